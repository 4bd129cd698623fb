# Copyright 2025 The L-CAD pipeline authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Image metrics for scoring colourisations against ground truth, as in the L-CAD paper (Tables 1 and 3).

PSNR, SSIM, LPIPS, FID and CLIP score come from torchmetrics; only the colourfulness of Hasler and Suesstrunk
(2003), which no library here implements, is computed in this module. Every image function takes batches of
``uint8`` tensors of shape ``(N, 3, H, W)`` holding RGB values in 0..255, the form images are stored in.

LPIPS and FID need pretrained backbones that torchmetrics would download through torchvision / torch-fidelity.
Neither package can be installed next to a CPU-only torch here, and nothing can be downloaded, so the loaders
below take the weights from a file the user gives and raise :class:`MetricUnavailable` (a reason to skip the
metric, not an error) when an optional package is missing. A file that is not what it should be raises
``ValueError``.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Callable
from unittest import mock

import torch
from torch import nn


# SSIM of Wang et al. (2004): 11x11 Gaussian window, sigma 1.5.
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed in this environment; the message says why and what would enable it."""


def _check_images(images: torch.Tensor, name: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"`{name}` must have shape (N, 3, H, W), got {tuple(images.shape)}")


def _check_pair(preds: torch.Tensor, target: torch.Tensor) -> None:
    _check_images(preds, "preds")
    _check_images(target, "target")
    if preds.shape != target.shape:
        raise ValueError(f"`preds` and `target` differ in shape: {tuple(preds.shape)} vs {tuple(target.shape)}")


def psnr(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image pair (data range 255, over all three channels).

    Returns a float64 tensor of shape ``(N,)``; identical images give ``inf``.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_pair(preds, target)
    return peak_signal_noise_ratio(preds.double(), target.double(), data_range=255.0, reduction="none", dim=(1, 2, 3))


def ssim(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Structural similarity of each image pair, averaged over the three RGB channels.

    Uses torchmetrics' Gaussian SSIM (11x11 window, sigma 1.5, K1 0.01, K2 0.03, data range 255) and, like the
    reference MATLAB code of Wang et al. and ``skimage.metrics.structural_similarity``, averages the SSIM map
    only where the window lies inside the image: torchmetrics pads the borders instead, which shifts the value
    by about 1e-3 on small images. Returns a float64 tensor of shape ``(N,)``.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(preds, target)
    height, width = preds.shape[-2:]
    if min(height, width) <= 2 * SSIM_RADIUS:
        raise ValueError(f"SSIM needs images larger than {2 * SSIM_RADIUS + 1} pixels a side, got {height}x{width}")
    _, ssim_map = structural_similarity_index_measure(
        preds.double(),
        target.double(),
        gaussian_kernel=True,
        sigma=SSIM_SIGMA,
        kernel_size=2 * SSIM_RADIUS + 1,
        data_range=255.0,
        reduction="none",
        return_full_image=True,
    )
    if ssim_map.shape[-2:] == (height, width):  # a padded "same"-size map: keep the valid part only
        ssim_map = ssim_map[..., SSIM_RADIUS:-SSIM_RADIUS, SSIM_RADIUS:-SSIM_RADIUS]
    return ssim_map.flatten(1).mean(dim=1)


def colorfulness(images: torch.Tensor) -> torch.Tensor:
    """Colourfulness of Hasler and Suesstrunk (2003) of each image, on 0..255 RGB values.

    With ``rg = R - G`` and ``yb = (R + G) / 2 - B`` over all pixels of an image, the score is
    ``sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)`` (population standard deviations).
    A grey image scores 0. Returns a float64 tensor of shape ``(N,)``.
    """
    _check_images(images, "images")
    red, green, blue = images.double().flatten(2).unbind(dim=1)
    rg = red - green
    yb = 0.5 * (red + green) - blue
    std = torch.sqrt(rg.var(dim=1, correction=0) + yb.var(dim=1, correction=0))
    mean = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
    return std + 0.3 * mean


def colorfulness_summary(result_scores: torch.Tensor, ground_truth_scores: torch.Tensor) -> dict[str, float]:
    """Summarise colourfulness over a data set from per-image scores of results and their ground truths.

    Returns:
        ``colorfulness``: mean colourfulness of the results (Table 3's "colorful").
        ``colorfulness_gt``: mean colourfulness of the ground truth.
        ``colorfulness_bias``: the signed difference, results minus ground truth, of those means; positive means
            the results are more colourful than the ground truth, negative less.
        ``delta_colorfulness``: ``|colorfulness_bias|``, Table 3's "Delta colorful": every row of that table adds
            up with one ground-truth mean (e.g. 31.60 + 4.72 = 22.70 + 13.62 = 36.32), so the paper takes the
            absolute difference of the two means.
        ``delta_colorfulness_per_image``: the mean of ``|C(result) - C(ground truth)|`` per image pair, never less
            than ``delta_colorfulness``: it also counts images that are too colourful and too dull cancelling out.
    """
    if result_scores.shape != ground_truth_scores.shape or result_scores.ndim != 1 or len(result_scores) == 0:
        raise ValueError("expected two non-empty 1-D tensors of per-image scores of the same length")
    result_scores, ground_truth_scores = result_scores.double(), ground_truth_scores.double()
    bias = result_scores.mean() - ground_truth_scores.mean()
    return {
        "colorfulness": result_scores.mean().item(),
        "colorfulness_gt": ground_truth_scores.mean().item(),
        "colorfulness_bias": bias.item(),
        "delta_colorfulness": bias.abs().item(),
        "delta_colorfulness_per_image": (result_scores - ground_truth_scores).abs().mean().item(),
    }


# ----------------------------------------------------------------------------------------------------- FID


class _FeatureExtractor(nn.Module):
    """Calls a loaded feature network on ``uint8`` images and returns one flat feature row per image.

    Handles the FID Inception networks shipped as TorchScript (``inception-2015-12-05.pt`` of StyleGAN2-ADA and
    its successors), whose ``forward`` needs ``return_features=True`` to return the 2048 pool features.
    """

    def __init__(self, network: nn.Module, pass_return_features: bool, switchable: bool = True) -> None:
        super().__init__()
        self.network = network
        self.pass_return_features = pass_return_features
        self.switchable = switchable
        self.train(False)

    def train(self, mode: bool = True) -> "_FeatureExtractor":
        # Always in inference mode; programs from torch.export cannot switch at all.
        self.training = False
        if self.switchable:
            self.network.train(False)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.pass_return_features:
            features = self.network(images, return_features=True)
        else:
            features = self.network(images)
        if isinstance(features, (tuple, list)):
            features = features[0]
        return features.reshape(images.shape[0], -1)


def load_fid_feature_extractor(path: str | os.PathLike) -> nn.Module:
    """Load the feature network of FID from a file, for :func:`make_fid`.

    Accepts a TorchScript module (such as the standard ``inception-2015-12-05.pt`` FID Inception) or a
    ``torch.export`` program (``.pt2``), either taking ``uint8`` images ``(N, 3, H, W)`` and returning features.
    An Inception state dict (``pt_inception-2015-12-05-6726825d.pth``) works only with torch-fidelity installed;
    without it this raises :class:`MetricUnavailable`. Anything else raises ``ValueError``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path}")
    if path.endswith(".pt2"):
        try:
            network = torch.export.load(path).module()
        except Exception as error:  # torch raises several types for unreadable archives
            raise ValueError(f"{path} is not a readable torch.export program ({error})") from None
        return _FeatureExtractor(network, pass_return_features=False, switchable=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            network = torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError):
        network = None
    if network is not None:
        arguments = [argument.name for argument in network.forward.schema.arguments]
        return _FeatureExtractor(network, pass_return_features="return_features" in arguments)

    _read_state_dict(path)  # neither TorchScript nor a state dict: ValueError
    if importlib.util.find_spec("torch_fidelity") is None:
        raise MetricUnavailable(
            f"{path} is a state dict, not TorchScript; an Inception state dict needs torch-fidelity, which is not "
            "installed (it requires torchvision). Give the TorchScript FID Inception (inception-2015-12-05.pt) "
            "instead."
        )
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        network = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=path
        )
    except Exception as error:  # torch-fidelity reports a bad file in many ways
        raise ValueError(
            f"{path} is neither TorchScript nor an Inception state dict torch-fidelity can load ({error})"
        )
    return _FeatureExtractor(network, pass_return_features=False)


