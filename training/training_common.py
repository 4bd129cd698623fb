# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""What both L-CAD training stages share: the diffusers-style flags, the accelerator, checkpoints, reproducible
per-step randomness, validation grids, the metrics log, EMA and the Hub.

Reproducibility and resumption: every random draw of a training step comes from a generator seeded by (seed, step,
micro-batch, process) ([`step_generator`]), the data order from accelerate's seedable sampler (seeded by seed and
epoch) and the augmentation from (seed, epoch, sample index) in the dataset. So a run resumed from a checkpoint (model,
optimizer, scheduler, EMA, step counter: all in accelerate's `save_state`) takes exactly the steps an uninterrupted
run takes.

Checkpoints are `output_dir/checkpoint-<global step>` folders written with `accelerator.save_state`, the newest
`--checkpoints_total_limit` kept, as in diffusers' example scripts. (accelerate's own `ProjectConfiguration(total_limit=
...)` only prunes with `automatic_checkpoint_naming`, whose folders are numbered by save count rather than step and
whose counter is not restored by `load_state`, so a resumed run would collide with its own first checkpoint.)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch


logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
METRICS_FILE = "training_log.jsonl"
VALIDATION_DIR = "validation"


# ------------------------------------------------------------------------------------------------ arguments


def add_common_arguments(
    parser: argparse.ArgumentParser, learning_rate: float, train_batch_size: int, validation: bool = True
) -> None:
    """The flags every diffusers example script has, with L-CAD's defaults."""
    group = parser.add_argument_group("training")
    group.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    group.add_argument("--variant", type=str, default=None, help="Variant of the pretrained weights, e.g. fp16.")
    group.add_argument(
        "--output_dir", type=str, required=True, help="Where checkpoints, validation images and the final model go."
    )
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of every random choice (data order, augmentation, noise); runs with the same seed are identical "
        "and a resumed run continues exactly.",
    )
    group.add_argument(
        "--train_batch_size", type=int, default=train_batch_size, help="Batch size per device."
    )
    group.add_argument("--num_train_epochs", type=int, default=1, help="Epochs (ignored when --max_train_steps is set).")
    group.add_argument("--max_train_steps", type=int, default=None, help="Total optimisation steps (overrides epochs).")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimisation step.")
    group.add_argument(
        "--gradient_checkpointing", action="store_true", help="Trade compute for memory in the trained models."
    )
    group.add_argument("--learning_rate", type=float, default=learning_rate, help="Initial learning rate.")
    group.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by the number of GPUs, accumulation steps and batch size.",
    )
    group.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help='diffusers scheduler: "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", '
        '"constant_with_warmup".',
    )
    group.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the learning rate scheduler.")
    group.add_argument("--adam_beta1", type=float, default=0.9, help="Adam's beta1.")
    group.add_argument("--adam_beta2", type=float, default=0.999, help="Adam's beta2.")
    group.add_argument(
        "--adam_weight_decay", type=float, default=0.0, help="Decoupled weight decay (0: plain Adam, as in the paper)."
    )
    group.add_argument("--adam_epsilon", type=float, default=1e-08, help="Adam's epsilon.")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0: no clipping).")
    group.add_argument("--use_ema", action="store_true", help="Keep an EMA of the trained weights and save it.")
    group.add_argument("--ema_decay", type=float, default=0.9999, help="Largest EMA decay.")
    group.add_argument(
        "--ema_warmup", action="store_true", help="EMA decay warm-up (diffusers' use_ema_warmup, power 2/3)."
    )
    group.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; defaults to the accelerate config's. Frozen models run in this precision, trained "
        "weights stay float32.",
    )
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere GPUs.")
    group.add_argument(
        "--report_to",
        type=str,
        default=None,
        help='Trackers for accelerate: "tensorboard", "wandb", "comet_ml", "all"; default none (metrics always go '
        f"to output_dir/{METRICS_FILE}).",
    )
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker log folder, relative to output_dir.")
    group.add_argument("--tracker_project_name", type=str, default=None, help="Project name for the trackers.")
    group.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every this many steps."
    )
    group.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints (oldest removed)."
    )
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='Resume from a checkpoint folder (a checkpoint-<step> name in output_dir or a path), or "latest".',
    )
    group.add_argument(
        "--overfit_one_batch",
        action="store_true",
        help="Debugging: train on the first batch only, with the same noise every step, to check that the model can "
        "fit it (the logged loss is then the loss of that fixed batch).",
    )
    if validation:
        group.add_argument(
            "--validation_steps", type=int, default=None, help="Run validation every this many steps (and at the end)."
        )
        group.add_argument(
            "--validation_image",
            type=str,
            nargs="+",
            default=None,
            help="Photos (colour or grey) to colourise at validation. Default: --num_validation_images training "
            "images held out of training.",
        )
        group.add_argument(
            "--num_validation_images",
            type=int,
            default=4,
            help="Training images held out for validation when no --validation_image is given.",
        )
    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the final model with its model card.")
    hub.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the logged-in one).")
    hub.add_argument("--hub_model_id", type=str, default=None, help="Hub repository (default: output_dir's name).")
    hub.add_argument("--hub_private", action="store_true", help="Create the Hub repository as private.")


