"""Imports every module that registers models. Add new model modules here."""

import importlib
import logging

_log = logging.getLogger(__name__)

MODEL_MODULES = [
    "medseg.models.unet",  # original 2015 UNet and the nested UNet++
    "medseg.models.smp_models",  # segmentation_models_pytorch: UNet/UNet++/SegFormer with ResNet/EfficientNet/MiT
    "medseg.models.zoo",  # TransUNet, Swin-UNet, UperNet, Mask2Former, Mask R-CNN, TransNeXt stand-in
    "medseg.models.mamba.networks",  # VM-UNet, Mamba-UNet, Swin-UMamba, MSVM-UNet, U-Mamba-Bot
]

for _module in MODEL_MODULES:
    importlib.import_module(_module)
