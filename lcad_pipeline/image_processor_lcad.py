# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""Image handling of the L-CAD pipeline: grey input in, colour output out, at the input's own size.

L-CAD works on the CIE Lab lightness L (sRGB, D65) of the input. This processor turns user images (PIL of any mode,
numpy, torch, lists) into full-resolution lightness, makes the normalised low-resolution luminance the model reads,
and maps the model's colour prediction back to the input's size, optionally putting the input's full-resolution
lightness back (the colour is kept as Lab a/b, with chroma reduced where needed to stay inside the sRGB gamut so the
lightness is exact).

Hub remote code: imports only torch, numpy, PIL and diffusers.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from diffusers.configuration_utils import ConfigMixin, register_to_config


PipelineImageInput = Union[
    PIL.Image.Image, np.ndarray, torch.Tensor, list[PIL.Image.Image], list[np.ndarray], list[torch.Tensor]
]

# Luminance normalisations: name -> (scale, offset) with normalised = L / scale - offset.
LUMINANCE_NORMALIZATIONS = {
    "official": (127.5, 1.0),  # the released checkpoints: L/127.5 - 1, spanning [-1, -0.216]
    "symmetric": (50.0, 1.0),  # L/50 - 1, spanning [-1, 1]
}

_D65_WHITE = (0.95047, 1.0, 1.08883)
_RGB_TO_XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_XYZ_TO_RGB = torch.linalg.inv(_RGB_TO_XYZ)
_EPSILON = (6.0 / 29.0) ** 3
_KAPPA = 3 * (6.0 / 29.0) ** 2


def _srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c > 0.04045, ((c + 0.055) / 1.055).clamp(min=0) ** 2.4, c / 12.92)


def _linear_to_srgb(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c > 0.0031308, 1.055 * c.clamp(min=0) ** (1 / 2.4) - 0.055, c * 12.92)


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > _EPSILON, t.clamp(min=0) ** (1 / 3), t / _KAPPA + 4.0 / 29.0)


