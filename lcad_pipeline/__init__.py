"""L-CAD (language-based colourisation with any-level descriptions) for diffusers."""

from diffusers import ModelMixin  # noqa: F401  diffusers checks components passed to from_pretrained against the
# base class that their declared library (model_index.json names this package) exports.

from .attention_lcad import InstanceAttentionGuidance, InstanceAttnProcessor
from .autoencoder_lcad import LuminanceAutoencoderKL
from .image_processor_lcad import LCADImageProcessor
from .pipeline_lcad import LCADPipeline, LCADPipelineOutput
from .unet_lcad import LCADUNet2DConditionModel

__all__ = [
    "InstanceAttentionGuidance",
    "InstanceAttnProcessor",
    "LCADImageProcessor",
    "LCADPipeline",
    "LCADPipelineOutput",
    "LCADUNet2DConditionModel",
    "LuminanceAutoencoderKL",
]
