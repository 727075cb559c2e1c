"""The model card: everything needed to apply a trained model without the project (timm's pretrained config,
nnU-Net's plans.json + dataset.json, a MONAI bundle's `network_data_format`, in one object).

Written by training into checkpoint.pt (`card`), by export into the ONNX file's `metadata_props` (key
`ONNX_METADATA_KEY`, JSON), by register into the MLflow model's metadata and version tags. Read back with
`ModelCard.from_dict` / `card_from_onnx` (ONNX Runtime only: a deployment needs neither torch nor onnx).

Pure Python + json: importable by the prediction path (only `build_card`, which training calls, imports more:
`medseg.config` and `medseg.data.split`, yaml and numpy; never torch).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from medseg import __version__
from medseg.data.plan import SlicePlan
from medseg.data.preprocessing import NORMALISATIONS, RESIZE  # the card records preprocessing's rules
from medseg.errors import MedsegError

CARD_SCHEMA = 3  # the newest card this medseg reads
# Schema 2 adds `nnunet` (an imported nnU-Net model): an older medseg, which would ignore the recipe and run the
# network the wrong way, refuses such a card ("newer than this medseg"). Cards without it stay schema 1.
NNUNET_CARD_SCHEMA = 2
# Schema 3 adds `recipe` (medseg.data.plan.SlicePlan): a planned recipe's spacing, patch and sliding window, which
# an older medseg would ignore (resizing every slice to the patch size). Resize-recipe cards keep schema 1.
PLANNED_CARD_SCHEMA = 3
ONNX_METADATA_KEY = "medseg.model_card"
# Bounds of what a card may describe: a hostile or corrupt card is refused before it sizes any allocation.
MAX_IMAGE_SIDE = 8192  # pixels of the training size's side (predict allocates batches of it)
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_CLASSES = 255  # class indices are uint8
MAX_INPUT_CHANNELS = 256
MAX_LABEL_VALUE = 2**32 - 1  # raw label values are written as unsigned integers
CANONICAL_ORIENTATION = "RAS"  # NIfTI volumes are reoriented to the closest canonical at ingest and predict
SLICE_AXIS = "z"  # 2D networks see axial (canonical z) slices, stored (D=z, H=y, W=x)


class CardError(MedsegError):
    """A model card is missing, unreadable or does not describe a usable model; the message names the source."""


@dataclass(frozen=True)
class ModelCard:
    arch: str
    model_options: dict[str, Any]
    image_channels: int  # channels of one slice (1 CT/MR, 3 RGB, k for multi-sequence MR)
    context: int  # 2.5D: neighbouring slices on each side stacked as channels
    class_names: list[str]
    label_values: list[int]  # class index -> raw label value written to disk (inverse of dataset.label_map)
    image_size: list[int]  # [h, w] the network's input: every slice resized to it (RESIZE rules), or the patch size
    size_multiple: int  # H and W the network accepts must be multiples of this (at image_size they are)
    dynamic_hw: bool  # whether the exported graph accepts other H, W than image_size
    modality: str  # ct | mr | rgb | grey
    normalisation: dict[str, Any]  # {"method": one of NORMALISATIONS, + its exact parameters}
    input_kind: str  # "volume" (NIfTI, 3D) | "image2d" (PNG/JPG/TIF, one slice)
    spacing: list[float] | None  # (sz, sy, sx) mm, the training fingerprint's median; None when unknown
    dataset: dict[str, Any]  # name, format, version (hash of cases.json)
    split: dict[str, Any]  # fingerprints of the split the model was trained / tested on
    intensity: list[dict[str, float]] = field(default_factory=list)  # training foreground stats per channel
    evaluation: dict[str, Any] | None = None  # protocol, hd95_unit, test metrics; None until evaluated
    orientation: str = CANONICAL_ORIENTATION
    slice_axis: str = SLICE_AXIS
    resize: dict[str, str] = field(default_factory=lambda: dict(RESIZE))
    medseg_version: str = ""
    schema: int = 1
    # An imported nnU-Net model's whole inference recipe (medseg.nnunet.inference.NnunetRecipe); None for medseg's
    # own networks. With it, `normalisation` is {"method": "nnunet"} and `orientation` "native": the scan's own
    # voxel order, as nnU-Net reads it.
    nnunet: dict[str, Any] | None = None
    # How slices meet the network (medseg.data.plan.SlicePlan.to_dict); None: the resize recipe at image_size.
    recipe: dict[str, Any] | None = None
    # [r, g, b] 0..255 per class (a DICOM SEG's segment colours); None (an older card): class_colour's palette
    class_colours: list[list[int]] | None = None

    def colour_of(self, index: int) -> tuple[int, int, int]:
        if self.class_colours is not None:
            r, g, b = self.class_colours[index]
            return int(r), int(g), int(b)
        return class_colour(index)

    @property
    def plan(self) -> SlicePlan:
        return SlicePlan.from_dict(self.recipe, self.image_size, "model card")

    @property
    def in_channels(self) -> int:
        """Channels of the network input: each slice's channels times the 2.5D stack."""
        return self.image_channels * (2 * self.context + 1)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "in_channels": self.in_channels, "num_classes": self.num_classes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def with_evaluation(self, evaluation: Mapping[str, Any]) -> "ModelCard":
        return ModelCard(**{**asdict(self), "evaluation": dict(evaluation)})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path = "model card") -> "ModelCard":
        """Validate and build; CardError names `source` and the first problem."""
        if not isinstance(data, Mapping):
            raise CardError(f"{source}: model card is not a mapping")
        schema = data.get("schema", 0)
        if isinstance(schema, bool) or not isinstance(schema, int):
            raise CardError(f"{source}: model card schema {schema!r} is not a whole number")
        if schema > CARD_SCHEMA:
            raise CardError(f"{source}: model card schema {data.get('schema')} is newer than this medseg ({CARD_SCHEMA}); upgrade medseg")
        names = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.default is MISSING and f.default_factory is MISSING)
        if missing:
            raise CardError(f"{source}: model card lacks {', '.join(missing)}")
        try:
            card = cls(**{k: v for k, v in data.items() if k in names})  # derived keys are recomputed, below
            card.validate(source)
        except (TypeError, ValueError, AttributeError) as exc:  # e.g. image_size null, normalisation a string
            raise CardError(f"{source}: model card is malformed ({type(exc).__name__}: {exc})") from exc
        for key in ("in_channels", "num_classes"):  # a stored derived value that disagrees means a corrupt card
            if key in data and data[key] != getattr(card, key):
                raise CardError(f"{source}: model card {key} {data[key]} != {getattr(card, key)} from its other fields")
        return card

    def validate(self, source: str | Path = "model card") -> None:
        def bad(problem: str) -> CardError:
            return CardError(f"{source}: model card {problem}")

        def whole(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not isinstance(self.class_names, list) or not all(isinstance(n, str) for n in self.class_names):
            raise bad(f"class_names must be a list of names, got {self.class_names!r}")
        if not isinstance(self.label_values, list) or len(self.class_names) < 2 \
                or len(self.label_values) != len(self.class_names):
            raise bad(f"needs >= 2 class names and one label value each, got {self.class_names} / {self.label_values}")
        if len(self.class_names) > MAX_CLASSES:
            raise bad(f"has {len(self.class_names)} classes; at most {MAX_CLASSES} fit the uint8 class indices")
        if not all(whole(v) and 0 <= v <= MAX_LABEL_VALUE for v in self.label_values):
            raise bad(f"label_values must be whole numbers 0..{MAX_LABEL_VALUE} (written as unsigned labels), "
                      f"got {self.label_values}")
        if self.label_values[0] != 0:
            raise bad(f"label_values[0] (background) must be 0, got {self.label_values[0]}")
        if not isinstance(self.image_size, list) or len(self.image_size) != 2 \
                or not all(whole(s) and s >= 1 for s in self.image_size):
            raise bad(f"image_size must be [h, w] of whole numbers >= 1, got {self.image_size}")
        h, w = self.image_size
        if max(h, w) > MAX_IMAGE_SIDE or h * w > MAX_IMAGE_PIXELS:
            raise bad(f"image_size {self.image_size} is over {MAX_IMAGE_SIDE} pixels a side or "
                      f"{MAX_IMAGE_PIXELS} pixels in all")
        if not all(whole(v) for v in (self.image_channels, self.context, self.size_multiple)) \
                or self.image_channels < 1 or self.context < 0 or self.size_multiple < 1:
            raise bad("image_channels >= 1, context >= 0 and size_multiple >= 1 (whole numbers) are required")
        if self.in_channels > MAX_INPUT_CHANNELS:
            raise bad(f"network input of {self.in_channels} channels (image_channels x (2 context + 1)) is over "
                      f"{MAX_INPUT_CHANNELS}")
        if not isinstance(self.normalisation, Mapping):
            raise bad(f"normalisation must be a mapping, got {self.normalisation!r}")
        if self.recipe is not None:
            self._validate_recipe(source)
        if self.class_colours is not None and (
                not isinstance(self.class_colours, list) or len(self.class_colours) != len(self.class_names)
                or not all(isinstance(c, list) and len(c) == 3 and all(whole(v) and 0 <= v <= 255 for v in c)
                           for c in self.class_colours)):
            raise bad(f"class_colours must be one [r, g, b] (0..255) per class, got {self.class_colours!r}")
        if self.nnunet is not None:
            self._validate_nnunet(source)
        elif self.normalisation.get("method") not in NORMALISATIONS:
            raise bad(f"normalisation method {self.normalisation.get('method')!r} is not one of {', '.join(NORMALISATIONS)}")
        if self.input_kind not in ("volume", "image2d"):
            raise bad(f"input_kind {self.input_kind!r} is not volume or image2d")
        if self.spacing is not None and len(self.spacing) != 3:
            raise bad(f"spacing must be [sz, sy, sx] or null, got {self.spacing}")

    def _validate_recipe(self, source: str | Path) -> None:
        if not isinstance(self.recipe, Mapping):
            raise CardError(f"{source}: model card recipe must be a mapping, got {self.recipe!r}")
        plan = SlicePlan.from_dict(self.recipe, self.image_size, str(source))
        if list(plan.image_size) != list(self.image_size):
            raise CardError(f"{source}: model card recipe image_size {list(plan.image_size)} != image_size "
                            f"{self.image_size}")
        if plan.planned:
            if self.schema < PLANNED_CARD_SCHEMA:
                raise CardError(f"{source}: model card with a planned recipe must be schema {PLANNED_CARD_SCHEMA}")
            if not 0 < plan.tile_step <= 1:
                raise CardError(f"{source}: model card recipe tile_step must be in (0, 1], got {plan.tile_step}")

    def _validate_nnunet(self, source: str | Path) -> None:
        from medseg.nnunet.inference import NnunetRecipe

        if not isinstance(self.nnunet, Mapping):
            raise CardError(f"{source}: model card nnunet must be a mapping, got {self.nnunet!r}")
        if self.schema < NNUNET_CARD_SCHEMA:
            raise CardError(f"{source}: model card with an nnunet recipe must be schema {NNUNET_CARD_SCHEMA}")
        if self.normalisation.get("method") != "nnunet" or self.orientation != "native":
            raise CardError(f"{source}: model card of an nnU-Net model needs normalisation method 'nnunet' and "
                            f"orientation 'native'")
        try:
            recipe = NnunetRecipe.from_dict(self.nnunet)
        except (KeyError, TypeError, ValueError) as exc:
            raise CardError(f"{source}: model card nnunet is malformed ({type(exc).__name__}: {exc})") from exc
        try:
            recipe.validate(str(source))
        except MedsegError as exc:
            raise CardError(str(exc)) from exc
        if recipe.num_classes != self.num_classes or len(recipe.normalization_schemes) != self.image_channels:
            raise CardError(f"{source}: model card nnunet has {recipe.num_classes} classes and "
                            f"{len(recipe.normalization_schemes)} channels, the card {self.num_classes} and "
                            f"{self.image_channels}")
        if list(recipe.patch_size) != list(self.image_size):
            raise CardError(f"{source}: model card nnunet patch_size {list(recipe.patch_size)} != image_size "
                            f"{self.image_size}")


def class_colour(index: int) -> tuple[int, int, int]:
    """A display colour per class index, well apart for neighbours (golden-angle hues; background black)."""
    import colorsys

    if index == 0:
        return 0, 0, 0
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def inverse_label_map(label_map: Mapping[Any, Any] | None, num_classes: int) -> list[int]:
    """class index -> the raw label value to write back (dataset.label_map inverted; identity without one).

    Background writes 0. When several raw values map to one class, the smallest is written.
    """
    values = list(range(num_classes))
    if label_map:
        chosen: dict[int, int] = {}
        for raw, cls in label_map.items():
            cls = int(cls)
            if cls > 0:
                chosen[cls] = min(int(raw), chosen.get(cls, int(raw)))
        values = [0] + [chosen.get(c, c) for c in range(1, num_classes)]
    return values


def dataset_version(cases_json: str | Path) -> str:
    """Content version of an ingested dataset: sha256[:12] of its cases.json bytes (which hold every case's sha256)."""
    return hashlib.sha256(Path(cases_json).read_bytes()).hexdigest()[:12]


def sha256_of_test_data(cases: Mapping[str, Mapping[str, Any]], test_ids: Sequence[str]) -> str:
    """sha256 of the test cases' ids AND content: (id, image sha256, label sha256) of each, from cases.json,
    sorted. The gate compares two versions' DSCs only when this matches: a re-ingest that changed the scans
    under the same case ids is other test data (the version tag and metrics.json's `test_data_sha256`)."""
    entries = [(str(i), cases.get(i) or {}) for i in test_ids]
    rows = sorted([i, str(c.get("sha256", "")), str(c.get("label_sha256", ""))] for i, c in entries)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def sha256_of_test_cases(test_ids: Sequence[str]) -> str:
    """sha256 of the sorted test case ids: the fingerprint of the cases test metrics were measured on (the card's
    split.test_cases_sha256, metrics.json and the version tag `test_cases_sha256`, which the promotion gate
    compares). Not `medseg.data.split.split_sha256`, which covers the whole split file."""
    return hashlib.sha256(json.dumps(sorted(test_ids)).encode()).hexdigest()


def build_card(
    params: Mapping[str, Any],
    arch: str,
    manifest: Mapping[str, Any],
    fingerprint: Mapping[str, Any],
    split: Mapping[str, Any],
    *,
    dataset_version: str,
    size_multiple: int,
    dynamic_hw: bool,
    plan: SlicePlan | None = None,
    medseg_version: str = __version__,
) -> ModelCard:
    """The card of a model trained on this dataset and split, from the plain dicts of params.yaml,
    data/ingested/<name>/cases.json (`manifest`), fingerprint.json and data/splits/<name>.json.

    `dataset_version` is `dataset_version(cases.json)` (a hash of the file's bytes, which the dict cannot give);
    `size_multiple` / `dynamic_hw` are the architecture's (`medseg.models.size_multiple_of`, ModelInfo); `plan` the
    recipe it was trained with (medseg.data.plan.plan_slices; None: resize to data.image_size).
    """
    from medseg.config import model_options, settings
    from medseg.data.split import split_sha256

    dataset = params.get("dataset") or {}
    data = settings(params).data
    class_names = [str(n) for n in manifest["class_names"]]
    # TransUNet's npz/h5 labels are already class indices (ingest applies no label_map): write them back as such.
    label_map = None if manifest["format"] == "transunet" else dataset.get("label_map")
    spacing = fingerprint.get("spacing") or {}
    card = ModelCard(
        arch=arch,
        model_options=json.loads(json.dumps(model_options(dict(params), arch))),  # tuples -> lists: JSON-native
        image_channels=int(manifest["in_channels"]),
        context=data.context,
        class_names=class_names,
        label_values=inverse_label_map(label_map, len(class_names)),
        image_size=[int(v) for v in (plan.image_size if plan is not None else data.image_size)],
        size_multiple=int(size_multiple),
        dynamic_hw=bool(dynamic_hw),
        modality=str(manifest["modality"]),
        normalisation=dict(manifest["normalisation"]),
        input_kind="image2d" if manifest["format"] == "folder2d" else "volume",
        # An unknown spacing was recorded as 1 mm at ingest; the card says "unknown" instead of passing it off as mm.
        spacing=[float(v) for v in spacing["median"]] if fingerprint.get("spacing_known") else None,
        dataset={"name": str(dataset.get("name", manifest.get("dataset"))), "format": str(manifest["format"]),
                 "version": dataset_version},
        split={"split_sha256": split_sha256(split), "test_cases_sha256": sha256_of_test_cases(split.get("test") or [])},
        intensity=[dict(stats) for stats in fingerprint.get("foreground_intensity") or []],
        medseg_version=medseg_version,
        recipe=plan.to_dict() if plan is not None and plan.planned else None,
        class_colours=[list(class_colour(k)) for k in range(len(class_names))],
        schema=PLANNED_CARD_SCHEMA if plan is not None and plan.planned else 1,
    )
    card.validate(f"model card of {arch}")
    return card


def evaluation_of(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The card's `evaluation` from reports/<arch>/metrics.json: protocol, HD95 unit, NSD tolerances, mean and
    per-class DSC/HD95/NSD.

    Non-finite values become None, so the card stays strict JSON and equal to itself after a round trip.
    """
    def number(value: Any) -> float | None:
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    return {
        "protocol": metrics.get("protocol"),
        "hd95_unit": metrics.get("hd95_unit"),
        "mean_dsc": number(metrics.get("mean_dsc")),
        "mean_hd95": number(metrics.get("mean_hd95")),
        "mean_nsd": number(metrics.get("mean_nsd")),
        "nsd_tolerance": {str(k): number(v) for k, v in (metrics.get("nsd_tolerance") or {}).items()},
        "per_class": {str(name): {key: number((scores or {}).get(key)) for key in ("dsc", "hd95", "nsd")}
                      for name, scores in (metrics.get("per_class") or {}).items()},
    }


def card_from_onnx(path: str | Path) -> ModelCard:
    """The card in an exported model's metadata_props, read with ONNX Runtime (no torch, no onnx package)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise CardError(f"{path}: ONNX model not found")
    try:
        meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    except Exception as exc:  # onnxruntime raises its own types for truncated or foreign files
        raise CardError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    return card_from_metadata(meta, path)


def card_from_metadata(meta: Mapping[str, str], source: str | Path) -> ModelCard:
    text = meta.get(ONNX_METADATA_KEY)
    if text is None:
        raise CardError(f"{source}: no {ONNX_METADATA_KEY} in the model's metadata (exported by an older medseg? re-run `dvc repro export@<arch>`)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CardError(f"{source}: {ONNX_METADATA_KEY} is not valid JSON ({exc})") from exc
    return ModelCard.from_dict(data, source)
