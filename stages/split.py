"""DVC stage `split`: a thin entry point over the medseg library (see dvc.yaml)."""

import sys

from medseg.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["split", *sys.argv[1:]]))
