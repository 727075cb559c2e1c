"""DVC stage `cv_summary@<arch>`: one architecture's out-of-fold scores and fold ensemble. Usage: cv_summary.py ARCH

A thin entry point (see dvc.yaml): it imports only the library function it runs, so its imports are its code.
"""

import sys

from medseg.entry import run_stage
from medseg.evaluation.cross_validation import cv_summary
from medseg.nnunet.evaluate import nnunet_cv_summary
from medseg.nnunet.train import is_nnunet_entry

if __name__ == "__main__":
    # an nnU-Net entry (nnunet_2d, nnunet_resenc_m_2d) writes the same outputs its own way
    run = nnunet_cv_summary if sys.argv[1:] and is_nnunet_entry(sys.argv[1]) else cv_summary
    raise SystemExit(run_stage(run, sys.argv[1:], with_arch=True))
