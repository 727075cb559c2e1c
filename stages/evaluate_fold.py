"""DVC stage `evaluate_fold@<arch>-<fold>`: score one fold's model on its held-out patients. Usage: evaluate_fold.py ARCH FOLD

A thin entry point (see dvc.yaml): it imports only the library function it runs, so its imports are its code.
"""

import sys

from medseg.entry import run_stage
from medseg.evaluation.cross_validation import evaluate_fold
from medseg.nnunet.evaluate import evaluate_nnunet_fold
from medseg.nnunet.train import is_nnunet_entry

if __name__ == "__main__":
    # an nnU-Net entry (nnunet_2d, nnunet_resenc_m_2d) writes the same outputs its own way
    run = evaluate_nnunet_fold if sys.argv[1:] and is_nnunet_entry(sys.argv[1]) else evaluate_fold
    raise SystemExit(run_stage(run, sys.argv[1:], with_arch=True, with_fold=True))
