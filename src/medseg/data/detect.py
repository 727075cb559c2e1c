"""`medseg dataset init`: describe a raw dataset folder (or archive) as the `dataset:` section of params.yaml.

Like nnU-Net's dataset conversion helpers, but nothing is converted: the layout is detected by asking every
adapter in `medseg.data.formats` what it finds (so detection and ingest can never disagree), class names and
modality come from the dataset itself where it says (an MSD/nnU-Net `dataset.json`, a few mask files), and the
format's conventions otherwise (Synapse's 8 organs, ACDC's rv/myo/lv). Everything here only *reads* the raw data.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

from medseg.data.archive import ARCHIVE_SUFFIXES, dataset_root, is_archive, safe_extract
from medseg.data.formats import FORMATS, FORMATS_3D, CaseSource, dataset_spec, discover
from medseg.errors import ConfigError, IngestError

# The TransUNet Synapse 8-organ setting (params.yaml, presets/paper.yaml): class names + raw BTCV value -> class.
SYNAPSE_CLASSES = ["background", "aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach"]
SYNAPSE_LABEL_MAP = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}
ACDC_CLASSES = ["background", "rv", "myo", "lv"]  # ACDC ground truth: 1 RV cavity, 2 myocardium, 3 LV cavity
HU_WINDOW = [-125, 275]  # abdominal soft tissue, the Synapse protocol's window
MASKS_SAMPLED = 5  # folder2d: mask files read to count classes
SECTION_ORDER = ["name", "format", "raw_dir", "modality", "hu_window", "class_names", "label_map", "unmapped_labels", "patient_pattern"]

LOOKED_FOR = (
    "synapse: img/ + label/ (or BTCV RawData/Training, imagesTr/ + labelsTr/ without dataset.json); "
    "msd: imagesTr/ + labelsTr/ + dataset.json; acdc: patientNNN/patientNNN_frameFF.nii.gz + _gt; "
    "folder2d: images/ + masks/ (Kvasir) or ISIC *_Input/ + *_GroundTruth/ (*_segmentation.png); "
    "transunet: train_npz/ and/or test_vol_h5/; itk: <case>_image.nrrd + <case>_label.nrrd (or .mha/.mhd); "
    "dicom: <case>/ series folders + labels/<case>.nii.gz"
)


@contextlib.contextmanager
def _opened(raw_dir: Path) -> Iterator[Path]:
    """The dataset folder: `raw_dir` itself, or an archive extracted into a temporary folder (never next to it)."""
    if is_archive(raw_dir):
        with tempfile.TemporaryDirectory(prefix="medseg-init-") as tmp:
            yield dataset_root(safe_extract(raw_dir, Path(tmp) / "raw"))
        return
    if not raw_dir.is_dir():
        raise ConfigError(f"{raw_dir}: not a folder or a supported archive ({', '.join(ARCHIVE_SUFFIXES)})")
    yield raw_dir


def _probe(fmt: str, folder: Path) -> tuple[list[CaseSource], list[IngestError]]:
    """What the `fmt` adapter finds in `folder` (placeholder classes: discovery does not look at them)."""
    probe = {"format": fmt, "class_names": ["background", "foreground"], "modality": "rgb" if fmt == "folder2d" else "ct"}
    return discover(dataset_spec(probe), folder)


def _detect(folder: Path, shown: Path) -> str:
    found = [fmt for fmt in FORMATS if _probe(fmt, folder)[0]]
    if set(found) == {"synapse", "msd"}:  # imagesTr/ + labelsTr/: nnU-Net with dataset.json, BTCV without
        has_json = (folder / "dataset.json").is_file() or len(list(folder.glob("*/dataset.json"))) == 1
        found = ["msd" if has_json else "synapse"]
    if not found:
        raise ConfigError(f"{shown}: no known dataset layout found (looked for {LOOKED_FOR}); pass --format")
    if len(found) > 1:
        raise ConfigError(f"{shown}: ambiguous layout, cases found as {' and '.join(found)}; pass --format")
    return found[0]


def detect_format(raw_dir: str | Path) -> str:
    """The `dataset.format` of a raw folder or archive; ConfigError if no layout, or several, fit."""
    with _opened(Path(raw_dir)) as folder:
        return _detect(folder, Path(raw_dir))


def slug(name: str) -> str:
    """A dataset name usable as a folder under data/ (lowercase, [a-z0-9_-])."""
    lowered = name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lowered.endswith(suffix):
            lowered = lowered[: -len(suffix)]
            break
    return re.sub(r"[^a-z0-9_-]+", "_", lowered).strip("_-") or "dataset"


def guess_patient_pattern(case_ids: list[str]) -> str | None:
    """A regex whose group 1 is the patient, if the ids look like `<subject>_<scan>` and that really groups them.

    The subject part must carry a number (`patient001`, `p01`, `sub-01`, `0001`): `spleen_12` or `case_00001`
    name the dataset, not a patient. At least two patients and fewer patients than cases, or no pattern.
    """
    heads = [cid.split("_", 1)[0] for cid in case_ids if "_" in cid and cid.split("_", 1)[1]]
    if len(heads) != len(case_ids) or not all(re.search(r"\d", h) for h in heads):
        return None
    letters = {m.group(1) if (m := re.fullmatch(r"([A-Za-z]*)\d+", h)) else None for h in heads}  # patient001 -> patient
    pattern = rf"^({re.escape(letters.pop())}\d+)_" if len(letters) == 1 and None not in letters else r"^([^_]+)_"
    patients = {re.search(pattern, cid).group(1) for cid in case_ids}
    return pattern if 2 <= len(patients) < len(case_ids) else None


def _mask_classes(cases: list[CaseSource]) -> int:
    """Classes in a few 2D masks: 0/255 (or JPEG-blurred) masks are binary, small integers are class indices."""
    from PIL import Image

    values: set[int] = set()
    for case in cases[:MASKS_SAMPLED]:
        try:
            with Image.open(case.label) as im:
                mask = np.asarray(im)
        except Exception:  # an unreadable mask is doctor's to report, not a reason to refuse a description
            continue
        values |= set(np.unique(mask[..., 0] if mask.ndim == 3 else mask).tolist())
    top = max(values, default=1)
    return 2 if top <= 1 or top >= 128 else int(top) + 1


def _label_map_classes(cases: list[CaseSource]) -> int:
    """1 + the largest label value in a few label maps (NIfTI, NRRD, MHA)."""
    from medseg.data.formats import read_volume

    top = 1
    for case in cases[:MASKS_SAMPLED]:
        try:
            top = max(top, int(np.max(read_volume(case.label).data)))
        except Exception:  # an unreadable label is doctor's to report
            continue
    return top + 1


def _dicom_modality(cases: list[CaseSource]) -> str:
    """ct or mr from the first series' Modality attribute (CT: ct; anything else: mr, to check)."""
    from medseg.data.clinical import require

    pydicom = require("pydicom")

    try:
        return "ct" if str(pydicom.dcmread(cases[0].images[0], stop_before_pixels=True,
                                           specific_tags=["Modality"]).get("Modality", "")) == "CT" else "mr"
    except Exception:
        return "ct"


