"""`medseg doctor`: check a raw dataset before ingesting it and list *every* problem, not just the first
(like nnU-Net's `--verify_dataset_integrity`). It runs the very checks ingest runs (`medseg.data.checks`
through `medseg.data.ingest.load_and_check`), plus dataset-wide warnings ingest does not stop for.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ConfigError, IngestError


@dataclass(frozen=True)
class Problem:
    file: str
    problem: str
    severity: str = "error"  # error: ingest would refuse the dataset | warning: it would go through, but look


def _problem(exc: IngestError, severity: str = "error") -> Problem:
    return Problem(exc.path, exc.problem, severity)


def check_dataset(dataset_params: dict[str, Any], raw_dir: str | Path) -> list[Problem]:
    """Every problem of the dataset at `raw_dir` (a folder or an archive), errors first."""
    return _check(dataset_params, Path(raw_dir))[0]


def _check(dataset_params: dict[str, Any], raw_dir: Path, geometry: list | None = None) -> tuple[list[Problem], int]:
    from medseg.data.archive import ArchiveLimits, dataset_root, is_archive, safe_extract

    if is_archive(raw_dir):
        with tempfile.TemporaryDirectory(prefix="medseg-doctor-") as tmp:
            try:
                extracted = dataset_root(safe_extract(raw_dir, Path(tmp) / "raw", ArchiveLimits.from_params(dataset_params)))
            except IngestError as exc:
                return [_problem(exc)], 0
            return _check_folder(dataset_params, extracted, geometry)
    return _check_folder(dataset_params, raw_dir, geometry)


def _check_folder(dataset_params: dict[str, Any], raw_dir: Path, geometry: list | None = None
                  ) -> tuple[list[Problem], int]:
    """(problems, cases); `geometry`, when given, receives each readable case's ((D, H, W), (sz, sy, sx))."""
    from medseg.data import checks
    from medseg.data.formats import dataset_spec, discover, external_links
    from medseg.data.ingest import load_and_check

    try:
        spec = dataset_spec(dataset_params, raw_dir)
        checks.check_label_map(spec.label_map, spec.num_classes)
    except ConfigError as exc:
        return [Problem("params.yaml (dataset)", str(exc))], 0
    except IngestError as exc:
        return [_problem(exc)], 0
    cases, layout = discover(spec, raw_dir)
    problems = [_problem(e) for e in layout]
    if spec.allow_external_links:  # followed on purpose: still worth a look
        problems += [_problem(e, "warning") for e in external_links(cases, raw_dir)]
    channels: dict[int, list[str]] = {}
    orientations: dict[str, list[str]] = {}
    present = np.zeros(spec.num_classes, dtype=bool)
    spacings = []
    for case in cases:
        raw, label, errors = load_and_check(case, spec)
        problems += [_problem(e) for e in errors]
        if raw is None:
            continue
        channels.setdefault(raw.image.shape[1], []).append(case.id)
        if geometry is not None:
            d, _, h, w = raw.image.shape
            geometry.append(((d, h, w), tuple(raw.spacing) if raw.spacing is not None else (1.0, 1.0, 1.0)))
        if raw.image_affine is not None:
            import nibabel as nib

            orientations.setdefault("".join(nib.aff2axcodes(raw.image_affine)), []).append(case.id)
        if raw.spacing is not None:
            spacings.append((case, raw.spacing))
        if label is not None:
            present[np.unique(label)] = True
            if label.max(initial=0) == 0:
                problems.append(Problem(str(case.label or case.images[0]), "label has no foreground voxels", "warning"))
        if spec.format == "transunet" and (float(raw.image.min()) < 0.0 or float(raw.image.max()) > 1.0):
            problems.append(Problem(str(case.images[0]), "TransUNet data should be windowed to [0, 1]; values outside it", "warning"))
        if spec.modality == "ct" and spec.format != "transunet" and float(raw.image.max()) <= 1.0:
            problems.append(Problem(str(case.images[0]), "modality is ct but intensities are <= 1: already normalised?", "warning"))
    if len(channels) > 1:
        counts = ", ".join(f"{c} channels: {len(ids)} cases" for c, ids in sorted(channels.items()))
        problems.append(Problem(str(raw_dir), f"cases have different channel counts ({counts})"))
    if len(orientations) > 1:
        summary = ", ".join(f"{code}: {len(ids)} cases (e.g. {ids[0]})" for code, ids in sorted(orientations.items()))
        problems.append(Problem(str(raw_dir), f"mixed volume orientations ({summary})", "warning"))
    if spacings:
        median = np.median(np.asarray([s for _, s in spacings]), axis=0)
        for case, case_spacing in spacings:
            case_spacing = np.asarray(case_spacing)
            if np.any(case_spacing > 3 * median) or np.any(case_spacing < median / 3):
                problems.append(Problem(str(case.images[0]), f"spacing {case_spacing.tolist()} far from the median {median.tolist()}", "warning"))
    if cases and not any(p.severity == "error" for p in problems):
        absent = [n for n, seen in zip(spec.class_names[1:], present[1:]) if not seen]
        if absent:
            problems.append(Problem(str(raw_dir), f"classes never present in any label: {', '.join(absent)}", "warning"))
    problems.sort(key=lambda p: (p.severity != "error", p.file))
    return problems, len(cases)


