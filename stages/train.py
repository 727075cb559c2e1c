"""DVC stage `train@<arch>`: train one architecture. Usage: train.py ARCH

A thin entry point (see dvc.yaml): it imports only the library function it runs, so its imports are its code.
"""

import sys

from medseg.entry import run_stage
from medseg.training.trainer import train_model

if __name__ == "__main__":
    raise SystemExit(run_stage(train_model, sys.argv[1:], with_arch=True))
