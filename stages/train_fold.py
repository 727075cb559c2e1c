"""DVC stage `train_fold@<arch>-<fold>`: train one architecture on one cross-validation fold. Usage: train_fold.py ARCH FOLD

A thin entry point (see dvc.yaml): it imports only the library function it runs, so its imports are its code.
"""

import sys

from medseg.entry import run_stage
from medseg.nnunet.train import is_nnunet_entry, train_nnunet_entry
from medseg.training.trainer import train_model

if __name__ == "__main__":
    # an nnU-Net entry (nnunet_2d, nnunet_resenc_m_2d) writes the same outputs its own way
    run = train_nnunet_entry if sys.argv[1:] and is_nnunet_entry(sys.argv[1]) else train_model
    raise SystemExit(run_stage(run, sys.argv[1:], with_arch=True, with_fold=True))
