# Copyright 2025 The L-CAD pipeline authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""``lcad evaluate``: score a folder of colourised images against their ground truth, as in the L-CAD paper.

Results pair with ground-truth images by relative file name without extension. Protocol presets pick the images
and their preprocessing so the numbers compare with the paper's tables:

- ``imagenet-val`` (Table 3): the first 5,000 images of the ImageNet validation folder sorted by file name,
  centre-cropped to a square and resized to 256x256.
- ``coco-stuff`` / ``multi-instance`` (Table 1): the images named in a caption JSON ``{file name: [captions]}``,
  at their own size; the first caption is the description (fed to the pipeline by ``--run``, used by CLIP score).
- ``folder``: every image of the ground-truth folder, as it is.

``--run`` first colourises the protocol's grey images with an L-CAD pipeline into the results folder, skipping
results already there, so an interrupted run resumes. Metrics whose weights are not given are skipped with the
reason, in the console and in the written ``results.json`` / ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Preset:
    """Which ground-truth images a protocol uses and how they are prepared."""

    description: str
    limit: int | None = None
    size: int | None = None
    needs_captions: bool = False
    sort_by_file_name: bool = False


PRESETS: dict[str, Preset] = {
    "folder": Preset("every image of the ground-truth folder, as it is"),
    "imagenet-val": Preset(
        "ImageNet val, first 5,000 images by file name, centre crop, 256x256 (paper Table 3)",
        limit=5000,
        size=256,
        sort_by_file_name=True,
    ),
    "coco-stuff": Preset(
        "extended COCO-Stuff evaluation images of the caption JSON, own size (paper Table 1)", needs_captions=True
    ),
    "multi-instance": Preset(
        "multi-instance evaluation images of the caption JSON, own size (paper Table 1)", needs_captions=True
    ),
}

# (key, label in the Markdown table); the order of the table.
METRICS: list[tuple[str, str]] = [
    ("fid", "FID ↓"),
    ("psnr", "PSNR (dB) ↑"),
    ("ssim", "SSIM ↑"),
    ("lpips", "LPIPS ↓"),
    ("colorfulness", "colourfulness ↑"),
    ("delta_colorfulness", "Δ colourfulness ↓ (difference of the means, as in Table 3)"),
    ("delta_colorfulness_per_image", "Δ colourfulness per image ↓ (mean absolute difference)"),
    ("colorfulness_bias", "colourfulness bias (mean result − mean GT)"),
    ("colorfulness_gt", "colourfulness of the ground truth"),
    ("clip_score", "CLIP score ↑"),
]

_LIST_SHOWN = 5  # names shown in console messages about missing files


class UsageError(Exception):
    """Bad input from the command line; the message names the argument."""


@dataclass
class Sample:
    """One ground-truth image of the protocol."""

    key: str  # relative path without extension, "/"-separated
    ground_truth: str
    caption: str | None = None


