"""Documentation that runs: README.md's marked code blocks and the `examples/` scripts, against a tiny model.

README convention. A fenced block preceded by the HTML comment `<!-- test-readme -->` (blank lines between them are
allowed; the comment does not render) is run by this test, as written:

    <!-- test-readme -->
    ```bash
    lcad colorize photos/ -o colourised/ --model path/to/lcad-coco --prompt "a red car"
    ```

- ```` ```python ```` blocks run in order in one shared namespace (a later block may use `pipe` from an earlier one);
  ```` ```bash ```` / ```` ```sh ```` / ```` ```shell ```` blocks run with `bash -euo pipefail`, one process per block,
  with this environment's `python` and `lcad` first on PATH and HF_HUB_OFFLINE=1.
- All blocks run in one fresh folder that holds:
  `path/to/lcad-coco/` (a tiny L-CAD pipeline: use this path for every model in a tested block),
  `old_photo.jpg` (a 64x48 grey photo), `photos/` (`wedding.jpg`, `beach.png` and `1950s/house.tif`, grey),
  `prompts.json` and `prompts.csv` (descriptions for `wedding.jpg` and `1950s/house.tif`), and `examples/` (this
  repository's examples).
- Do not mark blocks that install packages, download from the Hub or run the test suite.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny_models import make_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- test-readme -->"
FENCE = re.compile(r"^```(\w[\w+-]*)?[^\n]*$")
PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell"}


def marked_blocks(text: str) -> list[tuple[int, str, str]]:
    """`(line number, language, code)` of each block marked with MARKER; a marker not followed by a block is an error."""
    lines = text.splitlines()
    blocks = []
    for index, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        start = index + 1
        while start < len(lines) and not lines[start].strip():
            start += 1
        opening = FENCE.match(lines[start].strip()) if start < len(lines) else None
        if opening is None:
            raise AssertionError(f"README.md line {index + 1}: {MARKER} must be followed by a fenced code block.")
        language = (opening.group(1) or "").lower()
        if language not in PYTHON | SHELL:
            raise AssertionError(f"README.md line {start + 1}: tested blocks must be python or bash, got {language!r}.")
        end = start + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"README.md line {start + 1}: the code block is not closed.")
        blocks.append((start + 2, language, "\n".join(lines[start + 1 : end]) + "\n"))
    return blocks


def _grey_photo(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((4, 4)) * 255).astype(np.uint8)).resize(size, Image.BICUBIC)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-lcad"
    make_tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture
def workdir(tmp_path, model_dir, monkeypatch) -> Path:
    """The folder the documented commands run in (see the module docstring)."""
    shutil.copytree(model_dir, tmp_path / "path" / "to" / "lcad-coco")
    _grey_photo(0, (64, 48)).save(tmp_path / "old_photo.jpg")
    (tmp_path / "photos" / "1950s").mkdir(parents=True)
    _grey_photo(1, (40, 56)).save(tmp_path / "photos" / "wedding.jpg")
    _grey_photo(2, (48, 32)).save(tmp_path / "photos" / "beach.png")
    _grey_photo(3, (36, 36)).save(tmp_path / "photos" / "1950s" / "house.tif")
    descriptions = {"wedding.jpg": "a bride in a white dress, a red carpet", "1950s/house.tif": "a yellow house, a blue sky"}
    (tmp_path / "prompts.json").write_text(json.dumps(descriptions, indent=2))
    (tmp_path / "prompts.csv").write_text("file,prompt\n" + "".join(f'{k},"{v}"\n' for k, v in descriptions.items()))
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _shell_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _run_shell(code: str, cwd: Path, where: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=_shell_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{where} exited with {result.returncode}:\n{code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-4000:]}"
    return result


def test_marker_parsing():
    text = "intro\n<!-- test-readme -->\n\n```bash\nlcad --help\n```\n```python\nnot marked\n```\n<!-- test-readme -->\n```python title\nx = 1\n\ny = 2\n```\n"
    assert marked_blocks(text) == [(5, "bash", "lcad --help\n"), (12, "python", "x = 1\n\ny = 2\n")]
    with pytest.raises(AssertionError, match="must be followed by a fenced code block"):
        marked_blocks("<!-- test-readme -->\ntext\n```bash\nls\n```\n")
    with pytest.raises(AssertionError, match="must be python or bash"):
        marked_blocks("<!-- test-readme -->\n```json\n{}\n```\n")


def test_readme_marked_blocks_run_as_written(workdir):
    readme = REPO / "README.md"
    assert readme.is_file(), "README.md is missing"
    blocks = marked_blocks(readme.read_text(encoding="utf-8"))
    assert blocks, (
        f"README.md has no code block marked {MARKER}: put the comment on the line before each quick-start block "
        "that must run as written (see tests/test_readme.py)."
    )
    namespace: dict = {"__name__": "__readme__"}
    for line, language, code in blocks:
        where = f"README.md block at line {line}"
        if language in PYTHON:
            try:
                exec(compile(code, where, "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"{where} failed: {type(error).__name__}: {error}\n{code}") from error
        else:
            _run_shell(code, workdir, where)


def test_quickstart_example(workdir):
    for argv in (
        ["--model", "path/to/lcad-coco", "--image", "old_photo.jpg", "--prompt", "a red car", "--output", "out/colour.png", "--steps", "2"],
        ["--model", "path/to/lcad-coco", "--output", "camera.png", "--steps", "2"],
    ):
        sys_argv = sys.argv
        sys.argv = ["quickstart.py", *argv]
        try:
            runpy.run_path(str(REPO / "examples" / "quickstart.py"), run_name="__main__")
        finally:
            sys.argv = sys_argv
    for name, size in (("out/colour", (64, 48)), ("camera", (512, 512))):
        for suffix in ("", "_auto"):
            with Image.open(f"{name}{suffix}.png") as image:
                assert image.size == size and image.mode == "RGB"
        with Image.open(f"{name}_compare.png") as image:
            assert image.size == (3 * size[0], size[1])


def test_instance_masks_example(workdir):
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (0, 0, 64, 16))
    mask.save("sky_mask.png")
    runs = {
        "coffee.png": ["--steps", "2"],
        "old.png": [
            "--image", "old_photo.jpg", "--prompt", "a red car, a green tree and a blue sky", "--steps", "2",
            "--box", "a red car=2,20,30,46", "--point", "a green tree=50,30", "--point", "a green tree=55,35",
            "--mask", "a blue sky=sky_mask.png",
        ],
    }
    for output, argv in runs.items():
        sys_argv = sys.argv
        sys.argv = ["instance_masks.py", "--model", "path/to/lcad-coco", "--output", output, *argv]
        try:
            runpy.run_path(str(REPO / "examples" / "instance_masks.py"), run_name="__main__")
        finally:
            sys.argv = sys_argv
    for output, size in (("coffee", (600, 400)), ("old", (64, 48))):
        for suffix in ("", "_masks"):
            with Image.open(f"{output}{suffix}.png") as image:
                assert image.size == size
    tinted = np.asarray(Image.open("old_masks.png")).astype(int) - np.asarray(Image.open("old.png")).astype(int)
    assert np.abs(tinted[:14]).mean() > 5  # the sky mask is tinted ...
    assert np.abs(tinted[34:, 34:40]).mean() < 1  # ... a corner no region reaches is not


def test_batch_folder_example(workdir):
    before = {p: p.read_bytes() for p in Path("photos").rglob("*") if p.is_file()}
    result = _run_shell("STEPS=2 examples/batch_folder.sh path/to/lcad-coco photos colourised prompts.csv", workdir, "batch_folder.sh")
    assert "3 done, 0 skipped (existing), 0 ignored (not images), 0 failed" in result.stdout
    for name, size in (("wedding.png", (40, 56)), ("beach.png", (48, 32)), ("1950s/house.png", (36, 36))):
        with Image.open(Path("colourised") / name) as image:
            assert image.size == size
    run = json.loads(Path("colourised/lcad_run.json").read_text())["runs"][0]
    assert run["settings"]["scheduler"] == "dpm++" and run["settings"]["steps"] == 2
    prompts = {Path(f["input"]).name: f["prompt"] for f in run["files"]}
    assert prompts["house.tif"] == "a yellow house, a blue sky" and prompts["beach.png"] == ""
    assert {p: p.read_bytes() for p in Path("photos").rglob("*") if p.is_file()} == before

    usage = subprocess.run(["bash", "examples/batch_folder.sh", "only-one-arg"], capture_output=True, text=True, env=_shell_env())
    assert usage.returncode == 2 and "usage:" in usage.stderr
