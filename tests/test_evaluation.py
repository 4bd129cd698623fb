"""Tests of ``lcad evaluate`` and its metrics, against values computed independently of the code under test.

PSNR and SSIM are checked against scikit-image, colourfulness against hand-computed values, FID against a
Fréchet distance computed with scipy on the same features, LPIPS against a plain-torch forward pass of the
same weights, and CLIP score against transformers' own forward. Every weight file is tiny, random and made
here: nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lcad_pipeline import evaluation, metrics
from lcad_pipeline.cli import main


os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _random_images(count: int, height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus noise, like photographs more than white noise: (N, H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    images = []
    for _ in range(count):
        base = rng.uniform(0, 255, 3) + rng.uniform(-2, 2, 3) * x[..., None] + rng.uniform(-2, 2, 3) * y[..., None]
        images.append(np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255))
    return np.stack(images).astype(np.uint8)


def _perturb(images: np.ndarray, seed: int, amount: float = 25.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shift = rng.uniform(-amount, amount, (images.shape[0], 1, 1, 3))
    noise = rng.normal(0, amount / 2, images.shape)
    return np.clip(images.astype(float) + shift + noise, 0, 255).astype(np.uint8)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_matches_scikit_image():
    target = _random_images(4, 37, 52, seed=0)
    preds = _perturb(target, seed=1)
    expected = [peak_signal_noise_ratio(target[i], preds[i], data_range=255) for i in range(4)]
    np.testing.assert_allclose(
        metrics.psnr(_nchw(preds), _nchw(target)).numpy(), expected, rtol=1e-7
    )  # torchmetrics keeps log10(255) in float32


def test_ssim_matches_scikit_image():
    target = _random_images(3, 45, 33, seed=2)
    preds = _perturb(target, seed=3)
    expected = [
        structural_similarity(
            target[i],
            preds[i],
            channel_axis=-1,
            data_range=255,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for i in range(3)
    ]
    got = metrics.ssim(_nchw(preds), _nchw(target)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    assert metrics.ssim(_nchw(target), _nchw(target)).tolist() == pytest.approx([1.0] * 3)


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), torch.zeros(1, 3, 16, 17, dtype=torch.uint8))
    with pytest.raises(ValueError, match="larger than 11"):
        metrics.ssim(torch.zeros(1, 3, 10, 16, dtype=torch.uint8), torch.zeros(1, 3, 10, 16, dtype=torch.uint8))


# -------------------------------------------------------------------------------------------- colourfulness


def _solid(rgb: tuple[int, int, int], height: int = 4, width: int = 6) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (height, width, 3)).copy()


def test_colorfulness_hand_computed():
    # Left half pure red, right half pure blue. Red pixels: rg = 255, yb = 127.5; blue pixels: rg = 0, yb = -255.
    # mean rg = 127.5, std rg = 127.5; mean yb = -63.75, std yb = 191.25 (population std).
    # C = sqrt(127.5^2 + 191.25^2) + 0.3 sqrt(127.5^2 + 63.75^2) = 229.8539... + 0.3 * 142.5493... = 272.6187...
    red_blue = np.concatenate([_solid((255, 0, 0)), _solid((0, 0, 255))], axis=1)
    # Uniform (200, 100, 50): no spread, rg = 100, yb = 150 - 50 = 100, so C = 0.3 * sqrt(2) * 100 = 42.4264...
    orange = _solid((200, 100, 50), width=12)
    grey = _solid((128, 128, 128), width=12)
    got = metrics.colorfulness(_nchw(np.stack([red_blue, orange, grey]))).tolist()
    assert got == pytest.approx([272.6186938805, 42.4264068712, 0.0], abs=1e-9)


def test_delta_colorfulness_sign_conventions():
    dull, vivid = torch.tensor([10.0, 20.0]), torch.tensor([30.0, 50.0])

    too_vivid = metrics.colorfulness_summary(vivid, dull)  # results more colourful than the ground truth
    assert too_vivid["colorfulness"] == 40.0 and too_vivid["colorfulness_gt"] == 15.0
    assert too_vivid["colorfulness_bias"] == 25.0  # result minus ground truth: positive
    assert too_vivid["delta_colorfulness"] == 25.0

    too_dull = metrics.colorfulness_summary(dull, vivid)  # results less colourful than the ground truth
    assert too_dull["colorfulness_bias"] == -25.0  # negative
    assert too_dull["delta_colorfulness"] == 25.0  # the absolute difference is never negative
    assert too_dull["delta_colorfulness_per_image"] == 25.0

    # One image too vivid and one too dull by the same amount: the means agree, the images do not.
    mixed = metrics.colorfulness_summary(torch.tensor([30.0, 10.0]), torch.tensor([20.0, 20.0]))
    assert mixed["colorfulness_bias"] == 0.0 and mixed["delta_colorfulness"] == 0.0
    assert mixed["delta_colorfulness_per_image"] == 10.0


def test_paper_table3_delta_is_the_difference_of_means():
    # Table 3 (colorful, Δcolorful) rows: colorful + Δ or colorful − Δ gives one ground-truth mean per source.
    rows = {"CIC": (31.60, 4.72), "DeOldify": (22.70, 13.62), "ChromaGAN": (27.88, 8.43), "GCP": (32.98, 3.34)}
    for colorful, delta in rows.values():
        summary = metrics.colorfulness_summary(torch.tensor([colorful]), torch.tensor([36.32]))
        assert summary["delta_colorfulness"] == pytest.approx(delta, abs=0.011)


# ---------------------------------------------------------------------------------------------------- FID


class TinyFeatures(torch.nn.Module):
    """A random feature network taking uint8 images, with the FID Inception's ``return_features`` switch."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, dim, kernel_size=5, stride=2)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = torch.tanh(self.conv(img.float() / 127.5 - 1.0)).mean(dim=(2, 3))
        if return_features:
            return features
        return features.sum(dim=1, keepdim=True)  # "logits": what FID must not use


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("fid") / "tiny-inception.pt")
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is how the FID Inception ships
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyFeatures()).save(path)
    return path


