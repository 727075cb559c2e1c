"""DVC stage `ingest`: a thin entry point over the medseg library (see dvc.yaml)."""

import sys

from medseg.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["ingest", *sys.argv[1:]]))
