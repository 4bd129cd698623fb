# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""`lcad colorize`: colourise photos, or whole folders of them, with an L-CAD pipeline.

    lcad colorize old_photos/ scan.tif -o colourised/ --model path/to/lcad --prompt "a red car"
    lcad colorize album/ -o out/ --model path/to/lcad --prompts prompts.json --seed 7

Why it works the way it does (people run it on folders of family photos and archive scans, once, unattended):

- Inputs are files or folders (walked recursively, in sorted order). Images PIL reads (.jpg .jpeg .png .bmp .tif
  .tiff .webp, any case) are colourised; other files, and hidden ones such as macOS's `._photo.jpg`, are *ignored*
  and counted (hidden folders such as `.git` are not entered); an image that cannot be read or colourised is
  reported, counted as *failed*, and the run goes on. The exit status is 1 when any failed, 2 for a command-line
  problem found before any work (nothing is written then), 130 when interrupted.
- Each output keeps its input's size (as displayed: EXIF rotation is applied) and its path relative to the input
  folder (a file given directly: its name), under OUTDIR, as PNG by default (`--format png|jpg|same`).
- Inputs are never written to. OUTDIR may not be an input folder, lie inside one, or be the folder of an input file
  given directly; an output that would land on an input file or inside an input folder is refused.
- An output that already exists is skipped (so an interrupted run resumes), unless `--overwrite`. Outputs are written
  to a temporary file and renamed, so an interrupted run never leaves a truncated image that a later run would skip.
- Each image's seed depends only on `--seed` and the image's relative path (a hash of both): a file gets the same
  result whichever other files are in the folder or on the command line, and re-running reproduces it exactly
  (same model, settings and device). The noise is drawn on the CPU, so the seed means the same on every device.
- `lcad_run.json` beside the outputs records every run into OUTDIR (settings, command, library versions, and each
  file's prompt, seed and status), appended to the runs already recorded there.

Descriptions: `--prompt` for every image, and/or `--prompts FILE` per image. FILE is JSON
`{"name": "description" | {"prompt": ..., "negative_prompt": ..., "seed": ..., "boxes": {phrase: [x0, y0, x1, y1]},
"points": {phrase: [[x, y], ...]}, "masks": {phrase: "mask.png"}}}` or CSV with a header naming columns among
`file, prompt, negative_prompt, seed, phrase, x0, y0, x1, y1, mask` (several rows of one file add its phrases), or
headerless CSV `file,prompt`. A name is the image's path relative to its input folder (`sub/a.jpg`), its file name
when that is unique, or its path as given on the command line. Mask files are relative to FILE's folder; boxes and
points are in pixels of the input. Phrases must occur in the description. `--auto-masks` finds a mask for each
comma-separated phrase of a description that has none (with SAM, `--sam-checkpoint`).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import hashlib
import inspect
import json
import os
import platform
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

SUPPORTED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
RUN_RECORD_NAME = "lcad_run.json"
RUN_RECORD_FORMAT = "lcad-run/1"

# --scheduler name -> (diffusers class, config overrides). All are built with `from_config` on the loaded
# pipeline's scheduler config, so they keep its noise schedule (the released "scaled linear" betas).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "ddpm": ("DDPMScheduler", {}),
}
FORMATS = ("png", "jpg", "same")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")
_FORMAT_BY_SUFFIX = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}


class UsageError(Exception):
    """A problem with the command line or the files it names, found before any image is colourised (exit 2)."""


