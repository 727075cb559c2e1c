"""Serve a registered model over HTTP with MLflow's scoring server: a NIfTI volume or a 2D image in, its mask out.

    mlflow models serve -m models:/<name>@champion --env-manager local --host 127.0.0.1 -p 5001

Request (one case): `{"inputs": {"nifti_base64": "<base64 of a .nii or .nii.gz>"}}` or `{"inputs": {"png_base64":
"<base64 of a PNG, or any 2D image Pillow reads>"}}`; the same column in `dataframe_split` / `dataframe_records` works
too (the server hands the model a one-row DataFrame either way).
Response: `{"predictions": {"mask_nifti_base64" | "mask_png_base64": ..., "class_names": [...], "label_values": [...],
"voxels": {class name: count}}}`; the mask is the file `medseg predict` writes for that input (the card's
preprocessing, raw label values, the input's header, affine and qform/sform; gzipped when the input was).

Limits, checked before any voxel is decoded: the payload's base64 length (MEDSEG_SERVE_MAX_BYTES, default 512 MiB)
and the voxels a NIfTI header (or pixels an image header) declares (MEDSEG_SERVE_MAX_VOXELS, default 512*512*1024),
so a few hundred bytes declaring 2048^3 float32 never allocate 32 GB. Refusals raise `PayloadRefused`, an
MlflowException with INVALID_PARAMETER_VALUE: the server answers 400 with the message.

A registered version is one MLflow model with two flavors over one model.onnx: `python_function` (MedsegSegmenter,
what the server runs) and `onnx` (`mlflow.onnx.load_model` gives the ModelProto). `save_model` is the flavor hook
`medseg.registry` passes to `mlflow.models.Model.log`.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from medseg.card import ModelCard
from medseg.errors import PredictError
from medseg.predict import load_predictor, predict_files

NIFTI_KEY, PNG_KEY = "nifti_base64", "png_base64"
MAX_BYTES_ENV, MAX_VOXELS_ENV = "MEDSEG_SERVE_MAX_BYTES", "MEDSEG_SERVE_MAX_VOXELS"
DEFAULT_MAX_BYTES = 512 * 1024**2  # base64 characters
DEFAULT_MAX_VOXELS = 512 * 512 * 1024
ONNX_ARTIFACT = "model_onnx"  # the pyfunc artifact key of model.onnx
_NIFTI_HEADER_BYTES = 540  # a NIfTI-2 header; a NIfTI-1 header is the first 348 bytes


class PayloadRefused(MlflowException):
    """A request this model does not segment; the scoring server answers HTTP 400 with the message.

    The server rewrites the message of an MlflowException raised in predict to "Failed to predict data '<the whole
    request>'. Error: <message>"; for a payload refused as too large that would send the payload back, so the
    echoed request is cut to its first characters.
    """

    _ECHO = 200

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        own = getattr(self, "_message", value)
        if len(value) > len(own) + self._ECHO and value.endswith(own):
            value = f"{value[: self._ECHO]}… (request cut) {own}"
        self._message = value


class MedsegSegmenter(mlflow.pyfunc.PythonModel):
    """The pyfunc of a registered model: `medseg predict` for one base64 NIfTI or image (module docstring)."""

    def load_context(self, context) -> None:
        self.predictor = load_predictor(context.artifacts[ONNX_ARTIFACT])
        # Read once at start: a bad value stops the server before it serves anything.
        self.max_bytes = _env_limit(MAX_BYTES_ENV, DEFAULT_MAX_BYTES)
        self.max_voxels = _env_limit(MAX_VOXELS_ENV, DEFAULT_MAX_VOXELS)

    def predict(self, context, model_input, params=None) -> dict[str, Any]:
        key, text = _payload(model_input)
        if len(text) > self.max_bytes:
            raise PayloadRefused(f"{key}: {len(text)} base64 characters, over {MAX_BYTES_ENV}={self.max_bytes}")
        try:
            data = base64.b64decode(text)
        except (binascii.Error, ValueError) as exc:
            raise PayloadRefused(f"{key}: not base64 ({exc})") from exc
        if key == NIFTI_KEY:
            shape, suffix = _nifti_shape(data), ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
        else:
            shape, suffix = _image_shape(data), ".png"
        if math.prod(shape) > self.max_voxels:
            raise PayloadRefused(f"{key}: the header declares shape {list(shape)} = {math.prod(shape)} voxels, "
                                 f"over {MAX_VOXELS_ENV}={self.max_voxels}")
        with tempfile.TemporaryDirectory(prefix="medseg-serve-") as tmp:
            # predict_files is `medseg predict`: the same checks, preprocessing and written file, byte for byte.
            source = Path(tmp) / f"payload{suffix}"
            source.write_bytes(data)
            try:
                (summary,) = predict_files(self.predictor, source, Path(tmp) / "out")
            except PredictError as exc:
                raise PayloadRefused(f"{key}: {exc.problem}") from exc
            mask = base64.b64encode(Path(summary["output"]).read_bytes()).decode("ascii")
        card = self.predictor.card
        return {f"mask_{key}": mask, "class_names": list(card.class_names), "label_values": list(card.label_values),
                "voxels": summary["voxels"]}


def _env_limit(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}={value!r}: expected a positive whole number")
    return int(value)


def _payload(model_input: Any) -> tuple[str, str]:
    """(key, base64 text) of the one case in a request: a mapping, or the one-row DataFrame the server builds."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if len(model_input) != 1:
            raise PayloadRefused(f"one case per request, got {len(model_input)} rows")
        model_input = model_input.iloc[0].to_dict()
    if not isinstance(model_input, Mapping):
        raise PayloadRefused(f"expected {{{NIFTI_KEY!r} or {PNG_KEY!r}: base64 text}}, "
                             f"got {type(model_input).__name__}")
    given = {key: value for key, value in model_input.items() if key in (NIFTI_KEY, PNG_KEY) and isinstance(value, str)}
    if len(given) != 1:
        raise PayloadRefused(f"expected exactly one of {NIFTI_KEY!r}, {PNG_KEY!r} (base64 text), "
                             f"got {list(model_input)}")
    return next(iter(given.items()))


