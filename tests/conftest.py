"""Test-wide settings: no network, tiny models, quiet progress bars."""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def coffee_gray():
    """scikit-image's coffee photo (400x600) as a grey PIL image: a real, non-square photo."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.coffee()).convert("L")
