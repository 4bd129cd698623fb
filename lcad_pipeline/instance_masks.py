# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""Phrases, token spans and masks for L-CAD's instance-aware sampling (see `attention_lcad`).

- `split_prompt_phrases`: the released convention, the prompt's comma-separated parts are the phrases.
- `find_phrase_token_spans`: each phrase's token positions in the encoded prompt, from the tokenizer's offsets.
- `resolve_instance_inputs`: the pipeline's `instance_masks` / `phrases` / `masks` arguments -> phrases and specs.
- `check_mask_specs`, `prepare_instance_masks`: validate mask specs; turn them into a float tensor `[P, H, W]` at
  the working resolution.
- `assign_regions_to_phrases`: give each phrase one region proposal (e.g. from SAM's automatic mask generator) where
  its cross-attention concentrates, no region twice.

A mask spec (one per phrase) is one of:

- a mask: `PIL.Image` (any mode; colour images are converted to grey, transparent pixels count as 0), numpy `H x W`
  (bool, uint8 as 0..255, other integers as "non-zero", float in [0, 1]), or torch `H x W` / `1 x H x W` (same
  rules). Any size: resized to the working resolution. `1 x H x W` and `H x W x 1` numpy arrays are accepted too.
- a box `(x0, y0, x1, y1)` (a tuple or list of four numbers) in pixels of the input image;
- points `[(x, y), ...]` (a list or tuple of pairs) in pixels of the input image;
- a dict with `"box"` and/or `"points"` (and optional `"labels"`, 1 = on the object, 0 = off it).

Boxes and points go to a segmenter (SAM, see `sam_masks.SamSegmenter`) when one is given. Without one, a box becomes
a filled rectangle and each positive point a disc of radius `point_radius` (default: 1/8 of the shorter image side;
negative points cut such a disc out): a rough region, which is all the refinement needs since masks are reduced
to the attention layers' 8x8 to 64x64 grids anyway.

This file is Hub remote code: it imports only torch, numpy, PIL and the standard library.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F


def split_prompt_phrases(prompt: str) -> list[str]:
    """The released convention: the comma-separated parts of `prompt`, stripped; empty parts are dropped."""
    if not isinstance(prompt, str):
        raise ValueError(f"`prompt` must be a string to split into phrases, got {type(prompt).__name__}.")
    return [part.strip() for part in prompt.split(",") if part.strip()]


def _phrase_pattern(phrase: str) -> re.Pattern:
    words = phrase.split()
    return re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)", re.IGNORECASE)


def find_phrase_char_spans(prompt: str, phrases: Sequence[str], argument: str = "phrases") -> list[tuple[int, int]]:
    """Character span of each phrase in `prompt` (case- and whitespace-insensitive, whole words).

    Phrases are placed in order of appearance: each takes its first occurrence that does not overlap a span taken
    by an earlier phrase, so "a red car and a blue car" with phrases "a red car", "a blue car" (or "car", "car")
    gives each phrase its own occurrence.
    """
    taken: list[tuple[int, int]] = []
    for phrase in phrases:
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError(f"`{argument}` must hold non-empty strings, got {phrase!r}.")
        span = None
        for match in _phrase_pattern(phrase).finditer(prompt):
            if all(match.end() <= s or match.start() >= e for s, e in taken):
                span = match.span()
                break
        if span is None:
            occurs = _phrase_pattern(phrase).search(prompt) is not None
            reason = "occurs only where an earlier phrase already is" if occurs else "was not found"
            raise ValueError(f"`{argument}`: phrase {phrase!r} {reason} in the prompt {prompt!r}.")
        taken.append(span)
    return taken


