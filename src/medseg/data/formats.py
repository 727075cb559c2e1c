"""Dataset adapters: find the (image, label) files of each case in a raw layout, and read them.

An adapter only knows a layout; checks and normalisation live in `medseg.data.checks` / `medseg.data.ingest`.
Supported layouts (`dataset.format`):

- `synapse`: Synapse/BTCV raw data, `img/img0001.nii.gz` + `label/label0001.nii.gz` (or `imagesTr/`, `labelsTr/`).
- `msd`: Medical Segmentation Decathlon / nnU-Net raw, `imagesTr/<case>.nii.gz` (MSD, 3D or 4D with channels
  last) or `imagesTr/<case>_0000.nii.gz` (one file per channel), `labelsTr/<case>.nii.gz`, `dataset.json`.
- `acdc`: `patientXXX/patientXXX_frameYY.nii.gz` + `patientXXX_frameYY_gt.nii.gz`; patient = `patientXXX`.
- `folder2d`: an images folder and a masks folder (PNG/JPG/BMP/TIF), masks named like the image
  (Kvasir-SEG) or with a suffix (ISIC `ISIC_0000000_segmentation.png`); each image is one case with D=1.
- `itk`: NRRD/MHA/MHD volumes (read with SimpleITK, as nnU-Net reads them), `<case>_image.nrrd` +
  `<case>_label.nrrd` pairs anywhere under raw_dir (pyradiomics), or `images/<case>.mha` + `labels/<case>.mha`.
- `dicom`: one folder per case under raw_dir holding its DICOM series (a folder holding several series gives one
  case per series, `<folder>-<n>` in SeriesNumber order), labels in `labels/<case>.nii.gz` (or NRRD/MHA/MHD):
  medseg.data.clinical reads and checks each series.
- `transunet`: TransUNet's preprocessed Synapse, `train_npz/caseXXXX_sliceYYY.npz` (image, label; one case per
  caseXXXX) and `test_vol_h5/caseXXXX.npy.h5` (datasets image, label shaped (D, H, W)).

Optional `dataset.patient_pattern` (a regex; group 1, else the whole match, of the case id) sets the patient
where a layout does not record it, so that splits keep one patient's images together.

`discover(spec, raw_dir)` returns the cases it found plus every layout problem (missing pairs, empty dataset)
as `IngestError`s, so `doctor` can list them all while `ingest` raises the first.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medseg.data import orientation
from medseg.data.archive import ARCHIVE_LIMIT_KEYS
from medseg.data.clinical import NiftiVolume
from medseg.data.nifti_header import ReadLimits, check_nifti_file
from medseg.data.preprocessing import volume_from_canonical_xyz
from medseg.errors import ConfigError, IngestError

FORMATS = ("synapse", "msd", "acdc", "folder2d", "transunet", "itk", "dicom")
FORMATS_3D = ("synapse", "msd", "acdc")  # one NIfTI volume per case
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")  # NIfTI and ITK volume files
MODALITIES = ("ct", "mr", "rgb", "grey")  # grey: one-channel 2D images (EM, X-ray, ultrasound), 8 or 16 bit
ADAPTER_OPTIONS = {"images_dir", "masks_dir", "mask_suffix", "patient_pattern"}  # optional dataset.* keys
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")


@dataclass
class DatasetSpec:
    """The dataset section of params.yaml, validated and completed (e.g. from an MSD dataset.json)."""

    name: str
    format: str
    modality: str
    class_names: list[str]
    label_map: dict[int, int] | None = None
    unmapped_labels: str = "background"
    hu_window: tuple[float, float] = (-125.0, 275.0)
    options: dict[str, Any] = field(default_factory=dict)  # adapter options (folder2d dirs, ...)
    allow_external_links: bool = False  # follow case files that are links to files outside raw_dir

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class CaseSource:
    """Where one case lives in the raw layout (paths absolute)."""

    id: str
    patient: str
    images: list[Path]  # channel files (msd), one file, or the ordered slice files (transunet npz)
    label: Path | None  # None where the label sits in the image file (transunet)
    kind: str  # nifti (also NRRD/MHA/MHD) | dicom (images: the series' files) | image2d | npz_slices | h5


@dataclass
class RawCase:
    """A case as read from disk, before checks and normalisation; NIfTI arrays already in canonical orientation."""

    image: np.ndarray  # (D, C, H, W) raw intensities
    label: np.ndarray  # (D, H, W) raw label values
    spacing: tuple[float, float, float] | None  # (sz, sy, sx) mm, None where the file or format leaves it unknown
    image_affine: np.ndarray | None = None  # as in the image file (its own voxel order)
    label_affine: np.ndarray | None = None  # as in the label file
    affine: np.ndarray | None = None  # of the canonical arrays above
    source_shape: tuple[int, int, int] | None = None  # (x, y, z) of the image file


def dataset_spec(dataset_params: dict[str, Any], raw_dir: str | Path | None = None) -> DatasetSpec:
    """Validate `params["dataset"]`; for msd, fill class names / modality from dataset.json when not given."""
    ds = dict(dataset_params or {})
    fmt = ds.get("format")
    if fmt not in FORMATS:
        raise ConfigError(f"dataset.format={fmt!r}; expected one of {', '.join(FORMATS)}")
    class_names = ds.get("class_names")
    modality = ds.get("modality")
    if fmt == "msd" and raw_dir is not None and (not class_names or not modality):
        meta = _msd_dataset_json(Path(raw_dir))
        class_names = class_names or meta["class_names"]
        modality = modality or meta["modality"]
    if not class_names or len(class_names) < 2:
        raise ConfigError("dataset.class_names must list background and at least one class")
    if len(class_names) > 255:
        raise ConfigError(f"dataset.class_names has {len(class_names)} classes; at most 255 fit the uint8 labels")
    modality = modality or ("rgb" if fmt == "folder2d" else "ct")
    if modality not in MODALITIES:
        raise ConfigError(f"dataset.modality={modality!r}; expected one of {', '.join(MODALITIES)}")
    unmapped = ds.get("unmapped_labels") or "background"
    if unmapped not in ("background", "error"):
        raise ConfigError(f"dataset.unmapped_labels={unmapped!r}; expected background or error")
    label_map = ds.get("label_map")
    label_map = {int(k): int(v) for k, v in label_map.items()} if label_map else None
    window = ds.get("hu_window") or (-125.0, 275.0)
    if len(window) != 2 or float(window[0]) >= float(window[1]):
        raise ConfigError(f"dataset.hu_window must be [low, high] with low < high, got {window}")
    known = {"name", "format", "raw_dir", "modality", "hu_window", "class_names", "label_map", "unmapped_labels",
             "allow_external_links", *ARCHIVE_LIMIT_KEYS}
    allow_links = ds.get("allow_external_links", False)
    if not isinstance(allow_links, bool):
        raise ConfigError(f"dataset.allow_external_links={allow_links!r}; expected true or false")
    unknown = sorted(set(ds) - known - ADAPTER_OPTIONS)
    if unknown:  # a typo (images_folder) must not be silently ignored
        raise ConfigError(f"dataset: unknown key(s) {unknown}; adapter options are {sorted(ADAPTER_OPTIONS)}")
    return DatasetSpec(
        name=str(ds.get("name") or Path(str(ds.get("raw_dir", "dataset"))).name),
        format=fmt,
        modality=modality,
        class_names=[str(c) for c in class_names],
        label_map=label_map,
        unmapped_labels=unmapped,
        hu_window=(float(window[0]), float(window[1])),
        options={k: v for k, v in ds.items() if k not in known},
        allow_external_links=allow_links,
    )


# ---------------------------------------------------------------- discovery


def discover(spec: DatasetSpec, raw_dir: str | Path) -> tuple[list[CaseSource], list[IngestError]]:
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        return [], [IngestError(raw_dir, "raw data folder does not exist (or is not a folder)")]
    cases, problems = _ADAPTERS[spec.format](spec, raw_dir)
    pattern = spec.options.get("patient_pattern")
    if pattern:  # e.g. "^(\\d+)_" when one patient has several scans and the layout does not say so
        for case in cases:
            match = re.search(str(pattern), case.id)
            if match is None:
                problems.append(IngestError(case.images[0], f"case id {case.id!r} does not match dataset.patient_pattern {pattern!r}"))
            else:
                case.patient = match.group(1) if match.groups() else match.group(0)
    counts = Counter(c.id for c in cases)
    for dup in sorted(i for i, n in counts.items() if n > 1):
        problems.append(IngestError(raw_dir, f"case id {dup!r} found more than once"))
    if not spec.allow_external_links:  # such a case is listed as a problem and never read
        links = external_links(cases, raw_dir)
        linked = {e.path for e in links}
        cases = [c for c in cases if not any(str(p) in linked for p in [*c.images, c.label] if p is not None)]
        problems += links
    if not cases and not problems:
        problems.append(IngestError(raw_dir, f"empty dataset: no {spec.format} cases found"))
    return sorted(cases, key=lambda c: c.id), problems


def external_links(cases: list[CaseSource], raw_dir: Path) -> list[IngestError]:
    """A problem for each case file that is (or lies under) a link leading outside `raw_dir`: a dataset is what its
    folder holds, and a link out of it (to another patient's scan, to a file of the system) is read only when
    dataset.allow_external_links says so."""
    root = raw_dir.resolve()
    problems = []
    for case in cases:
        for path in [*case.images, *([case.label] if case.label else [])]:
            target = path.resolve()
            if root != target and root not in target.parents:
                problems.append(IngestError(path, f"is a link to {target}, outside the dataset folder {raw_dir}; "
                                                  "set dataset.allow_external_links: true to read it"))
    return problems


def _visible_files(folder: Path, pattern: str) -> list[Path]:
    # Hidden files (macOS `._img0001.nii.gz` shadows shipped in MSD tarballs) are never data.
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))


def _find_dir(root: Path, names: tuple[str, ...], depth: int = 2, has_sibling: tuple[str, ...] = ()) -> Path | None:
    """The first folder called one of `names` at `root` or up to `depth` levels below it (with a sibling folder
    called one of `has_sibling`, when given)."""
    level = [root]
    for _ in range(depth + 1):
        for parent in level:
            for name in names:
                if (parent / name).is_dir() and (not has_sibling or any((parent / s).is_dir() for s in has_sibling)):
                    return parent / name
        level = [d for p in level for d in sorted(p.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    return None


def _pair_problems(images: dict[str, Path], labels: dict[str, Path], what: str) -> list[IngestError]:
    problems = [IngestError(p, f"{what} has no matching label file") for k, p in sorted(images.items()) if k not in labels]
    problems += [IngestError(p, "label file has no matching image") for k, p in sorted(labels.items()) if k not in images]
    return problems


def _number(name: str) -> str | None:
    match = re.search(r"(\d+)", name)
    return match.group(1) if match else None


def _discover_synapse(spec: DatasetSpec, raw_dir: Path):
    # BTCV's RawData holds Testing/img (no labels) beside Training/img + label: take images from the folder
    # whose sibling holds the labels, not simply the first img/ found.
    img_dir = _find_dir(raw_dir, ("img", "imagesTr"), has_sibling=("label", "labelsTr"))
    img_dir = img_dir or _find_dir(raw_dir, ("img", "imagesTr"))
    lbl_dir = next((img_dir.parent / n for n in ("label", "labelsTr") if (img_dir.parent / n).is_dir()), None) if img_dir else None
    lbl_dir = lbl_dir or _find_dir(raw_dir, ("label", "labelsTr"))
    if img_dir is None or lbl_dir is None:
        missing = "img/ (or imagesTr/)" if img_dir is None else "label/ (or labelsTr/)"
        return [], [IngestError(raw_dir, f"Synapse layout needs a {missing} folder")]
    images = {_number(p.name): p for p in _visible_files(img_dir, "*.nii*") if _number(p.name)}
    labels = {_number(p.name): p for p in _visible_files(lbl_dir, "*.nii*") if _number(p.name)}
    cases = [
        CaseSource(f"case{num}", f"case{num}", [images[num]], labels[num], "nifti")
        for num in sorted(images)
        if num in labels
    ]
    return cases, _pair_problems(images, labels, "image")


def _msd_dataset_json(raw_dir: Path) -> dict[str, Any]:
    path = raw_dir / "dataset.json"
    if not path.is_file():
        found = sorted(raw_dir.glob("*/dataset.json"))
        if len(found) != 1:
            raise IngestError(path, "missing: MSD/nnU-Net datasets need dataset.json (or set class_names and modality)")
        path = found[0]
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise IngestError(path, f"not readable JSON ({exc})") from exc
    labels = meta.get("labels") or {}
    # MSD: {"0": "background", "1": "spleen"}; nnU-Net v2: {"background": 0, "spleen": 1}.
    if labels and all(str(k).isdigit() for k in labels):
        by_index = {int(k): str(v) for k, v in labels.items()}
    else:
        by_index = {int(v): str(k) for k, v in labels.items() if not isinstance(v, list)}
    if not by_index or sorted(by_index) != list(range(len(by_index))):
        raise IngestError(path, f"labels must number the classes 0..K-1, got {labels}")
    channels = meta.get("channel_names") or meta.get("modality") or {}
    first = str(channels.get("0", "")).lower()
    modality = "ct" if first == "ct" else ("rgb" if first in ("rgb", "color") else "mr")
    return {
        "class_names": [by_index[i] for i in range(len(by_index))],
        "modality": modality,
        "num_channels": len(channels) or None,
        "root": path.parent,
    }


def _discover_msd(spec: DatasetSpec, raw_dir: Path):
    found = _find_dir(raw_dir, ("imagesTr",), depth=1)
    root = found.parent if found is not None else raw_dir
    img_dir, lbl_dir = root / "imagesTr", root / "labelsTr"
    if not img_dir.is_dir() or not lbl_dir.is_dir():
        return [], [IngestError(root, "MSD/nnU-Net layout needs imagesTr/ and labelsTr/ folders")]
    channel_file = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")
    case_name = re.compile(r"^(?P<case>.+?)\.nii(\.gz)?$")
    images: dict[str, list[Path]] = {}
    for p in _visible_files(img_dir, "*.nii*"):
        m = channel_file.match(p.name) or case_name.match(p.name)
        if m:
            images.setdefault(m.group("case"), []).append(p)
    labels = {case_name.match(p.name).group("case"): p for p in _visible_files(lbl_dir, "*.nii*") if case_name.match(p.name)}
    problems = _pair_problems({k: v[0] for k, v in images.items()}, labels, "image")
    counts = {len(v) for k, v in images.items() if k in labels}
    if len(counts) > 1:
        problems.append(IngestError(img_dir, f"cases have different numbers of channel files: {sorted(counts)}"))
    cases = [CaseSource(k, k, sorted(images[k]), labels[k], "nifti") for k in sorted(images) if k in labels]
    return cases, problems


def _discover_acdc(spec: DatasetSpec, raw_dir: Path):
    frame = re.compile(r"^(?P<patient>patient\d+)_frame\d+$")
    images, labels = {}, {}
    for p in sorted(raw_dir.rglob("patient*_frame*.nii*")):
        if p.name.startswith("."):
            continue
        stem = p.name.split(".nii")[0]
        if stem.endswith("_gt"):
            labels[stem[:-3]] = p
        elif frame.match(stem):
            images[stem] = p
    cases = [
        CaseSource(k, frame.match(k).group("patient"), [images[k]], labels[k], "nifti") for k in sorted(images) if k in labels
    ]
    return cases, _pair_problems(images, labels, "frame")


def _folder2d_dirs(spec: DatasetSpec, raw_dir: Path) -> tuple[Path | None, Path | None]:
    opts = spec.options
    img_dir = raw_dir / opts["images_dir"] if opts.get("images_dir") else None
    mask_dir = raw_dir / opts["masks_dir"] if opts.get("masks_dir") else None
    img_dir = img_dir or _find_dir(raw_dir, ("images", "imgs", "image", "img", "Images"), depth=1)
    mask_dir = mask_dir or _find_dir(raw_dir, ("masks", "mask", "labels", "label", "segmentations", "Masks"), depth=1)
    if img_dir is None:  # ISIC: ISIC2018_Task1-2_Training_Input + ISIC2018_Task1_Training_GroundTruth
        inputs = [d for d in sorted(raw_dir.glob("*Input*")) if d.is_dir()]
        img_dir = inputs[0] if len(inputs) == 1 else None
    if mask_dir is None:
        truths = [d for d in sorted(raw_dir.glob("*GroundTruth*")) if d.is_dir()]
        mask_dir = truths[0] if len(truths) == 1 else None
    return img_dir, mask_dir


def _discover_folder2d(spec: DatasetSpec, raw_dir: Path):
    img_dir, mask_dir = _folder2d_dirs(spec, raw_dir)
    if img_dir is None or mask_dir is None:
        what = "images" if img_dir is None else "masks"
        return [], [IngestError(raw_dir, f"no {what} folder found (set dataset.images_dir / dataset.masks_dir)")]
    if img_dir == mask_dir:
        return [], [IngestError(img_dir, "images and masks must be in different folders")]

    def pictures(folder: Path) -> dict[str, Path]:
        return {p.stem: p for p in _visible_files(folder, "*") if p.suffix.lower() in IMAGE_EXTENSIONS}

    images, masks = pictures(img_dir), pictures(mask_dir)
    suffix = spec.options.get("mask_suffix")
    if suffix is None:  # ISIC names masks <image>_segmentation
        suffix = "_segmentation" if masks and all(s.endswith("_segmentation") for s in masks) else ""
    masks = {s[: len(s) - len(suffix)] if suffix and s.endswith(suffix) else s: p for s, p in masks.items()}
    cases = [CaseSource(k, k, [images[k]], masks[k], "image2d") for k in sorted(images) if k in masks]
    return cases, _pair_problems(images, masks, "image")


def _discover_transunet(spec: DatasetSpec, raw_dir: Path):
    npz_dir, h5_dir = _find_dir(raw_dir, ("train_npz",), 1), _find_dir(raw_dir, ("test_vol_h5",), 1)
    if npz_dir is None and h5_dir is None:
        return [], [IngestError(raw_dir, "TransUNet layout needs train_npz/ and/or test_vol_h5/")]
    problems: list[IngestError] = []
    slices: dict[str, dict[int, Path]] = {}
    if npz_dir is not None:
        pattern = re.compile(r"^(?P<case>case\d+)_slice(?P<slice>\d+)\.npz$")
        for p in _visible_files(npz_dir, "*.npz"):
            m = pattern.match(p.name)
            if m is None:
                problems.append(IngestError(p, "name does not follow caseXXXX_sliceYYY.npz"))
            else:
                slices.setdefault(m.group("case"), {})[int(m.group("slice"))] = p
    cases = []
    for case, by_index in sorted(slices.items()):
        order = sorted(by_index)
        gaps = sorted(set(range(order[0], order[-1] + 1)) - set(order))
        if gaps:
            problems.append(IngestError(npz_dir / f"{case}_slice*.npz", f"missing slices {gaps[:10]}"))
            continue
        cases.append(CaseSource(case, case, [by_index[i] for i in order], None, "npz_slices"))
    if h5_dir is not None:
        for p in _visible_files(h5_dir, "*.h5"):
            case = p.name.split(".")[0]
            if case in slices:
                problems.append(IngestError(p, f"{case} is also in train_npz/ (one case, two sources)"))
            else:
                cases.append(CaseSource(case, case, [p], None, "h5"))
    return cases, problems


def volume_stem(path: Path) -> str | None:
    """The name of a NIfTI or NRRD/MHA/MHD volume file without its suffix (None for another kind of file)."""
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _discover_itk(spec: DatasetSpec, raw_dir: Path):
    from medseg.data.clinical import is_itk_file

    images, labels = {}, {}
    img_dir, lbl_dir = raw_dir / "images", raw_dir / "labels"
    if img_dir.is_dir() and lbl_dir.is_dir():
        images = {volume_stem(p): p for p in _visible_files(img_dir, "*") if is_itk_file(p)}
        labels = {volume_stem(p): p for p in _visible_files(lbl_dir, "*") if is_itk_file(p)}
    else:  # <case>_image.<ext> + <case>_label.<ext>, anywhere below raw_dir
        for p in sorted(raw_dir.rglob("*")):
            stem = volume_stem(p) if p.is_file() and not p.name.startswith(".") and is_itk_file(p) else None
            if stem and stem.endswith("_image"):
                images[stem[: -len("_image")]] = p
            elif stem and stem.endswith("_label"):
                labels[stem[: -len("_label")]] = p
    if not images and not labels:
        return [], [IngestError(raw_dir, "itk layout needs <case>_image.nrrd + <case>_label.nrrd files (or .mha, "
                                         ".mhd, .nhdr), or images/ + labels/ folders of them")]
    cases = [CaseSource(k, k, [images[k]], labels[k], "nifti") for k in sorted(images) if k in labels]
    return cases, _pair_problems(images, labels, "image")


def _discover_dicom(spec: DatasetSpec, raw_dir: Path):
    from medseg.data.clinical import series_files

    lbl_dir = raw_dir / "labels"
    if not lbl_dir.is_dir():  # not this layout: no DICOM header is read
        return [], [IngestError(raw_dir, "dicom layout needs a labels/ folder (labels/<case>.nii.gz, .nrrd or .mha) "
                                         "beside one folder per case holding its DICOM series")]
    labels = {volume_stem(p): p for p in _visible_files(lbl_dir, "*") if volume_stem(p)}
    labels.update({p.name[: -len(".dcm")]: p for p in _visible_files(lbl_dir, "*.dcm")})  # DICOM SEGs
    images: dict[str, list[Path]] = {}
    problems: list[IngestError] = []
    for folder in sorted(p for p in raw_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p != lbl_dir):
        groups = _series_of(series_files(folder), problems)
        for n, files in enumerate(groups, start=1):
            images[folder.name if len(groups) == 1 else f"{folder.name}-{n}"] = files
    if not images and not problems:
        return [], [IngestError(raw_dir, "dicom layout needs one folder per case holding its DICOM series (and "
                                         "labels/<case>.nii.gz)")]
    cases = [CaseSource(k, k, images[k], labels[k], "dicom") for k in sorted(images) if k in labels]
    firsts = {k: files[0].parent for k, files in images.items()}
    return cases, problems + _pair_problems(firsts, labels, "DICOM series")


def _series_of(files: list[Path], problems: list[IngestError]) -> list[list[Path]]:
    """`files` grouped by SeriesInstanceUID, in SeriesNumber order (headers only)."""
    from medseg.data.clinical import require

    pydicom = require("pydicom")

    groups: dict[str, list[Path]] = {}
    numbers: dict[str, float] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SeriesInstanceUID", "SeriesNumber"])
        except Exception as exc:
            problems.append(IngestError(path, f"not a DICOM file ({type(exc).__name__})"))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        groups.setdefault(uid, []).append(path)
        number = ds.get("SeriesNumber")
        numbers.setdefault(uid, float(number) if number not in (None, "") else float("inf"))
    return [groups[uid] for uid in sorted(groups, key=lambda u: (numbers[u], u))]


def read_volume(path: Path, limits: ReadLimits | None = None) -> NiftiVolume:
    """A NIfTI file, an NRRD/MHA/MHD file or a DICOM series folder (one series) as a NiftiVolume."""
    from medseg.data.clinical import is_itk_file, read_dicom_series, read_itk

    if Path(path).is_dir() and not Path(path).name.lower().endswith((".nii", ".nii.gz")):
        return read_dicom_series(path).volume  # a NIfTI name on a folder is a broken NIfTI: read_nifti says so
    if is_itk_file(path):
        return read_itk(path)
    return read_nifti(path, limits)


_ADAPTERS: dict[str, Callable[[DatasetSpec, Path], tuple[list[CaseSource], list[IngestError]]]] = {
    "synapse": _discover_synapse,
    "msd": _discover_msd,
    "acdc": _discover_acdc,
    "folder2d": _discover_folder2d,
    "transunet": _discover_transunet,
    "itk": _discover_itk,
    "dicom": _discover_dicom,
}


# ---------------------------------------------------------------- readers


def read_nifti(path: Path, limits: ReadLimits | None = None) -> NiftiVolume:
    """Read a NIfTI file; any failure becomes an IngestError naming the file. The header is checked against the
    file's size and `limits` first (medseg.data.nifti_header): nothing is allocated for data the file does not
    hold, nor for complex or RGB voxels."""
    import nibabel as nib

    check_nifti_file(path, limits)
    try:
        img = nib.load(str(path))
        proxy = img.dataobj
        # With scl_slope/scl_inter nibabel would scale to float64 (8 bytes a voxel); float32 holds HU exactly.
        scaled = getattr(proxy, "slope", 1.0) != 1.0 or getattr(proxy, "inter", 0.0) != 0.0
        data = np.asanyarray(proxy, dtype=np.float32) if scaled else np.asanyarray(proxy)
        zooms = tuple(round(float(z), 6) for z in img.header.get_zooms())  # float32 0.7 -> 0.7
        return NiftiVolume(data, np.asarray(img.affine, dtype=np.float64), zooms, _spacing_known(img.header, zooms[:3]))
    except Exception as exc:  # nibabel/gzip/zlib raise many types for broken files
        raise IngestError(path, f"cannot read NIfTI ({type(exc).__name__}: {exc})") from exc


def _spacing_known(header, zooms: tuple[float, ...]) -> bool:
    """False for an "unknown spacing" export: unit zooms with no coordinate system (qform and sform codes 0)
    or no spatial unit. Unit zooms with a coordinate system and a unit are a real 1 mm grid."""
    if any(z != 1.0 for z in zooms):
        return True
    coded = int(header["qform_code"]) > 0 or int(header["sform_code"]) > 0
    return coded and header.get_xyzt_units()[0] != "unknown"


def _squeeze(data: np.ndarray) -> np.ndarray:
    """Drop singleton axes after the third (NIfTI writers pad a 3D volume to (x, y, z, 1))."""
    return data.reshape(data.shape[:3] + tuple(s for s in data.shape[3:] if s != 1))


def _canonical_dchw(path: Path, data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NIfTI (x, y, z[, c]) in the orientation of `affine` -> ((z, c, y, x) view in the canonical (RAS+)
    orientation, canonical affine, ornt)."""
    try:
        canonical, canonical_affine, ornt = orientation.to_canonical(data, affine)
    except ValueError as exc:
        raise IngestError(path, str(exc)) from exc
    return volume_from_canonical_xyz(canonical), canonical_affine, ornt


def _dhw(image: np.ndarray) -> tuple[int, int, int]:
    return (image.shape[0], image.shape[2], image.shape[3])


def _read_nifti_case(case: CaseSource, spec: DatasetSpec) -> RawCase:
    from medseg.data import checks
    from medseg.data.clinical import read_dicom_series

    channels, first, series = [], None, None
    if case.kind == "dicom":  # one channel: the series, whose files are case.images
        series = read_dicom_series(case.images[0].parent, case.images)
        sources = [(case.images[0].parent, series.volume)]
    else:
        sources = [(path, read_volume(path)) for path in case.images]
    for path, vol in sources:
        data = _squeeze(vol.data)
        if data.ndim < 3:
            raise IngestError(path, f"expected a 3D volume, got shape {vol.data.shape}")
        if data.ndim > 4:
            raise IngestError(path, f"expected a 3D (or 4D multi-channel) volume, got shape {vol.data.shape}")
        if spec.format != "msd" and data.ndim == 4:
            raise IngestError(path, f"expected a 3D volume, got 4D shape {vol.data.shape}")
        if first is None:
            first = vol
        else:
            checks.check_affine(path, first.affine, vol.affine)
        # Every channel, and the label below, takes the first file's reorientation: voxels stay paired as stored.
        dchw, affine, ornt = _canonical_dchw(path, data, first.affine)
        if channels:
            checks.check_same_shape(path, _dhw(channels[0]), _dhw(dchw))
        channels.append(dchw)
    image = channels[0] if len(channels) == 1 else np.concatenate(channels, axis=1)
    if series is not None and case.label.name.lower().endswith(".dcm"):  # a DICOM SEG of the series
        from medseg.data.clinical import read_seg_labels

        label_vol = NiftiVolume(read_seg_labels(case.label, series), first.affine, first.zooms, True)
    else:
        label_vol = read_volume(case.label)
    ldata = _squeeze(label_vol.data)
    if ldata.ndim != 3:
        raise IngestError(case.label, f"label must be a 3D volume, got shape {label_vol.data.shape}")
    label_affine = label_vol.affine
    label = _canonical_dchw(case.label, ldata, first.affine)[0][:, 0]  # paired as stored
    if not np.allclose(label_vol.affine, first.affine, atol=1e-3):
        # stored in another voxel order (a DICOM series, LPS, beside its LAS NIfTI label map): the same grid?
        label_dchw, label_canonical, _ = _canonical_dchw(case.label, ldata, label_vol.affine)
        if label_dchw.shape == label[:, None].shape and np.allclose(label_canonical, affine, atol=1e-3):
            label, label_affine = label_dchw[:, 0], first.affine  # the same voxels, reordered: paired
    zooms = orientation.canonical_zooms(first.zooms[:3], ornt)
    spacing = (zooms[2], zooms[1], zooms[0]) if first.spacing_known else None
    source_shape = tuple(int(s) for s in first.data.shape[:3])
    return RawCase(image, label, spacing, first.affine, label_affine, affine, source_shape)


def _read_image2d_case(case: CaseSource, spec: DatasetSpec) -> RawCase:
    from PIL import Image

    from medseg.data import checks

    def load(path: Path, mode: str | None) -> np.ndarray:
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert(mode) if mode else im)
        except Exception as exc:
            raise IngestError(path, f"cannot read image ({type(exc).__name__}: {exc})") from exc

    image = load(case.images[0], "RGB" if spec.modality == "rgb" else None)
    if image.ndim == 3 and spec.modality != "rgb":
        colour = image[..., :3]
        if (colour != colour[..., :1]).any():
            raise IngestError(case.images[0], f"a colour image (its channels differ) in a dataset of modality "
                                              f"{spec.modality}: set dataset.modality: rgb")
        image = colour[..., 0]  # greyscale stored as RGB(A) is fine
    image = image[None, None] if image.ndim == 2 else image.transpose(2, 0, 1)[None]
    mask = checks.check_mask_channels(case.label, load(case.label, None))
    if spec.num_classes == 2 and mask.max(initial=0) > 1:
        mask = (mask > 127).astype(np.uint8)  # 0/255 (and JPEG-blurred) binary masks
    return RawCase(image, mask[None], None)