# ---------------------------------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose and place the model, shared by `lcad colorize` and `lcad demo`."""
    parser.add_argument("--model", required=True, help="L-CAD pipeline: a local folder (e.g. from `lcad convert`) or a Hub id.")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where to run (auto: cuda, then mps, then cpu).")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="weights' precision (auto: float16 on cuda, float32 elsewhere)."
    )
    parser.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS), help="sampler (default: ddim, as released).")
    parser.add_argument("--sam-checkpoint", type=Path, metavar="FILE", help="a SAM checkpoint (sam_vit_{b,l,h}_*.pth) to turn boxes and points into masks.")
    parser.add_argument(
        "--sam-model-type", default="auto", choices=("auto", "vit_b", "vit_l", "vit_h"),
        help="SAM architecture of --sam-checkpoint (auto: from its file name).",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders (searched recursively).")
    parser.add_argument("-o", "--output-dir", required=True, type=Path, metavar="OUTDIR", help="where the colourised images go.")
    parser.add_argument("--prompt", default="", help="description used for every image without one in --prompts (default: none).")
    parser.add_argument("--negative-prompt", default=None, help="negative description (default: empty, as released).")
    parser.add_argument("--prompts", type=Path, metavar="FILE", help="JSON or CSV file of per-image descriptions, masks and boxes.")
    add_model_arguments(parser)
    parser.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default: the model's, 50 as released).")
    parser.add_argument("--guidance", type=_non_negative_float, default=5.0, help="classifier-free guidance scale (default: 5).")
    parser.add_argument("--seed", type=int, default=0, help="base seed; each image's seed is derived from it and its path (default: 0).")
    parser.add_argument(
        "--resolution", type=_non_negative_int, default=None,
        help="longer side the model works at (default: the model's, 256 as released; 0: each image's own size).",
    )
    parser.add_argument("--format", default="png", choices=FORMATS, help="output format (same: the input's).")
    parser.add_argument("--auto-masks", action="store_true", help="find masks for the description's comma-separated phrases (needs --sam-checkpoint).")
    parser.add_argument("--overwrite", action="store_true", help="redo images whose output already exists.")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar.")


# ---------------------------------------------------------------------------------------------------- planning


@dataclass
class PromptEntry:
    """One image's entry of a `--prompts` file."""

    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    boxes: dict[str, list[float]] = field(default_factory=dict)
    points: dict[str, list[list[float]]] = field(default_factory=dict)
    masks: dict[str, Path] = field(default_factory=dict)

    @property
    def has_instances(self) -> bool:
        return bool(self.boxes or self.points or self.masks)


@dataclass
class Task:
    """One input image and everything needed to colourise it."""

    source: Path
    relative: PurePosixPath
    given_as: str
    output: Path
    seed: int
    prompt: str
    negative_prompt: str | None
    entry: PromptEntry | None = None
    status: str = "pending"
    error: str | None = None


def is_supported_image(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_EXTENSIONS


def image_seed(base_seed: int, relative: PurePosixPath | str) -> int:
    """The seed of one image: a hash of `--seed` and its relative path, in [0, 2**32)."""
    digest = hashlib.sha256(f"{base_seed}\0{PurePosixPath(relative).as_posix()}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big")


def collect_inputs(inputs: Sequence[str]) -> tuple[list[tuple[Path, PurePosixPath, str, Path | None]], list[Path]]:
    """Images to colourise and ignored files.

    Returns `(images, ignored)`; each image is `(path, relative path, path as given, input folder or None)`.
    """
    images: list[tuple[Path, PurePosixPath, str, Path | None]] = []
    ignored: list[Path] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .thumbnails, ...
                for name in sorted(files):
                    file = Path(root) / name
                    if name.startswith(".") or not is_supported_image(file):  # incl. macOS "._photo.jpg" files
                        ignored.append(file)
                        continue
                    relative = PurePosixPath(file.relative_to(path).as_posix())
                    images.append((file, relative, str(file), path))
        elif path.is_file():
            if is_supported_image(path):
                images.append((path, PurePosixPath(path.name), given, None))
            else:
                ignored.append(path)
        elif path.exists():
            raise UsageError(f"INPUT {given!r} is neither a file nor a folder.")
        else:
            raise UsageError(f"INPUT {given!r}: no such file or folder.")
    return images, ignored


def output_path(output_dir: Path, relative: PurePosixPath, fmt: str) -> Path:
    suffix = {"png": ".png", "jpg": ".jpg"}.get(fmt, relative.suffix.lower())
    return output_dir.joinpath(*relative.parts).with_suffix(suffix)


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_locations(output_dir: Path, images: Sequence[tuple[Path, PurePosixPath, str, Path | None]], outputs: Sequence[Path]) -> None:
    """Refuse any layout that could write into an input folder or onto an input file (see the module docstring)."""
    out = output_dir.resolve()
    folders = {root.resolve() for _, _, _, root in images if root is not None}
    for folder in sorted(folders):
        if _is_within(out, folder):
            raise UsageError(
                f"-o/--output-dir {str(output_dir)!r} is inside the input folder {str(folder)!r}: outputs would mix with "
                "the photos (and be read as inputs by the next run). Choose a folder outside the inputs."
            )
    for source, _, given, root in images:
        if root is None and source.resolve().parent == out:
            raise UsageError(
                f"-o/--output-dir {str(output_dir)!r} is the folder of the input {given!r}: outputs are never written beside "
                "the inputs. Choose another folder."
            )
    input_files = {source.resolve() for source, _, _, _ in images}
    for target in outputs:
        resolved = target.resolve()
        if resolved in input_files or any(_is_within(resolved, folder) for folder in folders):
            raise UsageError(f"the output {str(target)!r} would overwrite or land among the inputs; choose another -o/--output-dir.")


# ---------------------------------------------------------------------------------------------------- --prompts


def _normalise_name(name: str) -> str:
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _phrase_in_prompt(phrase: str, prompt: str) -> bool:
    words = phrase.split()
    if not words:
        return False
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
    return re.search(pattern, prompt, flags=re.IGNORECASE) is not None


def _parse_box(value: Any, where: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise UsageError(f"{where}: a box must be [x0, y0, x1, y1] (four numbers), got {value!r}.")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not (x1 > x0 and y1 > y0):
        raise UsageError(f"{where}: a box needs x1 > x0 and y1 > y0, got {value!r}.")
    return [x0, y0, x1, y1]


def _parse_points(value: Any, where: str) -> list[list[float]]:
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
            for p in value
        )
    ):
        raise UsageError(f"{where}: points must be a list of [x, y] pairs, got {value!r}.")
    return [[float(x), float(y)] for x, y in value]


def _parse_json_entry(value: Any, where: str, base: Path) -> PromptEntry:
    if isinstance(value, str):
        return PromptEntry(prompt=value)
    if not isinstance(value, dict):
        raise UsageError(f"{where}: expected a description string or an object, got {type(value).__name__}.")
    known = {"prompt", "negative_prompt", "seed", "boxes", "points", "masks"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise UsageError(f"{where}: unknown keys {unknown}; use {sorted(known)}.")
    entry = PromptEntry()
    for key in ("prompt", "negative_prompt"):
        if value.get(key) is not None:
            if not isinstance(value[key], str):
                raise UsageError(f"{where}: {key!r} must be a string.")
            setattr(entry, key, value[key])
    if value.get("seed") is not None:
        if not isinstance(value["seed"], int) or isinstance(value["seed"], bool):
            raise UsageError(f"{where}: 'seed' must be an integer.")
        entry.seed = value["seed"]
    for key in ("boxes", "points", "masks"):
        group = value.get(key)
        if group is None:
            continue
        if not isinstance(group, dict):
            raise UsageError(f"{where}: {key!r} must be an object {{phrase: ...}}.")
        for phrase, spec in group.items():
            item = f"{where}[{key!r}][{phrase!r}]"
            if key == "boxes":
                entry.boxes[phrase] = _parse_box(spec, item)
            elif key == "points":
                entry.points[phrase] = _parse_points(spec, item)
            else:
                if not isinstance(spec, str):
                    raise UsageError(f"{item}: a mask must be an image file name.")
                entry.masks[phrase] = base / spec
    return entry


def _parse_csv(path: Path) -> dict[str, PromptEntry]:
    base = path.parent
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    if not rows:
        raise UsageError(f"--prompts {str(path)!r} is empty.")
    columns = ("file", "prompt", "negative_prompt", "seed", "phrase", "x0", "y0", "x1", "y1", "mask")
    header = [cell.strip().lower() for cell in rows[0]]
    if "file" in header:
        unknown = [c for c in header if c not in columns]
        if unknown:
            raise UsageError(f"--prompts {str(path)!r}: unknown columns {unknown}; use {list(columns)}.")
        rows = [dict(zip(header, row)) for row in rows[1:]]
    else:
        for number, row in enumerate(rows, 1):
            if len(row) != 2:
                raise UsageError(
                    f"--prompts {str(path)!r} line {number}: a CSV without a header must have two columns, file and prompt "
                    f"(quote descriptions that contain commas); got {len(row)}."
                )
        rows = [{"file": row[0], "prompt": row[1]} for row in rows]
    entries: dict[str, PromptEntry] = {}
    for number, row in enumerate(rows, 2 if "file" in header else 1):
        where = f"--prompts {str(path)!r} line {number}"
        name = _normalise_name(row.get("file") or "")
        if not name:
            raise UsageError(f"{where}: the 'file' column is empty.")
        entry = entries.setdefault(name, PromptEntry())
        for key in ("prompt", "negative_prompt"):
            text = (row.get(key) or "").strip()
            if text:
                if getattr(entry, key) not in (None, text):
                    raise UsageError(f"{where}: a second, different {key} for {name!r}.")
                setattr(entry, key, text)
        if (row.get("seed") or "").strip():
            try:
                entry.seed = int(row["seed"])
            except ValueError:
                raise UsageError(f"{where}: seed {row['seed']!r} is not an integer.") from None
        phrase = (row.get("phrase") or "").strip()
        coords = [(row.get(c) or "").strip() for c in ("x0", "y0", "x1", "y1")]
        mask = (row.get("mask") or "").strip()
        if (any(coords) or mask) and not phrase:
            raise UsageError(f"{where}: a box or mask needs its 'phrase'.")
        if phrase:
            if any(coords):
                try:
                    entry.boxes[phrase] = _parse_box([float(c) for c in coords], where)
                except ValueError:
                    raise UsageError(f"{where}: x0, y0, x1, y1 must all be numbers, got {coords}.") from None
            if mask:
                entry.masks[phrase] = base / mask
            if not any(coords) and not mask:
                raise UsageError(f"{where}: phrase {phrase!r} needs a box (x0, y0, x1, y1) or a mask.")
    return entries


def load_prompts_file(path: Path) -> dict[str, PromptEntry]:
    """Parse a `--prompts` file (JSON or CSV, see the module docstring) into `{name: PromptEntry}`."""
    if not path.is_file():
        raise UsageError(f"--prompts {str(path)!r}: no such file.")
    if path.suffix.lower() == ".csv":
        entries = _parse_csv(path)
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UsageError(f"--prompts {str(path)!r} is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise UsageError(f"--prompts {str(path)!r} must hold a JSON object {{file name: description or {{...}}}}.")
        entries = {
            _normalise_name(name): _parse_json_entry(value, f"--prompts {str(path)!r} entry {name!r}", path.parent)
            for name, value in data.items()
        }
    else:
        raise UsageError(f"--prompts {str(path)!r}: use a .json or .csv file.")
    for name, entry in entries.items():
        where = f"--prompts {str(path)!r} entry {name!r}"
        for phrase in entry.masks:
            if phrase in entry.boxes or phrase in entry.points:
                raise UsageError(f"{where}: phrase {phrase!r} has both a mask file and a box/points; give one.")
        for phrase, mask in entry.masks.items():
            if not mask.is_file():
                raise UsageError(f"{where}: mask file {str(mask)!r} of phrase {phrase!r} does not exist.")
    return entries


def match_prompt_entries(entries: dict[str, PromptEntry], tasks: Sequence[Task], prompts_path: Path) -> list[str]:
    """Attach each task's entry; returns the names that matched no input (to warn about)."""
    by_relative: dict[str, list[Task]] = {}
    by_name: dict[str, list[Task]] = {}
    by_given: dict[str, list[Task]] = {}
    for task in tasks:
        by_relative.setdefault(task.relative.as_posix(), []).append(task)
        by_name.setdefault(task.relative.name, []).append(task)
        by_given.setdefault(_normalise_name(task.given_as), []).append(task)
    unmatched = []
    for name, entry in entries.items():
        matches = by_relative.get(name) or by_given.get(name)
        if not matches and "/" not in name:
            matches = by_name.get(name)
            if matches and len(matches) > 1:
                listed = ", ".join(t.relative.as_posix() for t in matches[:4])
                raise UsageError(f"--prompts {str(prompts_path)!r}: name {name!r} matches several images ({listed}); use their relative paths.")
        if not matches:
            unmatched.append(name)
            continue
        for task in matches:
            if task.entry is not None and task.entry is not entry:
                raise UsageError(f"--prompts {str(prompts_path)!r}: {task.relative.as_posix()!r} is named by two entries.")
            task.entry = entry
    return unmatched


def instance_masks_for(task: Task) -> dict[str, Any] | None:
    """The pipeline's `instance_masks` argument for `task` (mask files loaded), or None."""
    entry = task.entry
    if entry is None or not entry.has_instances:
        return None
    from PIL import Image

    specs: dict[str, Any] = {}
    for phrase in list(dict.fromkeys([*entry.boxes, *entry.points, *entry.masks])):
        if phrase in entry.masks:
            with Image.open(entry.masks[phrase]) as mask:
                mask.load()
                specs[phrase] = mask.copy()
        elif phrase in entry.boxes and phrase in entry.points:
            specs[phrase] = {"box": entry.boxes[phrase], "points": entry.points[phrase]}
        elif phrase in entry.boxes:
            specs[phrase] = entry.boxes[phrase]
        else:
            specs[phrase] = {"points": entry.points[phrase]}
    return specs


def automatic_phrases(prompt: str, given: Sequence[str]) -> list[str]:
    """`--auto-masks`: the description's comma-separated parts that no given phrase lies in (those get SAM masks)."""
    from .instance_masks import split_prompt_phrases

    if not prompt.strip():
        return []
    return [part for part in split_prompt_phrases(prompt) if not any(_phrase_in_prompt(g, part) for g in given)]


def instance_arguments(task: Task, auto_masks: bool) -> dict[str, Any]:
    """The pipeline's instance-aware arguments for `task`: `instance_masks` (`None` specs are found automatically)."""
    specs = instance_masks_for(task) or {}
    automatic = automatic_phrases(task.prompt, list(specs)) if auto_masks else []
    if not specs and not automatic:
        return {}
    return {"instance_masks": {**specs, **{phrase: None for phrase in automatic}}}


# ---------------------------------------------------------------------------------------------------- model


def resolve_device(name: str) -> str:
    """`--device` -> a torch device string; an unavailable device is a UsageError."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available here (no GPU, or a CPU-only torch); use --device cpu.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UsageError("--device mps: Apple's MPS backend is not available here; use --device cpu.")
    return name


def resolve_dtype(name: str, device: str):
    """`--dtype` -> a torch dtype for `device`; float16 on CPU is refused."""
    import torch

    if name == "auto":
        name = "float16" if device == "cuda" else "float32"
    if name == "float16" and device == "cpu":
        raise UsageError(
            "--dtype float16 is not supported with --device cpu (half-precision convolutions are missing or very slow "
            "on CPU); use --dtype float32 or bfloat16, or a GPU."
        )
    return getattr(torch, name)


def make_scheduler(name: str, config: Any):
    """`--scheduler` name -> a diffusers scheduler built from the pipeline's scheduler `config`."""
    import diffusers

    if name not in SCHEDULERS:
        raise UsageError(f"--scheduler {name!r}: choose from {', '.join(SCHEDULERS)}.")
    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


def _looks_like_hub_id(model: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", model) is not None and not model.startswith(".")


def load_pipeline(model: str | os.PathLike, device: str, dtype, scheduler: str = "ddim"):
    """Load an `LCADPipeline` from a folder or Hub id onto `device`; problems are UsageErrors naming --model."""
    from . import LCADPipeline

    path = Path(model)
    if not path.exists() and not _looks_like_hub_id(str(model)):
        raise UsageError(f"--model {str(model)!r}: no such folder (and not a Hub id of the form owner/name).")
    if path.exists() and not (path / "model_index.json").is_file():
        raise UsageError(f"--model {str(model)!r} is not a pipeline folder (no model_index.json); see `lcad convert`.")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # The per-component loading bars would bury the run's own progress bar.
    bars_were_enabled = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        pipe = LCADPipeline.from_pretrained(str(model), dtype=dtype)
    except Exception as error:  # diffusers/hub raise many types; the user needs the message and the flag.
        raise UsageError(f"--model {str(model)!r}: could not load an L-CAD pipeline: {type(error).__name__}: {error}") from error
    finally:
        if bars_were_enabled[0]:
            diffusers_logging.enable_progress_bar()
        if bars_were_enabled[1]:
            transformers_logging.enable_progress_bar()
    if scheduler != "ddim" or type(pipe.scheduler).__name__ != "DDIMScheduler":
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call_parameters(pipe_or_class: Any) -> set[str]:
    return set(inspect.signature(pipe_or_class.__call__).parameters)


def load_segmenter(checkpoint: Path, model_type: str, device: str):
    """A SAM segmenter for boxes, points and automatic masks; problems are UsageErrors naming --sam-checkpoint."""
    if not checkpoint.is_file():
        raise UsageError(f"--sam-checkpoint {str(checkpoint)!r}: no such file.")
    if model_type == "auto":
        found = re.search(r"vit_([blh])", checkpoint.name)
        if not found:
            raise UsageError(
                f"--sam-checkpoint {str(checkpoint)!r}: cannot tell the SAM architecture from the file name; "
                "pass --sam-model-type vit_b, vit_l or vit_h."
            )
        model_type = f"vit_{found.group(1)}"
    try:
        from .sam_masks import SamSegmenter
    except ImportError as error:
        raise UsageError(f"--sam-checkpoint needs the SAM support of lcad_pipeline, which failed to import: {error}") from error
    try:
        return SamSegmenter.from_checkpoint(checkpoint, model_type=model_type, device=device)
    except Exception as error:
        raise UsageError(f"--sam-checkpoint {str(checkpoint)!r}: could not load it as SAM {model_type}: {error}") from error


def check_instance_support(call_parameters: set[str], needs_masks: bool, needs_auto: bool, needs_segmenter: bool, source: str) -> None:
    """Refuse mask options the installed pipeline cannot honour, instead of silently ignoring them."""
    if needs_masks and "instance_masks" not in call_parameters:
        raise UsageError(f"{source}: phrase masks, boxes and points are not available in this version of lcad_pipeline.")
    if needs_auto and not {"instance_masks", "segmenter"} <= call_parameters:
        raise UsageError("--auto-masks is not available in this version of lcad_pipeline.")
    if needs_segmenter and "segmenter" not in call_parameters:
        raise UsageError("--sam-checkpoint is not available in this version of lcad_pipeline.")


# ---------------------------------------------------------------------------------------------------- images


def read_image(path: Path):
    """Open an image fully (so a truncated file fails here), upright as displayed (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        upright = ImageOps.exif_transpose(image)
        return upright if upright is not image else image.copy()


def save_image_atomically(image, target: Path, metadata: dict[str, str]) -> None:
    """Write `image` to `target` through a temporary file in the same folder, so no partial file is ever left."""
    from PIL.PngImagePlugin import PngInfo

    target.parent.mkdir(parents=True, exist_ok=True)
    image_format = _FORMAT_BY_SUFFIX[target.suffix.lower()]
    options: dict[str, Any] = {}
    if image_format == "PNG":
        info = PngInfo()
        for key, value in metadata.items():
            info.add_itxt(key, value)
        options["pnginfo"] = info
    elif image_format in ("JPEG", "WEBP"):
        options["quality"] = 95
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format=image_format, **options)
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


# ---------------------------------------------------------------------------------------------------- record


def _versions() -> dict[str, str]:
    import importlib.metadata

    import PIL

    versions = {"python": platform.python_version(), "Pillow": PIL.__version__}
    for name in ("lcad-pipeline", "diffusers", "torch", "transformers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_run_record(output_dir: Path, run: dict[str, Any]) -> Path:
    """Append `run` to OUTDIR/lcad_run.json (an unreadable existing record is kept and a new file used)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / RUN_RECORD_NAME
    record: dict[str, Any] = {"format": RUN_RECORD_FORMAT, "runs": []}
    if path.exists():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
            if not (isinstance(existing, dict) and isinstance(existing.get("runs"), list)):
                raise ValueError("not an lcad run record")
            record = existing
        except (ValueError, UnicodeDecodeError):
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            path = output_dir / f"lcad_run-{stamp}.json"
            print(f"warning: {output_dir / RUN_RECORD_NAME} is not a readable run record; left as is, writing {path.name}.", file=sys.stderr)
    record["runs"].append(run)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=output_dir)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump(record, stream, indent=2, ensure_ascii=False)
        stream.write("\n")
    os.replace(temporary, path)
    return path


# ---------------------------------------------------------------------------------------------------- run


def plan(args: argparse.Namespace) -> tuple[list[Task], list[Path], list[str]]:
    """Everything checkable before loading the model: inputs, outputs, prompts. Returns (tasks, ignored, warnings)."""
    images, ignored = collect_inputs(args.inputs)
    output_dir: Path = args.output_dir
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"-o/--output-dir {str(output_dir)!r} exists and is not a folder.")
    tasks: list[Task] = []
    for source, relative, given, _ in images:
        tasks.append(
            Task(
                source=source,
                relative=relative,
                given_as=given,
                output=output_path(output_dir, relative, args.format),
                seed=image_seed(args.seed, relative),
                prompt=args.prompt,
                negative_prompt=args.negative_prompt,
            )
        )
    check_output_locations(output_dir, images, [t.output for t in tasks])

    owners: dict[Path, Task] = {}
    seen_sources: set[Path] = set()
    unique: list[Task] = []
    for task in tasks:
        resolved = task.source.resolve()
        if resolved in seen_sources:
            continue  # the same file named twice (a file and its folder): colourise it once
        seen_sources.add(resolved)
        key = task.output.resolve()
        if key in owners:
            raise UsageError(
                f"{owners[key].given_as!r} and {task.given_as!r} would both be written to {str(task.output)!r}; "
                "run them separately or use --format same."
            )
        owners[key] = task
        unique.append(task)
    tasks = unique

    warnings: list[str] = []
    if args.prompts is not None:
        entries = load_prompts_file(args.prompts)
        unmatched = match_prompt_entries(entries, tasks, args.prompts)
        if unmatched:
            shown = ", ".join(repr(n) for n in unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
            warnings.append(f"--prompts: {len(unmatched)} entries match no input image: {shown}")
        for task in tasks:
            if task.entry is None:
                continue
            if task.entry.prompt is not None:
                task.prompt = task.entry.prompt
            if task.entry.negative_prompt is not None:
                task.negative_prompt = task.entry.negative_prompt
            if task.entry.seed is not None:
                task.seed = task.entry.seed
            for phrase in [*task.entry.boxes, *task.entry.points, *task.entry.masks]:
                if not _phrase_in_prompt(phrase, task.prompt):
                    raise UsageError(
                        f"--prompts {str(args.prompts)!r} entry for {task.relative.as_posix()!r}: phrase {phrase!r} does not "
                        f"occur in its description {task.prompt!r}."
                    )
    return tasks, ignored, warnings


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as error:
        print(f"lcad colorize: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from . import LCADPipeline

    if args.auto_masks and args.sam_checkpoint is None:
        raise UsageError("--auto-masks needs --sam-checkpoint (SAM proposes the regions the phrases are matched to).")
    if args.sam_checkpoint is not None and not args.sam_checkpoint.is_file():
        raise UsageError(f"--sam-checkpoint {str(args.sam_checkpoint)!r}: no such file.")
    tasks, ignored, warnings = plan(args)
    needs_masks = any(t.entry is not None and t.entry.has_instances for t in tasks)
    check_instance_support(
        pipeline_call_parameters(LCADPipeline),
        needs_masks=needs_masks,
        needs_auto=args.auto_masks,
        needs_segmenter=args.sam_checkpoint is not None,
        source=f"--prompts {str(args.prompts)!r}" if args.prompts else "--prompts",
    )
    if not tasks:
        warnings.append(f"no images found in {', '.join(args.inputs)} (looked for {', '.join(SUPPORTED_EXTENSIONS)}).")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)

    for task in tasks:
        if task.output.exists() and not args.overwrite:
            task.status = "skipped"
    todo = [t for t in tasks if t.status == "pending"]

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = segmenter = None
    needs_segmenter = args.auto_masks or any(t.entry is not None and (t.entry.boxes or t.entry.points) for t in todo)
    if args.sam_checkpoint is not None and not needs_segmenter and todo:
        print("warning: --sam-checkpoint is not used: no image to do has boxes or points, and --auto-masks is off.", file=sys.stderr)
    if todo:
        pipe = load_pipeline(args.model, device, dtype, args.scheduler)
        if args.sam_checkpoint is not None and needs_segmenter:
            segmenter = load_segmenter(args.sam_checkpoint, args.sam_model_type, device)

    started = _dt.datetime.now().astimezone()
    steps = args.steps if args.steps is not None else (pipe.config.default_denoising_steps if pipe else None)
    resolution = args.resolution if args.resolution is not None else (pipe.config.default_processing_resolution if pipe else None)
    run_record: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "finished": None,
        "command": shlex.join(["lcad", "colorize", *_argv_from(args)]),
        "cwd": os.getcwd(),
        "settings": {
            "inputs": list(args.inputs),
            "output_dir": str(args.output_dir),
            "model": str(args.model),
            "prompt": args.prompt,
            "negative_prompt": args.negative_prompt,
            "prompts_file": str(args.prompts) if args.prompts else None,
            "steps": steps,
            "guidance": args.guidance,
            "seed": args.seed,
            "seed_rule": "per image: first 4 bytes (big-endian) of sha256(f'{seed}\\0{relative path}'), unless the prompts file gives one",
            "scheduler": args.scheduler,
            "resolution": resolution,
            "format": args.format,
            "auto_masks": args.auto_masks,
            "sam_checkpoint": str(args.sam_checkpoint) if args.sam_checkpoint else None,
            "device": device,
            "dtype": str(dtype).replace("torch.", ""),
            "overwrite": args.overwrite,
        },
        "versions": _versions(),
        "summary": None,
        "files": [],
    }

    def files_record() -> list[dict[str, Any]]:
        rows = [
            {
                "input": str(t.source),
                "output": t.output.relative_to(args.output_dir).as_posix(),
                "seed": t.seed,
                "prompt": t.prompt,
                **({"negative_prompt": t.negative_prompt} if t.negative_prompt is not None else {}),
                **_instances_record(t, args.auto_masks),
                "status": t.status,
                **({"error": t.error} if t.error else {}),
            }
            for t in tasks
        ]
        rows += [{"input": str(path), "status": "ignored"} for path in ignored]
        return rows

    def summary() -> dict[str, int]:
        return {
            "done": sum(t.status == "done" for t in tasks),
            "skipped": sum(t.status == "skipped" for t in tasks),
            "ignored": len(ignored),
            "failed": sum(t.status == "failed" for t in tasks),
        }

    interrupted = False
    try:
        if todo:
            _colourise(pipe, segmenter, todo, args, steps, resolution)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        run_record["finished"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        run_record["summary"] = {**summary(), **({"interrupted": True} if interrupted else {})}
        run_record["files"] = files_record()
        record_path = write_run_record(args.output_dir, run_record)

    counts = summary()
    for task in tasks:
        if task.status == "failed":
            print(f"failed: {task.given_as}: {task.error}", file=sys.stderr)
    if ignored:
        shown = ", ".join(str(p) for p in ignored[:5]) + (" ..." if len(ignored) > 5 else "")
        print(f"ignored (not {'/'.join(e[1:] for e in SUPPORTED_EXTENSIONS)}): {shown}", file=sys.stderr)
    if interrupted:
        print("interrupted: finished outputs are kept; run the same command again to continue.", file=sys.stderr)
    print(
        f"{counts['done']} done, {counts['skipped']} skipped (existing), {counts['ignored']} ignored (not images), "
        f"{counts['failed']} failed; outputs in {args.output_dir}, settings in {record_path.name}"
    )
    if interrupted:
        return 130
    return 1 if counts["failed"] else 0


def _instances_record(task: Task, auto_masks: bool) -> dict[str, Any]:
    given = list(dict.fromkeys([*task.entry.boxes, *task.entry.points, *task.entry.masks])) if task.entry else []
    automatic = automatic_phrases(task.prompt, given) if auto_masks else []
    record: dict[str, Any] = {}
    if given:
        record["phrase_regions"] = given
    if automatic:
        record["automatic_masks"] = automatic
    return record


def _argv_from(args: argparse.Namespace) -> list[str]:
    """The command line equivalent to `args`, every setting spelled out (to repeat the run from its record)."""
    argv = [*args.inputs, "-o", str(args.output_dir), "--model", str(args.model)]
    options = {
        "--prompt": args.prompt or None,
        "--negative-prompt": args.negative_prompt,
        "--prompts": args.prompts,
        "--steps": args.steps,
        "--guidance": args.guidance,
        "--seed": args.seed,
        "--scheduler": args.scheduler,
        "--resolution": args.resolution,
        "--format": args.format,
        "--device": args.device,
        "--dtype": args.dtype,
        "--sam-checkpoint": args.sam_checkpoint,
        "--sam-model-type": args.sam_model_type if args.sam_checkpoint else None,
    }
    for flag, value in options.items():
        if value is not None:
            argv += [flag, str(value)]
    argv += [flag for flag, on in (("--auto-masks", args.auto_masks), ("--overwrite", args.overwrite)) if on]
    return argv


def _colourise(pipe, segmenter, todo: list[Task], args: argparse.Namespace, steps: int, resolution: int) -> None:
    import torch
    from tqdm.auto import tqdm

    bar = tqdm(todo, desc="colourising", unit="image", file=sys.stderr, disable=args.no_progress, dynamic_ncols=True)
    for task in bar:
        bar.set_postfix_str(task.relative.as_posix()[-40:], refresh=False)
        try:
            image = read_image(task.source)
        except Exception as error:  # PIL raises several types for unreadable files
            task.status, task.error = "failed", f"cannot read the image ({type(error).__name__}: {error})"
            tqdm.write(f"failed: {task.given_as}: {task.error}", file=sys.stderr)
            continue
        try:
            kwargs = instance_arguments(task, args.auto_masks)
            if kwargs and segmenter is not None:
                kwargs["segmenter"] = segmenter
            generator = torch.Generator(device="cpu").manual_seed(task.seed)
            result = pipe(
                image,
                prompt=task.prompt or None,
                negative_prompt=task.negative_prompt,
                num_inference_steps=steps,
                guidance_scale=args.guidance,
                processing_resolution=resolution,
                generator=generator,
                **kwargs,
            ).images[0]
            if result.size != image.size:
                raise RuntimeError(f"the pipeline returned {result.size[0]}x{result.size[1]} for a {image.size[0]}x{image.size[1]} input")
            metadata = {"lcad:prompt": task.prompt, "lcad:seed": str(task.seed), "lcad:model": str(args.model)}
            save_image_atomically(result, task.output, metadata)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:
            task.status, task.error = "failed", f"{type(error).__name__}: {error}"
            tqdm.write(f"failed: {task.given_as}: {task.error}", file=sys.stderr)
            continue
        task.status = "done"
    bar.close()
