"""DVC stage `evaluate_fold@<arch>-<fold>`: score one fold's model on its held-out patients. Usage: evaluate_fold.py ARCH FOLD

A thin entry point (see dvc.yaml): it imports only the library function it runs, so its imports are its code.
"""

import sys

from medseg.entry import run_stage
from medseg.evaluation.cross_validation import evaluate_fold

if __name__ == "__main__":
    raise SystemExit(run_stage(evaluate_fold, sys.argv[1:], with_arch=True, with_fold=True))