def _frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    mean_a, mean_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def test_fid_of_a_set_with_itself_is_near_zero_and_matches_scipy(fid_weights):
    extractor = metrics.load_fid_feature_extractor(fid_weights)
    images = _nchw(_random_images(12, 32, 32, seed=4))
    others = _nchw(_perturb(_random_images(12, 32, 32, seed=4), seed=5, amount=60))

    same = metrics.make_fid(extractor)
    same.update(images, real=True)
    same.update(images, real=False)
    assert abs(same.compute().item()) < 1e-6

    different = metrics.make_fid(extractor)
    different.update(images, real=True)
    different.update(others, real=False)
    network = TinyFeatures()
    with torch.no_grad():
        expected = _frechet_distance(
            network(images, return_features=True).double().numpy(),
            network(others, return_features=True).double().numpy(),
        )
    assert expected > 1e-3
    assert different.compute().item() == pytest.approx(expected, rel=1e-4)


def test_fid_loader_reads_torch_export_and_rejects_other_files(tmp_path):
    network = TinyFeatures()
    example = (torch.zeros(2, 3, 32, 32, dtype=torch.uint8),)
    program = torch.export.export(network, example, dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(tmp_path / "tiny.pt2"))
    extractor = metrics.load_fid_feature_extractor(tmp_path / "tiny.pt2")
    images = _nchw(_random_images(3, 32, 32, seed=6))
    with torch.no_grad():
        torch.testing.assert_close(extractor(images), network(images).reshape(3, -1))

    (tmp_path / "notes.txt").write_text("not a network")
    with pytest.raises((ValueError, metrics.MetricUnavailable), match="notes.txt"):
        metrics.load_fid_feature_extractor(tmp_path / "notes.txt")


# -------------------------------------------------------------------------------------------------- LPIPS

_ALEXNET_CONVS = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}


