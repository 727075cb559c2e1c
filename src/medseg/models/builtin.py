"""Imports every module that registers models. Add new model modules here."""

import importlib
import logging

_log = logging.getLogger(__name__)

MODEL_MODULES = [
    "medseg.models.unet",  # original 2015 UNet and the nested UNet++
    "medseg.models.smp_models",  # segmentation_models_pytorch: UNet/UNet++/SegFormer with ResNet/EfficientNet/MiT
    "medseg.models.zoo",  # TransUNet, Swin-UNet, UperNet on DeiT/BEiT, TransNeXt stand-in
    "medseg.models.detection",  # Mask2Former and Mask R-CNN as dense semantic segmenters
    "medseg.models.mamba.networks",  # VM-UNet, Mamba-UNet, Swin-UMamba, MSVM-UNet, U-Mamba-Bot
]

for _module in MODEL_MODULES:
    importlib.import_module(_module)