def _image_modality(cases: list[CaseSource]) -> str:
    """grey when a few images are one channel (8 or 16 bit, or RGB with equal channels), else rgb."""
    from PIL import Image

    for case in cases[:MASKS_SAMPLED]:
        try:
            with Image.open(case.images[0]) as im:
                if im.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F", "1"):
                    continue
                rgb = np.asarray(im.convert("RGB"))
        except Exception:  # unreadable: doctor's to report
            continue
        if (rgb != rgb[..., :1]).any():
            return "rgb"
    return "grey"


def _nifti_header(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
    """(shape, x/y/z zooms) from the header only (the voxels are not read); None if unreadable (doctor's job)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        return tuple(img.shape), tuple(round(float(z), 4) for z in img.header.get_zooms()[:3])
    except Exception:
        return None


def _proposal(fmt: str, folder: Path, cases: list[CaseSource]) -> dict[str, Any]:
    """modality, class names (and label_map) of a format: the dataset's own word where it has one."""
    if fmt == "msd":
        spec = dataset_spec({"format": "msd"}, folder)  # class names and modality from dataset.json
        return {"modality": spec.modality, "class_names": spec.class_names}
    if fmt == "synapse":
        return {"modality": "ct", "class_names": list(SYNAPSE_CLASSES), "label_map": dict(SYNAPSE_LABEL_MAP), "unmapped_labels": "background"}
    if fmt == "transunet":  # labels are already TransUNet's class indices: no label_map
        return {"modality": "ct", "class_names": list(SYNAPSE_CLASSES)}
    if fmt == "acdc":
        return {"modality": "mr", "class_names": list(ACDC_CLASSES)}
    if fmt in ("itk", "dicom"):
        k = _label_map_classes(cases)
        names = ["background", "foreground"] if k == 2 else ["background"] + [f"class_{i}" for i in range(1, k)]
        return {"modality": _dicom_modality(cases) if fmt == "dicom" else "mr", "class_names": names}
    k = _mask_classes(cases)
    return {"modality": _image_modality(cases), "class_names": ["background", "foreground"] if k == 2 else ["background"] + [f"class_{i}" for i in range(1, k)]}


def infer_dataset_section(
    raw_dir: str | Path, fmt: str | None = None, name: str | None = None, root: str | Path = "."
) -> tuple[dict[str, Any], list[str]]:
    """The `dataset:` section describing `raw_dir` (a folder or an archive), and what was found, as lines.

    `raw_dir` in the section is the path as given if absolute, else relative to `root`. Raises ConfigError
    for an unknown/ambiguous layout or a bad --format/--name, IngestError when the layout holds no case.
    """
    given = path = Path(raw_dir)
    if not path.is_absolute() and not path.exists() and (Path(root) / path).exists():
        path = Path(root) / path  # given relative to the project root rather than the working directory
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '_', '-' or '.' (it names folders under data/)")
    stored = str(given) if given.is_absolute() else Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()
    with _opened(path) as folder:
        detected = fmt is None
        fmt = fmt or _detect(folder, path)
        cases, problems = _probe(fmt, folder)
        if not cases:  # the adapter's own words (inside an archive, named after the archive)
            if problems and not is_archive(path):
                raise problems[0]
            raise IngestError(path, problems[0].problem if problems else f"empty dataset: no {fmt} cases found")
        section: dict[str, Any] = {"name": name or slug(Path(os.path.abspath(path)).name), "format": fmt, "raw_dir": stored}
        section.update(_proposal(fmt, folder, cases))
        if section["modality"] == "ct" and fmt != "transunet":  # TransUNet's files are windowed already
            section["hu_window"] = list(HU_WINDOW)
        names = section["class_names"]
        source = "dataset.json" if fmt == "msd" else f"{fmt} proposal, check"
        notes = [
            f"format: {fmt}" + (" (detected)" if detected else " (--format)"),
            f"cases: {len(cases)}",
            f"classes: {len(names)} ({', '.join(map(str, names))}; {source})",
        ]
        channels, spacing = 3 if section["modality"] == "rgb" else 1, None
        if fmt in FORMATS_3D:  # NIfTI: channels and spacing from one header, cheaply
            first = cases[0].images
            header = _nifti_header(first[0])
            if header is not None:
                shape, zooms = header
                channels = len(first) if len(first) > 1 else (shape[3] if len(shape) > 3 else 1)
                spacing = f"spacing: {' x '.join(f'{z:g}' for z in zooms)} mm (x, y, z; header of {os.path.relpath(first[0], folder)})"
        notes.append(f"modality: {section['modality']}, {channels} channel(s)")
        notes += [spacing] if spacing else []
        pattern = r"^(patient\d+)_" if fmt == "acdc" else guess_patient_pattern([c.id for c in cases])
        if pattern:
            section["patient_pattern"] = pattern
            patients = {re.search(pattern, c.id).group(1) for c in cases}
            notes.append(f"patient pattern: {pattern} ({len(cases)} cases of {len(patients)} patients)")
        else:
            notes.append("patient pattern: none (each case is its own patient)")
    return {k: section[k] for k in sorted(section, key=SECTION_ORDER.index)}, notes


def review_items(section: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, why) for every value of `section` that is a guess or a convention the user should confirm."""
    fmt, items = section.get("format"), []
    why_classes = {
        "msd": "from dataset.json: index i must be raw label value i",
        "synapse": "the Synapse 8 organs (raw BTCV numbering); other abdominal datasets number organs differently",
        "transunet": "TransUNet's 8-organ order, assumed by its preprocessed labels",
        "acdc": "ACDC's numbering (1 rv, 2 myo, 3 lv)",
        "folder2d": "counted from a few masks; give the classes their real names",
        "dicom": "1 + the largest value of a few label maps; class i must be label value i: give them their names",
        "itk": "1 + the largest value of a few label maps; class i must be label value i: give them their names",
    }
    items.append(("class_names", why_classes.get(fmt, "check")))
    if fmt == "itk":
        items.append(("modality", "NRRD/MHA headers do not say CT or MR: mr assumed (ct for Hounsfield units)"))
    if "hu_window" in section:
        items.append(("hu_window", f"{section.get('hu_window')} is the abdominal soft-tissue window; set it for your organs"))
    if section.get("label_map"):
        items.append(("label_map", "raw label value -> class index; raw values not listed become background"))
    if section.get("patient_pattern"):
        items.append(("patient_pattern", "group 1 of the case id is the patient; splits keep a patient's cases together"))
    return items


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...")


def section_block(key: str, section: dict[str, Any], comment: str) -> str:
    """`key:` then one indented comment line and one flow-style line per entry (params.yaml's own style)."""
    lines = [f"{key}:", f"  # {comment}"] + [f"  {k}: {_yaml_value(v)}" for k, v in section.items()]
    return "\n".join(lines) + "\n"


def dataset_block(section: dict[str, Any]) -> str:
    """The `dataset:` block as written to params.yaml, its comment naming the values to check."""
    keys = ", ".join(k for k, _ in review_items(section))
    return section_block("dataset", section, f"written by `medseg dataset init`; check {keys}")


def replace_yaml_section(text: str, key: str, block_text: str) -> str:
    """`text` with its top-level `key:` entry replaced by `block_text` (appended if absent), every other byte kept.

    The entry runs from its `key:` line to the next top-level line; blank lines and column-0 comments just
    before that next line belong to what follows (params.yaml puts a key's comment above it), so they stay.
    """
    block_text = block_text if block_text.endswith("\n") else block_text + "\n"
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if re.match(rf"{re.escape(key)}\s*:(\s|$)", line)]
    if len(starts) > 1:
        raise ConfigError(f"top-level '{key}:' appears {len(starts)} times")
    if not starts:
        sep = "" if not text else ("\n" if text.endswith("\n") else "\n\n")
        return text + sep + block_text
    start = starts[0]
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"[^\s#]", lines[i])), len(lines))
    while end - 1 > start and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
        end -= 1
    return "".join(lines[:start]) + block_text + "".join(lines[end:])