def find_phrase_token_spans(tokenizer, prompt: str, phrases: Sequence[str], argument: str = "phrases") -> list[list[int]]:
    """For each phrase, the positions of its tokens in `tokenizer(prompt)` as the text encoder sees it.

    Position 0 is the start token; special tokens never belong to a phrase. Uses the offsets of a fast tokenizer
    (`return_offsets_mapping`); for a slow one, the token counts of the prompt's prefixes (exact for CLIP's
    word-level BPE, since phrases start and end at word boundaries).
    """
    char_spans = find_phrase_char_spans(prompt, phrases, argument)
    max_length = tokenizer.model_max_length
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(prompt, truncation=True, max_length=max_length, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
        special = set(tokenizer.all_special_ids)
        token_spans = []
        for start, end in char_spans:
            token_spans.append(
                [
                    i
                    for i, ((a, b), tid) in enumerate(zip(offsets, encoding["input_ids"]))
                    if tid not in special and b > a and a < end and b > start
                ]
            )
    else:
        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        has_bos = len(tokenizer("", add_special_tokens=True)["input_ids"]) > 0
        limit = max_length - 1  # room for the end token
        token_spans = []
        for start, end in char_spans:
            first, stop = count(prompt[:start]) + int(has_bos), count(prompt[:end]) + int(has_bos)
            token_spans.append(list(range(first, min(stop, limit))))
    for phrase, span in zip(phrases, token_spans):
        if not span:
            raise ValueError(
                f"`{argument}`: phrase {phrase!r} lies beyond the text encoder's {max_length}-token limit; "
                "shorten the prompt."
            )
    return token_spans


def resolve_instance_inputs(
    prompt: str | None,
    instance_masks: Mapping[str, Any] | None = None,
    phrases: Sequence[str] | None = None,
    masks: Sequence[Any] | None = None,
) -> tuple[list[str], list[Any] | None, str]:
    """Phrases and mask specs from the pipeline's arguments, and the argument name to use in errors.

    - `instance_masks={"the red cup": mask, ...}`;
    - `phrases=[...]`, `masks=[...]` (parallel lists);
    - `masks=[...]` alone: the released convention, the prompt's comma-separated parts in order;
    - `phrases=[...]` alone: masks to be found automatically (specs `None`).
    Returns `([], None, "")` when none is given.
    """
    if instance_masks is not None:
        if phrases is not None or masks is not None:
            raise ValueError("Pass either `instance_masks` or `phrases`/`masks`, not both.")
        if not isinstance(instance_masks, Mapping) or not instance_masks:
            raise ValueError("`instance_masks` must be a non-empty dict {phrase: mask}.")
        return list(instance_masks.keys()), list(instance_masks.values()), "instance_masks"
    if masks is not None:
        if isinstance(masks, (torch.Tensor, np.ndarray)):
            masks = list(masks)  # a stacked [P, H, W] array
        if not isinstance(masks, (list, tuple)) or not masks:
            raise ValueError("`masks` must be a non-empty list with one mask (or box / points) per phrase.")
        if phrases is None:
            if not isinstance(prompt, str):
                raise ValueError("`masks` without `phrases` pairs masks with the comma-separated parts of one prompt string.")
            phrases = split_prompt_phrases(prompt)
            if len(phrases) != len(masks):
                raise ValueError(
                    f"`masks` has {len(masks)} entries but the prompt has {len(phrases)} comma-separated phrases "
                    f"{phrases}; pass `phrases` to pair them explicitly."
                )
        phrases = list(phrases)
        if len(phrases) != len(masks):
            raise ValueError(f"`masks` has {len(masks)} entries but `phrases` has {len(phrases)}.")
        return phrases, list(masks), "masks"
    if phrases is not None:
        if isinstance(phrases, str) or not phrases:
            raise ValueError("`phrases` must be a non-empty list of strings.")
        return list(phrases), None, "phrases"
    return [], None, ""


# ---------------------------------------------------------------------------------------------------- mask specs


def is_prompt_spec(spec: Any) -> bool:
    """Whether a mask spec is a box / points prompt (as opposed to a raster mask)."""
    if isinstance(spec, Mapping):
        return True
    if isinstance(spec, (list, tuple)) and spec:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec) and len(spec) in (2, 4):
            return True
        return all(isinstance(v, (list, tuple)) and len(v) == 2 for v in spec)
    return False


