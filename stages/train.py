"""DVC stage `train@<arch>`: a thin entry point over the medseg library (see dvc.yaml). Usage: train.py ARCH"""

import sys

from medseg.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
