"""Stage-1 losses (Eq. 3-4) against direct re-computations: artifact map, PatchGAN hinge, adaptive weight, LPIPS."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lcad_pipeline.losses import (
    NLayerDiscriminator,
    PerceptualLoss,
    adaptive_discriminator_weight,
    artifact_map,
    artifact_weighted_l1,
    hinge_discriminator_loss,
    hinge_generator_loss,
    load_lpips,
    local_variance,
)


def _reference_local_variance(residual: torch.Tensor, window: int) -> torch.Tensor:
    """Unbiased variance of every reflect-padded window, by unfolding the windows (LDL's formulation)."""
    b, c, h, w = residual.shape
    padded = F.pad(residual, [window // 2] * 4, mode="reflect")
    patches = F.unfold(padded, window).view(b, c, window * window, h, w)
    return patches.var(dim=2, unbiased=True)


def test_local_variance_matches_unfolded_windows():
    residual = torch.rand(2, 1, 19, 23, dtype=torch.float64)
    for window in (3, 7):
        torch.testing.assert_close(local_variance(residual, window), _reference_local_variance(residual, window))


def test_artifact_map_as_released():
    torch.manual_seed(0)
    target, output = torch.rand(2, 3, 16, 16, dtype=torch.float64), torch.rand(2, 3, 16, 16, dtype=torch.float64)
    residual = (target - output).abs().sum(1, keepdim=True)
    patch = residual.var(dim=(1, 2, 3), unbiased=True, keepdim=True) ** 0.2
    expected = _reference_local_variance(residual, 7) * patch
    torch.testing.assert_close(artifact_map(target, output), expected)
    # A constant error has no local variance: no artifact.
    assert artifact_map(target, target + 0.5).abs().max() == 0


def test_artifact_weighted_l1_is_weighted_l1_with_a_detached_weight():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 16, 16)
    output = torch.rand(2, 3, 16, 16, requires_grad=True)
    loss = artifact_weighted_l1(target, output)
    weight = artifact_map(target, output.detach())
    torch.testing.assert_close(loss, (weight * (output - target)).abs().mean())
    loss.backward()
    expected_grad = weight * torch.sign(output.detach() - target) / output.numel()
    torch.testing.assert_close(output.grad, expected_grad.expand_as(output))
    assert artifact_weighted_l1(target, target.clone()) == 0


def test_patchgan_discriminator_shapes_and_hinge_losses():
    discriminator = NLayerDiscriminator(3, 8, 3)
    assert discriminator(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)  # 70x70 PatchGAN on 256 px
    assert discriminator(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3))
    assert hinge_generator_loss(fake).item() == pytest.approx(1 / 3)


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 3, 1)
    x = torch.randn(2, 3, 8, 8)
    out = layer(x)
    rec, gan = out.abs().mean(), -(out * 3).mean()
    weight = adaptive_discriminator_weight(rec, gan, layer.weight)
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, layer.weight, retain_graph=True)[0]
    assert weight.item() == pytest.approx((g_rec.norm() / (g_gan.norm() + 1e-4)).item(), rel=1e-6)
    assert not weight.requires_grad


def _random_alexnet_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    features = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, 1, 2), nn.ReLU(),
        nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, 1, 1), nn.ReLU(), nn.Conv2d(384, 256, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )
    return {f"features.{k}": v for k, v in features.state_dict().items()}


def test_lpips_without_weights_warns_and_with_weights_is_a_differentiable_distance(tmp_path):
    with pytest.warns(UserWarning, match="lpips_weights"):
        assert load_lpips(None) is None
    with pytest.raises(ValueError, match="--lpips_weights"):
        load_lpips(None, required=True)
    bad = tmp_path / "bad.pth"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="--lpips_weights"):
        load_lpips(bad)

    path = tmp_path / "alexnet.pth"
    torch.save(_random_alexnet_state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        network = load_lpips(path)
    loss = PerceptualLoss(network)
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    assert loss(a, a).item() == pytest.approx(0.0, abs=1e-7)
    distance = loss(b, a)
    assert distance.item() > 0
    distance.backward()
    assert b.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in network.parameters())
