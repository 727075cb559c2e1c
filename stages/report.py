"""DVC stage `report`: comparison report over params.yaml models. Usage: report.py

A thin entry point (see dvc.yaml): it imports only the library function it runs, so its imports are its code.
"""

import sys

from medseg.entry import run_stage
from medseg.report import build_report

if __name__ == "__main__":
    raise SystemExit(run_stage(build_report, sys.argv[1:], with_arch=False))
