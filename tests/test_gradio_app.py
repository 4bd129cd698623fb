"""The web demo: its region parsing, `lcad demo`, `examples/gradio_app.py`, and the page in a real headless Chromium.

The browser test starts the app around a tiny pipeline (2 steps) on 127.0.0.1, drives Debian's `chromium` with
Playwright (`executable_path`; Playwright's own browser download is not used), uploads a photo, types a
description, presses the button and checks the image that comes back: the input's size, in colour. Then it clicks
on the photo's preview and checks that a point for the chosen phrase lands in the points table.

Needs: `pip install gradio playwright` and `apt-get install -y chromium` (or LCAD_CHROMIUM=/path/to/chromium).
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lcad_pipeline import cli_demo
from lcad_pipeline.cli import main
from lcad_pipeline.cli_demo import RegionError, build_demo, draw_regions, parse_regions
from tiny_models import make_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(autouse=True)
def _quiet_gradio(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-lcad"
    make_tiny_pipeline().save_pretrained(path)
    return path


def _chromium() -> str:
    path = os.environ.get("LCAD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(path).is_file(), "the browser test needs Debian's chromium: `apt-get install -y chromium` (or set LCAD_CHROMIUM)"
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_regions_from_the_tables():
    prompt = "a red car, a green tree and a blue sky"
    boxes = [["a red car", 1, 2, 30, 40], ["", None, None, None, None], ["a blue sky", "0", "0", "64", "10"]]
    points = [["a green tree", 5, 6], ["a green tree", 7.5, 8], ["a red car", 3, 4]]
    regions = parse_regions(boxes, points, prompt, image_size=(64, 48))
    assert regions == {
        "a red car": {"box": [1.0, 2.0, 30.0, 40.0], "points": [[3.0, 4.0]]},
        "a blue sky": [0.0, 0.0, 64.0, 10.0],
        "a green tree": {"points": [[5.0, 6.0], [7.5, 8.0]]},
    }
    assert parse_regions(None, [], "anything") == {}
    assert parse_regions({"data": [["", "", "", "", ""]], "headers": cli_demo.BOX_HEADERS}, None, "") == {}

    bad = [
        ([["a red car", 1, 2, 30]], None, "give all four"),
        ([["a red car", 5, 2, 1, 40]], None, "x1 > x0"),
        ([["a red car", "left", 2, 30, 40]], None, "is not a number"),
        ([["", 1, 2, 30, 40]], None, "Boxes, row 1: the phrase is empty"),
        ([["a red car", 1, 2, 3, 4], ["a red car", 1, 2, 3, 4]], None, "already has a box"),
        (None, [["a purple cow", 1, 2]], "does not occur in the description"),
        (None, [["a red car", 1, None]], "Points, row 1: give both x and y"),
        (None, [["a red car", 100, 2]], "outside the 64x48 photo"),
    ]
    for boxes, points, message in bad:
        with pytest.raises(RegionError, match=message):
            parse_regions(boxes, points, prompt, image_size=(64, 48))


def test_preview_draws_boxes_and_points_in_phrase_colours():
    photo = Image.new("L", (64, 48), 128)
    drawn = np.asarray(draw_regions(photo, [["a red car", 4, 4, 40, 30], ["half a row", None, 1, 2, 3]], [["a sky", 50, 40]]))
    assert drawn.shape == (48, 64, 3)
    grey = (drawn[..., 0] == drawn[..., 1]) & (drawn[..., 1] == drawn[..., 2])
    assert not grey[4, 20] and grey[20, 20]  # the box outline is coloured, its inside untouched
    assert not grey[40, 50]  # the point


def _handler(demo, name: str = "colourise"):
    return next(fn.fn for fn in demo.fns.values() if fn.fn.__name__ == name)


def test_regions_reach_the_pipeline_and_their_masks_are_overlaid():
    demo = build_demo(make_tiny_pipeline(), default_steps=2)
    colourise = _handler(demo)
    photo = Image.new("L", (40, 32), 100)
    result, overlay, note = colourise(photo, "a red car", [["a red car", 0, 0, 20, 16]], None, 2, 5.0, 0)
    base, overlays = overlay["value"]
    assert result.size == (40, 32) and base is result and [phrase for _, phrase in overlays] == ["a red car"]
    assert overlays[0][0].shape == (32, 40)
    assert overlays[0][0][2:14, 2:18].min() > 0.5 and overlays[0][0][20:, 25:].max() < 0.5
    assert overlay["color_map"] == {"a red car": cli_demo.PALETTE[0]}  # the preview's colour for the first phrase
    assert "phrases with masks: a red car" in note

    import gradio as gr

    with pytest.raises(gr.Error, match="outside the 40x32 photo"):
        colourise(photo, "a red car", None, [["a red car", 50, 5]], 2, 5.0, 0)
    with pytest.raises(gr.Error, match="Upload a photo first"):
        colourise(None, "a red car", None, None, 2, 5.0, 0)


class _PipelineWithoutRegions:
    """A pipeline as released before instance-aware sampling: no `instance_masks` argument."""

    def __init__(self):
        self._pipe = make_tiny_pipeline()
        self.config, self.device = self._pipe.config, self._pipe.device

    def __call__(self, image, prompt=None, num_inference_steps=None, guidance_scale=5.0, generator=None):
        return self._pipe(image, prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator)


def test_regions_are_refused_by_a_pipeline_without_them():
    import gradio as gr

    colourise = _handler(build_demo(_PipelineWithoutRegions(), default_steps=2))
    photo = Image.new("L", (40, 32), 100)
    with pytest.raises(gr.Error, match="not available in this version"):
        colourise(photo, "a red car", [["a red car", 0, 0, 20, 16]], None, 2, 5.0, 0)
    result, overlay, _ = colourise(photo, "a red car", None, None, 2, 5.0, 0)
    assert result.size == (40, 32) and overlay["value"][1] == []


def test_sam_checkpoint_and_automatic_masks_in_the_demo(tmp_path, monkeypatch):
    import torch

    from lcad_pipeline import sam_masks
    from test_cli_colorize import TINY_SAM

    monkeypatch.setitem(sam_masks.SAM_CONFIGS, "vit_b", TINY_SAM)
    torch.manual_seed(0)
    checkpoint = tmp_path / "sam_vit_b_tiny.pth"
    torch.save(sam_masks.build_sam("vit_b").state_dict(), checkpoint)
    real_loader = cli_demo.load_segmenter

    def permissive_loader(*args, **kwargs):  # random SAM weights pass no quality threshold
        segmenter = real_loader(*args, **kwargs)
        segmenter.pred_iou_thresh = segmenter.stability_score_thresh = 0.0
        segmenter.points_per_side, segmenter.box_nms_thresh = 6, 1.0
        return segmenter

    monkeypatch.setattr(cli_demo, "load_segmenter", permissive_loader)
    demo = build_demo(make_tiny_pipeline(), sam_checkpoint=checkpoint, default_steps=2)
    auto = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "lcad-auto-masks")
    assert auto.visible is True
    photo = _smooth_photo((40, 32))
    result, overlay, note = _handler(demo)(photo, "a red car, a blue cup", [["a red car", 2, 2, 20, 16]], None, 2, 5.0, 0, True)
    assert result.size == (40, 32)
    assert [phrase for _, phrase in overlay["value"][1]] == ["a red car", "a blue cup"]
    assert "(SAM)" in note and "found automatically: a blue cup" in note


def _smooth_photo(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((4, 4)) * 255).astype(np.uint8)).resize(size, Image.BICUBIC)


def test_lcad_demo_command(model_dir, monkeypatch, capsys):
    import gradio as gr

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    assert main(["demo", "--model", str(model_dir), "--port", "7999", "--share", "--steps", "3", "--device", "cpu"]) == 0
    assert launched == {"server_name": "127.0.0.1", "server_port": 7999, "share": True}

    assert main(["demo", "--model", str(model_dir / "missing")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["demo", "--model", str(model_dir), "--sam-checkpoint", str(model_dir / "sam.pth")]) == 2
    assert "--sam-checkpoint" in capsys.readouterr().err


def test_space_app_builds_from_environment(model_dir, monkeypatch):
    import gradio as gr

    monkeypatch.setenv("LCAD_MODEL", str(model_dir))
    monkeypatch.setenv("LCAD_STEPS", "2")
    spec = importlib.util.spec_from_file_location("gradio_app_under_test", REPO / "examples" / "gradio_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert isinstance(module.demo, gr.Blocks)
    steps = next(b for b in module.demo.blocks.values() if getattr(b, "elem_id", None) == "lcad-steps")
    assert steps.value == 2

    monkeypatch.delenv("LCAD_MODEL")
    with pytest.raises(SystemExit, match="Set LCAD_MODEL"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_browser_upload_describe_colourise(tmp_path):
    from playwright.sync_api import sync_playwright

    start = time.monotonic()
    demo = build_demo(make_tiny_pipeline(), default_steps=2)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    url = f"http://127.0.0.1:{port}/"
    photo_path = tmp_path / "grandma.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((4, 6)) * 255).astype(np.uint8)).resize((120, 72), Image.BICUBIC).save(photo_path)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page()
                page.set_default_timeout(60_000)
                page.goto(url, wait_until="domcontentloaded")
                page.set_input_files("#lcad-input input[type=file]", str(photo_path))
                page.wait_for_selector("#lcad-input img")
                page.fill("#lcad-prompt textarea", "a red car")
                page.click("#lcad-run")
                output = page.wait_for_selector("#lcad-output img")
                page.wait_for_function("document.querySelector('#lcad-status').innerText.includes('seed 0')")
                src = output.get_attribute("src")
                response = page.request.get(src if src.startswith("http") else url.rstrip("/") + src)
                assert response.ok, response.status
                result = Image.open(io.BytesIO(response.body()))
                assert result.size == (120, 72)
                rgb = np.asarray(result.convert("RGB")).astype(int)
                assert np.abs(rgb[..., 0] - rgb[..., 1]).mean() > 1 or np.abs(rgb[..., 1] - rgb[..., 2]).mean() > 1, "grey result"
                assert "120x72" in page.inner_text("#lcad-status")

                # Clicking the preview adds a point for the chosen phrase (the first phrase of the description).
                page.click("#lcad-regions .label-wrap")
                preview = page.wait_for_selector("#lcad-preview img")
                assert page.input_value("#lcad-point-phrase input") == "a red car"
                box = preview.bounding_box()
                preview.click(position={"x": box["width"] / 2, "y": box["height"] / 2})
                page.wait_for_function("document.querySelector('#lcad-points').innerText.includes('a red car')")
                cells = page.inner_text("#lcad-points")
                assert "60" in cells and "36" in cells  # the centre of the 120x72 photo

                # Colourising again uses the point: the status names the phrase, its mask is overlaid on the result.
                page.click("#lcad-run")
                page.wait_for_function("document.querySelector('#lcad-status').innerText.includes('phrases with masks: a red car')")
                page.wait_for_selector("#lcad-masks img")
                assert "a red car" in page.inner_text("#lcad-masks")  # the overlay's legend
            finally:
                browser.close()
    finally:
        demo.close()
    assert time.monotonic() - start < 90
