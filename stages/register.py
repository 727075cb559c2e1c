"""DVC stage `register@<arch>`: a thin entry point over the medseg library (see dvc.yaml). Usage: register.py ARCH"""

import sys

from medseg.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["register", *sys.argv[1:]]))
