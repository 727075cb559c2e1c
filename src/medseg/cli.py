"""`medseg` command line. `medseg train ARCH` etc. run what the DVC stage scripts (stages/*.py) run, through
the same `medseg.entry.call_stage`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from medseg.config import PARAMS_FILE, disable_telemetry, load_params
from medseg.errors import MedsegError, error_message

log = logging.getLogger("medseg")

PRESET_DIR = "presets"


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_models(args: argparse.Namespace) -> int:
    """The architecture table: rich on a terminal, every name and description whole off one (a pipe, a file),
    or JSON with --json."""
    from medseg.models import available_models, get_model_info

    rows = []
    for name in available_models():
        info = get_model_info(name)
        rows.append({"name": name, "family": info.family, "paper_params_m": info.paper_params_m,
                     "paper_gflops": info.paper_gflops, "dynamic_hw": info.dynamic_hw,
                     "size_multiple": info.size_multiple, "ablation_of": info.ablation_of,
                     "description": info.description})
    if args.json:
        _print_json(rows)
        return 0
    from medseg.runtime.progress import on_terminal

    header = ("name", "family", "paper params (M)", "paper GFLOPs", "ONNX dynamic H/W", "H, W multiple of",
              "description")
    cells = [(r["name"], r["family"], "" if r["paper_params_m"] is None else f"{r['paper_params_m']:g}",
              "" if r["paper_gflops"] is None else f"{r['paper_gflops']:g}", "yes" if r["dynamic_hw"] else "no",
              str(r["size_multiple"]), r["description"]) for r in rows]
    if on_terminal():
        from rich.console import Console
        from rich.table import Table

        table = Table(title="medseg models")
        for col in header:
            table.add_column(col)
        for row in cells:
            table.add_row(*row)
        Console().print(table)
        return 0
    # a pipe or a file: plain aligned columns, nothing cut (rich would fit the table to 80 columns: `mamba_u…`)
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header) - 1)]
    for row in [header, *cells]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0


def _stage(func_path: str, with_arch: bool, nnunet_path: str | None = None) -> Callable[[argparse.Namespace], int]:
    """Build a command that calls `module:function(params, [arch,] root)` as its DVC stage script does (with
    `nnunet_path`'s function for an nnU-Net entry, as stages/train.py, evaluate.py and export.py choose)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        from medseg.entry import call_stage
        from medseg.nnunet.train import is_nnunet_entry

        chosen = nnunet_path if nnunet_path and with_arch and is_nnunet_entry(args.arch) else func_path
        module_name, func_name = chosen.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        call_stage(func, args.arch if with_arch else None, root=args.root, params_file=args.params)
        return 0

    return run


def cmd_promote(args: argparse.Namespace) -> int:
    from medseg.errors import PromotionRefused
    from medseg.tracking.promotion import promote, promote_in_project

    params_path = Path(args.root) / args.params
    try:
        if params_path.is_file():  # in a project: a champion tested on other data is re-evaluated on its test split
            result = promote_in_project(load_params(params_path), args.model_name, args.root, args.tracking_uri)
        else:
            result = promote(args.model_name, tracking_uri=args.tracking_uri)
    except PromotionRefused as exc:
        print(f"promotion refused: {exc}", file=sys.stderr)
        return 3
    _print_json(result)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Segment files with an exported model on ONNX Runtime; imports no torch (nor mlflow for a local model)."""
    from medseg.deployment.predict import load_predictor, predict_files

    tracking_uri = args.tracking_uri
    params_path = Path(args.root) / args.params
    if args.model.startswith("models:/") and not tracking_uri and params_path.is_file():
        from medseg.tracking.store import resolve_tracking_uri  # MLFLOW_TRACKING_URI, else the project's store

        tracking_uri = resolve_tracking_uri(load_params(params_path), args.root)
    start = time.perf_counter()
    predictor = load_predictor(args.model, args.device, tracking_uri=tracking_uri, batch_size=args.batch_size,
                               threads=args.threads)
    results = predict_files(predictor, args.input, args.output, labels=args.labels,
                            save_probabilities=args.save_probabilities, tta=args.tta, resume=args.resume,
                            overwrite=args.overwrite)
    skipped = sum(r["skipped"] for r in results)
    log.info("%s: %d case(s) predicted, %d already there, in %.1f s", args.output, len(results) - skipped, skipped,
             time.perf_counter() - start)
    return 0


def resolve_model(model: str, tracking_uri: str | None) -> str:
    """`model`, an alias URI pinned to the version it names now (models:/<name>@<alias> -> models:/<name>/<N>), so
    one run uses one version and the SEGs it writes name it."""
    if not (model.startswith("models:/") and "@" in model):
        return model
    from medseg.errors import PredictError
    from medseg.tracking.registry import alias_version
    from medseg.tracking.store import connect

    name, alias = model[len("models:/"):].split("@", 1)
    version = alias_version(connect(tracking_uri), name, alias)
    if version is None:
        raise PredictError(model, f"no version of {name} has the alias {alias!r} in {tracking_uri}")
    return f"models:/{name}/{version}"


def cmd_pacs_segment(args: argparse.Namespace) -> int:
    """Segment a study on a DICOMweb server and store the SEGs back (medseg.deployment.pacs)."""
    from medseg.deployment.pacs import outcomes_as_rows, segment_study
    from medseg.deployment.predict import load_predictor, model_version

    tracking_uri = args.tracking_uri
    params_path = Path(args.root) / args.params
    if args.model.startswith("models:/") and not tracking_uri:
        from medseg.tracking.store import resolve_tracking_uri  # MLFLOW_TRACKING_URI, else the project's store

        tracking_uri = resolve_tracking_uri(load_params(params_path) if params_path.is_file() else {}, args.root)
    predictor = load_predictor(resolve_model(args.model, tracking_uri), tracking_uri=tracking_uri)
    outcomes = segment_study(args.url, args.study, predictor, model_version=model_version(predictor), tta=args.tta)
    _print_json(outcomes_as_rows(outcomes))
    return 0


def cmd_nnunet_dataset(args: argparse.Namespace) -> int:
    """Write the ingested dataset, split as medseg split it, in nnU-Net v2's raw layout (data/nnunet/raw)."""
    from medseg.nnunet.dataset import write_nnunet_raw

    folder = write_nnunet_raw(load_params(Path(args.root) / args.params), args.root, args.id)
    raw = folder.parent.resolve()
    print(f"{folder}\n\nnnU-Net v2 trains on it (here or on a GPU machine with this folder):\n"
          f"  export nnUNet_raw={raw} nnUNet_preprocessed=<preprocessed> nnUNet_results=<results>\n"
          f"  nnUNetv2_plan_and_preprocess -d {args.id} -c 2d --verify_dataset_integrity\n"
          f"  nnUNetv2_train {args.id} 2d 0    # fold 0 = medseg's train/val split (splits_final.json)\n"
          f"then, into this project's comparison (nnunet_2d in params.yaml models:):\n"
          f"  medseg nnunet adopt <results>/{folder.name}/nnUNetTrainer__nnUNetPlans__2d\n"
          f"or, as a deployable model alone:\n"
          f"  medseg nnunet import <results>/{folder.name}/nnUNetTrainer__nnUNetPlans__2d -o models/nnunet_2d")
    return 0


def cmd_nnunet_import(args: argparse.Namespace) -> int:
    """A trained nnU-Net v2 2D model folder -> model.onnx with its card (medseg predict, register, serve)."""
    from medseg.nnunet.convert import import_nnunet_model

    folds = "all" if args.fold == ["all"] else args.fold
    _print_json(import_nnunet_model(args.results, args.output, folds, args.checkpoint, args.arch, args.opset))
    return 0


def cmd_nnunet_adopt(args: argparse.Namespace) -> int:
    """A model nnU-Net trained elsewhere becomes this project's nnU-Net entry (the train stage's outputs)."""
    from medseg.nnunet.train import adopt_nnunet_results

    summary = adopt_nnunet_results(load_params(Path(args.root) / args.params), args.arch, args.results, args.fold,
                                   args.checkpoint, args.root)
    _print_json(summary)
    print(f"next: medseg evaluate {args.arch} && medseg export {args.arch} && medseg register {args.arch} && "
          f"medseg report   (with DVC: dvc commit -f train@{args.arch}, then dvc repro)", file=sys.stderr)
    return 0


def _add_nnunet(sub) -> None:
    p = sub.add_parser("nnunet", help="nnU-Net v2 beside medseg: its raw dataset from medseg's split, import its "
                                      "trained models")
    nnunet_sub = p.add_subparsers(dest="nnunet_command", required=True)
    p = nnunet_sub.add_parser("dataset", help="write the dataset and split in nnU-Net v2's raw layout "
                                              "(data/nnunet/raw/Dataset<ID>_<name>)")
    p.add_argument("--id", type=int, default=900, help="nnU-Net dataset id, 1..999 (default 900)")
    p.set_defaults(func=cmd_nnunet_dataset)
    p = nnunet_sub.add_parser("import", help="turn a trained nnU-Net v2 2D model into model.onnx with its card",
                              description="Read <Trainer>__<Plans>__2d (plans.json, dataset.json, fold_<k>/"
                              "checkpoint_*.pth), rebuild the network with nnunetv2 (the [nnunet] extra), export one "
                              "ONNX graph averaging the chosen folds' logits, and write its model card: "
                              "`medseg predict` then reproduces nnUNetv2_predict without torch.")
    p.add_argument("results", help="the trained model folder, e.g. $nnUNet_results/Dataset900_x/"
                                   "nnUNetTrainer__nnUNetPlans__2d")
    p.add_argument("-o", "--output", required=True, help="model folder to write (model.onnx, nnunet_import.json)")
    p.add_argument("--fold", nargs="+", default=["all"], help="folds to ensemble (default: all trained folds)")
    p.add_argument("--checkpoint", choices=("final", "best"), default="final")
    p.add_argument("--arch", default="nnunet_2d", help="the name the card and the registry give it")
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=cmd_nnunet_import)
    p = nnunet_sub.add_parser("adopt", help="make an nnU-Net model trained elsewhere this project's nnU-Net entry",
                              description="Write the train stage's outputs of an nnU-Net entry (models/<arch>/"
                              "checkpoint.pt, reports/<arch>/train_*) from a trained model folder, so that "
                              "evaluate, export, register and the report take it without retraining. The model must "
                              "have been trained on the folder `medseg nnunet dataset` wrote from this project's "
                              "split (its dataset.json says so).")
    p.add_argument("results", help="the trained model folder, e.g. $nnUNet_results/Dataset900_x/"
                                   "nnUNetTrainer__nnUNetPlans__2d")
    p.add_argument("--arch", default="nnunet_2d", choices=("nnunet_2d", "nnunet_resenc_m_2d"),
                   help="the params.yaml models: entry it becomes (default nnunet_2d)")
    p.add_argument("--fold", type=int, default=0, help="the fold to take (default 0: medseg's train/val split)")
    p.add_argument("--checkpoint", choices=("final", "best"), default="final")
    p.set_defaults(func=cmd_nnunet_adopt)


