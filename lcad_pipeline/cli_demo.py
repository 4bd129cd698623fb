# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""`lcad demo` and `build_demo`: a browser demo of L-CAD, built with gradio.

    lcad demo --model path/to/lcad [--sam-checkpoint sam_vit_b_01ec64.pth] [--port 7860] [--share]

Upload a photo, describe it (or not), optionally give phrases of the description a region, and see the colourised
photo beside the input, then the masks that steered each phrase overlaid on the result. Regions are entered as a
table of boxes (phrase, x0, y0, x1, y1, in pixels of the photo) and/or by clicking points on the photo's preview
(each click adds a point for the chosen phrase). With a SAM checkpoint, boxes and points become SAM masks; without
one, a box is a filled rectangle and a point a disc, which is enough to steer colours.

`build_demo(pipe_or_model_path, sam_checkpoint=None)` returns the `gradio.Blocks` app (not launched), so that
`examples/gradio_app.py` (a Hub Space's `app.py`) and the browser test build the same app around any pipeline.

gradio is imported only when the demo is built: it is an optional dependency (`pip install gradio`).
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_colorize import UsageError, add_model_arguments, load_pipeline, load_segmenter, resolve_device, resolve_dtype

if TYPE_CHECKING:
    import gradio

BOX_HEADERS = ["phrase", "x0", "y0", "x1", "y1"]
POINT_HEADERS = ["phrase", "x", "y"]
# Distinct, readable on photos; the overlay and the preview use the same colour for a phrase.
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990"]
DESCRIPTION = """
# L-CAD: colourise a photo from a description

Upload a grey (or colour) photo and describe its colours, as much or as little as you like: *"a red car parked
beside a green tree"*, *"a yellow taxi"*, or nothing at all. To put a colour on a particular object, give the phrase
a box or click on the object in the preview (under **Regions**).
"""


class RegionError(ValueError):
    """A region table entry that cannot be used; the message names the table and row."""


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def _number(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RegionError(f"{where}: {value!r} is not a number.") from None
    if not math.isfinite(number):
        raise RegionError(f"{where}: {value!r} is not a finite number.")
    return number


def _rows(table: Any) -> list[list[Any]]:
    """A gradio Dataframe value (list of rows, pandas DataFrame, dict with "data", or None) as a list of rows."""
    if table is None:
        return []
    if hasattr(table, "values") and hasattr(table, "columns"):
        return [list(row) for row in table.values.tolist()]
    if isinstance(table, dict):
        table = table.get("data") or []
    return [list(row) for row in table]


def _phrase_in_prompt(phrase: str, prompt: str) -> bool:
    from .cli_colorize import _phrase_in_prompt as occurs

    return occurs(phrase, prompt)


def parse_regions(boxes: Any, points: Any, prompt: str, image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The demo's box and point tables -> `{phrase: spec}` for the pipeline's `instance_masks`.

    A spec is a box `[x0, y0, x1, y1]`, `{"points": [[x, y], ...]}`, or both in one dict. Blank rows are ignored;
    anything else that cannot be used raises `RegionError` naming the table and row (1-based).
    """
    boxes_by_phrase: dict[str, list[float]] = {}
    points_by_phrase: dict[str, list[list[float]]] = {}
    for number, row in enumerate(_rows(boxes), 1):
        row = (row + [None] * 5)[:5]
        if all(_is_blank(v) for v in row):
            continue
        where = f"Boxes, row {number}"
        phrase = "" if _is_blank(row[0]) else str(row[0]).strip()
        if not phrase:
            raise RegionError(f"{where}: the phrase is empty.")
        if any(_is_blank(v) for v in row[1:]):
            raise RegionError(f"{where}: give all four of x0, y0, x1, y1.")
        x0, y0, x1, y1 = (_number(v, f"{where} ({name})") for v, name in zip(row[1:], BOX_HEADERS[1:]))
        if not (x1 > x0 and y1 > y0):
            raise RegionError(f"{where}: needs x1 > x0 and y1 > y0 (top-left, then bottom-right corner).")
        if phrase in boxes_by_phrase:
            raise RegionError(f"{where}: phrase {phrase!r} already has a box.")
        boxes_by_phrase[phrase] = [x0, y0, x1, y1]
    for number, row in enumerate(_rows(points), 1):
        row = (row + [None] * 3)[:3]
        if all(_is_blank(v) for v in row):
            continue
        where = f"Points, row {number}"
        phrase = "" if _is_blank(row[0]) else str(row[0]).strip()
        if not phrase:
            raise RegionError(f"{where}: the phrase is empty.")
        if any(_is_blank(v) for v in row[1:]):
            raise RegionError(f"{where}: give both x and y.")
        points_by_phrase.setdefault(phrase, []).append([_number(row[1], f"{where} (x)"), _number(row[2], f"{where} (y)")])

    regions: dict[str, Any] = {}
    for phrase in dict.fromkeys([*boxes_by_phrase, *points_by_phrase]):
        if not _phrase_in_prompt(phrase, prompt or ""):
            raise RegionError(f"The phrase {phrase!r} does not occur in the description {prompt!r}.")
        box, pts = boxes_by_phrase.get(phrase), points_by_phrase.get(phrase)
        if image_size is not None:
            width, height = image_size
            for x, y in ([box[:2], box[2:]] if box else []) + (pts or []):
                if not (0 <= x <= width and 0 <= y <= height):
                    raise RegionError(f"The region of {phrase!r} reaches ({x:g}, {y:g}), outside the {width}x{height} photo.")
        if box is not None and pts:
            regions[phrase] = {"box": box, "points": pts}
        elif box is not None:
            regions[phrase] = box
        else:
            regions[phrase] = {"points": pts}
    return regions


def masks_at_size(output: Any, size: tuple[int, int]) -> list[tuple[Any, str]]:
    """The masks the pipeline used (`output.masks`, at the processing size) as `(mask [H, W], phrase)` at `size`."""
    masks, phrases = getattr(output, "masks", None), getattr(output, "phrases", None)
    if masks is None or not phrases:
        return []
    import torch.nn.functional as F

    resized = F.interpolate(masks[0][:, None].float().cpu(), size=(size[1], size[0]), mode="bilinear", align_corners=False)
    return [(mask[0].clamp(0, 1).numpy(), phrase) for mask, phrase in zip(resized, phrases)]


def draw_regions(image, boxes: Any, points: Any):
    """The photo with the table's boxes and points drawn on it (what the user clicks on to add points)."""
    from PIL import ImageDraw

    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 200))
    radius = max(3, round(max(canvas.size) / 80))
    colours: dict[str, str] = {}

    def colour(phrase: str) -> str:
        return colours.setdefault(phrase, PALETTE[len(colours) % len(PALETTE)])

    for row in _rows(boxes):
        row = (row + [None] * 5)[:5]
        try:
            x0, y0, x1, y1 = (float(v) for v in row[1:])
        except (TypeError, ValueError):
            continue  # incomplete rows are drawn once complete
        if _is_blank(row[0]) or not (x1 > x0 and y1 > y0):
            continue
        draw.rectangle([x0, y0, x1, y1], outline=colour(str(row[0]).strip()), width=width)
        draw.text((x0 + width + 1, y0 + width + 1), str(row[0]).strip(), fill=colour(str(row[0]).strip()))
    for row in _rows(points):
        row = (row + [None] * 3)[:3]
        try:
            x, y = float(row[1]), float(row[2])
        except (TypeError, ValueError):
            continue
        if _is_blank(row[0]):
            continue
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour(str(row[0]).strip()), outline="white")
    return canvas


