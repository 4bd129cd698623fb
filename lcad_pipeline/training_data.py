# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""Training data of L-CAD: image/caption datasets, the released augmentation, and the grey input.

Three sources, all turned into one `datasets.Dataset` with an `image` column (undecoded: path or bytes) and, when
captions are needed, a `text` column (a string or a list of strings):

- a dataset of the Hub (or a local dataset folder/script) through `datasets.load_dataset(--dataset_name)`;
- an image folder with a `metadata.jsonl` (`{"file_name": ..., "text": ...}` per line) through `datasets`'
  `imagefolder` builder (`--train_data_dir`);
- the release's caption file, a JSON map `{file name: [captions]}` (`--caption_file`), plus the folder holding the
  images (`--train_data_dir`).

[`LCADTrainingDataset`] decodes, augments as released (RandomResizedCrop to `resolution` with scale 0.8-1 and bicubic
resampling, then a horizontal flip with probability 0.5), derives the grey input as the crop's CIE Lab lightness, and
draws the description (see `descriptions.py`). Every random choice of a sample is seeded by (seed, epoch, index), so
a resumed run sees exactly the data an uninterrupted run would, whatever the number of workers or processes.

Unreadable images never stop a run: the sample is replaced by the next readable one and the failure is logged and
counted (each sample reports in `unreadable` how many images were skipped to produce it).

No torchvision: the crop follows torchvision's `RandomResizedCrop.get_params` and is done with PIL.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import random
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch

from .image_processor_lcad import rgb_to_lightness


logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
#: How many following samples are tried in place of an unreadable one before giving up.
MAX_REPLACEMENT_TRIES = 64

Describe = Callable[[str, random.Random], "tuple[str, str]"]


# ----------------------------------------------------------------------------------------------- arguments