def _lab_f_inv(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 6.0 / 29.0, t**3, _KAPPA * (t - 4.0 / 29.0))


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], shape (B, 3, H, W), to CIE Lab (D65): L in [0, 100], a/b roughly in [-128, 127]."""
    linear = _srgb_to_linear(rgb)
    xyz = torch.einsum("ij,bjhw->bihw", _RGB_TO_XYZ.to(rgb), linear)
    white = torch.tensor(_D65_WHITE, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    fx, fy, fz = _lab_f(xyz / white).unbind(1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE Lab (D65), shape (B, 3, H, W), to sRGB; values outside [0, 1] (out of gamut) are not clipped."""
    lightness, a, b = lab.unbind(1)
    fy = (lightness + 16.0) / 116.0
    f = torch.stack([fy + a / 500.0, fy, fy - b / 200.0], dim=1)
    white = torch.tensor(_D65_WHITE, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    linear = torch.einsum("ij,bjhw->bihw", _XYZ_TO_RGB.to(lab), _lab_f_inv(f) * white)
    return _linear_to_srgb(linear)


def rgb_to_lightness(rgb: torch.Tensor) -> torch.Tensor:
    """Lab lightness L in [0, 100], shape (B, 1, H, W), of sRGB images in [0, 1]."""
    linear = _srgb_to_linear(rgb)
    luminance = torch.einsum("j,bjhw->bhw", _RGB_TO_XYZ[1].to(rgb), linear)
    return (116.0 * _lab_f(luminance) - 16.0).unsqueeze(1)


def lightness_to_gray_rgb(lightness: torch.Tensor) -> torch.Tensor:
    """The neutral grey sRGB image in [0, 1] with Lab lightness `lightness` (B, 1, H, W)."""
    linear = _lab_f_inv((lightness + 16.0) / 116.0)
    return _linear_to_srgb(linear).clamp(0, 1).expand(-1, 3, -1, -1)


def combine_lightness_and_color(lightness: torch.Tensor, rgb: torch.Tensor, bisection_steps: int = 12) -> torch.Tensor:
    """
    The sRGB image with Lab lightness `lightness` (B, 1, H, W) and the hue of `rgb` (B, 3, H, W).

    Where the combination leaves the sRGB gamut, the chroma (a, b) is scaled down per pixel, by bisection, until it
    fits, so the lightness is kept exactly instead of being changed by clipping.
    """
    lab = rgb_to_lab(rgb.clamp(0, 1))
    chroma = lab[:, 1:]
    target = lightness.clamp(0, 100)

    def to_rgb(scale: torch.Tensor) -> torch.Tensor:
        return lab_to_rgb(torch.cat([target, chroma * scale], dim=1))

    candidate = to_rgb(torch.ones_like(target))
    tolerance = 1e-6
    outside = ((candidate < -tolerance) | (candidate > 1 + tolerance)).any(dim=1, keepdim=True)
    if outside.any():
        low, high = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(bisection_steps):
            mid = (low + high) / 2
            trial = to_rgb(mid)
            fits = ((trial >= -tolerance) & (trial <= 1 + tolerance)).all(dim=1, keepdim=True)
            low = torch.where(fits, mid, low)
            high = torch.where(fits, high, mid)
        candidate = torch.where(outside, to_rgb(low), candidate)
    return candidate.clamp(0, 1)


class LCADImageProcessor(ConfigMixin):
    r"""
    Pre- and post-processing of the L-CAD pipeline.

    Args:
        vae_scale_factor (`int`, defaults to 8): the VAE's downsampling factor; processing sizes are multiples of it.
    """

    config_name = "image_processor_config.json"

    @register_to_config
    def __init__(self, vae_scale_factor: int = 8):
        super().__init__()

    @staticmethod
    def _to_tensor(image, index: int) -> torch.Tensor:
        """One image (PIL, numpy or torch) as a float64 (1, C, H, W) tensor in [0, 1] with C in {1, 3}."""
        name = f"image[{index}]" if index >= 0 else "image"
        if isinstance(image, PIL.Image.Image):
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                array = np.asarray(image, dtype=np.float64)
                array = array / (65535.0 if array.max() > 255 else 255.0) if image.mode != "F" else array
            else:
                array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
            image = array
        if isinstance(image, np.ndarray):
            if image.dtype == np.uint8:
                array = image.astype(np.float64) / 255.0
            elif image.dtype == np.uint16:
                array = image.astype(np.float64) / 65535.0
            elif image.dtype == np.bool_ or np.issubdtype(image.dtype, np.floating):
                array = image.astype(np.float64)
            else:
                raise TypeError(f"`{name}` numpy dtype must be uint8, uint16, bool or float, got {image.dtype}.")
            if array.ndim == 2:
                array = array[:, :, None]
            if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
                raise ValueError(f"`{name}` numpy arrays must be HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}.")
            tensor = torch.from_numpy(np.ascontiguousarray(array[:, :, :3])).permute(2, 0, 1)[None]
        elif isinstance(image, torch.Tensor):
            tensor = image.detach().to("cpu", torch.float64)
            if tensor.ndim == 3:
                tensor = tensor[None]
            if tensor.ndim != 4 or tensor.shape[1] not in (1, 3):
                raise ValueError(f"`{name}` tensors must be (B, C, H, W) with C 1 or 3, got {tuple(image.shape)}.")
        else:
            raise TypeError(
                f"`{name}` must be a PIL image, a numpy array, a torch tensor or a list of them, got {type(image).__name__}."
            )
        if tensor.shape[-1] < 2 or tensor.shape[-2] < 2:
            raise ValueError(f"`{name}` must be at least 2x2 pixels, got {tuple(tensor.shape[-2:])}.")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"`{name}` contains NaN or infinite pixel values.")
        if tensor.min() < 0 or tensor.max() > 1:
            raise ValueError(
                f"`{name}` values must lie in [0, 1] for float input, got [{tensor.min().item():.3g}, {tensor.max().item():.3g}]."
            )
        return tensor

    def lightness(self, image: PipelineImageInput) -> list[torch.Tensor]:
        """
        Lab lightness of each input image at its own size: a list of float32 (1, 1, H, W) tensors in [0, 100].

        Colour inputs are reduced to their lightness (so colour photos can be re-coloured); one-channel inputs are
        read as grey sRGB values.
        """
        items = image if isinstance(image, list) else [image]
        if len(items) == 0:
            raise ValueError("`image` is an empty list.")
        lightness = []
        for index, item in enumerate(items):
            tensor = self._to_tensor(item, index if isinstance(image, list) else -1)
            rgb = tensor.expand(-1, 3, -1, -1) if tensor.shape[1] == 1 else tensor
            lightness.extend(rgb_to_lightness(rgb).float().split(1))
        return lightness

    def processing_size(self, height: int, width: int, processing_resolution: int) -> tuple[int, int]:
        """
        The size the model works at: the longer side `processing_resolution` (0: the input's own), the aspect ratio
        kept, both sides rounded to multiples of `vae_scale_factor`.
        """
        multiple = self.config.vae_scale_factor
        if processing_resolution > 0:
            scale = processing_resolution / max(height, width)
            height, width = height * scale, width * scale
        return (
            max(multiple, int(round(height / multiple)) * multiple),
            max(multiple, int(round(width / multiple)) * multiple),
        )

    @staticmethod
    def resize(image: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        if tuple(image.shape[-2:]) == tuple(size):
            return image
        antialias = mode in ("bilinear", "bicubic") and (size[0] < image.shape[-2] or size[1] < image.shape[-1])
        return F.interpolate(image, size=size, mode=mode, align_corners=False, antialias=antialias)

    @staticmethod
    def normalize_luminance(lightness: torch.Tensor, normalization: str = "official", channels: int = 3) -> torch.Tensor:
        """Lab lightness (B, 1, H, W) in [0, 100] to the model's luminance input (B, channels, H, W)."""
        if normalization not in LUMINANCE_NORMALIZATIONS:
            raise ValueError(
                f"`luminance_normalization` must be one of {list(LUMINANCE_NORMALIZATIONS)}, got {normalization!r}."
            )
        scale, offset = LUMINANCE_NORMALIZATIONS[normalization]
        return (lightness / scale - offset).expand(-1, channels, -1, -1)

    def postprocess(
        self,
        rgb: torch.Tensor,
        lightness: torch.Tensor | None,
        size: tuple[int, int],
        preserve_luminance: bool = True,
    ) -> torch.Tensor:
        """
        The model's colour prediction (1, 3, h, w) in [0, 1] as a (1, 3, H, W) image at the input's `size`; with
        `preserve_luminance`, its lightness replaced by the input's full-resolution `lightness`.
        """
        # Colour conversion needs float32 or better: never under an autocast the caller may have opened.
        with torch.autocast(device_type=rgb.device.type, enabled=False):
            rgb = self.resize(rgb.float(), size, mode="bicubic").clamp(0, 1)
            if preserve_luminance:
                rgb = combine_lightness_and_color(lightness.float().to(rgb.device), rgb)
        return rgb

    @staticmethod
    def to_output(images: list[torch.Tensor], output_type: str):
        """A list of (1, 3, H, W) images in [0, 1] as `output_type`: PIL list, numpy or torch (stacked if same size)."""
        if output_type == "pil":
            return [
                PIL.Image.fromarray((image[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8))
                for image in images
            ]
        same_size = len({tuple(image.shape[-2:]) for image in images}) == 1
        if output_type == "pt":
            return torch.cat(images) if same_size else [image[0] for image in images]
        arrays = [image.permute(0, 2, 3, 1).cpu().numpy() for image in images]
        return np.concatenate(arrays) if same_size else [array[0] for array in arrays]


def is_valid_image_input(image) -> bool:
    """True for the types `LCADImageProcessor` accepts (without checking their contents)."""
    kinds = (PIL.Image.Image, np.ndarray, torch.Tensor)
    if isinstance(image, list):
        return len(image) > 0 and all(isinstance(item, kinds) for item in image)
    return isinstance(image, kinds)


def count_images(image) -> int:
    """Number of images in a valid input (a (B, C, H, W) tensor counts B)."""
    items = image if isinstance(image, list) else [image]
    return sum(item.shape[0] if isinstance(item, torch.Tensor) and item.ndim == 4 else 1 for item in items)


__all__ = [
    "LCADImageProcessor",
    "LUMINANCE_NORMALIZATIONS",
    "rgb_to_lab",
    "lab_to_rgb",
    "rgb_to_lightness",
    "lightness_to_gray_rgb",
    "combine_lightness_and_color",
]