def cmd_doctor(args: argparse.Namespace) -> int:
    from medseg.data.doctor import run_doctor

    params = load_params(Path(args.root) / args.params)
    return run_doctor(params, args.root, raw_dir=args.raw_dir, fmt=args.format)


def cmd_dataset_init(args: argparse.Namespace) -> int:
    """Describe a raw dataset as params.yaml's `dataset:` section (the raw folder is only read)."""
    from medseg.data import detect
    from medseg.data.ingest import check_raw_dir_is_not_an_output

    section, notes = detect.infer_dataset_section(args.raw_dir, args.format, args.name, root=args.root)
    check_raw_dir_is_not_an_output(Path(args.root) / section["raw_dir"], args.root, builtin_ok=False)
    print(f"{args.raw_dir}:")
    for note in notes:
        print(f"  {note}")
    print("check before training:")
    for key, why in detect.review_items(section):
        print(f"  - {key}: {why}")
    params_path = Path(args.root) / args.params
    if args.dry_run:
        print("\n" + detect.dataset_block(section))
        print(f"(dry run: {params_path} not changed)")
        return 0
    raw_path = Path(args.root) / section["raw_dir"]  # an absolute raw_dir stays itself
    detect.write_dataset_section(params_path, section, raw_path)
    print(f"{params_path}: dataset section written, data.recipe: planned (every other line kept)")
    print("next: `medseg doctor` (checks every case against this description), then `dvc repro`")
    return 0


