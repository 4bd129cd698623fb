#!/usr/bin/env python
"""Fine-tune L-CAD on a folder of your own photos.

A few hundred photos are far too few to train L-CAD from Stable Diffusion (the paper used COCO-Stuff, 118k images,
for 10 + 50 epochs), but they are enough to adapt a trained L-CAD model to a look (a family archive, a film stock, a
region's architecture) with light LoRA fine-tuning. This script

1. collects the photos of a folder (recursively) and their descriptions: a `<photo>.txt` beside each photo, or a
   CSV file `file,description` (`--captions`); photos without one get "a colorful image", the paper's description for
   automatic colourisation;
2. writes them as the release's caption file (`captions.json`, `{file: [description]}`) into the output folder (your
   photo folder is not touched);
3. runs `accelerate launch training/train_latent.py` with LoRA on an L-CAD pipeline folder (`--base`, e.g. the output
   of `lcad convert` on a released checkpoint).

Describe colours in the captions ("a girl in a yellow dress on a red bench"): during training they are turned into
partial and scarce descriptions automatically, so the model keeps working with any level of detail.

    python examples/train_on_own_photos.py my_photos out/my-lcad --base out/lcad-coco --steps 2000
    python examples/train_on_own_photos.py my_photos out/my-lcad --base out/lcad-coco --dry-run   # only print
    python examples/train_on_own_photos.py my_photos out/my-lcad --base out/lcad-coco --mixed_precision fp16 --use_ema

Flags the script does not know are passed on to `train_latent.py`.

The photos can be in colour (they are the training targets; the grey input is made from them). Any size: the
training crops are `--resolution` (256) squares. Use the result like any L-CAD pipeline:
`LCADPipeline.from_pretrained("out/my-lcad")`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path


GENERIC_DESCRIPTION = "a colorful image"
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}
REPO = Path(__file__).resolve().parents[1]


def collect(photos: Path, captions_csv: Path | None) -> dict[str, list[str]]:
    """`{path relative to photos: [description]}` for every photo in the folder."""
    from_csv: dict[str, str] = {}
    if captions_csv is not None:
        with open(captions_csv, newline="", encoding="utf-8") as handle:
            for row in csv.reader(handle):
                if len(row) >= 2 and row[0] and row[0] != "file":
                    from_csv[row[0].strip()] = row[1].strip()
    captions = {}
    for path in sorted(photos.rglob("*")):
        if path.suffix.lower() not in PHOTO_SUFFIXES or not path.is_file():
            continue
        relative = path.relative_to(photos).as_posix()
        sidecar = path.with_suffix(".txt")
        if relative in from_csv:
            text = from_csv[relative]
        elif path.name in from_csv:
            text = from_csv[path.name]
        elif sidecar.is_file():
            text = sidecar.read_text(encoding="utf-8").strip()
        else:
            text = GENERIC_DESCRIPTION
        captions[relative] = [text or GENERIC_DESCRIPTION]
    return captions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", type=Path, help="folder of your photos (searched recursively)")
    parser.add_argument("output", type=Path, help="output folder: the caption file, checkpoints, the final pipeline")
    parser.add_argument("--base", required=True, help="the L-CAD pipeline folder (or Hub id) to fine-tune")
    parser.add_argument("--captions", type=Path, default=None, help="CSV file with `file,description` rows")
    parser.add_argument("--steps", type=int, default=2000, help="optimisation steps")
    parser.add_argument("--batch-size", type=int, default=4, help="photos per step and GPU")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="learning rate")
    parser.add_argument("--resolution", type=int, default=256, help="training crop size")
    parser.add_argument("--dry-run", action="store_true", help="write the caption file and print the command only")
    args, extra = parser.parse_known_args(argv)  # other flags go to train_latent.py as they are

    if not args.photos.is_dir():
        parser.error(f"{args.photos} is not a folder")
    captions = collect(args.photos, args.captions)
    if not captions:
        parser.error(f"no photos ({', '.join(sorted(PHOTO_SUFFIXES))}) in {args.photos}")
    described = sum(caption != [GENERIC_DESCRIPTION] for caption in captions.values())
    args.output.mkdir(parents=True, exist_ok=True)
    caption_file = args.output / "captions.json"
    caption_file.write_text(json.dumps(captions, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"{len(captions)} photos ({described} described) -> {caption_file}")

    held_out = min(4, max(1, len(captions) // 10))
    command = [
        "accelerate", "launch", str(REPO / "training" / "train_latent.py"),
        "--pretrained_model_name_or_path", str(args.base),
        "--train_data_dir", str(args.photos), "--caption_file", str(caption_file),
        "--output_dir", str(args.output), "--resolution", str(args.resolution),
        "--trainable", "lora", "--lora_rank", str(args.rank), "--learning_rate", str(args.learning_rate),
        "--train_batch_size", str(args.batch_size), "--max_train_steps", str(args.steps),
        "--checkpointing_steps", str(max(1, args.steps // 4)), "--checkpoints_total_limit", "2",
        "--validation_steps", str(max(1, args.steps // 4)), "--num_validation_images", str(held_out),
        "--resume_from_checkpoint", "latest",
        *[flag for flag in extra if flag != "--"],
    ]
    print(" ".join(shlex.quote(part) for part in command))
    if args.dry_run:
        return 0
    return subprocess.call(command, env={**os.environ})


if __name__ == "__main__":
    sys.exit(main())