def _read_image_label(path: Path, open_file, kind: str, member: str) -> tuple[np.ndarray, np.ndarray]:
    """The 'image' and 'label' arrays of a TransUNet file (npz slice or h5 volume), errors naming the file."""
    try:
        with open_file(path) as store:
            missing = [k for k in ("image", "label") if k not in store]
            if missing:
                raise IngestError(path, f"missing {member} {missing[0]!r} (TransUNet files hold 'image' and 'label')")
            return np.asarray(store["image"]), np.asarray(store["label"])
    except IngestError:
        raise
    except Exception as exc:
        raise IngestError(path, f"cannot read {kind} ({type(exc).__name__}: {exc})") from exc


def _read_npz_case(case: CaseSource, spec: DatasetSpec) -> RawCase:
    images, labels = [], []
    for path in case.images:
        image, label = _read_image_label(path, np.load, "npz", "array")
        if image.ndim != 2 or image.shape != label.shape:
            raise IngestError(path, f"image {image.shape} and label {label.shape} must be the same 2D shape")
        if images and image.shape != images[0].shape:
            raise IngestError(path, f"slice shape {image.shape} != first slice {images[0].shape}")
        images.append(image)
        labels.append(label)
    return RawCase(np.stack(images)[:, None], np.stack(labels), None)


def _read_h5_case(case: CaseSource, spec: DatasetSpec) -> RawCase:
    import h5py

    path = case.images[0]
    image, label = _read_image_label(path, lambda p: h5py.File(p, "r"), "HDF5", "dataset")
    if image.ndim != 3:
        raise IngestError(path, f"image must be (D, H, W), got shape {image.shape}")
    return RawCase(image[:, None], label, None)


_READERS: dict[str, Callable[[CaseSource, DatasetSpec], RawCase]] = {
    "nifti": _read_nifti_case,
    "dicom": _read_nifti_case,
    "image2d": _read_image2d_case,
    "npz_slices": _read_npz_case,
    "h5": _read_h5_case,
}


def read_case(case: CaseSource, spec: DatasetSpec) -> RawCase:
    """Read one case's arrays (image (D, C, H, W), label (D, H, W)); IngestError on unreadable files."""
    return _READERS[case.kind](case, spec)
