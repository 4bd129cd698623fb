"""L-CAD web demo: upload a photo, describe it, see it colourised. Ready to be a Hugging Face Space's `app.py`.

Run it locally (the same app as `lcad demo --model ...`):

    LCAD_MODEL=path/to/lcad-coco python examples/gradio_app.py

As a Space (SDK: gradio): copy this file to the Space as `app.py`, add a `requirements.txt` with this package
(e.g. `lcad-pipeline @ git+https://github.com/<you>/<this repo>`) and `gradio`, and set the Space variables:

- `LCAD_MODEL`: the pipeline, a Hub id such as `you/lcad-coco` (uploaded with `lcad push`) or a folder in the Space;
- `LCAD_SAM_CHECKPOINT` (optional): a SAM checkpoint file (e.g. `sam_vit_b_01ec64.pth`) for masks from boxes and
  clicks;
- `LCAD_STEPS` (optional): the initial number of denoising steps (default: the model's, 50); fewer is faster on a
  CPU Space.

Everything the page does is in `lcad_pipeline.cli_demo.build_demo`; this file only reads the settings.
"""

from __future__ import annotations

import os
import sys

from lcad_pipeline.cli_colorize import UsageError
from lcad_pipeline.cli_demo import build_demo


def _settings() -> dict:
    model = os.environ.get("LCAD_MODEL", "").strip()
    if not model:
        sys.exit("Set LCAD_MODEL to an L-CAD pipeline folder or Hub id, e.g. `LCAD_MODEL=path/to/lcad-coco python gradio_app.py`.")
    steps = os.environ.get("LCAD_STEPS", "").strip()
    if steps and not (steps.isdigit() and int(steps) > 0):
        sys.exit(f"LCAD_STEPS must be a positive integer, got {steps!r}.")
    return {
        "pipe_or_model_path": model,
        "sam_checkpoint": os.environ.get("LCAD_SAM_CHECKPOINT", "").strip() or None,
        "default_steps": int(steps) if steps else None,
    }


try:
    demo = build_demo(**_settings())  # module level: what Spaces and `gradio app.py` (auto-reload) look for
except UsageError as error:
    sys.exit(f"gradio_app: {error}".replace("--model", "LCAD_MODEL").replace("--sam-checkpoint", "LCAD_SAM_CHECKPOINT"))

if __name__ == "__main__":
    demo.launch()
