"""DVC stage `evaluate@<arch>`: a thin entry point over the medseg library (see dvc.yaml). Usage: evaluate.py ARCH"""

import sys

from medseg.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
