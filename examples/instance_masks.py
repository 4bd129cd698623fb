"""Instance-aware colourisation: put each described colour on its own object with phrase masks, boxes or points.

    python examples/instance_masks.py --model path/to/lcad-coco --image street.jpg \
        --prompt "a red car, a green tree" --box "a red car=40,120,260,230" --point "a green tree=330,60" \
        [--mask "a red car=car_mask.png"] [--sam-checkpoint sam_vit_b_01ec64.pth] [--auto-masks] --output street.png

Each phrase must occur in the description (the release's convention: its comma-separated parts). A region is:

- `--box "phrase=x0,y0,x1,y1"`: a box in pixels of the photo;
- `--point "phrase=x,y"` (repeatable): a point on the object;
- `--mask "phrase=file.png"`: a mask image (white on the object), any size.

Boxes and points become SAM masks with `--sam-checkpoint` (a rectangle and discs without it). `--auto-masks` lets
SAM and the phrase's own attention choose a mask for every part of the description given no region. Without
`--image`, scikit-image's "coffee" photo (a cup on a saucer) is used with the regions below.

Besides the result it saves `<output>_masks.png`: the result with each phrase's mask tinted, as the pipeline used it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lcad_pipeline import LCADPipeline

TINTS = [(230, 25, 75), (60, 180, 75), (67, 99, 216), (245, 130, 49), (145, 30, 180), (66, 212, 244)]


def parse_region(text: str, flag: str) -> tuple[str, str]:
    phrase, sep, value = text.rpartition("=")
    if not sep or not phrase.strip() or not value.strip():
        raise SystemExit(f"{flag} {text!r}: use \"phrase=value\".")
    return phrase.strip(), value.strip()


def numbers(value: str, count: int, flag: str) -> list[float]:
    try:
        parsed = [float(v) for v in value.split(",")]
    except ValueError:
        parsed = []
    if len(parsed) != count:
        raise SystemExit(f"{flag}: expected {count} comma-separated numbers, got {value!r}.")
    return parsed


def overlay_masks(image: Image.Image, masks: torch.Tensor, phrases: list[str]) -> Image.Image:
    """Tint each phrase's mask (processing size) on the image (its own size); prints the tint of each phrase."""
    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    resized = torch.nn.functional.interpolate(masks[:, None].float(), size=rgb.shape[:2], mode="bilinear")[:, 0]
    for k, (mask, phrase) in enumerate(zip(resized.numpy(), phrases)):
        tint = np.array(TINTS[k % len(TINTS)], dtype=np.float32)
        alpha = 0.45 * mask.clip(0, 1)[..., None]
        rgb = rgb * (1 - alpha) + tint * alpha
        print(f"  {phrase!r}: tint {TINTS[k % len(TINTS)]}")
    return Image.fromarray(rgb.round().astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an L-CAD pipeline folder or Hub id")
    parser.add_argument("--image", type=Path, help="the photo (default: scikit-image's 'coffee', in grey)")
    parser.add_argument("--prompt", default=None, help="the description; its phrases get the regions")
    parser.add_argument("--box", action="append", default=[], metavar="PHRASE=X0,Y0,X1,Y1")
    parser.add_argument("--point", action="append", default=[], metavar="PHRASE=X,Y")
    parser.add_argument("--mask", action="append", default=[], metavar="PHRASE=FILE")
    parser.add_argument("--sam-checkpoint", type=Path, help="SAM checkpoint (sam_vit_b/l/h_*.pth)")
    parser.add_argument("--auto-masks", action="store_true", help="automatic masks for the phrases without a region (needs SAM)")
    parser.add_argument("--output", type=Path, default=Path("instances.png"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.image is not None:
        gray = Image.open(args.image)
        prompt = args.prompt or ""
        regions: dict = {}
    else:  # the coffee photo (600x400): a cup in the middle, a saucer under it, a spoon on the right
        from skimage import data

        gray = Image.fromarray(data.coffee()).convert("L")
        prompt = args.prompt or "a white cup of brown coffee, a blue saucer"
        regions = {} if args.prompt else {"a white cup of brown coffee": (165, 15, 420, 300), "a blue saucer": [(300, 335)]}

    for text in args.box:
        phrase, value = parse_region(text, "--box")
        regions[phrase] = tuple(numbers(value, 4, "--box"))
    points: dict[str, list] = {}
    for text in args.point:
        phrase, value = parse_region(text, "--point")
        points.setdefault(phrase, []).append(tuple(numbers(value, 2, "--point")))
    for phrase, pts in points.items():
        regions[phrase] = {"box": regions[phrase], "points": pts} if isinstance(regions.get(phrase), tuple) else pts
    for text in args.mask:
        phrase, value = parse_region(text, "--mask")
        regions[phrase] = Image.open(value)

    segmenter = None
    if args.sam_checkpoint is not None:
        from lcad_pipeline.sam_masks import SamSegmenter

        model_type = next((t for t in ("vit_b", "vit_l", "vit_h") if t in args.sam_checkpoint.name), "vit_h")
        segmenter = SamSegmenter.from_checkpoint(args.sam_checkpoint, model_type=model_type)
    if args.auto_masks:
        if segmenter is None:
            raise SystemExit("--auto-masks needs --sam-checkpoint.")
        from lcad_pipeline.instance_masks import split_prompt_phrases

        for part in split_prompt_phrases(prompt):
            if not any(phrase in part for phrase in regions):
                regions[part] = None  # chosen automatically
    if not regions:
        raise SystemExit("Give at least one --box, --point or --mask (or --auto-masks with --sam-checkpoint).")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = LCADPipeline.from_pretrained(args.model).to(device)
    output = pipe(
        gray,
        prompt,
        instance_masks=regions,
        segmenter=segmenter,
        num_inference_steps=args.steps,
        generator=torch.manual_seed(args.seed),
    )
    image = output.images[0]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.output)
    masks_path = args.output.with_name(args.output.stem + "_masks.png")
    print(f"saved {args.output} ({image.width}x{image.height}) and {masks_path}; masks:")
    overlay_masks(image, output.masks[0], output.phrases).save(masks_path)


if __name__ == "__main__":
    main()
