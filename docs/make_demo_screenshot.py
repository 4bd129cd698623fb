"""Screenshot of the web demo for README.md.

It runs the demo around the tiny random test model (no trained L-CAD weights can be downloaded here), so the picture
shows the page, the result at the input's size and the kept structure, not meaningful colours.

    HF_HUB_OFFLINE=1 python docs/make_demo_screenshot.py      (needs Debian's chromium and playwright)
"""

import socket
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lcad_pipeline.cli_demo import build_demo  # noqa: E402
from tiny_models import make_tiny_pipeline  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
OUTPUT = Path(__file__).resolve().parent / "demo_tiny_model.png"


def main() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo = build_demo(make_tiny_pipeline(), default_steps=10)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    photo = Path(tempfile.mkdtemp()) / "coffee_gray.png"
    Image.fromarray(data.coffee()).convert("L").resize((300, 200)).save(photo)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.set_input_files("#lcad-input input[type=file]", str(photo))
            page.wait_for_selector("#lcad-input img")
            page.fill("#lcad-prompt textarea", "a red cup on a white saucer")
            page.click("#lcad-run")
            page.wait_for_selector("#lcad-output img")
            page.wait_for_function("document.querySelector('#lcad-status').innerText.includes('seed')")
            time.sleep(1)
            page.screenshot(path=str(OUTPUT))
            browser.close()
    finally:
        demo.close()
    shot = Image.open(OUTPUT).convert("RGB")
    shot = shot.resize((960, round(shot.height * 960 / shot.width)), Image.LANCZOS)
    shot.quantize(256).save(OUTPUT, optimize=True)


if __name__ == "__main__":
    main()