def add_data_arguments(parser: argparse.ArgumentParser, captions: bool = True) -> None:
    """The data flags shared by both stages (names as in diffusers' example scripts)."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A dataset of the Hub (or a local dataset folder) for `datasets.load_dataset`, with an image column"
        + (" and a caption column." if captions else "."),
    )
    group.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's configuration, if any.")
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A folder of images"
        + (" with a `metadata.jsonl` (`file_name`, `text` per line)," if captions else " (a `metadata.jsonl` is optional),")
        + " or the image folder of `--caption_file`.",
    )
    group.add_argument(
        "--caption_file",
        type=str,
        default=None,
        help="The release's caption JSON, `{image file name: [captions]}`, for the images in `--train_data_dir`.",
    )
    group.add_argument("--image_column", type=str, default="image", help="The dataset column holding the images.")
    if captions:
        group.add_argument("--caption_column", type=str, default="text", help="The dataset column holding the captions.")
    group.add_argument("--cache_dir", type=str, default=None, help="Where `datasets` caches downloaded data.")
    group.add_argument(
        "--max_train_samples", type=int, default=None, help="Train on only this many samples (for debugging)."
    )
    group.add_argument(
        "--resolution", type=int, default=256, help="Training crop size (256 as released); a multiple of 8."
    )
    group.add_argument(
        "--center_crop",
        action="store_true",
        help="Resize and center-crop instead of the released RandomResizedCrop.",
    )
    group.add_argument(
        "--crop_min_scale",
        type=float,
        default=0.8,
        help="Smallest area fraction of RandomResizedCrop (0.8 as released; the largest is 1).",
    )
    group.add_argument(
        "--random_flip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Flip training images horizontally with probability 0.5 (on as released; `--no-random_flip` to turn off).",
    )
    group.add_argument(
        "--dataloader_num_workers", type=int, default=0, help="Subprocesses loading data (0: the main process)."
    )


def check_data_arguments(args: argparse.Namespace) -> None:
    """Flag checks that need no data loading; a ValueError naming the flag."""
    sources = [flag for flag in ("dataset_name", "train_data_dir") if getattr(args, flag) is not None]
    if not sources:
        raise ValueError("Give training data: --dataset_name, or --train_data_dir (optionally with --caption_file).")
    if args.dataset_name is not None and args.caption_file is not None:
        raise ValueError("--caption_file goes with --train_data_dir, not with --dataset_name.")
    if args.caption_file is not None and args.train_data_dir is None:
        raise ValueError("--caption_file needs --train_data_dir, the folder holding its images.")
    if args.dataset_name is None and not os.path.isdir(args.train_data_dir):
        raise ValueError(f"--train_data_dir {args.train_data_dir!r} is not a folder.")
    if args.caption_file is not None and not os.path.isfile(args.caption_file):
        raise ValueError(f"--caption_file {args.caption_file!r} is not a file.")
    if args.resolution < 8 or args.resolution % 8:
        raise ValueError(f"--resolution must be a positive multiple of 8, got {args.resolution}.")
    if not 0.0 < args.crop_min_scale <= 1.0:
        raise ValueError(f"--crop_min_scale must be in (0, 1], got {args.crop_min_scale}.")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise ValueError(f"--max_train_samples must be positive, got {args.max_train_samples}.")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")


# ----------------------------------------------------------------------------------------------- loading


def load_image_caption_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    caption_file: str | None = None,
    image_column: str = "image",
    caption_column: str | None = "text",
    cache_dir: str | None = None,
    max_samples: int | None = None,
    seed: int | None = None,
):
    """
    The training split as a `datasets.Dataset` with columns `image` (undecoded: `{"path", "bytes"}`) and, unless
    `caption_column` is None, `text`.

    Raises a ValueError naming the flag when a column is missing (listing the columns there are) or no image is found.
    """
    import datasets

    if caption_file is not None:
        dataset = _dataset_from_caption_file(caption_file, train_data_dir)
        image_column, caption_column = "image", "text" if caption_column is not None else None
        image_flag, caption_flag = "--caption_file", "--caption_file"
    else:
        try:
            if dataset_name is not None:
                loaded = datasets.load_dataset(
                    dataset_name, dataset_config_name, cache_dir=cache_dir, data_dir=train_data_dir
                )
            else:
                loaded = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
        except datasets.data_files.EmptyDatasetError:
            source = f"--dataset_name {dataset_name!r}" if dataset_name is not None else f"--train_data_dir {train_data_dir!r}"
            raise ValueError(
                f"No images found in {source} (image files end in {', '.join(IMAGE_EXTENSIONS)})."
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(
                    f"--dataset_name {dataset_name!r} has no `train` split (splits: {', '.join(loaded)})."
                )
            loaded = loaded["train"]
        dataset = loaded
        image_flag, caption_flag = "--image_column", "--caption_column"

    columns = dataset.column_names
    if image_column not in columns:
        raise ValueError(f"{image_flag} {image_column!r} is not a column of the dataset; its columns are {columns}.")
    if caption_column is not None and caption_column not in columns:
        hint = (
            " An image folder needs a `metadata.jsonl` with a `file_name` and a `text` field per image."
            if dataset_name is None and caption_file is None
            else ""
        )
        raise ValueError(
            f"{caption_flag} {caption_column!r} is not a column of the dataset; its columns are {columns}.{hint}"
        )
    keep = {image_column: "image"}
    if caption_column is not None:
        keep[caption_column] = "text"
    dataset = dataset.select_columns(list(keep))
    for old, new in keep.items():
        if old != new:
            dataset = dataset.rename_column(old, new)
    if isinstance(dataset.features["image"], datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    if len(dataset) == 0:
        source = f"--dataset_name {dataset_name!r}" if dataset_name is not None else f"--train_data_dir {train_data_dir!r}"
        raise ValueError(f"No images found in {source}.")
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_samples))
    return dataset


def _dataset_from_caption_file(caption_file: str, image_dir: str):
    """The release's `{file name: [captions]}` JSON and its image folder as a `datasets.Dataset`."""
    import datasets

    try:
        with open(caption_file, encoding="utf-8") as handle:
            captions = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--caption_file {caption_file!r} is not a readable JSON file ({error}).") from None
    if not isinstance(captions, dict):
        raise ValueError(
            f"--caption_file {caption_file!r} must hold a JSON object {{image file name: [captions]}}, "
            f"got a {type(captions).__name__}."
        )
    paths, texts, missing = [], [], []
    for name, value in captions.items():
        caption_list = [value] if isinstance(value, str) else value
        if not isinstance(caption_list, list) or not caption_list or not all(isinstance(c, str) for c in caption_list):
            raise ValueError(
                f"--caption_file {caption_file!r}: the entry of {name!r} must be a caption or a non-empty list of "
                f"captions, got {value!r}."
            )
        path = os.path.join(image_dir, name)
        if not os.path.isfile(path):
            missing.append(name)
            continue
        paths.append(path)
        texts.append(caption_list)
    if missing:
        logger.warning(
            "%d of the %d images of --caption_file are not in --train_data_dir %s and are skipped (e.g. %s).",
            len(missing), len(captions), image_dir, ", ".join(missing[:5]),
        )
    if not paths:
        raise ValueError(
            f"No images found: none of the {len(captions)} files named in --caption_file {caption_file!r} is in "
            f"--train_data_dir {image_dir!r}."
        )
    features = datasets.Features(
        {"image": datasets.Image(decode=False), "text": datasets.Sequence(datasets.Value("string"))}
    )
    return datasets.Dataset.from_dict(
        {"image": [{"path": p, "bytes": None} for p in paths], "text": texts}, features=features
    )


