"""DVC stage `ingest`: ingest the dataset named in params.yaml. Usage: ingest.py

A thin entry point (see dvc.yaml): it imports only the library function it runs, so its imports are its code.
"""

import sys

from medseg.data.ingest import ingest_from_params
from medseg.entry import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage(ingest_from_params, sys.argv[1:], with_arch=False))