@pytest.fixture(scope="module")
def lpips_weights(tmp_path_factory) -> str:
    """A random state dict in the layout of torchvision's AlexNet, classifier included."""
    generator = torch.Generator().manual_seed(7)
    state_dict = {}
    for index, (out_channels, in_channels, kernel) in _ALEXNET_CONVS.items():
        fan_in = in_channels * kernel * kernel
        state_dict[f"features.{index}.weight"] = torch.randn(
            out_channels, in_channels, kernel, kernel, generator=generator
        ) * math.sqrt(2.0 / fan_in)
        state_dict[f"features.{index}.bias"] = torch.randn(out_channels, generator=generator) * 0.01
    state_dict["classifier.1.weight"] = torch.zeros(4, 9216)
    path = str(tmp_path_factory.mktemp("lpips") / "alexnet.pth")
    torch.save(state_dict, path)
    return path


def _reference_lpips(state_dict: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 (Zhang et al. 2018) written out: AlexNet relu1..relu5, unit-normalised, weighted, averaged."""
    import torchmetrics

    lin_path = os.path.join(os.path.dirname(torchmetrics.__file__), "functional", "image", "lpips_models", "alex.pth")
    lins = torch.load(lin_path, map_location="cpu")
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(image):
        h = ((image * 2 - 1) - shift) / scale
        out = []
        for index, (stride, padding, pool) in {
            0: (4, 2, False),
            3: (1, 2, True),
            6: (1, 1, True),
            8: (1, 1, False),
            10: (1, 1, False),
        }.items():
            if pool:
                h = F.max_pool2d(h, 3, 2)
            h = F.relu(
                F.conv2d(
                    h, state_dict[f"features.{index}.weight"], state_dict[f"features.{index}.bias"], stride, padding
                )
            )
            out.append(h)
        return out

    total = 0
    for layer, (a, b) in enumerate(zip(taps(x), taps(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + F.conv2d((a - b) ** 2, lins[f"lin{layer}.model.1.weight"]).mean(dim=(2, 3))
    return total.flatten()


def test_lpips_uses_the_given_backbone_weights(lpips_weights):
    network = metrics.load_lpips_network(lpips_weights)
    target = _nchw(_random_images(3, 64, 64, seed=8))
    preds = _nchw(_perturb(_random_images(3, 64, 64, seed=8), seed=9))
    got = metrics.lpips(network, preds, target)
    expected = _reference_lpips(torch.load(lpips_weights), preds.float() / 255, target.float() / 255)
    assert (expected > 1e-3).all()
    torch.testing.assert_close(got, expected.double(), rtol=1e-4, atol=1e-6)
    assert metrics.lpips(network, target, target).abs().max().item() < 1e-6


def test_lpips_loader_rejects_other_state_dicts(tmp_path):
    torch.save({"features.0.weight": torch.zeros(8, 3, 7, 7)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision AlexNet or VGG16"):
        metrics.load_lpips_network(tmp_path / "other.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="not a readable state dict"):
        metrics.load_lpips_network(tmp_path / "garbage.pth")


# --------------------------------------------------------------------------------------------- CLIP score


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> str:
    """A tiny random CLIP model folder with a character-level tokenizer, saved like a real one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **small,
            "vocab_size": len(vocab),
            "max_position_embeddings": 32,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    torch.manual_seed(3)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def _reference_clip_score(folder: str, images: torch.Tensor, captions: list[str]) -> float:
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=captions, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model(**inputs)
    cosine = (output.image_embeds * output.text_embeds).sum(dim=-1)  # both come unit-normalised
    return max(100 * cosine.mean().item(), 0.0)


def test_clip_score_matches_transformers_forward(clip_model):
    images = _nchw(_random_images(3, 40, 36, seed=10))
    captions = ["a red car", "blue sky", "green tree"]
    score = metrics.load_clip_score(clip_model)
    score.update(list(images), captions)
    expected = _reference_clip_score(clip_model, images, captions)
    assert expected > 1.0  # a degenerate (clamped) score would not test anything
    assert score.compute().item() == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------------------- command line


def _save(images: np.ndarray, folder, names: list[str], extension: str) -> None:
    for image, name in zip(images, names):
        path = os.path.join(folder, name + extension)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(image).save(path, quality=100) if extension == ".jpg" else Image.fromarray(image).save(path)


@pytest.fixture
def folders(tmp_path):
    """Ground truth (PNG, one in a sub-folder) and results (PNG): five pairs, one ground truth without result."""
    names = ["img0", "img1", "img2", "sub/img3", "img4", "img5"]
    ground_truth = _random_images(6, 40, 48, seed=11)
    results = _perturb(ground_truth, seed=12)
    _save(ground_truth, tmp_path / "gt", names, ".png")
    _save(results[:5], tmp_path / "results", names[:5], ".png")
    return tmp_path, names, ground_truth, results


def _evaluate(*args: str) -> int:
    return main(["evaluate", *map(str, args)])


def test_cli_end_to_end(folders, fid_weights, lpips_weights, capsys):
    tmp_path, names, ground_truth, results = folders
    status = _evaluate(
        "--results",
        tmp_path / "results",
        "--ground-truth",
        tmp_path / "gt",
        "--output",
        tmp_path / "report",
        "--fid-weights",
        fid_weights,
        "--lpips-weights",
        lpips_weights,
        "--batch-size",
        "2",
    )
    assert status == 0
    captured = capsys.readouterr()
    assert "1 ground-truth images have no result" in captured.err and "img5" in captured.err
    assert "skipping CLIP score" in captured.err

    report = json.loads((tmp_path / "report" / "results.json").read_text())
    assert report["counts"]["pairs"] == 5 and report["counts"]["missing_results"] == 1
    assert report["missing_results"] == ["img5"]
    scored = report["metrics"]
    assert {key: entry["n"] for key, entry in scored.items()} == {
        "fid": 5,
        "psnr": 5,
        "ssim": 5,
        "lpips": 5,
        "colorfulness": 5,
        "delta_colorfulness": 5,
        "delta_colorfulness_per_image": 5,
        "colorfulness_bias": 5,
        "colorfulness_gt": 5,
    }
    order = sorted(range(5), key=lambda i: names[i])
    psnr = np.mean([peak_signal_noise_ratio(ground_truth[i], results[i], data_range=255) for i in order])
    assert scored["psnr"]["value"] == pytest.approx(psnr, rel=1e-7)
    gt_c = metrics.colorfulness(_nchw(ground_truth[:5])).mean().item()
    assert scored["colorfulness_gt"]["value"] == pytest.approx(gt_c, rel=1e-12)
    assert scored["fid"]["value"] > 0 and 0 < scored["lpips"]["value"] < 5
    assert "clip_score" in report["skipped"]

    markdown = (tmp_path / "report" / "results.md").read_text()
    assert "| metric | value | n |" in markdown
    assert f"| PSNR (dB) ↑ | {psnr:.4f} | 5 |" in markdown
    assert "- CLIP score: no captions" in markdown

    # A second run must not replace the report without --overwrite.
    before = (tmp_path / "report" / "results.json").read_bytes()
    assert (
        _evaluate(
            "--results", tmp_path / "results", "--ground-truth", tmp_path / "gt", "--output", tmp_path / "report"
        )
        == 2
    )
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "report" / "results.json").read_bytes() == before