def split_validation(dataset, count: int):
    """
    Hold out the last `count` readable rows of `dataset` for validation: returns `(train, held_out)` where
    `held_out` is a list of `(RGB image, caption or None)`; unreadable rows met on the way stay in `train` (where they
    are skipped and counted like any other).
    """
    if count <= 0:
        return dataset, []
    if count >= len(dataset):
        raise ValueError(
            f"--num_validation_images {count} would hold out every one of the {len(dataset)} training images; give "
            "--validation_image files or fewer validation images."
        )
    held_out, indices = [], []
    for index in range(len(dataset) - 1, -1, -1):
        row = dataset[index]
        try:
            image = decode_image(row["image"])
        except Exception as error:  # PIL's errors have no common type
            logger.warning("Not holding out unreadable image %s for validation (%s).", describe_record(row["image"]), error)
            continue
        caption = row.get("text")
        if caption is not None and not isinstance(caption, str):
            caption = next(iter(caption), None)
        held_out.append((image, caption))
        indices.append(index)
        if len(held_out) == count or len(indices) == len(dataset) - 1:
            break
    keep = sorted(set(range(len(dataset))) - set(indices))
    return dataset.select(keep), held_out[::-1]


# ----------------------------------------------------------------------------------------------- decoding


def decode_image(record: Any) -> PIL.Image.Image:
    """An RGB PIL image from a dataset's image value (undecoded dict, PIL image, path or bytes); raises on failure."""
    if isinstance(record, PIL.Image.Image):
        image = record
    elif isinstance(record, dict):
        if record.get("bytes") is not None:
            image = PIL.Image.open(io.BytesIO(record["bytes"]))
        elif record.get("path"):
            image = PIL.Image.open(record["path"])
        else:
            raise ValueError("empty image record")
    elif isinstance(record, (str, os.PathLike)):
        image = PIL.Image.open(record)
    elif isinstance(record, (bytes, bytearray)):
        image = PIL.Image.open(io.BytesIO(record))
    else:
        raise TypeError(f"unsupported image value of type {type(record).__name__}")
    image.load()
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        array = array / (65535.0 if array.max() > 255 else 255.0) if image.mode != "F" else np.clip(array, 0, 1)
        image = PIL.Image.fromarray((array * 255.0).round().astype(np.uint8))
    return image.convert("RGB")


def describe_record(record: Any) -> str:
    """A short name of an image value for messages."""
    if isinstance(record, dict):
        return str(record.get("path") or "<bytes>")
    return str(record) if isinstance(record, (str, os.PathLike)) else f"<{type(record).__name__}>"