def _describe(params: dict[str, Any], root: str | Path, raw_dir: str | Path | None, fmt: str | None):
    """(dataset section, raw folder, where the description came from, or the problem that stopped it).

    A folder other than params' dataset.raw_dir is a different dataset: params' class names, label_map and
    modality say nothing about it, so it describes itself (its dataset.json, or its layout's conventions:
    what `medseg dataset init` would write). params.yaml's dataset is checked as it stands otherwise.
    """
    from medseg.data.detect import infer_dataset_section
    from medseg.data.ingest import raw_dir_from_params

    dataset = dict(params.get("dataset") or {})
    own = raw_dir_from_params(params, root) if dataset.get("raw_dir") else None
    if raw_dir is None:
        if own is None:
            raise ConfigError("params.yaml: dataset.raw_dir is required (or pass a raw folder)")
        raw_dir = own
    if own is not None and os.path.abspath(raw_dir) == os.path.abspath(own):
        return {**dataset, **({"format": fmt} if fmt else {})}, Path(raw_dir), "params.yaml", None
    try:
        section, _ = infer_dataset_section(raw_dir, fmt, root=root)
    except IngestError as exc:  # the layout holds no case (e.g. --format synapse on an ACDC folder)
        return {"format": fmt}, Path(raw_dir), None, _problem(exc)
    except ConfigError as exc:  # unknown or ambiguous layout; the message already names the folder
        return {"format": fmt}, Path(raw_dir), None, Problem(str(raw_dir), str(exc).removeprefix(f"{raw_dir}: "))
    source = "its dataset.json" if section["format"] == "msd" else f"the {section['format']} layout's conventions"
    return section, Path(raw_dir), source, None


def run_doctor(params: dict[str, Any], root: str | Path = ".", raw_dir: str | Path | None = None, fmt: str | None = None) -> int:
    """Check `raw_dir` (default `<root>/<dataset.raw_dir>`) as dataset format `fmt` (default `dataset.format`).

    A `raw_dir` other than params' dataset.raw_dir is described by itself (`_describe`). Prints which
    description was used and a table of problems; returns 1 if any is an error, else 0 (the CLI's exit code).
    """
    from rich.console import Console
    from rich.table import Table

    dataset, raw_dir, source, failed = _describe(params, root, raw_dir, fmt)
    geometry: list = []
    problems, num_cases = ([failed], 0) if failed else _check(dataset, raw_dir, geometry)
    budget_line = None
    if geometry and not any(p.severity == "error" for p in problems):
        budget_line, warnings = training_budget(params, geometry)
        problems += [Problem("params.yaml (train)", w, "warning") for w in warnings]
    console = Console()
    if source:
        names = ", ".join(map(str, dataset.get("class_names") or [])) or "from dataset.json"
        modality = dataset.get("modality") or "from dataset.json"
        console.print(f"dataset described by {source}: {dataset.get('format')}, classes {names}, modality {modality}")
    errors = sum(p.severity == "error" for p in problems)
    if problems:
        table = Table(title=f"medseg doctor: {raw_dir} ({dataset.get('format') or 'layout unknown'})", show_lines=False)
        table.add_column("severity")
        table.add_column("file", overflow="fold")
        table.add_column("problem", overflow="fold")
        for p in problems:
            table.add_row(f"[red]{p.severity}[/red]" if p.severity == "error" else f"[yellow]{p.severity}[/yellow]", p.file, p.problem)
        console.print(table)
    if budget_line:
        console.print(f"training budget: {budget_line}")
    console.print(
        f"{num_cases} cases checked: {errors} error(s), {len(problems) - errors} warning(s)"
        + ("" if errors else " - ready to ingest")
    )
    return 1 if errors else 0


def training_budget(params: dict[str, Any], geometry: list) -> tuple[str, list[str]]:
    """(the budget of training params' first network on cases of `geometry` ((D, H, W), (sz, sy, sx)) with
    params' recipe and split fractions, why it is too small) (medseg.data.plan)."""
    from medseg.config import model_options, settings
    from medseg.data.plan import budget_of, plan_slices
    from medseg.models import available_models, input_multiple_of

    config = settings(params)
    arch = next((m for m in config.models if m in available_models()), "unet")
    options = model_options(params, arch)
    shapes = [list(shape) for shape, _ in geometry]
    fingerprint = {"spacing": {"all": [list(s) for _, s in geometry]}, "shape": {"all": shapes}}
    plan = plan_slices(config.data, fingerprint, lambda size: input_multiple_of(arch, size, **options))
    train_share = (1 - config.split.test_fraction) * (1 - config.split.val_fraction)
    slices = sum(shape[0] for shape in shapes) * train_share
    budget = budget_of(plan, config.train, int(slices))
    if plan.planned:
        pixels = train_share * sum(d * h * w for (d, h, w) in (
            (shape[0], *plan.slice_shape(shape[1:], spacing[1:])) for shape, spacing in geometry))
    else:
        pixels = slices * plan.image_size[0] * plan.image_size[1]
    return f"{arch}: {budget.describe()}", budget.warnings(pixels)


def problems_as_dicts(problems: list[Problem]) -> list[dict[str, str]]:
    return [asdict(p) for p in problems]