def test_cli_skips_metrics_without_weights_and_pairs_across_extensions(tmp_path, capsys):
    ground_truth = _random_images(3, 24, 24, seed=13)
    _save(ground_truth, tmp_path / "gt", ["a", "b", "c"], ".jpg")
    _save(_perturb(ground_truth, seed=14), tmp_path / "res", ["a", "b", "c"], ".png")
    assert _evaluate("--results", tmp_path / "res", "--ground-truth", tmp_path / "gt") == 0
    err = capsys.readouterr().err
    for name, argument in [("LPIPS", "--lpips-weights"), ("FID", "--fid-weights")]:
        assert f"skipping {name}: no {argument} given" in err
    report = json.loads((tmp_path / "res" / "results.json").read_text())
    assert report["counts"]["pairs"] == 3 and set(report["skipped"]) == {"lpips", "fid", "clip_score"}
    assert "lpips" not in report["metrics"] and "fid" not in report["metrics"]


def test_imagenet_preset_takes_first_images_by_name_centre_cropped(tmp_path):
    # Class sub-folders as in the usual ImageNet val layout; the file names carry the order.
    rng = np.random.default_rng(15)
    layout = {
        "n02/ILSVRC2012_val_00000001": (300, 260),
        "n01/ILSVRC2012_val_00000002": (280, 320),
        "n01/ILSVRC2012_val_00000003": (256, 256),
        "n00/ILSVRC2012_val_00000004": (200, 240),
    }
    for name, (height, width) in layout.items():
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        _save(image[None], tmp_path / "val", [name], ".JPEG")
    # Results: the prepared ground truth itself for the first two, a flat grey for the third.
    args = evaluation.argparse.Namespace(
        preset="imagenet-val", ground_truth=str(tmp_path / "val"), captions=None, limit=3, size=None
    )
    protocol = evaluation.build_protocol(args)
    assert [sample.key for sample in protocol.samples] == [
        "n02/ILSVRC2012_val_00000001",
        "n01/ILSVRC2012_val_00000002",
        "n01/ILSVRC2012_val_00000003",
    ]
    assert protocol.size == 256
    for sample in protocol.samples[:2]:
        prepared = evaluation.prepare_image(Image.open(sample.ground_truth), 256)
        assert prepared.size == (256, 256)
        _save(np.asarray(prepared)[None], tmp_path / "res", [sample.key], ".png")
    _save(np.full((1, 256, 256, 3), 128, np.uint8), tmp_path / "res", [protocol.samples[2].key], ".png")
    _save(np.full((1, 256, 256, 3), 128, np.uint8), tmp_path / "res", ["n00/ILSVRC2012_val_00000004"], ".png")

    assert (
        _evaluate(
            "--results",
            tmp_path / "res",
            "--ground-truth",
            tmp_path / "val",
            "--preset",
            "imagenet-val",
            "--limit",
            "3",
        )
        == 0
    )
    report = json.loads((tmp_path / "res" / "results.json").read_text())
    assert report["counts"] == {
        "ground_truth": 3,
        "pairs": 3,
        "missing_results": 0,
        "missing_ground_truth": 0,
        "extra_results": 1,
        "resized_results": 0,
    }
    third = np.asarray(evaluation.prepare_image(Image.open(protocol.samples[2].ground_truth), 256))
    expected_ssim = (
        1
        + 1
        + structural_similarity(
            third,
            np.full_like(third, 128),
            channel_axis=-1,
            data_range=255,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    ) / 3
    assert report["metrics"]["ssim"]["value"] == pytest.approx(expected_ssim, abs=1e-9)
    assert report["metrics"]["psnr"]["value"] == "inf"  # two identical pairs


def test_prepare_image_crops_the_centre_square():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 10:50] = 255  # the centre 40x40 square is white, the 10-pixel side bands black
    prepared = np.asarray(evaluation.prepare_image(Image.fromarray(image), 40))
    assert prepared.shape == (40, 40, 3) and prepared.min() == 255