@dataclass
class Protocol:
    """The samples to score and how their images are prepared."""

    preset: str
    samples: list[Sample]
    size: int | None
    missing_ground_truth: list[str] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``lcad evaluate`` to ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "presets:\n" + "\n".join(f"  {name:15s} {preset.description}" for name, preset in PRESETS.items())
    parser.add_argument("--results", required=True, help="folder of colourised images (written to by --run)")
    parser.add_argument("--ground-truth", required=True, help="folder of ground-truth colour images")
    parser.add_argument(
        "--preset", default="folder", help=f"evaluation protocol: {', '.join(PRESETS)} (default: folder)"
    )
    parser.add_argument(
        "--captions", help="caption JSON {file name: [captions]}; required by coco-stuff and multi-instance"
    )
    parser.add_argument("--limit", type=int, help="score only the first N images (default: the preset's)")
    parser.add_argument("--size", type=int, help="centre-crop to a square and resize to SIZE (default: the preset's)")
    parser.add_argument("--output", help="folder for results.json and results.md (default: the --results folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing results.json / results.md")
    weights = parser.add_argument_group("metric weights (a metric whose weights are not given is skipped)")
    weights.add_argument(
        "--lpips-weights", help="torchvision AlexNet (or VGG16) state dict for LPIPS, e.g. alexnet-owt-7be5be79.pth"
    )
    weights.add_argument(
        "--fid-weights", help="FID Inception as TorchScript, e.g. inception-2015-12-05.pt (or a .pt2 export)"
    )
    weights.add_argument("--clip-model", help="local CLIP model folder for CLIP score (needs captions)")
    parser.add_argument("--batch-size", type=int, default=16, help="images scored at once (default: 16)")
    parser.add_argument(
        "--device", default=None, help="torch device for the pipeline and LPIPS/FID/CLIP (default: cuda if available)"
    )
    colorize = parser.add_argument_group("colourising first (--run)")
    colorize.add_argument("--run", action="store_true", help="colourise the protocol's grey images before scoring")
    colorize.add_argument("--model", help="L-CAD pipeline folder for --run")
    colorize.add_argument("--prompt", default="", help="description for images without a caption (default: empty)")
    colorize.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50, as in the paper)")
    colorize.add_argument(
        "--guidance-scale", type=float, help="classifier-free guidance scale (default: the pipeline's)"
    )
    colorize.add_argument("--seed", type=int, default=0, help="seed of every image's generator (default: 0)")


