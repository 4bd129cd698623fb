"""Loading the repository's scripts that are not part of the package (benchmarks/) in tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_script(relative_path: str, module_name: str):
    """Import `relative_path` (e.g. `benchmarks/speed.py`) as module `module_name`."""
    spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
