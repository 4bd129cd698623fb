"""Quick start: colourise one photo from descriptions of any level of detail.

    python examples/quickstart.py --model path/to/lcad-coco --image old_photo.jpg \
        --prompt "a red car parked beside a green tree" --output colour.png

Without `--image` it colourises scikit-image's grey "camera" photo. It also saves `<output>_auto.png`, the same
photo with no description (L-CAD colourises automatically then), and `<output>_compare.png`: input, automatic and
described results side by side. The outputs have the input's size, whatever the processing resolution.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from lcad_pipeline import LCADPipeline


def side_by_side(images: list[Image.Image]) -> Image.Image:
    width, height = sum(i.width for i in images), max(i.height for i in images)
    canvas = Image.new("RGB", (width, height), "white")
    x = 0
    for image in images:
        canvas.paste(image.convert("RGB"), (x, 0))
        x += image.width
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an L-CAD pipeline folder (from `lcad convert` or training) or Hub id")
    parser.add_argument("--image", type=Path, help="the photo to colourise (default: scikit-image's 'camera')")
    parser.add_argument("--prompt", default="a man in a black coat under a blue sky, green grass")
    parser.add_argument("--output", type=Path, default=Path("colour.png"))
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 50)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = LCADPipeline.from_pretrained(args.model, dtype=dtype).to(device)

    if args.image is not None:
        gray = Image.open(args.image)
    else:
        from skimage import data

        gray = Image.fromarray(data.camera())

    # The same seed for both, so only the description differs.
    described = pipe(gray, args.prompt, num_inference_steps=args.steps, generator=torch.manual_seed(args.seed)).images[0]
    automatic = pipe(gray, num_inference_steps=args.steps, generator=torch.manual_seed(args.seed)).images[0]
    assert described.size == gray.size

    args.output.parent.mkdir(parents=True, exist_ok=True)
    stem = args.output.with_suffix("")
    described.save(args.output)
    automatic.save(f"{stem}_auto.png")
    side_by_side([gray, automatic, described]).save(f"{stem}_compare.png")
    print(f"saved {args.output}, {stem}_auto.png and {stem}_compare.png ({gray.width}x{gray.height})")


if __name__ == "__main__":
    main()
