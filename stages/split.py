"""DVC stage `split`: patient-level train/val/test split. Usage: split.py

A thin entry point (see dvc.yaml): it imports only the library function it runs, so its imports are its code.
"""

import sys

from medseg.data.split import split_from_params
from medseg.entry import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage(split_from_params, sys.argv[1:], with_arch=False))