def check_common_arguments(args: argparse.Namespace) -> None:
    """Flag checks needing no models or data; a ValueError naming the flag."""
    positive = ["train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps"]
    for flag in positive:
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be a positive integer, got {getattr(args, flag)}.")
    for flag in ("max_train_steps", "checkpoints_total_limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be a positive integer, got {value}.")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be positive, got {args.learning_rate}.")
    if args.lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}.")
    if not 0.0 <= args.ema_decay <= 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1], got {args.ema_decay}.")
    if args.max_grad_norm < 0:
        raise ValueError(f"--max_grad_norm must be >= 0, got {args.max_grad_norm}.")
    if getattr(args, "validation_steps", None) is not None and args.validation_steps < 1:
        raise ValueError(f"--validation_steps must be a positive integer, got {args.validation_steps}.")
    for path in getattr(args, "validation_image", None) or []:
        if not os.path.isfile(path):
            raise ValueError(f"--validation_image {path!r} is not a file.")
    if getattr(args, "num_validation_images", 0) < 0:
        raise ValueError(f"--num_validation_images must be >= 0, got {args.num_validation_images}.")
    if args.resume_from_checkpoint not in (None, "latest"):
        candidate = resolve_checkpoint_path(args.output_dir, args.resume_from_checkpoint)
        if candidate is None:
            raise ValueError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is neither a folder nor a checkpoint in "
                f"--output_dir {args.output_dir!r}."
            )
    if args.push_to_hub:
        check_hub_reachable(args)


def resolve_checkpoint_path(output_dir: str, name: str) -> str | None:
    """A checkpoint folder from `--resume_from_checkpoint` (path, or name inside output_dir), or None."""
    for candidate in (name, os.path.join(output_dir, name)):
        if os.path.isdir(candidate):
            return candidate
    return None


# ------------------------------------------------------------------------------------------------ accelerator


def make_accelerator(args: argparse.Namespace):
    """An `Accelerator` with the run's accumulation, precision, trackers and seedable data order."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    project_config = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
    )
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.report_to not in (None, "none") else None,
        project_config=project_config,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def weight_dtype_of(accelerator) -> torch.dtype:
    """The dtype frozen models run in under the accelerator's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def configure_logging(accelerator) -> None:
    """diffusers' example logging: info on the main process, errors elsewhere."""
    import datasets
    import diffusers
    import transformers

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
        logging.getLogger().setLevel(logging.ERROR)


class TrainState:
    """The step counter, saved and restored with the checkpoint (`accelerator.register_for_checkpointing`)."""

    def __init__(self) -> None:
        self.global_step = 0
        self.unreadable_images = 0

    def state_dict(self) -> dict[str, int]:
        return {"global_step": self.global_step, "unreadable_images": self.unreadable_images}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.global_step = int(state["global_step"])
        self.unreadable_images = int(state.get("unreadable_images", 0))


