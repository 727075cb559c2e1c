"""DVC stage `register@<arch>`: log and register one architecture in MLflow. Usage: register.py ARCH

A thin entry point (see dvc.yaml): it imports only the library function it runs, so its imports are its code.
"""

import sys

from medseg.entry import run_stage
from medseg.tracking.registry import register_model_version

if __name__ == "__main__":
    raise SystemExit(run_stage(register_model_version, sys.argv[1:], with_arch=True))