def test_coco_stuff_preset_uses_caption_json_and_clip_score(tmp_path, clip_model, capsys):
    ground_truth = _random_images(4, 32, 32, seed=16)
    results = _perturb(ground_truth, seed=17)
    _save(ground_truth, tmp_path / "gt", ["x0", "x1", "x2", "unused"], ".jpg")
    _save(results, tmp_path / "res", ["x0", "x1", "x2", "unused"], ".png")
    captions = {
        "x0.jpg": ["a red car", "a car"],
        "x1.jpg": ["blue sky"],
        "x2.jpg": ["green tree"],
        "gone.jpg": ["a cup"],
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    status = _evaluate(
        "--results",
        tmp_path / "res",
        "--ground-truth",
        tmp_path / "gt",
        "--preset",
        "coco-stuff",
        "--captions",
        tmp_path / "captions.json",
        "--clip-model",
        clip_model,
    )
    assert status == 0
    assert "1 images named in --captions are not in --ground-truth: gone" in capsys.readouterr().err
    report = json.loads((tmp_path / "res" / "results.json").read_text())
    assert report["counts"]["pairs"] == 3 and report["missing_ground_truth"] == ["gone"]
    expected = _reference_clip_score(clip_model, _nchw(results[:3]), ["a red car", "blue sky", "green tree"])
    assert report["metrics"]["clip_score"] == {"value": pytest.approx(expected, rel=1e-4), "n": 3}


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--ground-truth", "{tmp}/nowhere"], "--ground-truth: no such folder"),
        (["--preset", "cifar"], "--preset: unknown preset 'cifar'"),
        (["--preset", "multi-instance"], "--preset multi-instance needs --captions"),
        (["--captions", "{tmp}/none.json"], "--captions: no such file"),
        (["--lpips-weights", "{tmp}/alex.pth"], "--lpips-weights: no such file"),
        (["--fid-weights", "{tmp}/gt/a.png"], "--fid-weights: "),
        (["--clip-model", "{tmp}/gt/a.png"], "--clip-model: "),
        (["--results", "{tmp}/nothing"], "--results: no such folder"),
        (["--ground-truth", "{tmp}/empty"], "--ground-truth: no images"),
        (["--results", "{tmp}/empty"], "--results: none of the 2 ground-truth images has a result"),
        (["--run"], "--run needs --model"),
        (["--run", "--model", "{tmp}/nowhere"], "--model: no such folder"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--device", "warp-drive"], "--device"),
    ],
)
def test_cli_bad_input_exits_2_naming_the_argument(tmp_path, capsys, arguments, message):
    images = _random_images(2, 16, 16, seed=18)
    _save(images, tmp_path / "gt", ["a", "b"], ".png")
    _save(images, tmp_path / "res", ["a", "b"], ".png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "captions.json").write_text(json.dumps({"a.png": ["a red car"]}))
    defaults = {"--results": f"{tmp_path}/res", "--ground-truth": f"{tmp_path}/gt"}
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    for option, value in defaults.items():
        if option not in arguments:
            arguments += [option, value]
    if "--clip-model" in arguments:
        arguments += ["--captions", f"{tmp_path}/captions.json"]
    assert _evaluate(*arguments) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "res" / "results.json").exists()