def step_generator(seed: int, step: int, micro_step: int, process_index: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-batch's noise, timesteps and latent samples: a function of its position only."""
    state = np.random.SeedSequence([seed, step, micro_step, process_index]).generate_state(2)
    value = (int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1)
    return torch.Generator(device=device).manual_seed(value)


def epochs_and_steps(args: argparse.Namespace, batches_per_epoch: int, from_epochs: bool = False) -> tuple[int, int]:
    """
    (num_update_steps_per_epoch, num_train_epochs). Sets args.max_train_steps from --num_train_epochs when it is
    None, or always with `from_epochs` (after `accelerator.prepare` has sharded the data loader: the exact count).
    """
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
    if args.max_train_steps is None or from_epochs:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    return steps_per_epoch, math.ceil(args.max_train_steps / steps_per_epoch)


# ------------------------------------------------------------------------------------------------ checkpoints


def list_checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-<step>` folders in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [
        name
        for name in os.listdir(output_dir)
        if name.startswith(CHECKPOINT_PREFIX)
        and name[len(CHECKPOINT_PREFIX) :].isdigit()
        and os.path.isdir(os.path.join(output_dir, name))
    ]
    return sorted(names, key=lambda name: int(name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(accelerator, args: argparse.Namespace, global_step: int) -> str:
    """Prune old checkpoints (main process) to make room, then `save_state` on every process."""
    if accelerator.is_main_process and args.checkpoints_total_limit is not None:
        existing = list_checkpoints(args.output_dir)
        excess = len(existing) - args.checkpoints_total_limit + 1
        if excess > 0:
            logger.info("Removing %d old checkpoint(s): %s", excess, ", ".join(existing[:excess]))
            for name in existing[:excess]:
                shutil.rmtree(os.path.join(args.output_dir, name))
    accelerator.wait_for_everyone()
    path = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    accelerator.save_state(path)
    logger.info("Saved state to %s", path)
    return path


def resume(accelerator, args: argparse.Namespace) -> str | None:
    """Load `--resume_from_checkpoint` into the prepared objects; returns the folder, or None for a fresh start."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        existing = list_checkpoints(args.output_dir)
        if not existing:
            accelerator.print(f"No checkpoint in {args.output_dir}: starting a new training run.")
            return None
        path = os.path.join(args.output_dir, existing[-1])
    else:
        path = resolve_checkpoint_path(args.output_dir, args.resume_from_checkpoint)
    accelerator.load_state(path)
    return path


# ------------------------------------------------------------------------------------------------ EMA


def make_ema(args: argparse.Namespace, parameters: list[torch.nn.Parameter]):
    """diffusers' `EMAModel` of the trained parameters, or None without --use_ema."""
    if not args.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(parameters, decay=args.ema_decay, use_ema_warmup=args.ema_warmup, power=2 / 3)


class ema_weights:
    """Context manager: the EMA weights in `parameters` inside, the trained ones restored after (no-op without EMA)."""

    def __init__(self, ema, parameters: list[torch.nn.Parameter]):
        self.ema, self.parameters = ema, parameters

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.parameters)
        return False


# ------------------------------------------------------------------------------------------------ logging


class MetricsLog:
    """Appends each step's metrics as a JSON line to output_dir/training_log.jsonl (main process) and to the trackers."""

    def __init__(self, accelerator, output_dir: str):
        self.accelerator = accelerator
        self.path = os.path.join(output_dir, METRICS_FILE)

    def log(self, values: dict[str, Any], step: int) -> None:
        values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        if self.accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")
        self.accelerator.log(values, step=step)


def image_grid(rows: list[list[PIL.Image.Image]]) -> PIL.Image.Image:
    """Paste rows of equally sized images into one grid image."""
    width, height = rows[0][0].size
    columns = max(len(row) for row in rows)
    grid = PIL.Image.new("RGB", (columns * width, len(rows) * height), color=(255, 255, 255))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((width, height)), (c * width, r * height))
    return grid


def save_validation_grid(accelerator, args: argparse.Namespace, rows: list[list[PIL.Image.Image]], name: str) -> str:
    """Save the grid as output_dir/validation/<name>.png and send it to the trackers; returns the path."""
    grid = image_grid(rows)
    folder = os.path.join(args.output_dir, VALIDATION_DIR)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.png")
    grid.save(path)
    step = int(name.split("-")[-1]) if name.split("-")[-1].isdigit() else None
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption=name)]}, step=step)
    return path


# ------------------------------------------------------------------------------------------------ hub


def _hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def check_hub_reachable(args: argparse.Namespace) -> None:
    """--push_to_hub fails here, before training, when the Hub is switched off."""
    if _hub_offline():
        raise ValueError(
            "--push_to_hub needs the Hugging Face Hub, but it is switched off (HF_HUB_OFFLINE is set): unset "
            "HF_HUB_OFFLINE or drop --push_to_hub (the model is saved to --output_dir either way)."
        )


def create_hub_repo(args: argparse.Namespace) -> str:
    """Create (or reuse) the Hub repository before training, so a login or network problem shows up now."""
    from huggingface_hub import create_repo

    repo_id = args.hub_model_id or Path(args.output_dir).name
    try:
        return create_repo(repo_id, exist_ok=True, token=args.hub_token, private=args.hub_private or None).repo_id
    except Exception as error:  # network, authentication and permission errors have no common type
        raise ValueError(f"--push_to_hub: cannot create the Hub repository {repo_id!r}: {error}") from None


def upload_output(args: argparse.Namespace, repo_id: str, commit_message: str) -> None:
    """Upload output_dir without checkpoints and tracker logs (the README.md model card included)."""
    from huggingface_hub import upload_folder

    upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message=commit_message,
        token=args.hub_token,
        ignore_patterns=[f"{CHECKPOINT_PREFIX}*", f"{args.logging_dir}/*", "*.pyc", "__pycache__/*"],
    )


def training_summary(args: argparse.Namespace, keys: list[str]) -> str:
    """A markdown list of the run's main settings, for the model card."""
    lines = []
    for key in keys:
        value = getattr(args, key, None)
        if value is not None:
            lines.append(f"- `--{key}`: `{value}`")
    return "\n".join(lines)
