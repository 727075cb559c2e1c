"""Mamba (selective state space) segmentation networks and their building blocks.

- `medseg.models.mamba.selective_scan.selective_scan`: the S6 scan, mamba_ssm's fused CUDA kernel when available,
  else a chunked pure-PyTorch scan (not re-exported here, so the submodule name stays the module).
- `ss2d`: SS2D / VSS blocks (VMamba) and the 1D Mamba layer; `count_scan_gflops` for the scan's analytic cost.
- `networks`: vm_unet, mamba_unet, swin_umamba, msvm_unet, umamba_bot (registered in medseg.models).
"""

from medseg.models.mamba.ss2d import SS2D, MambaLayer, VSSBlock, count_scan_gflops

__all__ = ["SS2D", "MambaLayer", "VSSBlock", "count_scan_gflops"]