def make_fid(feature_extractor: nn.Module):
    """A torchmetrics ``FrechetInceptionDistance`` on the given feature network, fed ``uint8`` images.

    Update it with ``fid.update(images, real=True)`` for ground truth and ``real=False`` for results; it needs at
    least two images of each.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if not isinstance(feature_extractor, _FeatureExtractor):
        feature_extractor.eval()
    # Feature sums and covariances are accumulated in float64 whatever the network's dtype.
    return FrechetInceptionDistance(feature=feature_extractor, normalize=False)


# --------------------------------------------------------------------------------------------------- LPIPS

# The convolutional ``features`` of torchvision's AlexNet and VGG16, rebuilt here so that LPIPS works without
# torchvision: (in channels, out channels, kernel, stride, padding) per convolution, "M" for a max pool.
_ALEXNET_LAYERS = [
    (3, 64, 11, 4, 2),
    "M",
    (64, 192, 5, 1, 2),
    "M",
    (192, 384, 3, 1, 1),
    (384, 256, 3, 1, 1),
    (256, 256, 3, 1, 1),
    "M",
]
_VGG16_CHANNELS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _torchvision_features(net: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    if net == "alex":
        for spec in _ALEXNET_LAYERS:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
            else:
                in_channels, out_channels, kernel, stride, padding = spec
                layers += [nn.Conv2d(in_channels, out_channels, kernel, stride, padding), nn.ReLU(inplace=True)]
    else:
        in_channels = 3
        for spec in _VGG16_CHANNELS:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, spec, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_channels = spec
    return nn.Sequential(*layers)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and safetensors errors have no common type
        raise ValueError(f"{path} is not a readable state dict ({error})") from None
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state_dict


def load_lpips_network(path: str | os.PathLike) -> nn.Module:
    """Build torchmetrics' LPIPS network (its shipped v0.1 linear layers) on backbone weights from a file.

    ``path`` holds a torchvision AlexNet or VGG16 state dict (``alexnet-owt-7be5be79.pth``, ``vgg16-397923af.pth``;
    the kind is recognised from its shapes, ``classifier.*`` entries are ignored). The backbone is rebuilt
    without torchvision and handed to torchmetrics' own LPIPS module, so scaling, normalisation and the learned
    linear layers are exactly torchmetrics'. The returned module maps two ``[0, 1]`` float batches to ``(N,)``
    distances via :func:`lpips`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path}")
    state_dict = _read_state_dict(path)
    first = state_dict.get("features.0.weight")
    if first is None or first.ndim != 4:
        raise ValueError(f"{path} is not a torchvision AlexNet or VGG16 state dict (no `features.0.weight`)")
    if tuple(first.shape) == (64, 3, 11, 11):
        net = "alex"
    elif tuple(first.shape) == (64, 3, 3, 3) and "features.28.weight" in state_dict:
        net = "vgg"
    else:
        raise ValueError(
            f"{path} is not a torchvision AlexNet or VGG16 state dict (`features.0.weight` {tuple(first.shape)})"
        )

    features = _torchvision_features(net)
    backbone = {key[len("features.") :]: value for key, value in state_dict.items() if key.startswith("features.")}
    try:
        features.load_state_dict(backbone, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit torchvision's {net} backbone: {error}") from None

    try:
        from torchmetrics.functional.image import lpips as tm_lpips

        # torchmetrics asks torchvision for the backbone: hand it the rebuilt one (no torchvision, no download).
        with mock.patch.object(tm_lpips, "_get_tv_model_features", lambda *args, **kwargs: features):
            network = tm_lpips._NoTrainLpips(net=net, pretrained=True, pnet_rand=True)
    except (ImportError, AttributeError, TypeError) as error:
        raise MetricUnavailable(f"this torchmetrics version's LPIPS internals are not the ones expected ({error})")
    network.eval()
    network.net_type = net
    return network


def lpips(network: nn.Module, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LPIPS distance of each ``uint8`` image pair with a network from :func:`load_lpips_network`; shape ``(N,)``."""
    _check_pair(preds, target)
    with torch.inference_mode():
        distances = network(preds.float() / 255.0, target.float() / 255.0, normalize=True)
    return distances.reshape(preds.shape[0]).double()


# ----------------------------------------------------------------------------------------------- CLIP score


def _as_tensor(output) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output holds the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _CLIPFeatures(nn.Module):
    """Gives torchmetrics' CLIPScore the tensors it expects from ``get_image_features`` / ``get_text_features``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _as_tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _as_tensor(self.model.get_text_features(*args, **kwargs))


def load_clip_score(path: str | os.PathLike):
    """torchmetrics' ``CLIPScore`` on a local CLIP model folder (``CLIPModel`` + ``CLIPProcessor`` files).

    Update it with ``clip.update(list_of_uint8_chw_images, list_of_captions)``; ``compute()`` gives
    ``max(100 * mean cosine similarity, 0)``.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"not a folder: {path}")
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError... for a wrong folder
        raise ValueError(f"{path} is not a CLIP model folder transformers can load ({error})") from None
    model.eval()
    load: Callable = lambda: (_CLIPFeatures(model), processor)  # noqa: E731
    return CLIPScore(model_name_or_path=load)