RECIPE_LINE = "  recipe: planned           # set by `medseg dataset init`: nnU-Net's 2D recipe planned from your data\n"


def set_planned_recipe(text: str) -> str:
    """`text` with `data.recipe: planned` (a new dataset's recipe: slices at a planned spacing, patches, sliding
    windows; medseg.data.plan), every other line kept: the `recipe:` line of the top-level `data:` block replaced,
    or added as its first entry, or a `data:` block appended."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if re.match(r"data\s*:(\s|$)", line)]
    if not starts:
        sep = "" if not text or text.endswith("\n") else "\n"
        return text + sep + "data:\n" + RECIPE_LINE
    start = starts[0]
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"[^\s#]", lines[i])), len(lines))
    for i in range(start + 1, end):
        if re.match(r"\s+recipe\s*:", lines[i]):
            return "".join(lines[:i]) + RECIPE_LINE + "".join(lines[i + 1:])
    return "".join(lines[:start + 1]) + RECIPE_LINE + "".join(lines[start + 1:])


def write_dataset_section(params_path: str | Path, section: dict[str, Any], raw_dir: str | Path) -> str:
    """Replace the `dataset:` block of `params_path` and set `data.recipe: planned` (one atomic write) after
    checking the result; returns the dataset block."""
    from medseg.data.checks import check_label_map
    from medseg.io import write_text

    params_path, raw_dir = Path(params_path), Path(raw_dir)
    if not params_path.is_file():
        raise ConfigError(f"{params_path}: parameters file not found (run from the project root or pass --root)")
    if Path(os.path.abspath(params_path)).is_relative_to(os.path.abspath(raw_dir)):
        raise ConfigError(f"{raw_dir}: holds {params_path}; medseg never writes inside a raw data folder")
    block = dataset_block(section)
    try:
        text = set_planned_recipe(replace_yaml_section(params_path.read_text(encoding="utf-8"), "dataset", block))
        params = yaml.safe_load(text)
    except (ConfigError, yaml.YAMLError) as exc:
        raise ConfigError(f"{params_path}: {exc}") from exc
    if not isinstance(params, dict) or params.get("dataset") != section \
            or (params.get("data") or {}).get("recipe") != "planned":  # never write a file that reads back otherwise
        raise ConfigError(f"{params_path}: the new dataset block does not read back as written")
    spec = dataset_spec(params["dataset"], raw_dir)
    check_label_map(spec.label_map, spec.num_classes)
    write_text(params_path, text)
    return block