# ------------------------------------------------------------------------------------------- --run (fake)


class FakePipeline:
    """Stands in for LCADPipeline: checks its inputs and tints the grey image with a seeded random colour."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, image, prompt, num_inference_steps, generator, guidance_scale=None):
        assert isinstance(image, Image.Image) and image.mode == "L"
        assert isinstance(generator, torch.Generator)
        self.calls.append(
            {"size": image.size, "prompt": prompt, "steps": num_inference_steps, "guidance": guidance_scale}
        )
        tint = torch.rand(3, generator=generator).numpy()
        grey = np.asarray(image, dtype=float)[..., None]
        colour = np.clip(grey * (0.5 + tint), 0, 255).astype(np.uint8)
        return type("Output", (), {"images": [Image.fromarray(colour)]})()


def test_run_colourises_missing_results_and_resumes(tmp_path, capsys):
    ground_truth = _random_images(3, 24, 32, seed=19)
    _save(ground_truth, tmp_path / "gt", ["p", "q", "sub/r"], ".jpg")
    (tmp_path / "captions.json").write_text(json.dumps({"p.jpg": ["a red car"], "sub/r.jpg": "blue sky"}))
    (tmp_path / "res").mkdir()
    kept = np.full((24, 32, 3), 7, np.uint8)
    Image.fromarray(kept).save(tmp_path / "res" / "q.jpg")  # a result already there: to keep, not overwrite
    kept_bytes = (tmp_path / "res" / "q.jpg").read_bytes()

    arguments = [
        "evaluate",
        "--results",
        str(tmp_path / "res"),
        "--ground-truth",
        str(tmp_path / "gt"),
        "--captions",
        str(tmp_path / "captions.json"),
        "--run",
        "--prompt",
        "a colorful image",
        "--steps",
        "2",
        "--guidance-scale",
        "3.5",
        "--seed",
        "5",
    ]
    parser = evaluation.argparse.ArgumentParser()
    evaluation.add_arguments(parser)
    fake = FakePipeline()
    assert evaluation.run(parser.parse_args(arguments[1:]), pipeline=fake) == 0
    assert "colourised 2 images, kept 1" in capsys.readouterr().out
    assert sorted(call["prompt"] for call in fake.calls) == ["a red car", "blue sky"]
    assert all(call["steps"] == 2 and call["guidance"] == 3.5 and call["size"] == (32, 24) for call in fake.calls)
    assert (tmp_path / "res" / "q.jpg").read_bytes() == kept_bytes
    assert sorted(os.listdir(tmp_path / "res")) == ["p.png", "q.jpg", "results.json", "results.md", "sub"]
    first = {name: np.asarray(Image.open(tmp_path / "res" / name)) for name in ["p.png", "sub/r.png"]}
    assert first["p.png"].shape == (24, 32, 3)

    # Resuming after losing one result regenerates just that one, identically (per-image seed).
    os.remove(tmp_path / "res" / "sub" / "r.png")
    again = FakePipeline()
    assert evaluation.run(parser.parse_args(arguments[1:] + ["--overwrite"]), pipeline=again) == 0
    assert [call["prompt"] for call in again.calls] == ["blue sky"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "res" / "sub" / "r.png")), first["sub/r.png"])
    report = json.loads((tmp_path / "res" / "results.json").read_text())
    assert report["counts"]["pairs"] == 3


def test_run_without_the_pipeline_class_or_model_fails_cleanly(tmp_path, capsys):
    _save(_random_images(1, 16, 16, seed=20), tmp_path / "gt", ["a"], ".png")
    (tmp_path / "model").mkdir()
    status = _evaluate(
        "--results", tmp_path / "res", "--ground-truth", tmp_path / "gt", "--run", "--model", tmp_path / "model"
    )
    assert status == 2
    err = capsys.readouterr().err
    assert "--model: cannot load" in err or "has no LCADPipeline" in err
    assert not (tmp_path / "res").exists() or not os.listdir(tmp_path / "res")


# ------------------------------------------------------------------------------------------- --run (real)


def test_run_with_the_tiny_pipeline_end_to_end(tmp_path, capsys):
    from tiny_models import make_tiny_pipeline

    make_tiny_pipeline().save_pretrained(tmp_path / "pipe")
    ground_truth = _random_images(2, 24, 32, seed=21)
    _save(ground_truth, tmp_path / "gt", ["a", "b"], ".png")
    arguments = [
        "--results",
        tmp_path / "res",
        "--ground-truth",
        tmp_path / "gt",
        "--run",
        "--model",
        tmp_path / "pipe",
        "--steps",
        "2",
        "--device",
        "cpu",
    ]
    assert _evaluate(*arguments) == 0
    assert "colourised 2 images, kept 0" in capsys.readouterr().out
    for index, name in enumerate(["a.png", "b.png"]):
        result = Image.open(tmp_path / "res" / name)
        assert result.mode == "RGB" and result.size == (32, 24)
        # The pipeline was fed this image's luminance: its result keeps the structure of the ground truth.
        grey_in = np.asarray(Image.fromarray(ground_truth[index]).convert("L"), dtype=float).ravel()
        grey_out = np.asarray(result.convert("L"), dtype=float).ravel()
        assert np.corrcoef(grey_in, grey_out)[0, 1] > 0.9
    report = json.loads((tmp_path / "res" / "results.json").read_text())
    assert report["counts"]["pairs"] == 2 and report["metrics"]["psnr"]["n"] == 2

    # Resuming finds everything done and colourises nothing.
    stamps = {name: os.stat(tmp_path / "res" / name).st_mtime_ns for name in ["a.png", "b.png"]}
    assert _evaluate(*arguments, "--overwrite") == 0
    assert "colourised 0 images, kept 2" in capsys.readouterr().out
    assert {name: os.stat(tmp_path / "res" / name).st_mtime_ns for name in stamps} == stamps
