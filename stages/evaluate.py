"""DVC stage `evaluate@<arch>`: evaluate one architecture on the test split. Usage: evaluate.py ARCH

A thin entry point (see dvc.yaml): it imports only the library function it runs, so its imports are its code.
"""

import sys

from medseg.entry import run_stage
from medseg.evaluation.evaluate import evaluate_model

if __name__ == "__main__":
    raise SystemExit(run_stage(evaluate_model, sys.argv[1:], with_arch=True))
