"""A saved folder loads as Hub remote code in a fresh process where `lcad_pipeline` cannot be imported."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tiny_models import make_tiny_pipeline

import lcad_pipeline

ALLOWED_LIBRARIES = {"torch", "numpy", "PIL", "diffusers", "transformers"}
PACKAGE_DIR = Path(lcad_pipeline.__file__).parent

FRESH_PROCESS = r"""
import importlib.abc, sys

class RefuseLCAD(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "lcad_pipeline":
            raise ImportError("lcad_pipeline is not installed here")

sys.meta_path.insert(0, RefuseLCAD())
try:
    import lcad_pipeline
    raise SystemExit("lcad_pipeline should not be importable")
except ImportError:
    pass

import numpy as np, PIL.Image, torch
from diffusers import DiffusionPipeline

folder, out = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
assert type(pipe).__name__ == "LCADPipeline", type(pipe)
assert type(pipe.unet).__name__ == "LCADUNet2DConditionModel" and type(pipe.vae).__name__ == "LuminanceAutoencoderKL"
image = PIL.Image.open(sys.argv[3])
result = pipe(image, "a red cup", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
np.save(out, result)
"""


def test_saved_folder_loads_as_remote_code_in_a_fresh_process(tmp_path, coffee_gray):
    pipe = make_tiny_pipeline()
    folder = tmp_path / "lcad"
    pipe.save_pretrained(folder)
    image_path = tmp_path / "input.png"
    coffee_gray.resize((60, 40)).save(image_path)
    expected = pipe(
        coffee_gray.resize((60, 40)), "a red cup", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images

    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["lcad_pipeline", "LCADUNet2DConditionModel"]
    assert index["vae"] == ["lcad_pipeline", "LuminanceAutoencoderKL"]
    assert (folder / "pipeline.py").is_file() and (folder / "unet" / "lcad_pipeline.py").is_file()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(folder), str(tmp_path / "out.npy"), str(image_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    absolute, relative = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            absolute.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                relative.add(node.module)
            else:
                absolute.add(node.module.split(".")[0])
    return absolute, relative


def test_remote_code_files_import_only_what_the_hub_has():
    """Each file shipped as remote code imports only torch/numpy/PIL/diffusers/transformers and the standard
    library; diffusers copies only the pipeline file's direct relative imports, so it imports all of them."""
    pipeline_file = PACKAGE_DIR / "pipeline_lcad.py"
    _, shipped = _imports(pipeline_file)
    for name in sorted(shipped | {"pipeline_lcad"}):
        absolute, relative = _imports(PACKAGE_DIR / f"{name}.py")
        foreign = {lib for lib in absolute if lib not in ALLOWED_LIBRARIES and lib not in sys.stdlib_module_names}
        assert not foreign, f"{name}.py imports {foreign}"
        assert relative <= shipped, f"{name}.py imports {relative - shipped}, which pipeline_lcad.py does not import"