def parse_prompt_spec(spec: Any, where: str) -> dict:
    """A box / points spec -> `{"box": np.float32[4] | None, "points": np.float32[N, 2] | None, "labels": int[N]}`."""
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"box", "points", "labels"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; use 'box', 'points' and 'labels'.")
        box, points, labels = spec.get("box"), spec.get("points"), spec.get("labels")
    elif len(spec) == 4 and not isinstance(spec[0], (list, tuple)):
        box, points, labels = spec, None, None
    elif len(spec) == 2 and not isinstance(spec[0], (list, tuple)):
        box, points, labels = None, [spec], None
    else:
        box, points, labels = None, spec, None
    out: dict = {"box": None, "points": None, "labels": None}
    if box is not None:
        box = np.asarray(box, dtype=np.float32).reshape(-1)
        if box.shape != (4,) or not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"{where}: a box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {spec!r}.")
        out["box"] = box
    if points is not None:
        points = np.asarray(points, dtype=np.float32)
        if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0 or not np.isfinite(points).all():
            raise ValueError(f"{where}: points must be a non-empty list of (x, y) pairs, got {spec!r}.")
        labels = np.ones(len(points), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.shape != (len(points),) or not np.isin(labels, (0, 1)).all():
            raise ValueError(f"{where}: `labels` must hold one 0 or 1 per point, got {labels.tolist()}.")
        if out["box"] is None and not labels.any():
            raise ValueError(f"{where}: needs at least one positive point (label 1) or a box.")
        out["points"], out["labels"] = points, labels
    elif labels is not None:
        raise ValueError(f"{where}: `labels` given without `points`.")
    if out["box"] is None and out["points"] is None:
        raise ValueError(f"{where}: give a 'box' and/or 'points'.")
    return out


def mask_to_tensor(mask: Any, where: str) -> torch.Tensor:
    """A raster mask (PIL, numpy, torch) -> float tensor `[H, W]` in [0, 1] at its own size."""
    if isinstance(mask, PIL.Image.Image):
        if mask.mode == "1":
            array = np.asarray(mask, dtype=bool)
        elif mask.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            array = np.asarray(mask)
            array = array.astype(np.float32) if mask.mode == "F" else array
        else:
            if "A" in mask.getbands() or mask.mode == "P" and "transparency" in mask.info:
                black = PIL.Image.new("RGBA", mask.size, (0, 0, 0, 255))
                mask = PIL.Image.alpha_composite(black, mask.convert("RGBA"))
            array = np.asarray(mask.convert("L"))
        tensor = torch.from_numpy(np.array(array))
    elif isinstance(mask, np.ndarray):
        tensor = torch.from_numpy(np.array(mask))
    elif isinstance(mask, torch.Tensor):
        tensor = mask.detach().cpu()
    else:
        raise ValueError(
            f"{where}: expected a mask (PIL image, numpy array, torch tensor), a box (x0, y0, x1, y1) or points "
            f"[(x, y), ...], got {type(mask).__name__}."
        )
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    elif tensor.ndim == 3 and tensor.shape[-1] == 1 and not isinstance(mask, torch.Tensor):
        tensor = tensor[..., 0]
    if tensor.ndim != 2:
        raise ValueError(f"{where}: a mask must be H x W (or 1 x H x W), got shape {tuple(tensor.shape)}.")
    if tensor.dtype == torch.bool:
        tensor = tensor.float()
    elif tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0
    elif tensor.is_floating_point():
        tensor = tensor.float()
        if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
            raise ValueError(f"{where}: a float mask must lie in [0, 1].")
    else:
        tensor = (tensor != 0).float()
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{where}: the mask has shape {tuple(tensor.shape)}.")
    return tensor


def rasterize_prompt(prompt: dict, image_size: tuple[int, int], point_radius: float | None = None) -> torch.Tensor:
    """A parsed box / points spec as a rough mask `[H, W]` (no segmenter): rectangle, discs around points."""
    height, width = image_size
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    mask = torch.zeros(height, width)
    if prompt["box"] is not None:
        x0, y0, x1, y1 = (float(v) for v in prompt["box"])
        mask = torch.maximum(mask, ((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)).float())
    if prompt["points"] is not None:
        radius = min(height, width) / 8 if point_radius is None else float(point_radius)
        for (x, y), label in zip(prompt["points"].tolist(), prompt["labels"].tolist()):
            disc = ((xs - x) ** 2 + (ys - y) ** 2) <= radius**2
            mask = torch.where(disc, torch.tensor(float(label)), mask)
    return mask


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize `[P, H, W]` masks to `size` (area average when shrinking, bilinear when growing), values in [0, 1]."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    shrinking = masks.shape[-2] >= size[0] and masks.shape[-1] >= size[1]
    mode = "area" if shrinking else "bilinear"
    kwargs = {} if shrinking else {"align_corners": False}
    return F.interpolate(masks[:, None], size=tuple(size), mode=mode, **kwargs)[:, 0].clamp(0, 1)


def _spec_names(specs: Sequence[Any], phrases: Sequence[str], argument: str) -> list[str]:
    if len(specs) != len(phrases):
        raise ValueError(f"`{argument}` has {len(specs)} masks for {len(phrases)} phrases.")
    if argument == "instance_masks":
        return [f"`{argument}`[{phrase!r}]" for phrase in phrases]
    return [f"`{argument}`[{i}] ({phrase!r})" for i, phrase in enumerate(phrases)]


def check_mask_specs(specs: Sequence[Any], phrases: Sequence[str], argument: str = "masks") -> None:
    """Validate mask specs without resizing or segmenting (for a pipeline's `check_inputs`); `None` specs are skipped."""
    for name, spec in zip(_spec_names(specs, phrases, argument), specs):
        if spec is None:
            continue
        if is_prompt_spec(spec):
            parse_prompt_spec(spec, name)
        elif mask_to_tensor(spec, name).max() <= 0:
            raise ValueError(f"{name}: the mask is empty (all zeros).")


def prepare_instance_masks(
    specs: Sequence[Any],
    phrases: Sequence[str],
    size: tuple[int, int],
    image_size: tuple[int, int] | None = None,
    argument: str = "masks",
    image: Any = None,
    segmenter: Any = None,
    point_radius: float | None = None,
) -> torch.Tensor:
    """Mask specs (see the module docstring) -> float tensor `[P, *size]` in [0, 1].

    Args:
        specs: one spec per phrase; `None` gives an all-zero mask, a placeholder for a mask chosen later.
        phrases: the phrases (for error messages).
        size: the working resolution `(H, W)` the masks are returned at.
        image_size: the input image's `(H, W)`, the frame of boxes and points (default: `size`).
        argument: the pipeline argument named in errors (`"instance_masks"`, `"masks"`).
        image, segmenter: when given, boxes/points go to `segmenter.segment(image, prompts)` (one mask per prompt,
            at the image's size) instead of being rasterized.
    """
    names = _spec_names(specs, phrases, argument)
    image_size = tuple(size) if image_size is None else tuple(image_size)
    prompts = {i: parse_prompt_spec(spec, names[i]) for i, spec in enumerate(specs) if is_prompt_spec(spec)}
    segmented = {}
    if prompts and segmenter is not None:
        if image is None:
            raise ValueError("Segmenting boxes / points needs the input image.")
        results = segmenter.segment(image, list(prompts.values()))
        segmented = dict(zip(prompts.keys(), results))
    out = []
    for i, spec in enumerate(specs):
        if spec is None:
            out.append(torch.zeros(tuple(size)))  # to be filled later (automatic masks)
            continue
        if i in segmented:
            mask = mask_to_tensor(segmented[i], names[i])
        elif i in prompts:
            mask = rasterize_prompt(prompts[i], image_size, point_radius)
        else:
            mask = mask_to_tensor(spec, names[i])
        if mask.max() <= 0:
            raise ValueError(f"{names[i]}: the mask is empty (all zeros).")
        mask = resize_masks(mask[None], size)[0]
        if mask.max() <= 0:
            raise ValueError(f"{names[i]}: the mask vanishes when resized to {tuple(size)}.")
        out.append(mask)
    return torch.stack(out)


def assign_regions_to_phrases(attention_maps: torch.Tensor, regions: torch.Tensor) -> list[int]:
    """For each phrase, the index of the region where its attention concentrates; no region is used twice.

    Args:
        attention_maps: `[P, h, w]`, each phrase's cross-attention (e.g. from an early denoising step).
        regions: `[R, H, W]` region proposals (bool or [0, 1]), R >= P.

    The score of phrase p and region r is the soft IoU between the phrase's attention, rescaled to [0, 1], and the
    region: `sum(a * m) / sum(a + m - a * m)`. It prefers a region that holds the attention's peak and not much more,
    so neither the whole image (low for a concentrated map) nor a speck at the peak (misses most of the attention)
    wins. Pairs are taken greedily by score, best first.
    """
    if attention_maps.ndim != 3 or regions.ndim != 3:
        raise ValueError("`attention_maps` must be [P, h, w] and `regions` [R, H, W].")
    num_phrases, num_regions = attention_maps.shape[0], regions.shape[0]
    if num_regions < num_phrases:
        raise ValueError(
            f"Only {num_regions} region proposals for {num_phrases} phrases; give masks, boxes or points for some "
            "phrases, or relax the region proposal thresholds."
        )
    regions = regions.float()
    maps = F.interpolate(attention_maps[:, None].float(), size=regions.shape[-2:], mode="bilinear", align_corners=False)
    maps = maps[:, 0].flatten(1)
    low, high = maps.min(1, keepdim=True).values, maps.max(1, keepdim=True).values
    maps = (maps - low) / (high - low).clamp_min(1e-12)
    flat = regions.flatten(1)
    inter = maps @ flat.T  # [P, R]
    union = maps.sum(1, keepdim=True) + flat.sum(1)[None] - inter
    score = inter / union.clamp_min(1e-12)
    chosen = [-1] * num_phrases
    order = torch.argsort(score.flatten(), descending=True).tolist()
    used_regions: set[int] = set()
    for flat_index in order:
        p, r = divmod(flat_index, num_regions)
        if chosen[p] < 0 and r not in used_regions:
            chosen[p] = r
            used_regions.add(r)
            if len(used_regions) == num_phrases:
                break
    return chosen
