"""Apply an exported model to new scans: `medseg predict` (as nnU-Net's `nnUNetv2_predict`), on ONNX Runtime only.

The model is a `model.onnx` carrying the model card (`medseg.deployment.card`), a `models/<arch>/` folder, or a registered
version `models:/<name>@<alias>` / `models:/<name>/<version>` (downloaded with MLflow, the only case that imports
it). torch is never imported here: a deployment needs numpy, nibabel, pillow and onnxruntime.

Each case goes through the preprocessing training used (`medseg.data.preprocessing`, parameters from the card):
NIfTI volume -> canonical (RAS) orientation -> (D, C, H, W) slices -> normalisation -> 2.5D stacks at the training
size -> network -> logits resized back to the native slice size -> argmax, then back to the file's own voxel order
and written with its header, affine and qform/sform: label voxel (i, j, k) belongs to image voxel (i, j, k).
2D images (PNG/JPG/TIF/BMP) are one slice. Labels are written as the dataset's raw values (`card.label_values`;
a 0/255 binary mask dataset was ingested as 0/1, so its masks come out 0/1) or, with labels="index", as class
indices.

Every input is read and checked before the first output is written (channels, 2D vs 3D, unreadable or truncated
files, headers declaring more than the file holds, NaN/Inf voxels, outputs that would land on or inside an input),
so a bad case 40 stops the run before case 1. Outputs are written atomically; `resume` skips cases whose outputs
all exist.

No file medseg did not write is ever replaced: every output carries a mark of the case it segments (`Case.key`,
from the sha256 of its input files: the NIfTI header's `descrip`, a PNG text chunk, an npz array), and an existing
output that lacks the mark of the same case (a user's scan, a prediction of another scan with the same name) is
refused before anything is read, unless `overwrite` (`--overwrite`) or `resume` (which keeps it).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from medseg.data import checks, orientation
from medseg.data.clinical import ITK_SUFFIXES, is_dicom_file, is_itk_file
from medseg.data.formats import IMAGE_EXTENSIONS, read_volume, volume_stem
from medseg.data.preprocessing import normalise_image, volume_from_canonical_xyz
from medseg.deployment.card import ModelCard, card_from_metadata
from medseg.errors import ConfigError, IngestError, PredictError, PredictTimeout
from medseg.inference.inferer import NO_MIRRORING, segment_slices
from medseg.io import atomic_open, atomic_path, sha256_file
from medseg.runtime.progress import progress
from medseg.runtime.threads import onnxruntime_options, plan_threads

_log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
LABEL_KINDS = ("raw", "index")
# Mirroring test-time augmentation over the in-plane axes of (N, C, H, W): none, W, H, both (nnU-Net's 2D mirroring).
MIRROR_AXES = ((), (3,), (2,), (2, 3))
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net's <case>_0000.nii.gz
INPUT_KINDS = {"volume": ("a 3D volume", "3D NIfTI volumes"), "image2d": ("a 2D image", "2D images (PNG/JPG/TIF/BMP)")}
BATCH_INPUT_BYTES = 256 * 1024**2  # float32 network input of one call at most (fewer slices per call if need be)
SPACING_RATIO = 2.0  # warn when a case's voxel size differs from the training median by more than this factor
OUTPUT_MARK = "medseg prediction"  # + Case.key(): the NIfTI descrip (80 bytes), the PNG text chunk, the npz array
MARK_KEY = "medseg"  # the PNG text chunk's keyword and the npz array's name


@dataclass(frozen=True)
class Deadline:
    """A time budget for one call (serving: inside the scoring server's request timeout), checked between batches
    of slices, so that the work stops when the answer could no longer arrive in time."""

    at: float  # time.monotonic()
    seconds: float
    setting: str  # what to raise for longer cases

    @classmethod
    def after(cls, seconds: float, setting: str) -> "Deadline":
        return cls(time.monotonic() + seconds, seconds, setting)

    def check(self, progress: str) -> None:
        if time.monotonic() > self.at:
            raise PredictTimeout(f"stopped after {self.seconds:g} s ({progress}), the time this case may take "
                                 f"({self.setting}); send a smaller volume or raise {self.setting}")


# nnU-Net's tiles per ONNX Runtime call on a CPU: 4 tiles ran 6 % faster than 32 on 2 cores (docs/benchmarks.md,
# 2026-12-07); a GPU keeps the batch size asked for
NNUNET_CPU_TILES = 4


@dataclass
class Predictor:
    """An ONNX Runtime session and the card of the model it runs."""

    session: Any  # onnxruntime.InferenceSession
    card: ModelCard
    source: str
    batch_size: int = 32
    model_sha256: str | None = None  # of the model.onnx the session was opened from: its identity

    @property
    def native_order(self) -> bool:
        """An imported nnU-Net model sees the scan in its own voxel order (nnU-Net never reorients)."""
        return self.card.nnunet is not None

    def predict_volume(self, data_xyz: np.ndarray, affine: np.ndarray, *, labels: str = "raw",
                       tta: bool | None = None, spacing: tuple[float, float, float] | None = None) -> np.ndarray:
        """Labels for a NIfTI-ordered volume (x, y, z[, c]) with its affine, in the same voxel order (`spacing`
        (sz, sy, sx): the header's, which an nnU-Net model resamples from; default: the affine's)."""
        data = self._check_volume("volume", np.asarray(data_xyz))
        checks.check_finite("volume", data)
        if self.native_order:
            zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
            spacing = spacing or (float(zooms[2]), float(zooms[1]), float(zooms[0]))
            classes, _ = self._segment(volume_from_canonical_xyz(data), tta, probabilities=False, spacing=spacing)
            return self.label_array(classes.transpose(2, 1, 0), labels)
        canonical, _, ornt = _to_canonical("volume", data, affine)
        if spacing is None:
            zooms = orientation.canonical_zooms(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)), ornt)
            spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
        classes, _ = self._segment(volume_from_canonical_xyz(canonical), tta, probabilities=False, spacing=spacing)
        return self.label_array(_volume_to_source(classes, affine), labels)

    def predict_image(self, array_hw_or_hwc: np.ndarray, *, labels: str = "raw", tta: bool = False) -> np.ndarray:
        """Labels (H, W) for one 2D image (H, W) or (H, W, C) of raw intensities (0..255 for RGB)."""
        image = self._check_image("image", np.asarray(array_hw_or_hwc))
        classes, _ = self._segment(image, tta, probabilities=False)
        return self.label_array(classes[0], labels)

    def label_array(self, classes: np.ndarray, labels: str) -> np.ndarray:
        """Class indices -> what is written: raw label values (smallest dtype that holds them) or the indices."""
        _check_labels(labels)
        if labels == "index":
            return classes
        values = np.asarray(self.card.label_values)
        return values.astype(np.min_scalar_type(int(values.max())))[classes]

    def _segment(self, image_dchw: np.ndarray, tta: bool | None, probabilities: bool, deadline: Deadline | None = None,
                 spacing: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw (D, C, H, W) -> class indices (D, H, W) uint8 and, if asked, probabilities (D, K, H, W) float16
        (what is saved: half the memory of float32 for a K-class CT, sums to 1 within 1e-2). `tta` None: the
        model's default (mirroring for an nnU-Net model, as nnUNetv2_predict; none for medseg's networks)."""
        if self.native_order:
            return self._segment_nnunet(image_dchw, tta, probabilities, deadline, spacing), None
        return self.segment_normalised(normalise_image(image_dchw, self.card.normalisation), bool(tta),
                                       probabilities, deadline, spacing)

    def _segment_nnunet(self, image_dchw: np.ndarray, tta: bool | None, probabilities: bool,
                        deadline: Deadline | None, spacing: tuple[float, float, float] | None) -> np.ndarray:
        from medseg.nnunet.inference import NnunetRecipe, segment_case

        if probabilities:
            raise ConfigError(f"{self.source}: probabilities are not saved for imported nnU-Net models yet")
        recipe = NnunetRecipe.from_dict(self.card.nnunet)
        check = None if deadline is None else (lambda: deadline.check("segmenting with nnU-Net's sliding window"))
        on_cpu = self.session.get_providers()[0] == "CPUExecutionProvider"
        batch = min(self.batch_size, NNUNET_CPU_TILES) if on_cpu else self.batch_size
        classes = segment_case(image_dchw.transpose(1, 0, 2, 3), spacing or (1.0, 1.0, 1.0), recipe, self._run,
                               mirror=True if tta is None else bool(tta), batch_size=batch, check=check)
        return classes

    def segment_normalised(self, image: np.ndarray, tta: bool = False, probabilities: bool = False,
                           deadline: Deadline | None = None, spacing: Sequence[float] | None = None
                           ) -> tuple[np.ndarray, np.ndarray | None]:
        """_segment for a volume already normalised by the card's rule (an ingested (D, C, H, W) array), through
        the slice inferer with this session as its network, under the card's recipe (`spacing` (sz, sy, sx): the
        volume's, which a planned recipe resamples from; unknown: taken as the plan's); `deadline` is checked
        before each batch of slices."""
        card = self.card
        plan = card.plan
        if plan.planned and spacing is None:
            spacing = (1.0, *plan.target_spacing)
        return segment_slices(self._run, image, card.image_size, card.context, self.batch_size,
                              probabilities=np.float16 if probabilities else None,
                              mirror_axes=MIRROR_AXES if tta else NO_MIRRORING, deadline=deadline,
                              plan=plan, spacing=spacing)

    def _run(self, x: np.ndarray) -> np.ndarray:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        return self.session.run([outputs[0].name], {inputs[0].name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def _check_kind(self, source: str | Path, kind: str) -> None:
        if self.card.input_kind != kind:
            raise PredictError(source, f"is {INPUT_KINDS[kind][0]}, but {self.source} segments "
                                       f"{INPUT_KINDS[self.card.input_kind][1]} (input_kind {self.card.input_kind})")

    def _check_volume(self, source: str | Path, data: np.ndarray) -> np.ndarray:
        """(x, y, z) or (x, y, z, c) with the model's channel count, else PredictError naming `source`."""
        self._check_kind(source, "volume")
        if data.ndim not in (3, 4) or 0 in data.shape:
            raise PredictError(source, f"expected a 3D volume (x, y, z) or 4D with channels last, got shape {data.shape}")
        self._check_channels(source, 1 if data.ndim == 3 else data.shape[3], data.shape)
        return data

    def _check_image(self, source: str | Path, array: np.ndarray) -> np.ndarray:
        """(H, W[, C]) with the model's channel count and finite values -> (1, C, H, W)."""
        self._check_kind(source, "image2d")
        if array.ndim not in (2, 3) or 0 in array.shape:
            raise PredictError(source, f"expected a 2D image (H, W) or (H, W, C), got shape {array.shape}")
        self._check_channels(source, 1 if array.ndim == 2 else array.shape[2], array.shape)
        checks.check_finite(source, array)
        return array[None, None] if array.ndim == 2 else array.transpose(2, 0, 1)[None]

    def _check_channels(self, source: str | Path, channels: int, shape: tuple[int, ...]) -> None:
        expected = self.card.image_channels
        if channels != expected:
            raise PredictError(source, f"has {channels} channel(s) (shape {shape}), but {self.source} expects "
                                       f"{expected} ({self.card.modality}); a multi-channel case is one 4D file "
                                       "(channels last) or nnU-Net channel files <case>_0000.nii.gz, <case>_0001.nii.gz, ...")


def _check_labels(labels: str) -> None:
    if labels not in LABEL_KINDS:
        raise ConfigError(f"labels={labels!r}; expected one of {', '.join(LABEL_KINDS)}")


def load_predictor(model: str | Path, device: str = "cpu", *, tracking_uri: str | None = None,
                   batch_size: int = 32, threads: int | None = None) -> Predictor:
    """A Predictor for a model.onnx, a models/<arch>/ folder or a models:/ registry URI (`tracking_uri`, else
    MLFLOW_TRACKING_URI, names the MLflow store). ONNX Runtime's intra-op threads: `threads`, else the thread
    policy's (medseg.runtime.threads: the usable cores, MEDSEG_PARALLEL_JOBS, OMP_NUM_THREADS)."""
    text = str(model)
    if text.startswith("models:/"):
        with tempfile.TemporaryDirectory(prefix="medseg-predict-") as tmp:
            # ONNX Runtime reads the whole graph (external data included) into the session: the download can go.
            return _open_session(_download_registered(text, tracking_uri, Path(tmp)), device, batch_size, text,
                                 threads)
    path = Path(model)
    if path.is_dir():
        path = path / "model.onnx"
    return _open_session(path, device, batch_size, str(path), threads)


def _download_registered(uri: str, tracking_uri: str | None, dest: Path) -> Path:
    import mlflow

    from medseg.tracking.store import mlflow_store

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise ConfigError(f"{uri}: no MLflow store to resolve it in; pass --tracking-uri or set MLFLOW_TRACKING_URI")
    # MLflow resolves models:/ names in the global registry URI whatever download_artifacts is given (3.17)
    with mlflow_store(tracking_uri):
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
        except Exception as exc:  # MlflowException for unknown names/aliases, OSError/HTTP errors for the store
            raise PredictError(uri, f"cannot download the model from {tracking_uri} ({type(exc).__name__}: {exc})") from exc
    found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
    if len(found) != 1 or found[0].suffix != ".onnx":
        raise PredictError(uri, f"expected one .onnx file in the registered model, found {[p.name for p in found]}")
    return found[0]


def _open_session(path: Path, device: str, batch_size: int, source: str, threads: int | None = None) -> Predictor:
    import onnxruntime as ort

    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r}; expected cpu or cuda")
    if int(batch_size) < 1:
        raise ConfigError(f"batch size {batch_size}: expected at least 1 slice per network call")
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError(f"device cuda: this ONNX Runtime has no CUDAExecutionProvider (it has "
                              f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use cpu")
        providers.insert(0, "CUDAExecutionProvider")
    if not path.is_file():
        raise PredictError(path, "ONNX model not found (a model.onnx, a models/<arch>/ folder or models:/<name>@<alias>)")
    # an explicit count (--threads) wins; else the policy's (ONNX Runtime itself ignores OMP_NUM_THREADS)
    options = onnxruntime_options(threads or plan_threads().intra_op)
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types for truncated or foreign files
        raise PredictError(path, f"not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    if session.get_providers()[0] != providers[0]:  # ONNX Runtime falls back to CPU silently when CUDA fails to load
        raise ConfigError(f"device {device}: ONNX Runtime could not start {providers[0]} (CUDA/cuDNN libraries?)")
    card = card_from_metadata(session.get_modelmeta().custom_metadata_map, source)
    graph_channels = session.get_inputs()[0].shape[1]
    if isinstance(graph_channels, int) and graph_channels != card.in_channels:
        raise PredictError(path, f"the graph takes {graph_channels} input channels, its model card says "
                                 f"{card.in_channels}; re-export the model")
    outputs = session.get_outputs()[0].shape
    graph_classes = outputs[1] if len(outputs) == 4 else None
    if len(outputs) != 4 or (isinstance(graph_classes, int) and graph_classes != card.num_classes):
        raise PredictError(path, f"the graph's output {outputs} is not (batch, {card.num_classes} classes, H, W) as "
                                 f"its model card's {card.num_classes} class names say; re-export the model")
    # A batch's network input stays under BATCH_INPUT_BYTES whatever the card's image size.
    per_slice = card.in_channels * card.image_size[0] * card.image_size[1] * 4
    return Predictor(session, card, source, max(1, min(int(batch_size), BATCH_INPUT_BYTES // per_slice)),
                     sha256_file(path))


# ------------------------------------------------------------------------------------------------ cases and files


@dataclass
class Case:
    """One prediction: its input file(s) (channel files in channel order) and the files it writes."""

    name: str
    inputs: list[Path]
    labels: Path
    probabilities: Path | None

    @property
    def outputs(self) -> list[Path]:
        return [self.labels] + ([self.probabilities] if self.probabilities else [])

    def key(self) -> str:
        """What marks this case's outputs as medseg's: sha256 of its input files' bytes, in channel order (a DICOM
        series: its files in name order; the same scan under another name or folder is the same case; another scan
        under the same name is not)."""
        files = [f for p in self.inputs for f in (_series_files(p) if p.is_dir() else [p])]
        return hashlib.sha256(" ".join(sha256_file(p) for p in files).encode()).hexdigest()[:32]

    @property
    def kind(self) -> str:
        """nifti | itk | dicom | image2d: what the input is, and what the labels are written as."""
        return _kind(self.inputs[0])


@dataclass
class _CaseImage:
    image: np.ndarray  # (D, C, H, W) raw intensities, canonical orientation for volumes
    affine: np.ndarray | None  # the source file's affine (volumes)
    spacing: tuple[float, float, float] | None  # (sz, sy, sx) mm, None where unknown


def _nifti_stem(path: Path) -> str | None:
    name = path.name
    return next((name[: -len(s)] for s in NIFTI_SUFFIXES if name.lower().endswith(s)), None)


def _series_files(folder: Path) -> list[Path]:
    from medseg.data.clinical import series_files

    return series_files(folder)


def _is_series_folder(path: Path) -> bool:
    """A folder holding DICOM files itself (a series; the first file decides, read no further than its preamble)."""
    if not path.is_dir():
        return False
    first = next((p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")), None)
    return first is not None and is_dicom_file(first)


def _kind(path: Path) -> str:
    if path.is_dir():
        return "dicom"
    if _nifti_stem(path) is not None:
        return "nifti"
    return "itk" if is_itk_file(path) else "image2d"


def _volume_stem(path: Path) -> str | None:
    """The case name of a volume input (NIfTI, NRRD/MHA/MHD file or DICOM series folder), None for a 2D image."""
    return path.name if path.is_dir() else volume_stem(path)


# what a case's labels are written as: the input's own format (NRRD header + data in one file for .nhdr, MHA for .mhd)
LABEL_SUFFIX = {".nrrd": ".nrrd", ".nhdr": ".nrrd", ".mha": ".mha", ".mhd": ".mha"}
SEG_SUFFIX = "_seg.dcm"  # a DICOM series' labels: a DICOM Segmentation object


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _input_files(inputs: Path) -> list[Path]:
    """The cases' inputs in `inputs`: a file, a DICOM series folder, or a folder of files and series folders."""
    if _is_series_folder(inputs):
        return [inputs]
    if inputs.is_dir():
        files = sorted(p for p in inputs.iterdir() if not p.name.startswith(".") and (
            _is_series_folder(p) or p.is_file() and (_volume_stem(p) is not None or _is_image(p))))
        if not files:
            raise PredictError(inputs, f"no NIfTI ({', '.join(NIFTI_SUFFIXES)}), NRRD/MHA ({', '.join(ITK_SUFFIXES)}) "
                                       f"or image ({', '.join(IMAGE_EXTENSIONS)}) files, nor DICOM series folders")
        return files
    if not inputs.is_file():
        raise PredictError(inputs, "no such file or folder")
    if _volume_stem(inputs) is None and not _is_image(inputs):
        raise PredictError(inputs, f"not a supported input ({', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES + IMAGE_EXTENSIONS)}"
                                   ", or a DICOM series folder)")
    return [inputs]


def plan_cases(predictor: Predictor, inputs: str | Path | Iterable[str | Path], output_dir: str | Path,
               save_probabilities: bool = False) -> list[Case]:
    """The cases in `inputs` (files and/or folders) and the files they write; PredictError (nothing read yet) for
    inputs the model cannot take and outputs that would land on or inside an input."""
    card = predictor.card
    roots = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise PredictError(output_dir, "output folder is a file (an input?); pass a folder for the predictions")
    out_resolved = output_dir.resolve()
    files: dict[Path, Path] = {}  # resolved -> as given; a file named twice is one case
    for root in roots:
        if root.is_dir() and (out_resolved == root.resolve() or root.resolve() in out_resolved.parents):
            raise PredictError(output_dir, f"is inside the input folder {root}; write predictions elsewhere "
                                           "(inputs are never overwritten)")
        files.update((p.resolve(), p) for p in _input_files(root))
    singles: list[tuple[str, list[Path]]] = []
    channel_groups: dict[tuple[Path, str], list[tuple[int, Path]]] = {}
    for path in files.values():
        stem = _nifti_stem(path) if _kind(path) == "nifti" else _volume_stem(path)
        predictor._check_kind(path, "image2d" if stem is None else "volume")
        match = CHANNEL_FILE.match(stem) if stem is not None else None
        if match and card.image_channels > 1:
            channel_groups.setdefault((path.parent, match["case"]), []).append((int(match["channel"]), path))
        elif match and match["channel"] == "0000":  # nnU-Net's single-channel input case_0000 -> output case
            singles.append((match["case"], [path]))
        else:
            singles.append((path.stem if stem is None else stem, [path]))
    for (folder, name), members in channel_groups.items():
        members.sort()
        if [c for c, _ in members] != list(range(card.image_channels)):
            raise PredictError(folder / name, f"channel files {[p.name for _, p in members]} are not "
                                              f"{name}_0000 .. {name}_{card.image_channels - 1:04d}")
        singles.append((name, [p for _, p in members]))
    cases, writers = [], {}
    for name, paths in sorted(singles, key=lambda item: (item[0], str(item[1][0]))):
        kind = _kind(paths[0])
        if kind == "nifti":
            suffix = paths[0].name[len(_nifti_stem(paths[0])):]  # .nii stays .nii, .nii.gz stays .nii.gz
        elif kind == "itk":
            suffix = LABEL_SUFFIX[paths[0].name[len(_volume_stem(paths[0])):].lower()]
        else:
            suffix = SEG_SUFFIX if kind == "dicom" else ".png"
        case = Case(name, paths, output_dir / f"{name}{suffix}", output_dir / f"{name}.npz" if save_probabilities else None)
        for out in case.outputs:
            resolved = out.resolve()
            if resolved in files:
                raise PredictError(out, "output would overwrite an input; write predictions to another folder")
            if resolved in writers:
                raise PredictError(out, f"would be written for both {writers[resolved]} and {paths[0]}; rename one")
            writers[resolved] = paths[0]
        cases.append(case)
    return cases


def _read_case(predictor: Predictor, case: Case) -> _CaseImage:
    """Read and check one case's input(s); PredictError naming the file for anything the model cannot take."""
    try:
        if case.kind == "image2d":
            image = _read_image(case.inputs[0], predictor.card.image_channels)
            return _CaseImage(predictor._check_image(case.inputs[0], image), None, None)
        return _read_volume(predictor, case.inputs)
    except IngestError as exc:  # the shared readers and checks (medseg.data) name the file and the problem
        raise PredictError(exc.path, exc.problem) from exc


def _read_volume(predictor: Predictor, paths: list[Path]) -> _CaseImage:
    volumes = [read_volume(p) for p in paths]
    first = volumes[0]
    for path, vol in zip(paths, volumes):
        checks.check_finite(path, vol.data)
        checks.check_same_shape(path, first.data.shape, vol.data.shape)
        checks.check_affine(path, first.affine, vol.affine)  # channel files must share the grid, voxel for voxel
    data = first.data if len(volumes) == 1 else np.stack([v.data for v in volumes], axis=-1)
    data = predictor._check_volume(paths[0], data)
    if predictor.native_order:  # nnU-Net's reader: the file's voxel order, the header's spacing, known or not
        zooms = first.zooms[:3]
        return _CaseImage(volume_from_canonical_xyz(data), first.affine, (zooms[2], zooms[1], zooms[0]))
    canonical, _, ornt = _to_canonical(paths[0], data, first.affine)
    zooms = orientation.canonical_zooms(first.zooms[:3], ornt)
    spacing = (zooms[2], zooms[1], zooms[0]) if first.spacing_known else None
    return _CaseImage(volume_from_canonical_xyz(canonical), first.affine, spacing)


def _read_image(path: Path, channels: int) -> np.ndarray:
    """A 2D image as ingest reads it: RGB for 3-channel models, else as stored (16-bit greyscale kept)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB") if channels == 3 else im)
    except Exception as exc:  # PIL raises many types for truncated or foreign files
        raise PredictError(path, f"cannot read image ({type(exc).__name__}: {exc})") from exc
    if channels == 1 and array.ndim == 3 and (array[..., :3] == array[..., :1]).all():
        array = array[..., 0]  # greyscale saved as RGB(A)
    return array


def _to_canonical(source: str | Path, data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        return orientation.to_canonical(data, affine)
    except ValueError as exc:  # an affine without an orientation
        raise PredictError(source, str(exc)) from exc


def _volume_to_source(classes_dhw: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Canonical (D, H, W) = (z, y, x) -> the voxel order (x, y, z) of the file with `affine`."""
    return orientation.from_canonical(classes_dhw.transpose(2, 1, 0), affine)


def _probabilities_to_source(probs_dkhw: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Canonical (D, K, H, W) -> (K, x, y, z) in the voxel order of the file with `affine`."""
    return np.moveaxis(orientation.from_canonical(probs_dkhw.transpose(3, 2, 0, 1), affine), -1, 0)


def predict_files(
    predictor: Predictor,
    inputs: str | Path | Iterable[str | Path],
    output_dir: str | Path,
    *,
    labels: str = "raw",
    save_probabilities: bool = False,
    tta: bool | None = None,
    resume: bool = False,
    overwrite: bool = False,
    deadline: Deadline | None = None,
    algorithm_version: str | None = None,
) -> list[dict[str, Any]]:
    """Segment every case in `inputs` into `output_dir`; one summary per case (input files, output, seconds,
    voxels per class; `skipped` for cases `resume` found done). An existing output that is not this case's
    prediction by medseg is refused (PredictError, nothing written) unless `overwrite`; `deadline` stops the work
    (PredictTimeout) when it passes; `algorithm_version` is what a DICOM SEG names the model's version (default:
    medseg.deployment.dicom_seg.model_version)."""
    _check_labels(labels)
    if save_probabilities and predictor.native_order:
        raise ConfigError(f"{predictor.source}: probabilities are not saved for imported nnU-Net models yet; "
                          "predict without --save-probabilities")
    cases = plan_cases(predictor, inputs, output_dir, save_probabilities)
    skipped = [resume and all(os.path.lexists(p) for p in case.outputs) for case in cases]
    todo = [case for case, skip in zip(cases, skipped) if not skip]
    keys = {case.name: case.key() for case in todo}
    if not overwrite:
        for case in todo:
            _check_replaceable_outputs(case, keys[case.name])
    # Cases 2.. are read (and checked) twice, so that a truncated file or a NaN in the last case stops the run before
    # the first output is written; the first case is checked by its own read, before its output.
    for case in todo[1:]:
        _read_case(predictor, case)
        if deadline is not None:
            deadline.check(f"reading {case.name}")
    results = []
    with progress(total=len(todo), desc="predict", unit="case") as bar:
        for case, skip in zip(cases, skipped):
            if skip:
                results.append(_summary(case, 0.0, None, predictor.card))
                continue
            bar.set_postfix_str(case.name)
            results.append(_predict_case(predictor, case, labels, tta, keys[case.name], deadline,
                                         algorithm_version))
            bar.update()
    return results


def _check_replaceable_outputs(case: Case, key: str) -> None:
    """PredictError for an existing output of `case` that is not medseg's prediction of this very case."""
    for path in case.outputs:
        if os.path.lexists(path) and output_mark(path) != key:
            raise PredictError(path, f"exists and is not medseg's prediction of {case.inputs[0].name}; refusing to "
                                     "replace it (pass --overwrite to replace it, --continue to keep it and skip the "
                                     "case, or write the predictions to another folder)")


def output_mark(path: Path) -> str | None:
    """The case key an output medseg wrote carries, or None (another file, unreadable, a folder or a link)."""
    if path.is_symlink() or not path.is_file():
        return None
    name = path.name.lower()
    try:
        if name.endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            text = nib.load(str(path)).header["descrip"].item().decode("ascii", "replace")
        elif name.endswith(".npz"):
            with np.load(path, allow_pickle=False) as stored:
                text = str(stored[MARK_KEY]) if MARK_KEY in stored.files else ""
        elif name.endswith(".dcm"):  # a SEG medseg wrote: its ContentDescription
            import pydicom

            text = str(pydicom.dcmread(path, stop_before_pixels=True,
                                       specific_tags=["ContentDescription"]).get("ContentDescription", ""))
        elif is_itk_file(path):
            from medseg.data.clinical import itk_metadata

            text = itk_metadata(path).get(MARK_KEY, "")
        else:
            from PIL import Image

            with Image.open(path) as im:
                text = str(im.info.get(MARK_KEY, ""))
    except Exception:  # anything unreadable is not ours
        return None
    prefix = f"{OUTPUT_MARK} "
    return text[len(prefix):].strip() if text.startswith(prefix) else None


def _predict_case(predictor: Predictor, case: Case, labels: str, tta: bool | None, key: str,
                  deadline: Deadline | None = None, algorithm_version: str | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    card = predictor.card
    data = _read_case(predictor, case)
    classes, probs = predictor._segment(data.image, tta, probabilities=case.probabilities is not None,
                                        deadline=deadline, spacing=data.spacing)
    problems = _distribution_warnings(card, data, classes)
    if problems:
        _log.warning("%s: %s", case.name, "; ".join(problems))
    if data.affine is None:  # a 2D image: one slice
        source_classes, probs = classes[0], None if probs is None else probs[0]
    elif predictor.native_order:  # (z, y, x) of the file's own voxel grid
        source_classes = classes.transpose(2, 1, 0)
    else:
        source_classes = _volume_to_source(classes, data.affine)
        probs = None if probs is None else _probabilities_to_source(probs, data.affine)
    if probs is not None:  # before the labels: a case whose labels exist is complete
        _write_probabilities(case.probabilities, probs, card.class_names, key)
    written = predictor.label_array(source_classes, labels)
    if case.kind == "image2d":
        _write_png(case.labels, written, key)
    elif case.kind == "itk":
        _write_itk(case.labels, written, case.inputs[0], key)
    elif case.kind == "dicom":  # segments are classes, whatever `labels` says: a SEG numbers its segments
        _write_seg(case.labels, source_classes, case.inputs[0], card, algorithm_version or model_version(predictor),
                   key)
    else:
        _write_nifti(case.labels, written, case.inputs[0], key)
    counts = np.bincount(classes.ravel(), minlength=card.num_classes)
    return _summary(case, time.perf_counter() - start, counts, card)


def _summary(case: Case, seconds: float, counts: np.ndarray | None, card: ModelCard) -> dict[str, Any]:
    return {
        "case": case.name,
        "input": [str(p) for p in case.inputs],
        "output": str(case.labels),
        "probabilities": None if case.probabilities is None else str(case.probabilities),
        "skipped": counts is None,
        "seconds": round(seconds, 3),
        "voxels": None if counts is None else {n: int(c) for n, c in zip(card.class_names, counts)},
    }


def _distribution_warnings(card: ModelCard, data: _CaseImage, classes: np.ndarray) -> list[str]:
    """Why this case may be outside what the model was trained on: voxel spacing, intensities."""
    problems = []
    if card.spacing and data.spacing:
        ratios = [s / t for s, t in zip(data.spacing, card.spacing) if t > 0]
        if any(r > SPACING_RATIO or r < 1 / SPACING_RATIO for r in ratios):
            problems.append(f"voxel spacing {[round(s, 3) for s in data.spacing]} mm (z, y, x) is more than "
                            f"{SPACING_RATIO:g}x off the training median {card.spacing}")
    foreground = classes > 0
    if foreground.any():
        for c, stats in enumerate(card.intensity[: data.image.shape[1]]):
            low, high = stats.get("percentile_00_5"), stats.get("percentile_99_5")
            if low is None or high is None:
                continue
            median = float(np.median(data.image[:, c][foreground]))
            if not low <= median <= high:
                problems.append(f"channel {c}: the predicted foreground's median intensity {median:.4g} is outside "
                                f"the training foreground's 0.5..99.5 percentile range [{low:.4g}, {high:.4g}] "
                                "(another modality, or other units?)")
    return problems


def _write_nifti(path: Path, labels_xyz: np.ndarray, template_path: Path, key: str) -> None:
    """Labels as a NIfTI with the template's header, affine and qform/sform (codes included), written atomically;
    `descrip` holds the mark of the case (the image's own description does not describe its labels)."""
    import nibabel as nib

    template = nib.load(str(template_path))  # the header only: the data were read before
    header = template.header.copy()
    header.set_data_dtype(labels_xyz.dtype)
    header.set_slope_inter(None, None)  # labels are stored as they are
    header["cal_min"] = header["cal_max"] = 0  # the image's display window means nothing for labels
    header["descrip"] = f"{OUTPUT_MARK} {key}".encode("ascii")
    data = type(template)(labels_xyz, template.affine, header).to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=1, mtime=0)  # nibabel's default level; same labels, same bytes
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def _write_itk(path: Path, labels_xyz: np.ndarray, template_path: Path, key: str) -> None:
    """Labels in the NRRD/MHA/MHD template's grid (spacing, origin, direction), in its format, atomically; the
    case's mark in the header's `medseg` field."""
    from medseg.data.clinical import write_itk_like

    with atomic_path(path) as tmp:
        staged = tmp.with_name(tmp.name + path.suffix)  # SimpleITK picks the writer from the suffix
        write_itk_like(labels_xyz, template_path, staged, {MARK_KEY: f"{OUTPUT_MARK} {key}"})
        os.replace(staged, tmp)


def _write_seg(path: Path, classes_xyz: np.ndarray, series_folder: Path, card: ModelCard, version: str,
               key: str) -> None:
    """The class indices of a DICOM series as a DICOM Segmentation (medseg.deployment.dicom_seg), atomically."""
    from medseg.deployment.dicom_seg import write_segmentation

    with atomic_path(path) as tmp:
        write_segmentation(tmp, classes_xyz, series_folder, card, version, f"{OUTPUT_MARK} {key}")


def model_version(predictor: "Predictor") -> str:
    """How a SEG names the model's version: the registry version of a pinned models:/<name>/<N>, else the sha256
    of the ONNX file (an alias or a local file: the bytes are the identity)."""
    source = str(predictor.source)
    if source.startswith("models:/") and source.rsplit("/", 1)[-1].isdigit():
        return source.rsplit("/", 1)[-1]
    return f"sha256:{predictor.model_sha256[:12]}" if predictor.model_sha256 else source[-64:]


def _write_png(path: Path, labels_hw: np.ndarray, key: str) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    mark = PngInfo()
    mark.add_text(MARK_KEY, f"{OUTPUT_MARK} {key}")  # a tEXt chunk before the pixels: read without decoding them
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(labels_hw)).save(tmp, format="PNG", pnginfo=mark)


def _write_probabilities(path: Path, probs: np.ndarray, class_names: Sequence[str], key: str) -> None:
    """(K, ...) float16 softmax probabilities in the source's voxel order, the class names and the case's mark."""
    with atomic_open(path, "wb") as fh:
        np.savez_compressed(fh, probabilities=probs, class_names=np.asarray(class_names),
                            **{MARK_KEY: np.asarray(f"{OUTPUT_MARK} {key}")})
