"""L-CAD (language-based colourisation with any-level descriptions) for diffusers."""

from .autoencoder_lcad import LuminanceAutoencoderKL
from .unet_lcad import LCADUNet2DConditionModel

__all__ = ["LuminanceAutoencoderKL", "LCADUNet2DConditionModel"]
