# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""Losses of L-CAD's pixel-space stage (paper Sec. 3.2, Eq. 3-4): L_pix = L_rec + alpha L_dis + beta L_per.

- L_rec, the artifact-weighted L1 (Eq. 3, after LDL, Liang et al. CVPR 2022), computed as the release does: the
  residual is the channel sum of |x - x~|; the artifact map is its local *unbiased* variance in an N_win x N_win
  (7x7) reflect-padded window, times the whole image's residual variance to the power 1/5; L_rec is the mean L1
  between the weighted reconstruction and the weighted target. The map is a weight: it is detached, so gradients only
  flow through the difference (the release does not say; weighting without back-propagating through the weight is the
  usual reading of "apply the artifact map as a weight").
- L_dis, a PatchGAN discriminator (3 layers, pix2pix / taming-transformers) with the hinge loss, weighted adaptively
  by the ratio of the gradient norms of the reconstruction and adversarial terms at the last trained layer
  ([`adaptive_discriminator_weight`]), times alpha, from a start step on.
- L_per, LPIPS. Its backbone weights cannot be downloaded here; [`load_lpips`] builds the network on a torchvision
  AlexNet/VGG16 state dict the user gives (the learned linear heads ship with torchmetrics).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn


ARTIFACT_WINDOW = 7  # N_win of Eq. 3, as released


# ------------------------------------------------------------------------------------------- reconstruction


def local_variance(residual: torch.Tensor, window: int = ARTIFACT_WINDOW) -> torch.Tensor:
    """Unbiased variance of `residual` (B, 1, H, W) in a `window` x `window` reflect-padded window around each pixel."""
    if window < 2 or window % 2 == 0:
        raise ValueError(f"`window` must be an odd size >= 3, got {window}.")
    pad = window // 2
    padded = F.pad(residual, (pad, pad, pad, pad), mode="reflect")
    mean = F.avg_pool2d(padded, window, stride=1)
    mean_of_squares = F.avg_pool2d(padded * padded, window, stride=1)
    count = window * window
    return ((mean_of_squares - mean * mean) * (count / (count - 1))).clamp_min(0.0)


def artifact_map(target: torch.Tensor, reconstruction: torch.Tensor, window: int = ARTIFACT_WINDOW) -> torch.Tensor:
    """
    The artifact map M^art (B, 1, H, W) of Eq. 3 as released: local variance of the channel-summed absolute residual,
    times the image's residual variance ** (1/5) (LDL's patch-level weight). Not detached.
    """
    residual = (target - reconstruction).abs().sum(dim=1, keepdim=True)
    patch_weight = residual.var(dim=(1, 2, 3), keepdim=True) ** (1.0 / 5.0)
    return local_variance(residual, window) * patch_weight


def artifact_weighted_l1(target: torch.Tensor, reconstruction: torch.Tensor, window: int = ARTIFACT_WINDOW) -> torch.Tensor:
    """L_rec = mean |M (x - x~)| with the artifact map M computed in float32 and detached (a weight, not a target)."""
    weight = artifact_map(target.detach().float(), reconstruction.detach().float(), window)
    return (weight * (reconstruction.float() - target.float())).abs().mean()


# ------------------------------------------------------------------------------------------- discriminator


class NLayerDiscriminator(nn.Module):
    r"""
    PatchGAN discriminator (pix2pix; as used by taming-transformers and latent diffusion's autoencoders).

    Args:
        in_channels: image channels.
        base_channels: channels of the first layer (64).
        num_layers: strided layers (3 as released); the receptive field is 70x70 for 3.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        multiplier = 1
        for n in range(1, num_layers + 1):
            previous, multiplier = multiplier, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(base_channels * previous, base_channels * multiplier, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(base_channels * multiplier),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(base_channels * multiplier, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_discriminator_weights)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Patch logits (B, 1, h, w) of images in [-1, 1]."""
        return self.main(image)


def _init_discriminator_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss, 0.5 (E[relu(1 - D(x))] + E[relu(1 + D(x~))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss for a hinge discriminator, -E[D(x~)]."""
    return -logits_fake.mean()


def adaptive_discriminator_weight(
    reconstruction_loss: torch.Tensor,
    generator_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """
    taming-transformers' adaptive weight ||grad_w L_rec|| / (||grad_w L_gan|| + 1e-4), clamped to [0, `max_weight`]
    and detached, with w the `last_layer` weight (the trained parameter nearest to the output). Both losses must still
    hold their graphs (they are kept for the backward pass).
    """
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    gan_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    if rec_grad is None or gan_grad is None:
        raise ValueError("`last_layer` is not on the path of both losses; pass the last trained layer's weight.")
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# ------------------------------------------------------------------------------------------- perceptual


def load_lpips(path: str | os.PathLike | None, required: bool = False) -> nn.Module | None:
    """
    The LPIPS network (v0.1 linear heads) on the torchvision AlexNet or VGG16 backbone state dict at `path`
    (`alexnet-owt-7be5be79.pth`, `vgg16-397923af.pth`, or a safetensors file; the kind is read from the shapes).

    Returns a frozen module mapping two image batches in [-1, 1] to (B, 1, 1, 1) distances, differentiable in its
    inputs. With `path` None it warns and returns None (train without the perceptual term) unless `required`.
    """
    if path is None:
        if required:
            raise ValueError("LPIPS needs backbone weights: pass --lpips_weights.")
        warnings.warn(
            "No --lpips_weights given: LPIPS backbone weights cannot be downloaded here, so the perceptual term "
            "(beta L_per) is left out of the loss. Pass a torchvision AlexNet/VGG16 state dict to use it.",
            stacklevel=2,
        )
        return None
    from .metrics import MetricUnavailable, load_lpips_network

    try:
        network = load_lpips_network(path)
    except (ValueError, MetricUnavailable) as error:
        raise ValueError(f"--lpips_weights {os.fspath(path)!r}: {error}") from None
    network.requires_grad_(False)
    network.eval()
    return network


class PerceptualLoss(nn.Module):
    """Mean LPIPS distance between two batches in [-1, 1], computed in float32."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=reconstruction.device.type, enabled=False):
            return self.network(reconstruction.float(), target.float(), normalize=False).mean()


__all__ = [
    "ARTIFACT_WINDOW",
    "NLayerDiscriminator",
    "PerceptualLoss",
    "adaptive_discriminator_weight",
    "artifact_map",
    "artifact_weighted_l1",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "load_lpips",
    "local_variance",
]