def cmd_preset(args: argparse.Namespace) -> int:
    """Replace params.yaml with presets/<name>.yaml (the one switch between quick and paper settings)."""
    from medseg.io import write_text

    root = Path(args.root)
    source = root / PRESET_DIR / f"{args.name}.yaml"
    if not source.is_file():
        available = sorted(p.stem for p in (root / PRESET_DIR).glob("*.yaml"))
        raise MedsegError(f"{source}: no such preset; available: {', '.join(available) or 'none'}")
    text = source.read_text(encoding="utf-8")
    load_params(source)  # refuse a preset that is not valid YAML before touching params.yaml
    write_text(root / args.params, text)
    print(f"{args.params} <- {source} (run `dvc repro` to apply)")
    return 0


def _add_predict(sub) -> None:
    """`medseg predict`'s arguments."""
    p = sub.add_parser("predict", help="segment NIfTI, NRRD/MHA or DICOM volumes or 2D images with an exported "
                       "model (ONNX Runtime)",
                       description="Segment NIfTI, NRRD/MHA/MHD volumes, DICOM series (a folder per series) or 2D "
                       "images with an exported model on ONNX Runtime. Labels are written as the dataset's raw values "
                       "(the card's label_values; a 0/255 mask dataset was ingested as 0/1, so its masks come out "
                       "0/1) in the input's format and grid; a DICOM series gives a DICOM SEG (<series>_seg.dcm, one "
                       "segment per class) that references it.")
    p.add_argument("-m", "--model", required=True,
                   help="model.onnx, a models/<arch>/ folder, or models:/<name>@<alias> | models:/<name>/<version>")
    p.add_argument("-i", "--input", required=True, help="a file, a DICOM series folder, or a folder (every "
                   ".nii/.nii.gz, .nrrd/.mha/.mhd or image file and DICOM series folder in it)")
    p.add_argument("-o", "--output", required=True, help="output folder (outside the input)")
    p.add_argument("--labels", choices=("raw", "index"), default="raw",
                   help="raw label values (default) or class indices 0..K-1")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write <case>.npz: probabilities (K, ...) float16 and class_names")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="mirroring test-time augmentation (in-plane flips, 4x slower); default: off for medseg's "
                        "networks, on for imported nnU-Net models (as nnUNetv2_predict; --no-tta turns it off)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--continue", dest="resume", action="store_true", help="skip cases whose outputs exist")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs that are not medseg's prediction of the same input (by default "
                        "they are refused: no file medseg did not write is replaced)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="slices per network call (an nnU-Net model on a CPU: at most 4 tiles, its fastest there)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads (default: the usable cores divided by MEDSEG_PARALLEL_JOBS; "
                        "OMP_NUM_THREADS or MEDSEG_THREADS set it too)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store for models:/ (default: MLFLOW_TRACKING_URI, "
                   "else params.yaml register.tracking_uri)")
    p.set_defaults(func=cmd_predict)