def run(args: argparse.Namespace, pipeline: Callable | None = None) -> int:
    """Run ``lcad evaluate``; returns the exit status (2 for bad input).

    ``pipeline`` replaces loading ``--model`` for ``--run`` (any callable with the pipeline's call signature).
    """
    try:
        return _run(args, pipeline)
    except UsageError as error:
        print(f"lcad evaluate: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, pipeline: Callable | None) -> int:
    protocol = build_protocol(args)
    output = args.output or args.results
    report_paths = [os.path.join(output, name) for name in ("results.json", "results.md")]
    existing = [path for path in report_paths if os.path.exists(path)]
    if existing and not args.overwrite:
        raise UsageError(f"--output: {', '.join(existing)} already exist(s); pass --overwrite to replace")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from None
    if os.path.exists(args.results) and not os.path.isdir(args.results):
        raise UsageError(f"--results: {args.results} is not a folder")
    if args.run:
        if not args.model and pipeline is None:
            raise UsageError("--run needs --model PATH, the L-CAD pipeline folder")
        if args.model and not os.path.isdir(args.model):
            raise UsageError(f"--model: no such folder: {args.model}")
        if args.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {args.steps}")
    elif not os.path.isdir(args.results):
        raise UsageError(f"--results: no such folder: {args.results}")

    for path, argument in [
        (args.lpips_weights, "--lpips-weights"),
        (args.fid_weights, "--fid-weights"),
        (args.clip_model, "--clip-model"),
    ]:
        if path and not os.path.exists(path):
            raise UsageError(f"{argument}: no such file or folder: {path}")

    # Load every weight file before the long part, so that a bad path fails at once.
    skipped: dict[str, str] = {}
    lpips_network = _load_metric(args.lpips_weights, "--lpips-weights", "lpips", skipped)
    fid_extractor = _load_metric(args.fid_weights, "--fid-weights", "fid", skipped)
    clip_score = None
    if not any(sample.caption for sample in protocol.samples):
        skipped["clip_score"] = "no captions for these images (give --captions)"
    else:
        clip_score = _load_metric(args.clip_model, "--clip-model", "clip_score", skipped)
    for name, reason in skipped.items():
        print(f"lcad evaluate: skipping {_label(name)}: {reason}", file=sys.stderr)

    if args.run:
        if pipeline is None:
            pipeline = load_pipeline(args.model, device)
        os.makedirs(args.results, exist_ok=True)
        written, kept = colorize_missing(
            protocol,
            args.results,
            pipeline,
            prompt=args.prompt,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            seed=args.seed,
        )
        print(f"lcad evaluate: colourised {written} images, kept {kept} already in {args.results}")

    pairs, missing, extra = pair_results(protocol.samples, args.results)
    _report_pairing(protocol, pairs, missing, extra)
    if not pairs:
        raise UsageError(
            f"--results: none of the {len(protocol.samples)} ground-truth images has a result in {args.results}"
        )

    if lpips_network is not None:
        lpips_network.to(device)
    if fid_extractor is not None:
        fid_extractor.to(device)
    if clip_score is not None:
        clip_score.to(device)
    metrics, resized = score_pairs(
        pairs,
        size=protocol.size,
        lpips_network=lpips_network,
        fid_extractor=fid_extractor,
        clip_score=clip_score,
        batch_size=args.batch_size,
        device=device,
        skipped=skipped,
    )
    if resized:
        print(f"lcad evaluate: note: resized {resized} results to the size of their ground truth", file=sys.stderr)

    report = {
        "protocol": {
            "preset": protocol.preset,
            "description": PRESETS[protocol.preset].description,
            "ground_truth": os.path.abspath(args.ground_truth),
            "results": os.path.abspath(args.results),
            "captions": os.path.abspath(args.captions) if args.captions else None,
            "size": protocol.size,
            "limit": _limit(args, PRESETS[protocol.preset]),
        },
        "counts": {
            "ground_truth": len(protocol.samples),
            "pairs": len(pairs),
            "missing_results": len(missing),
            "missing_ground_truth": len(protocol.missing_ground_truth),
            "extra_results": len(extra),
            "resized_results": resized,
        },
        "metrics": metrics,
        "skipped": skipped,
        "missing_results": missing,
        "missing_ground_truth": protocol.missing_ground_truth,
    }
    os.makedirs(output, exist_ok=True)
    markdown = format_markdown(report)
    with open(report_paths[0], "w", encoding="utf-8") as file:
        json.dump(_json_safe(report), file, indent=2, ensure_ascii=False)
        file.write("\n")
    with open(report_paths[1], "w", encoding="utf-8") as file:
        file.write(markdown)
    print(markdown)
    print(f"lcad evaluate: wrote {report_paths[0]} and {report_paths[1]}")
    return 0


# ------------------------------------------------------------------------------------------------ protocol


def _limit(args: argparse.Namespace, preset: Preset) -> int | None:
    return args.limit if args.limit is not None else preset.limit


def _image_key(relative_path: str) -> str | None:
    """The pairing key of an image file: its relative path without extension; None if not an image."""
    stem, extension = os.path.splitext(relative_path.replace(os.sep, "/"))
    return stem if extension.lower() in IMAGE_EXTENSIONS else None


def find_images(folder: str, argument: str) -> dict[str, str]:
    """Map each image under ``folder`` (recursively, hidden entries skipped) from its key to its path."""
    images: dict[str, str] = {}
    for root, directories, files in os.walk(folder):
        directories[:] = sorted(name for name in directories if not name.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            key = _image_key(os.path.relpath(path, folder))
            if key is None:
                continue
            if key in images:
                raise UsageError(f"{argument}: {images[key]} and {path} have the same name; keep one of them")
            images[key] = path
    return images


def load_captions(path: str) -> dict[str, str]:
    """Read a caption JSON ``{file name: [captions] or caption}`` into ``{key: first caption}``."""
    if not os.path.isfile(path):
        raise UsageError(f"--captions: no such file: {path}")
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"--captions: {path} is not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise UsageError(
            f"--captions: {path} must hold an object {{file name: [captions]}}, not a {type(data).__name__}"
        )
    captions: dict[str, str] = {}
    for name, value in data.items():
        if isinstance(value, list) and value and all(isinstance(text, str) for text in value):
            caption = value[0]
        elif isinstance(value, str):
            caption = value
        else:
            raise UsageError(f"--captions: the entry of {name!r} must be a caption or a non-empty list of captions")
        key = _image_key(name) or name.replace(os.sep, "/")
        captions[key] = caption
    return captions


def build_protocol(args: argparse.Namespace) -> Protocol:
    """Resolve the preset, ground-truth folder and captions into the list of samples to score."""
    if args.preset not in PRESETS:
        raise UsageError(f"--preset: unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[args.preset]
    if not os.path.isdir(args.ground_truth):
        raise UsageError(f"--ground-truth: no such folder: {args.ground_truth}")
    limit = _limit(args, preset)
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    size = args.size if args.size is not None else preset.size
    if size is not None and size < 16:
        raise UsageError(f"--size must be at least 16, got {size}")
    if preset.needs_captions and not args.captions:
        raise UsageError(f"--preset {args.preset} needs --captions, the caption JSON of its evaluation images")
    captions = load_captions(args.captions) if args.captions else {}

    images = find_images(args.ground_truth, "--ground-truth")
    if not images:
        raise UsageError(f"--ground-truth: no images ({', '.join(IMAGE_EXTENSIONS)}) in {args.ground_truth}")
    missing_ground_truth: list[str] = []
    if preset.needs_captions:
        keys = sorted(captions)
        missing_ground_truth = [key for key in keys if key not in images]
        keys = [key for key in keys if key in images]
        if not keys:
            raise UsageError(
                f"--ground-truth: none of the {len(captions)} images named in {args.captions} "
                f"is in {args.ground_truth}"
            )
    elif preset.sort_by_file_name:
        # ImageNet val images are numbered in their file names, whether or not they sit in class folders.
        keys = sorted(images, key=lambda key: (os.path.basename(key), key))
    else:
        keys = sorted(images)
    if limit is not None:
        keys = keys[:limit]
    samples = [Sample(key, images[key], captions.get(key)) for key in keys]
    return Protocol(args.preset, samples, size, missing_ground_truth)


def prepare_image(image: Image.Image, size: int | None) -> Image.Image:
    """RGB, and for a ``size``: the centred largest square, resized to ``size`` x ``size`` (bicubic)."""
    image = image.convert("RGB")
    if size is None:
        return image
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


def _open(path: str, argument: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UsageError(f"{argument}: cannot read image {path} ({error})") from None


def pair_results(
    samples: Sequence[Sample], results_folder: str
) -> tuple[list[tuple[Sample, str]], list[str], list[str]]:
    """Pair each sample with the result of the same key; returns the pairs, missing keys and unused result keys."""
    results = find_images(results_folder, "--results")
    pairs = [(sample, results[sample.key]) for sample in samples if sample.key in results]
    missing = [sample.key for sample in samples if sample.key not in results]
    wanted = {sample.key for sample in samples}
    extra = sorted(key for key in results if key not in wanted)
    return pairs, missing, extra


def _some(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_LIST_SHOWN])
    return shown + (", ..." if len(keys) > _LIST_SHOWN else "")


def _report_pairing(protocol: Protocol, pairs: Sequence, missing: Sequence[str], extra: Sequence[str]) -> None:
    print(
        f"lcad evaluate: {len(pairs)} of {len(protocol.samples)} ground-truth images have a result ({protocol.preset})"
    )
    if protocol.missing_ground_truth:
        print(
            f"lcad evaluate: warning: {len(protocol.missing_ground_truth)} images named in --captions are not in "
            f"--ground-truth: {_some(protocol.missing_ground_truth)}",
            file=sys.stderr,
        )
    if missing:
        print(
            f"lcad evaluate: warning: {len(missing)} ground-truth images have no result in --results "
            "and are left out: "
            f"{_some(missing)}",
            file=sys.stderr,
        )
    if extra:
        print(f"lcad evaluate: {len(extra)} images in --results are not part of the protocol and are ignored")


# ----------------------------------------------------------------------------------------------- colourise


def load_pipeline(model: str, device: torch.device) -> Callable:
    """Load the L-CAD pipeline of ``--model`` onto ``device``."""
    try:
        from lcad_pipeline import LCADPipeline
    except ImportError as error:
        raise UsageError(f"--run: this install of lcad_pipeline has no LCADPipeline ({error})") from None
    try:
        pipeline = LCADPipeline.from_pretrained(model)
    except Exception as error:  # diffusers raises many types for a folder that is not a pipeline
        raise UsageError(
            f"--model: cannot load an L-CAD pipeline from {model} ({type(error).__name__}: {error})"
        ) from None
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def colorize_missing(
    protocol: Protocol,
    results_folder: str,
    pipeline: Callable,
    prompt: str = "",
    steps: int = 50,
    guidance_scale: float | None = None,
    seed: int = 0,
) -> tuple[int, int]:
    """Colourise every sample that has no result yet into ``results_folder`` as ``<key>.png``.

    The grey input is the prepared ground truth converted to luminance. Each image gets a generator seeded with
    ``seed``, so a resumed run gives the same images as an uninterrupted one. Results already present (any image
    extension) are kept, never overwritten; each new one is written to a temporary name and renamed, so an
    interrupted run leaves no half-written image behind. Returns (images written, images kept).
    """
    from tqdm.auto import tqdm

    existing = set(find_images(results_folder, "--results"))
    written = kept = 0
    for sample in tqdm(protocol.samples, desc="colourising", unit="image"):
        if sample.key in existing:
            kept += 1
            continue
        grey = prepare_image(_open(sample.ground_truth, "--ground-truth"), protocol.size).convert("L")
        kwargs: dict[str, Any] = {
            "image": grey,
            "prompt": sample.caption or prompt,
            "num_inference_steps": steps,
            "generator": torch.Generator().manual_seed(seed),
        }
        if guidance_scale is not None:
            kwargs["guidance_scale"] = guidance_scale
        image = pipeline(**kwargs).images[0]
        target = os.path.join(results_folder, *sample.key.split("/")) + ".png"
        os.makedirs(os.path.dirname(target), exist_ok=True)
        partial = target + ".partial"
        image.save(partial, format="PNG")
        os.replace(partial, target)
        written += 1
    return written, kept


# ------------------------------------------------------------------------------------------------- scoring


def _load_metric(path: str | None, argument: str, name: str, skipped: dict[str, str]) -> Any:
    from . import metrics

    loaders = {
        "lpips": metrics.load_lpips_network,
        "fid": metrics.load_fid_feature_extractor,
        "clip_score": metrics.load_clip_score,
    }
    if not path:
        skipped[name] = f"no {argument} given (its weights cannot be downloaded here)"
        return None
    try:
        return loaders[name](path)
    except metrics.MetricUnavailable as error:
        skipped[name] = str(error)
        return None
    except ValueError as error:
        raise UsageError(f"{argument}: {error}") from None


def _batches(pairs: Sequence[tuple[Sample, str]], size: int | None, batch_size: int) -> Iterator[list]:
    """Load pairs as (sample, result array, ground-truth array, resized) lists of equal image size."""
    batch: list = []
    for sample, result_path in pairs:
        ground_truth = prepare_image(_open(sample.ground_truth, "--ground-truth"), size)
        result = prepare_image(_open(result_path, "--results"), size)
        resized = result.size != ground_truth.size
        if resized:
            result = result.resize(ground_truth.size, Image.Resampling.BICUBIC)
        item = (sample, np.asarray(result), np.asarray(ground_truth), resized)
        if batch and (len(batch) == batch_size or batch[0][2].shape != item[2].shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _to_tensor(arrays: Iterable[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(list(arrays))).permute(0, 3, 1, 2).contiguous()


def score_pairs(
    pairs: Sequence[tuple[Sample, str]],
    size: int | None = None,
    lpips_network: torch.nn.Module | None = None,
    fid_extractor: torch.nn.Module | None = None,
    clip_score: Any = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    skipped: dict[str, str] | None = None,
) -> tuple[dict[str, dict[str, Any]], int]:
    """Score result / ground-truth pairs; returns ``{metric: {"value", "n"}}`` and the number of resized results.

    Metrics that cannot be computed on these pairs (FID on fewer than two) are added to ``skipped``.
    """
    from tqdm.auto import tqdm

    from . import metrics

    skipped = {} if skipped is None else skipped
    fid = metrics.make_fid(fid_extractor).to(device) if fid_extractor is not None else None
    scores: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "lpips": [], "c_result": [], "c_gt": []}
    n_captioned = resized = 0
    with tqdm(total=len(pairs), desc="scoring", unit="image") as progress:
        for batch in _batches(pairs, size, batch_size):
            results = _to_tensor(item[1] for item in batch)
            ground_truths = _to_tensor(item[2] for item in batch)
            resized += sum(item[3] for item in batch)
            scores["psnr"].append(metrics.psnr(results, ground_truths))
            scores["ssim"].append(metrics.ssim(results, ground_truths))
            scores["c_result"].append(metrics.colorfulness(results))
            scores["c_gt"].append(metrics.colorfulness(ground_truths))
            if lpips_network is not None:
                scores["lpips"].append(
                    metrics.lpips(lpips_network, results.to(device), ground_truths.to(device)).cpu()
                )
            if fid is not None:
                with torch.inference_mode():
                    fid.update(ground_truths.to(device), real=True)
                    fid.update(results.to(device), real=False)
            if clip_score is not None:
                captioned = [index for index, item in enumerate(batch) if item[0].caption]
                if captioned:
                    with torch.inference_mode():
                        clip_score.update(
                            [results[index].to(device) for index in captioned],
                            [batch[index][0].caption for index in captioned],
                        )
                    n_captioned += len(captioned)
            progress.update(len(batch))

    n = len(pairs)
    values: dict[str, dict[str, Any]] = {}
    if fid is not None:
        if n < 2:
            skipped["fid"] = f"needs at least 2 image pairs, got {n}"
        else:
            values["fid"] = {"value": fid.compute().item(), "n": n}
    values["psnr"] = {"value": torch.cat(scores["psnr"]).mean().item(), "n": n}
    values["ssim"] = {"value": torch.cat(scores["ssim"]).mean().item(), "n": n}
    if lpips_network is not None:
        values["lpips"] = {"value": torch.cat(scores["lpips"]).mean().item(), "n": n}
    summary = metrics.colorfulness_summary(torch.cat(scores["c_result"]), torch.cat(scores["c_gt"]))
    for key, value in summary.items():
        values[key] = {"value": value, "n": n}
    if clip_score is not None and n_captioned:
        values["clip_score"] = {"value": clip_score.compute().item(), "n": n_captioned}
    elif clip_score is not None:
        skipped["clip_score"] = "none of the scored images has a caption"
    ordered = {key: values[key] for key, _ in METRICS if key in values}
    return ordered, resized


# -------------------------------------------------------------------------------------------------- report


def _label(key: str) -> str:
    return {"fid": "FID", "lpips": "LPIPS", "clip_score": "CLIP score"}.get(key, key)


def _format_value(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _json_safe(value: Any) -> Any:
    # JSON has no inf / nan (PSNR of identical images is inf); write them as strings.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def format_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: protocol, counts, a metric | value | n table and the skipped metrics."""
    protocol, counts = report["protocol"], report["counts"]
    lines = [
        "# L-CAD evaluation",
        "",
        f"- preset: `{protocol['preset']}` ({protocol['description']})",
        f"- ground truth: `{protocol['ground_truth']}`",
        f"- results: `{protocol['results']}`",
    ]
    if protocol["captions"]:
        lines.append(f"- captions: `{protocol['captions']}`")
    lines.append(
        f"- pairs scored: {counts['pairs']} of {counts['ground_truth']} ground-truth images "
        f"(missing results: {counts['missing_results']}, ground truth named in the captions but absent: "
        f"{counts['missing_ground_truth']}, results resized to their ground truth: {counts['resized_results']})"
    )
    lines += ["", "| metric | value | n |", "| --- | ---: | ---: |"]
    for key, label in METRICS:
        if key in report["metrics"]:
            entry = report["metrics"][key]
            lines.append(f"| {label} | {_format_value(entry['value'])} | {entry['n']} |")
    if report["skipped"]:
        lines += ["", "Skipped:", ""]
        lines += [f"- {_label(key)}: {reason}" for key, reason in report["skipped"].items()]
    return "\n".join(lines) + "\n"