# ----------------------------------------------------------------------------------------------- augmentation


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` as a PIL box `(left, top, right, bottom)`, drawn from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    # Fallback: the central crop of the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square, as a PIL box."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random stream of one sample in one epoch: independent of workers, processes and resumption."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


class LCADTrainingDataset(torch.utils.data.Dataset):
    r"""
    Decoded, augmented training samples with their grey input and an any-level description.

    Each item is a dict: `pixel_values` (3, R, R) float32 in [-1, 1]; `lightness` (1, R, R) float32, the Lab
    lightness L in [0, 100] of the same crop (the grey input before the model's normalisation); `text` (the drawn
    description, "" without captions); `level` (its level); `unreadable` (images skipped to produce this item).

    Args:
        dataset: a `datasets.Dataset` from [`load_image_caption_dataset`].
        resolution: crop size.
        describe: `describe(caption, rng) -> (description, level)`, e.g. a `functools.partial` of
            `descriptions.sample_description`; None keeps the caption ("complete").
        seed: the run's seed; with the epoch (see `set_epoch`) and the index it seeds every random choice.
        center_crop, crop_min_scale, random_flip: the augmentation (released: RandomResizedCrop 0.8-1, flip).
    """

    def __init__(
        self,
        dataset,
        resolution: int = 256,
        describe: Describe | None = None,
        seed: int = 0,
        center_crop: bool = False,
        crop_min_scale: float = 0.8,
        random_flip: bool = True,
    ):
        self.dataset = dataset
        self.resolution = resolution
        self.describe = describe
        self.seed = seed
        self.center_crop = center_crop
        self.crop_min_scale = crop_min_scale
        self.random_flip = random_flip
        self.epoch = 0
        self.has_captions = "text" in dataset.column_names

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's random streams (call before iterating; workers copy the dataset when they start)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = sample_rng(self.seed, self.epoch, index)
        unreadable = 0
        tries = min(len(self.dataset), MAX_REPLACEMENT_TRIES)
        for attempt in range(tries):
            row = self.dataset[(index + attempt) % len(self.dataset)]
            try:
                image = decode_image(row["image"])
            except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
                unreadable += 1
                logger.warning("Skipping unreadable image %s (%s).", describe_record(row["image"]), error)
                continue
            break
        else:
            raise RuntimeError(
                f"{tries} images in a row from index {index} are unreadable; check the training data."
            )

        if self.center_crop:
            box = center_crop_box(*image.size)
        else:
            box = random_resized_crop_box(*image.size, rng, scale=(self.crop_min_scale, 1.0))
        image = image.resize((self.resolution, self.resolution), PIL.Image.BICUBIC, box=box)
        # Draw the flip even when off, so the description draw below stays the same either way.
        if rng.random() < 0.5 and self.random_flip:
            image = image.transpose(PIL.Image.FLIP_LEFT_RIGHT)

        rgb = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        lightness = rgb_to_lightness(rgb[None])[0]

        text, level = "", "complete"
        if self.has_captions:
            captions = row["text"]
            if not isinstance(captions, str):
                captions = [c for c in captions if isinstance(c, str)] or [""]
                captions = captions[rng.randrange(len(captions))]
            text = captions
            if self.describe is not None:
                text, level = self.describe(captions, rng)
        return {
            "pixel_values": rgb * 2.0 - 1.0,
            "lightness": lightness,
            "text": text,
            "level": level,
            "unreadable": unreadable,
        }


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of [`LCADTrainingDataset`] items into a batch."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(),
        "lightness": torch.stack([e["lightness"] for e in examples]).contiguous(),
        "text": [e["text"] for e in examples],
        "level": [e["level"] for e in examples],
        "unreadable": torch.tensor([e["unreadable"] for e in examples], dtype=torch.long),
    }


def square_image(image: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """The largest centred square of `image`, resized (bicubic) to `resolution` x `resolution`."""
    return image.resize((resolution, resolution), PIL.Image.BICUBIC, box=center_crop_box(*image.size))


def load_validation_images(paths: list[str], resolution: int) -> list[PIL.Image.Image]:
    """`--validation_image` files as RGB images, centre-cropped and resized to `resolution`; a ValueError if unreadable."""
    images = []
    for path in paths:
        try:
            image = decode_image(path)
        except Exception as error:
            raise ValueError(f"--validation_image {path!r} is not a readable image ({error}).") from None
        images.append(square_image(image, resolution))
    return images


__all__ = [
    "IMAGE_EXTENSIONS",
    "LCADTrainingDataset",
    "add_data_arguments",
    "center_crop_box",
    "check_data_arguments",
    "collate_fn",
    "decode_image",
    "load_image_caption_dataset",
    "load_validation_images",
    "random_resized_crop_box",
    "sample_rng",
    "split_validation",
    "square_image",
]