def _add_pacs(sub) -> None:
    p = sub.add_parser("pacs", help="segment studies on a PACS over DICOMweb (QIDO-RS, WADO-RS, STOW-RS)")
    pacs_sub = p.add_subparsers(dest="pacs_command", required=True)
    p = pacs_sub.add_parser("segment", help="segment a study's CT/MR series and store each DICOM SEG back into it",
                            description="Finds the study's image series (QIDO-RS), retrieves each (WADO-RS), segments "
                            "it as `medseg predict` does and stores the DICOM SEG in the same study (STOW-RS). A series "
                            "that has a SEG of the same model version already is left alone; a refused store is an "
                            "error (exit 2). Prints one JSON row per series (UIDs, status; no patient attribute). "
                            "Credentials come from the environment: DICOMWEB_TOKEN (bearer), or DICOMWEB_USER and "
                            "DICOMWEB_PASSWORD (basic).")
    p.add_argument("--url", required=True, help="the DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    p.add_argument("--study", required=True, help="StudyInstanceUID")
    p.add_argument("-m", "--model", required=True,
                   help="model.onnx, a models/<arch>/ folder, or models:/<name>@<alias> | models:/<name>/<version>")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="as for medseg predict")
    p.add_argument("--tracking-uri", default=None, help="MLflow store for models:/ (default: MLFLOW_TRACKING_URI, "
                   "else params.yaml register.tracking_uri)")
    p.set_defaults(func=cmd_pacs_segment)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description=__doc__)
    parser.add_argument("--root", default=".", help="project root (where params.yaml and dvc.yaml live)")
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file, relative to --root")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered architectures")
    p.add_argument("--json", action="store_true", help="one JSON object per architecture, for scripts")
    p.set_defaults(func=cmd_models)
    data_stages = {
        "phantom": ("medseg.data.phantom:generate_from_params", "generate the built-in phantom dataset"),
        "ingest": ("medseg.data.ingest:ingest_from_params", "ingest the dataset named in params.yaml"),
        "split": ("medseg.data.split:split_from_params", "patient-level train/val/test split"),
        "report": ("medseg.report:build_report", "comparison report over params.yaml models"),
    }
    for name, (func_path, help_text) in data_stages.items():
        sub.add_parser(name, help=help_text).set_defaults(func=_stage(func_path, with_arch=False))
    arch_stages = {  # (a network's function, an nnU-Net entry's, help)
        "train": ("medseg.training.trainer:train_model", "medseg.nnunet.train:train_nnunet_entry",
                  "train one architecture"),
        "evaluate": ("medseg.evaluation.evaluate:evaluate_model", "medseg.nnunet.evaluate:evaluate_nnunet_entry",
                     "evaluate one architecture on the test split"),
        "export": ("medseg.deployment.export:export_model", "medseg.nnunet.export:export_nnunet_entry",
                   "export one architecture to ONNX and check parity"),
        "register": ("medseg.tracking.registry:register_model_version", None,
                     "log and register one architecture in MLflow"),
    }
    for name, (func_path, nnunet_path, help_text) in arch_stages.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("arch", help="architecture name (see `medseg models`), or nnunet_2d / nnunet_resenc_m_2d")
        p.set_defaults(func=_stage(func_path, with_arch=True, nnunet_path=nnunet_path))

    p = sub.add_parser("promote", help="move the champion alias to the challenger if it is better",
                       epilog="exit codes: 0 promoted, or unchanged (the challenger is already champion); 3 refused "
                              "(no challenger, worse, different test data or protocol, parity failed: the reason "
                              "is printed); 2 error (no such model, tracking store unreachable)")
    p.add_argument("model_name", help="registered model name, e.g. medseg-phantom-unet")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_promote)

    _add_predict(sub)
    _add_pacs(sub)
    _add_nnunet(sub)

    p = sub.add_parser("doctor", help="check a raw dataset before ingest and print a table of problems")
    p.add_argument("--raw-dir", default=None, help="default: params dataset.raw_dir")
    p.add_argument("--format", default=None, help="default: params dataset.format")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("dataset", help="describe a raw dataset in params.yaml")
    dataset_sub = p.add_subparsers(dest="dataset_command", required=True)
    p = dataset_sub.add_parser("init", help="detect a raw dataset's layout and write params.yaml's dataset: section")
    p.add_argument("raw_dir", help="raw dataset folder or .zip/.tar.gz archive (only read, never changed)")
    p.add_argument("--format", default=None, help="synapse | msd | acdc | folder2d | transunet (default: detected)")
    p.add_argument("--name", default=None, help="dataset name (default: a slug of the folder name)")
    p.add_argument("--dry-run", action="store_true", help="print the section, write nothing")
    p.set_defaults(func=cmd_dataset_init)

    p = sub.add_parser("preset", help="switch params.yaml to a preset (quick | paper | benchmark)")
    p.add_argument("name")
    p.set_defaults(func=cmd_preset)
    return parser


def main(argv: list[str] | None = None) -> int:
    disable_telemetry()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:  # `medseg models | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - a user's error is one line; anything else keeps its traceback
        message = error_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
