"""DVC stage `export@<arch>`: a thin entry point over the medseg library (see dvc.yaml). Usage: export.py ARCH"""

import sys

from medseg.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["export", *sys.argv[1:]]))
