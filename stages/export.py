"""DVC stage `export@<arch>`: export one architecture to ONNX and check parity. Usage: export.py ARCH

A thin entry point (see dvc.yaml): it imports only the library function it runs, so its imports are its code.
"""

import sys

from medseg.deployment.export import export_model
from medseg.entry import run_stage
from medseg.nnunet.export import export_nnunet_entry
from medseg.nnunet.train import is_nnunet_entry

if __name__ == "__main__":
    # an nnU-Net entry (nnunet_2d, nnunet_resenc_m_2d) writes the same outputs its own way
    run = export_nnunet_entry if sys.argv[1:] and is_nnunet_entry(sys.argv[1]) else export_model
    raise SystemExit(run_stage(run, sys.argv[1:], with_arch=True))