def _nifti_shape(data: bytes) -> tuple[int, ...]:
    """The dims a NIfTI-1/-2 header declares; of a .nii.gz only the header's bytes are gunzipped."""
    head = data[:_NIFTI_HEADER_BYTES]
    if data[:2] == b"\x1f\x8b":
        inflate, view, head = zlib.decompressobj(16 + zlib.MAX_WBITS), memoryview(data), b""
        try:
            for start in range(0, len(view), 4096):  # small chunks: zlib keeps unconsumed input as a copy
                head += inflate.decompress(view[start : start + 4096], _NIFTI_HEADER_BYTES - len(head))
                if len(head) >= _NIFTI_HEADER_BYTES or inflate.eof:
                    break
        except zlib.error as exc:
            raise PayloadRefused(f"{NIFTI_KEY}: gzip data is corrupt ({exc})") from exc
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(f"{endian}i", head[:4])[0] == 348:
            dims = struct.unpack(f"{endian}8h", head[40:56])
            break
        if len(head) >= 540 and struct.unpack(f"{endian}i", head[:4])[0] == 540:
            dims = struct.unpack(f"{endian}8q", head[16:80])
            break
    else:
        raise PayloadRefused(f"{NIFTI_KEY}: not a NIfTI-1 or NIfTI-2 file (no header)")
    if not 1 <= dims[0] <= 7 or min(dims[1 : dims[0] + 1]) < 1:
        raise PayloadRefused(f"{NIFTI_KEY}: the header declares invalid dims {list(dims)}")
    return dims[1 : dims[0] + 1]


def _image_shape(data: bytes) -> tuple[int, ...]:
    """(H, W) an image header declares; Pillow opens lazily and decodes no pixel here."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size[::-1]
    except Exception as exc:  # PIL raises many types for truncated or foreign files (and decompression bombs)
        raise PayloadRefused(f"{PNG_KEY}: cannot read image ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------------------------------- the MLflow model
def payload_signature():
    """The pyfunc's signature: the request and response of the module docstring."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Map, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, NIFTI_KEY, required=False),
                       ColSpec(DataType.string, PNG_KEY, required=False)]),
        outputs=Schema([ColSpec(DataType.string, f"mask_{NIFTI_KEY}", required=False),
                        ColSpec(DataType.string, f"mask_{PNG_KEY}", required=False),
                        ColSpec(Array(DataType.string), "class_names"), ColSpec(Array(DataType.long), "label_values"),
                        ColSpec(Map(DataType.long), "voxels")]),
    )


def example_payload(card: ModelCard) -> dict[str, str]:
    """A request this model accepts (an 8x8 ramp, one slice): the input example MLflow serves once at logging (so a
    model that cannot serve is reported then) and shows as the request format."""
    ramp = np.arange(64, dtype=np.float32).reshape(8, 8)
    channels = card.image_channels
    if card.input_kind == "image2d":
        from PIL import Image

        pixels = ramp.astype(np.uint8) if channels == 1 else np.repeat(ramp.astype(np.uint8)[..., None], channels, -1)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return {PNG_KEY: base64.b64encode(buffer.getvalue()).decode("ascii")}
    import nibabel as nib

    volume = ramp[:, :, None] if channels == 1 else np.repeat(ramp[:, :, None, None], channels, -1)
    data = gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes(), mtime=0)
    return {NIFTI_KEY: base64.b64encode(data).decode("ascii")}


def save_model(path: str, mlflow_model, onnx_path: str | Path, card: ModelCard, pip_requirements: list[str]) -> None:
    """Flavor hook of `mlflow.models.Model.log(flavor=medseg.serving, ...)`: the pyfunc model with model.onnx as its
    artifact, plus the `onnx` flavor pointing at that same file (one copy, byte for byte the exported one)."""
    import onnx
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.onnx import FLAVOR_NAME, ONNX_EXECUTION_PROVIDERS

    mlflow.pyfunc.save_model(
        path,
        python_model=MedsegSegmenter(),
        artifacts={ONNX_ARTIFACT: str(onnx_path)},
        mlflow_model=mlflow_model,
        signature=payload_signature(),
        input_example=example_payload(card),
        pip_requirements=pip_requirements,
    )
    data = mlflow_model.flavors[mlflow.pyfunc.FLAVOR_NAME]["artifacts"][ONNX_ARTIFACT]["path"]  # relative to path
    mlflow_model.add_flavor(FLAVOR_NAME, onnx_version=onnx.__version__, data=data, providers=ONNX_EXECUTION_PROVIDERS)
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))
