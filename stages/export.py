"""DVC stage `export@<arch>`: export one architecture to ONNX and check parity. Usage: export.py ARCH

A thin entry point (see dvc.yaml): it imports only the library function it runs, so its imports are its code.
"""

import sys

from medseg.deployment.export import export_model
from medseg.entry import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage(export_model, sys.argv[1:], with_arch=True))
