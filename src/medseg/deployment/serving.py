"""Serve a registered model over HTTP with MLflow's scoring server: a NIfTI volume or a 2D image in, its mask out.

    mlflow models serve -m models:/<name>@champion --env-manager local --host 127.0.0.1 -p 5001

Request (one case): `{"inputs": {"nifti_base64": "<base64 of a .nii or .nii.gz>"}}` or `{"inputs": {"png_base64":
"<base64 of a PNG, or any 2D image Pillow reads>"}}`; the same column in `dataframe_split` / `dataframe_records` works
too (the server hands the model a one-row DataFrame either way).
Response: `{"predictions": {"mask_nifti_base64" | "mask_png_base64": ..., "class_names": [...], "label_values": [...],
"voxels": {class name: count}}}`; the mask is the file `medseg predict` writes for that input (the card's
preprocessing, raw label values, the input's header, affine and qform/sform; gzipped when the input was).

Limits, checked before any voxel is decoded: the payload's base64 length (MEDSEG_SERVE_MAX_BYTES, default 512 MiB);
the bytes of voxels a NIfTI header declares, from its shape and voxel type, or of pixels an image header declares
(MEDSEG_SERVE_MAX_VOLUME_BYTES, default 512 MiB), so a few hundred bytes declaring 2048^3 float32 never allocate
32 GB; the compression ratio and truncation rules of every NIfTI medseg reads (medseg.data.nifti_header: a 0.7 MB
gzip declaring 512 MiB is a bomb); only real-valued voxel types (no complex, no RGB). Refusals raise
`PayloadRefused`, an MlflowException with INVALID_PARAMETER_VALUE: the server answers 400 with the message.

Each server worker segments MEDSEG_SERVE_MAX_CONCURRENT cases at once (default 1: ONNX Runtime already uses every
core it is given) and lets MEDSEG_SERVE_MAX_QUEUED more wait for a slot (default 32), each no longer than its own
time; a request beyond those is answered 503 at once (`ServerBusy`), and so is one whose wait used up its time.
A case's time (MEDSEG_SERVE_MAX_SECONDS, default the scoring server's request timeout
MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT less 10 %, at least 2 s less) counts from its arrival: when it is up the
answer is a 504 from the model with the reason, before the server's own 504, and the work does not go on behind it.

A registered version is one MLflow model with two flavors over one model.onnx: `python_function` (MedsegSegmenter,
what the server runs) and `onnx` (`mlflow.onnx.load_model` gives the ModelProto). `save_model` is the flavor hook
`medseg.tracking.registry` passes to `mlflow.models.Model.log`.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from medseg.config import env_number
from medseg.data.nifti_header import ReadLimits, check_nifti_bytes
from medseg.deployment.card import ModelCard
from medseg.deployment.predict import Deadline, load_predictor, predict_files
from medseg.errors import IngestError, PredictError, PredictTimeout

NIFTI_KEY, PNG_KEY = "nifti_base64", "png_base64"
MAX_BYTES_ENV, MAX_VOLUME_BYTES_ENV = "MEDSEG_SERVE_MAX_BYTES", "MEDSEG_SERVE_MAX_VOLUME_BYTES"
MAX_CONCURRENT_ENV, MAX_QUEUED_ENV = "MEDSEG_SERVE_MAX_CONCURRENT", "MEDSEG_SERVE_MAX_QUEUED"
MAX_SECONDS_ENV = "MEDSEG_SERVE_MAX_SECONDS"
DEFAULT_MAX_QUEUED = 32
SERVER_TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # the scoring server answers 504 after it
DEFAULT_MAX_BYTES = 512 * 1024**2  # base64 characters
DEFAULT_MAX_VOLUME_BYTES = 512 * 1024**2  # a 512x512x1024 int16 CT
DEFAULT_SERVER_TIMEOUT_S = 60  # MLflow's default of SERVER_TIMEOUT_ENV
ONNX_ARTIFACT = "model_onnx"  # the pyfunc artifact key of model.onnx


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


class ServerBusy(MlflowException):
    """Every segmentation slot of this worker is taken: HTTP 503 at once (retry later, or add workers)."""

    def __init__(self, message: str):
        super().__init__(message, error_code=TEMPORARILY_UNAVAILABLE)


class CaseTooSlow(MlflowException):
    """The case outran its time (MEDSEG_SERVE_MAX_SECONDS): HTTP 504 from the model, the work stopped."""

    def __init__(self, message: str):
        super().__init__(message, error_code=DEADLINE_EXCEEDED)


class MedsegSegmenter(mlflow.pyfunc.PythonModel):
    """The pyfunc of a registered model: `medseg predict` for one base64 NIfTI or image (module docstring)."""

    def load_context(self, context) -> None:
        self.predictor = load_predictor(context.artifacts[ONNX_ARTIFACT])
        # Read once at start: a bad value stops the server before it serves anything.
        self.max_bytes = env_number(MAX_BYTES_ENV, DEFAULT_MAX_BYTES)
        self.limits = ReadLimits(max_bytes=env_number(MAX_VOLUME_BYTES_ENV, DEFAULT_MAX_VOLUME_BYTES),
                                 max_ratio=ReadLimits.from_env().max_ratio, bytes_setting=MAX_VOLUME_BYTES_ENV)
        self.max_concurrent = env_number(MAX_CONCURRENT_ENV, 1)
        self.max_queued = env_number(MAX_QUEUED_ENV, DEFAULT_MAX_QUEUED, int, minimum=0)
        self.slots = threading.BoundedSemaphore(self.max_concurrent)  # the server calls predict from threads
        self.admitted = threading.BoundedSemaphore(self.max_concurrent + self.max_queued)  # running + waiting
        server_timeout = env_number(SERVER_TIMEOUT_ENV, DEFAULT_SERVER_TIMEOUT_S)
        margin = max(2.0, 0.1 * server_timeout)  # decoding, writing and sending the answer still take time
        self.max_seconds = min(env_number(MAX_SECONDS_ENV, server_timeout), max(1.0, server_timeout - margin))

    def predict(self, context, model_input, params=None) -> dict[str, Any]:
        deadline = Deadline.after(self.max_seconds, MAX_SECONDS_ENV)
        busy = (f"this worker is segmenting {self.max_concurrent} case(s) ({MAX_CONCURRENT_ENV}) with "
                f"{self.max_queued} waiting ({MAX_QUEUED_ENV}); retry later")
        if not self.admitted.acquire(blocking=False):
            raise ServerBusy(f"busy: {busy}")
        try:
            if not self.slots.acquire(timeout=max(0.0, deadline.at - time.monotonic())):
                raise ServerBusy(f"busy: no slot within {self.max_seconds:g} s ({MAX_SECONDS_ENV}): {busy}")
            try:
                return self._segment(model_input, deadline)
            finally:
                self.slots.release()
        finally:
            self.admitted.release()

    def _segment(self, model_input: Any, deadline: Deadline) -> dict[str, Any]:
        key, text = _payload(model_input)
        if len(text) > self.max_bytes:
            raise PayloadRefused(f"{key}: {len(text)} base64 characters, over {MAX_BYTES_ENV}={self.max_bytes}")
        try:
            data = base64.b64decode(text)
        except (binascii.Error, ValueError) as exc:
            raise PayloadRefused(f"{key}: not base64 ({exc})") from exc
        if key == NIFTI_KEY:
            try:
                check_nifti_bytes(data, key, self.limits)
            except IngestError as exc:
                raise PayloadRefused(f"{key}: {exc.problem}") from exc
            suffix = ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
        else:
            shape, pixel_bytes = _image_shape(data)
            if math.prod(shape) * pixel_bytes > self.limits.max_bytes:
                raise PayloadRefused(f"{key}: the header declares {shape[0]}x{shape[1]} pixels of {pixel_bytes} "
                                     f"byte(s), over {MAX_VOLUME_BYTES_ENV}={self.limits.max_bytes}")
            suffix = ".png"
        with tempfile.TemporaryDirectory(prefix="medseg-serve-") as tmp:
            # predict_files is `medseg predict`: the same checks, preprocessing and written file, byte for byte.
            source = Path(tmp) / f"payload{suffix}"
            source.write_bytes(data)
            try:
                (summary,) = predict_files(self.predictor, source, Path(tmp) / "out", deadline=deadline)
            except PredictTimeout as exc:
                raise CaseTooSlow(f"{key}: {exc.problem}") from exc
            except PredictError as exc:
                raise PayloadRefused(f"{key}: {exc.problem}") from exc
            mask = base64.b64encode(Path(summary["output"]).read_bytes()).decode("ascii")
        card = self.predictor.card
        return {f"mask_{key}": mask, "class_names": list(card.class_names), "label_values": list(card.label_values),
                "voxels": summary["voxels"]}


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


def _image_shape(data: bytes) -> tuple[tuple[int, int], int]:
    """((H, W), bytes a pixel) an image header declares; Pillow opens lazily and decodes no pixel here."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            # as decoded: a byte a band (1-bit and palette images decode to bytes), wider for 16/32-bit greyscale
            return image.size[::-1], {"I;16": 2, "I": 4, "F": 4}.get(image.mode, len(image.getbands()))
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
    """Flavor hook of `mlflow.models.Model.log(flavor=medseg.deployment.serving, ...)`: the pyfunc model with model.onnx as its
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