def build_demo(
    pipe_or_model_path: Any,
    sam_checkpoint: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    scheduler: str = "ddim",
    sam_model_type: str = "auto",
    default_steps: int | None = None,
    title: str = "L-CAD colourisation",
) -> "gradio.Blocks":
    """Build (not launch) the demo's `gradio.Blocks` around an `LCADPipeline` or a model folder / Hub id.

    Args:
        pipe_or_model_path: a loaded pipeline (used as is) or what `lcad colorize --model` accepts.
        sam_checkpoint: a SAM checkpoint; boxes and points then become SAM masks.
        device, dtype, scheduler, sam_model_type: as the `lcad colorize` options, when loading from a path.
        default_steps: the steps slider's initial value (default: the pipeline's `default_denoising_steps`).
    """
    try:
        import gradio as gr
    except ImportError as error:
        raise ImportError("The demo needs gradio: `pip install gradio`.") from error
    import torch

    if isinstance(pipe_or_model_path, (str, os.PathLike)):
        resolved_device = resolve_device(device)
        pipe = load_pipeline(pipe_or_model_path, resolved_device, resolve_dtype(dtype, resolved_device), scheduler)
    else:
        pipe = pipe_or_model_path
        resolved_device = str(pipe.device)
    call_parameters = set(inspect.signature(pipe.__call__).parameters)
    regions_supported = "instance_masks" in call_parameters
    if sam_checkpoint and "segmenter" not in call_parameters:
        raise UsageError("--sam-checkpoint is not available in this version of lcad_pipeline (the pipeline takes no segmenter).")
    segmenter = load_segmenter(Path(sam_checkpoint), sam_model_type, resolved_device) if sam_checkpoint else None
    steps_default = int(default_steps or pipe.config.default_denoising_steps)

    def refresh_preview(photo, boxes, points):
        return None if photo is None else draw_regions(photo, boxes, points)

    def phrase_choices(prompt: str):
        from .instance_masks import split_prompt_phrases

        phrases = split_prompt_phrases(prompt) if prompt and prompt.strip() else []
        return gr.update(choices=phrases, value=phrases[0] if phrases else None)

    def add_point(points, phrase, photo, boxes, evt: gr.SelectData):
        if photo is None:
            raise gr.Error("Upload a photo first.")
        if not phrase or not str(phrase).strip():
            raise gr.Error("Choose (or type) the phrase this point belongs to, then click on the photo.")
        x, y = evt.index[0], evt.index[1]
        rows = [r for r in _rows(points) if not all(_is_blank(v) for v in r)]
        rows.append([str(phrase).strip(), int(x), int(y)])
        return rows, draw_regions(photo, boxes, rows)

    add_point.__annotations__["evt"] = gr.SelectData  # gradio finds the event argument by this annotation

    def clear_points(photo, boxes):
        return [], refresh_preview(photo, boxes, [])

    def colourise(photo, prompt, boxes, points, steps, guidance, seed, auto_masks=False):
        if photo is None:
            raise gr.Error("Upload a photo first.")
        prompt = prompt or ""
        try:
            regions = parse_regions(boxes, points, prompt, image_size=photo.size)
        except RegionError as error:
            raise gr.Error(str(error)) from None
        specs: dict[str, Any] = dict(regions)
        if auto_masks and segmenter is not None:
            from .cli_colorize import _phrase_in_prompt as occurs
            from .instance_masks import split_prompt_phrases

            parts = split_prompt_phrases(prompt) if prompt.strip() else []
            specs.update({part: None for part in parts if not any(occurs(given, part) for given in regions)})
        kwargs: dict[str, Any] = {}
        if specs:
            if not regions_supported:
                raise gr.Error("Phrase regions (boxes and points) are not available in this version of lcad_pipeline; clear them to colourise.")
            kwargs["instance_masks"] = specs
            if segmenter is not None:
                kwargs["segmenter"] = segmenter
        try:
            seed_value = int(seed or 0)
            generator = torch.Generator(device="cpu").manual_seed(seed_value)
            output = pipe(
                photo,
                prompt=prompt.strip() or None,
                num_inference_steps=int(steps),
                guidance_scale=float(guidance),
                generator=generator,
                **kwargs,
            )
        except ValueError as error:
            raise gr.Error(str(error)) from None
        result = output.images[0]
        note = f"{result.size[0]}x{result.size[1]}, seed {seed_value}, {int(steps)} steps, guidance {float(guidance):g}"
        if specs:
            automatic = [p for p, spec in specs.items() if spec is None]
            note += f"; phrases with masks: {', '.join(specs)}" + (" (SAM)" if segmenter is not None else "")
            if automatic:
                note += f"; found automatically: {', '.join(automatic)}"
        overlays = masks_at_size(output, result.size)
        colour_map = {phrase: PALETTE[k % len(PALETTE)] for k, (_, phrase) in enumerate(overlays)}  # as in the preview
        return result, gr.update(value=(result, overlays), color_map=colour_map), note

    # No usage analytics leave the machine: people upload family photos.
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(DESCRIPTION)
        with gr.Row():
            with gr.Column():
                photo = gr.Image(
                    label="Photo", type="pil", image_mode=None, format="png", sources=["upload", "clipboard"], height=360,
                    elem_id="lcad-input",
                )
                prompt = gr.Textbox(
                    label="Description", placeholder="a red car parked beside a green tree (or leave empty)", lines=2,
                    elem_id="lcad-prompt",
                )
                with gr.Accordion("Regions: tie phrases of the description to parts of the photo (optional)", open=False, elem_id="lcad-regions"):
                    if regions_supported:
                        gr.Markdown(
                            "Boxes are in pixels of the photo (x to the right, y down). Or choose a phrase and click on "
                            "the preview to add points on its object. "
                            + ("SAM turns boxes and points into masks." if segmenter is not None else
                               "Without SAM, a box is used as a rectangle and a point as a disc around it.")
                        )
                    else:
                        gr.Markdown("*Phrase regions are not available in this version of lcad_pipeline.*")
                    boxes = gr.Dataframe(
                        headers=BOX_HEADERS, datatype=["str", "number", "number", "number", "number"], type="array",
                        label="Boxes", interactive=True, elem_id="lcad-boxes",
                    )
                    with gr.Row():
                        point_phrase = gr.Dropdown(
                            choices=[], value=None, allow_custom_value=True, label="Phrase for clicked points",
                            elem_id="lcad-point-phrase",
                        )
                        clear = gr.Button("Clear points", size="sm", elem_id="lcad-clear-points")
                    preview = gr.Image(
                        label="Click on an object to add a point", type="pil", interactive=False, format="png", height=300,
                        elem_id="lcad-preview",
                    )
                    points = gr.Dataframe(
                        headers=POINT_HEADERS, datatype=["str", "number", "number"], type="array", label="Points",
                        interactive=True, elem_id="lcad-points",
                    )
                    auto_masks = gr.Checkbox(
                        value=False, label="Find masks automatically for the other phrases of the description (SAM)",
                        visible=segmenter is not None and regions_supported, elem_id="lcad-auto-masks",
                    )
                with gr.Row():
                    steps = gr.Slider(1, 100, value=steps_default, step=1, label="Steps", elem_id="lcad-steps")
                    guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance", elem_id="lcad-guidance")
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="lcad-seed")
                run = gr.Button("Colourise", variant="primary", elem_id="lcad-run")
            with gr.Column():
                result = gr.Image(
                    label="Colourised", type="pil", format="png", interactive=False, height=360, elem_id="lcad-output"
                )
                status = gr.Markdown(elem_id="lcad-status")
                overlay = gr.AnnotatedImage(label="Result with the phrase masks", format="png", height=360, elem_id="lcad-masks")

        photo.change(refresh_preview, [photo, boxes, points], preview)
        boxes.change(refresh_preview, [photo, boxes, points], preview)
        points.change(refresh_preview, [photo, boxes, points], preview)
        prompt.change(phrase_choices, prompt, point_phrase)
        preview.select(add_point, [points, point_phrase, photo, boxes], [points, preview])
        clear.click(clear_points, [photo, boxes], [points, preview])
        inputs = [photo, prompt, boxes, points, steps, guidance, seed, auto_masks]
        # One pipeline, one run at a time, whichever way it is started.
        run.click(colourise, inputs, [result, overlay, status], concurrency_limit=1, concurrency_id="pipeline")
        prompt.submit(colourise, inputs, [result, overlay, status], concurrency_limit=1, concurrency_id="pipeline")
    return demo


# ---------------------------------------------------------------------------------------------------- lcad demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=None, help="initial steps (default: the model's).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface).")
    parser.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one).")
    parser.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link.")


def run(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 1:
        print("lcad demo: error: --steps must be a positive integer.", file=sys.stderr)
        return 2
    try:
        demo = build_demo(
            args.model, args.sam_checkpoint, device=args.device, dtype=args.dtype, scheduler=args.scheduler,
            sam_model_type=args.sam_model_type, default_steps=args.steps,
        )
    except UsageError as error:
        print(f"lcad demo: error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        print(f"lcad demo: error: {error}", file=sys.stderr)
        return 2
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0
