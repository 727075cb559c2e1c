"""`python -m medseg.nnunet.worker`: one fold of nnunetv2's own trainer with a given budget, in a process whose
environment names the nnU-Net folders (medseg.nnunet.train starts it). nnU-Net's command line has no epochs or
iterations-per-epoch options (its trainer variants fix them in code), so this sets them on the trainer it builds
exactly as `nnUNetv2_train` builds it."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medseg.nnunet.worker")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--plans", default="nnUNetPlans")
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--val-iterations", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None,
                        help="seed python, numpy and torch (nnU-Net seeds nothing; with its augmentation in this process "
                             "a CPU training is then repeatable)")
    args = parser.parse_args(argv)

    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    torch.set_num_threads(args.threads)
    if args.seed is not None:
        import random

        import numpy as np

        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
    base = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(int(args.dataset)))
    plans = load_json(join(base, f"{args.plans}.json"))
    plans["continue_training"] = False  # as nnunetv2.run.run_training.get_trainer_from_args passes it
    trainer = nnUNetTrainer(plans=plans, configuration=args.configuration, fold=args.fold,
                            dataset_json=load_json(join(base, "dataset.json")), device=torch.device(args.device))
    trainer.num_epochs = args.epochs
    trainer.num_iterations_per_epoch = args.iterations
    trainer.num_val_iterations_per_epoch = args.val_iterations
    trainer.run_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
