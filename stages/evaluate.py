"""DVC stage `evaluate@<arch>`: evaluate one architecture on the test split. Usage: evaluate.py ARCH

A thin entry point (see dvc.yaml): it imports only the library function it runs, so its imports are its code.
"""

import sys

from medseg.entry import run_stage
from medseg.evaluation.evaluate import evaluate_model
from medseg.nnunet.evaluate import evaluate_nnunet_entry
from medseg.nnunet.train import is_nnunet_entry

if __name__ == "__main__":
    # an nnU-Net entry (nnunet_2d, nnunet_resenc_m_2d) writes the same outputs its own way
    run = evaluate_nnunet_entry if sys.argv[1:] and is_nnunet_entry(sys.argv[1]) else evaluate_model
    raise SystemExit(run_stage(run, sys.argv[1:], with_arch=True))
