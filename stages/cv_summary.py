"""DVC stage `cv_summary@<arch>`: one architecture's out-of-fold scores and fold ensemble. Usage: cv_summary.py ARCH

A thin entry point (see dvc.yaml): it imports only the library function it runs, so its imports are its code.
"""

import sys

from medseg.entry import run_stage
from medseg.evaluation.cross_validation import cv_summary

if __name__ == "__main__":
    raise SystemExit(run_stage(cv_summary, sys.argv[1:], with_arch=True))
