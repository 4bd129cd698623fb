# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""`LCADPipeline`: colourise a grey photo from a description of any level of detail (L-CAD, NeurIPS 2023).

The grey image's Lab lightness is encoded by the luminance encoder of a `LuminanceAutoencoderKL`; its deepest feature
conditions an `LCADUNet2DConditionModel` at every denoising step, and all its features guide the decoder. The
description (complete, partial or empty) conditions the UNet through CLIP as in Stable Diffusion, with classifier-free
guidance against the empty prompt.

This file is Hub remote code (`pipeline.py` of a saved folder): it imports only torch, numpy, PIL, transformers,
diffusers and its sibling files, which `save_pretrained` writes beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline, retrieve_timesteps
from diffusers.schedulers import DDIMScheduler, KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.hub_utils import create_repo  # huggingface_hub's, through diffusers (remote-code rule)
from diffusers.utils.torch_utils import randn_tensor

from .autoencoder_lcad import LuminanceAutoencoderKL
from .image_processor_lcad import (
    LUMINANCE_NORMALIZATIONS,
    LCADImageProcessor,
    PipelineImageInput,
    count_images,
    is_valid_image_input,
    lightness_to_gray_rgb,
)
from .loading_lcad import check_materialized
from .unet_lcad import LCADUNet2DConditionModel
from .attention_lcad import InstanceAttentionGuidance  # instance-aware sampling (paper Sec. 3.4)
from .instance_masks import (
    assign_regions_to_phrases,
    check_mask_specs,
    find_phrase_token_spans,
    is_prompt_spec,
    prepare_instance_masks,
    resolve_instance_inputs,
)


logger = logging.get_logger(__name__)

# The released sampler: DDIM over SD1.5's "scaled linear" schedule, as in the authors' ldm code.
RELEASED_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

# The name `model_index.json` gives the L-CAD model classes' library. With this package installed it resolves to
# the package; in a saved folder, `<component>/lcad_pipeline.py` provides the same classes as remote code.
_LIBRARY_NAME = "lcad_pipeline"
_CUSTOM_COMPONENTS = ("unet", "vae")
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", flags=re.MULTILINE)

EXAMPLE_DOC_STRING = """
Examples:
```py
>>> from PIL import Image
>>> from lcad_pipeline import LCADPipeline

>>> pipe = LCADPipeline.from_pretrained("path/to/lcad-coco")  # e.g. the output of `lcad convert`
>>> gray = Image.open("old_photo.jpg")
>>> image = pipe(gray, "a red car parked beside a green tree", generator=torch.manual_seed(0)).images[0]
>>> image.size == gray.size
True
```
"""


@dataclass
class LCADPipelineOutput(BaseOutput):
    """
    Output of [`LCADPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The colourised images at their inputs' sizes: PIL images, a (B, H, W, 3) array or a (B, 3, H, W) tensor in
            [0, 1] (a list when the inputs differ in size), or the final latents for `output_type="latent"`.
            `num_images_per_prompt` results of each input follow one another.
        phrases (`list[str]`, *optional*):
            With instance masks: the phrases, in the order of `masks` and `attention_maps`.
        masks (`torch.Tensor`, *optional*):
            With instance masks: the masks used, (images, phrases, H, W) float in [0, 1] at the processing size (one
            set per input image; automatic ones as chosen).
        attention_maps (`torch.Tensor`, *optional*):
            With `return_attention_maps`: each phrase's cross-attention, (batch, phrases, h, w) at the latent size,
            averaged over the refined layers and steps (after the automatic-mask steps, if any).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    phrases: list[str] | None = None
    masks: torch.Tensor | None = None
    attention_maps: torch.Tensor | None = None


class LCADPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin):
    r"""
    Language-based colourisation with any-level descriptions (L-CAD).

    Args:
        vae ([`LuminanceAutoencoderKL`]): the SD VAE with the luminance encoder and luminance-guided decoder.
        unet ([`LCADUNet2DConditionModel`]): the noise predictor that also reads the luminance feature.
        text_encoder ([`~transformers.CLIPTextModel`]), tokenizer ([`~transformers.CLIPTokenizer`]): CLIP ViT-L/14.
        scheduler ([`SchedulerMixin`]): any of diffusers' Karras schedulers; DDIM as released by default.
        default_denoising_steps (`int`, defaults to 50): steps when `num_inference_steps` is not given.
        default_processing_resolution (`int`, defaults to 256): longer side the model works at (the released training
            size); 0 means the input's own size.
        luminance_normalization (`str`, defaults to `"official"`): how Lab lightness is normalised for the luminance
            encoder; `"official"` (L/127.5 - 1) is what the released weights were trained with, `"symmetric"`
            (L/50 - 1) spans [-1, 1].
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = []
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    supported_output_types = ("pil", "np", "pt", "latent")

    # The prompt encoding of Stable Diffusion (textual inversion, LoRA scale, clip_skip), reused as is.
    encode_prompt = StableDiffusionPipeline.encode_prompt
    prepare_extra_step_kwargs = StableDiffusionPipeline.prepare_extra_step_kwargs

    def __init__(
        self,
        vae: LuminanceAutoencoderKL,
        unet: LCADUNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: KarrasDiffusionSchedulers,
        default_denoising_steps: int = 50,
        default_processing_resolution: int = 256,
        luminance_normalization: str = "official",
    ):
        super().__init__()
        if luminance_normalization not in LUMINANCE_NORMALIZATIONS:
            raise ValueError(
                f"`luminance_normalization` must be one of {list(LUMINANCE_NORMALIZATIONS)}, got {luminance_normalization!r}."
            )
        if not hasattr(vae, "encode_luminance"):
            raise TypeError(f"`vae` must be a LuminanceAutoencoderKL, got {type(vae).__name__}.")
        if "luminance_channels" not in unet.config:
            raise TypeError(f"`unet` must be an LCADUNet2DConditionModel, got {type(unet).__name__}.")
        if vae.luminance_feature_channels != unet.config.luminance_channels:
            raise ValueError(
                f"The VAE's luminance features have {vae.luminance_feature_channels} channels but the UNet expects "
                f"`luminance_channels={unet.config.luminance_channels}`."
            )
        self.register_modules(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(
            default_denoising_steps=default_denoising_steps,
            default_processing_resolution=default_processing_resolution,
            luminance_normalization=luminance_normalization,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = LCADImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @staticmethod
    def default_scheduler_config() -> dict[str, Any]:
        """The released sampler's DDIM configuration (for `DDIMScheduler(**LCADPipeline.default_scheduler_config())`)."""
        return dict(RELEASED_SCHEDULER_CONFIG)

    # ------------------------------------------------------------------ construction, saving and loading

    @classmethod
    def from_stable_diffusion(cls, pretrained: str | os.PathLike | DiffusionPipeline, **kwargs) -> "LCADPipeline":
        r"""
        An untrained L-CAD pipeline from Stable Diffusion 1.x components: the starting point for training.

        Args:
            pretrained: a `StableDiffusionPipeline` (or any pipeline with vae, unet, text_encoder, tokenizer), or a
                folder / Hub id of one.
            kwargs: passed to `DiffusionPipeline.from_pretrained` when loading, and pipeline settings
                (`default_processing_resolution`, ...).

        The luminance encoder starts from the VAE encoder, every zero-initialised part at zero, so until trained the
        pipeline computes exactly Stable Diffusion conditioned on the text.
        """
        settings = {
            k: kwargs.pop(k) for k in ("default_denoising_steps", "default_processing_resolution", "luminance_normalization") if k in kwargs
        }
        if isinstance(pretrained, (str, os.PathLike)):
            pretrained = DiffusionPipeline.from_pretrained(pretrained, **kwargs)
        components = getattr(pretrained, "components", None)
        if not components or any(name not in components for name in ("vae", "unet", "text_encoder", "tokenizer")):
            raise TypeError("`pretrained` must be a Stable Diffusion pipeline (or a path to one) with vae, unet, text_encoder and tokenizer.")
        vae, unet = components["vae"], components["unet"]
        if not isinstance(vae, AutoencoderKL) or not isinstance(unet, UNet2DConditionModel):
            raise TypeError("`pretrained` must hold an AutoencoderKL `vae` and a UNet2DConditionModel `unet`.")
        lcad_vae = vae if isinstance(vae, LuminanceAutoencoderKL) else LuminanceAutoencoderKL.from_vae(vae)
        lcad_unet = (
            unet
            if isinstance(unet, LCADUNet2DConditionModel)
            else LCADUNet2DConditionModel.from_unet(unet, luminance_channels=lcad_vae.luminance_feature_channels)
        )
        return cls(
            vae=lcad_vae,
            unet=lcad_unet,
            text_encoder=components["text_encoder"],
            tokenizer=components["tokenizer"],
            scheduler=DDIMScheduler(**RELEASED_SCHEDULER_CONFIG),
            **settings,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "LCADPipeline":
        r"""
        Load a saved L-CAD pipeline (a folder or Hub id), like `DiffusionPipeline.from_pretrained`.

        The folder's `model_index.json` names its L-CAD models' library `lcad_pipeline` and ships their code for
        `trust_remote_code` loading; with this package installed its own classes load the weights instead, so no
        remote code runs.
        """
        if cls is LCADPipeline and "custom_pipeline" not in kwargs:
            model_kwargs = {
                k: kwargs[k]
                for k in (
                    "cache_dir", "force_download", "local_files_only", "token", "revision", "torch_dtype",
                    "variant", "use_safetensors", "low_cpu_mem_usage",
                )
                if k in kwargs
            }
            if "dtype" in kwargs:
                model_kwargs["torch_dtype"] = kwargs["dtype"]
            if "unet" not in kwargs:
                kwargs["unet"] = LCADUNet2DConditionModel.from_pretrained(pretrained_model_name_or_path, subfolder="unet", **model_kwargs)
            if "vae" not in kwargs:
                kwargs["vae"] = LuminanceAutoencoderKL.from_pretrained(pretrained_model_name_or_path, subfolder="vae", **model_kwargs)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        for model in (pipe.unet, pipe.vae):
            check_materialized(model)
        card = Path(pretrained_model_name_or_path, "README.md")
        if card.is_file():  # the model card `lcad convert` or training wrote: kept by save_pretrained / push_to_hub
            pipe.model_card = card.read_text(encoding="utf-8")
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        r"""
        Save the pipeline into one folder loadable both with `LCADPipeline.from_pretrained(folder)` and, without this
        package, with `DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)`:
        weights (safetensors by default), configs, `model_index.json`, and the code (`pipeline.py` and its sibling
        files at the top; the model files in `unet/` and `vae/`). Other arguments: see `DiffusionPipeline.save_pretrained`.
        """
        push_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "private", "token", "create_pr", "commit_message") if k in kwargs}
        super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        self._write_remote_code(Path(save_directory))
        card = Path(save_directory, "README.md")
        if getattr(self, "model_card", None) and not card.exists():
            card.write_text(self.model_card, encoding="utf-8")
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", Path(save_directory).name)
            self.push_to_hub(repo_id, **push_kwargs, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        model_card: str | None = None,
    ) -> str:
        r"""
        Upload the pipeline's folder (weights, configs, code files) to the Hub, with its model card as `README.md`:
        `model_card` (the card's text) if given, else the card of the folder the pipeline was loaded from (`lcad
        convert` and the training scripts write one), else diffusers' generic card. Returns the commit URL.
        """
        card = model_card if model_card is not None else getattr(self, "model_card", None)
        if card is None:
            return super().push_to_hub(
                repo_id, commit_message=commit_message, private=private, token=token, create_pr=create_pr,
                safe_serialization=safe_serialization, variant=variant,
            )
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            Path(folder, "README.md").write_text(card, encoding="utf-8")
            return self._upload_folder(folder, repo_id, token=token, commit_message=commit_message, create_pr=create_pr)

    def _write_remote_code(self, directory: Path) -> None:
        """Write the code files and point `model_index.json`'s L-CAD models at them."""
        source_dir = Path(__file__).resolve().parent
        pipeline_source = Path(__file__).resolve()
        shutil.copyfile(pipeline_source, directory / "pipeline.py")
        for name in _relative_import_closure(pipeline_source):
            shutil.copyfile(source_dir / f"{name}.py", directory / f"{name}.py")

        # diffusers loads `<component>/lcad_pipeline.py` as each L-CAD model's remote code, into one shared module
        # namespace and copying only the files that module imports directly: so one shim, identical in every
        # component folder, imports every model file directly.
        models = {component: getattr(self, component) for component in _CUSTOM_COMPONENTS}
        needed: list[str] = []
        for model in models.values():
            module_name = type(model).__module__.rsplit(".", 1)[-1]
            for name in [*_relative_import_closure(source_dir / f"{module_name}.py"), module_name]:
                if name not in needed:
                    needed.append(name)
        shim = "\n".join(
            [
                f'"""Remote code of the L-CAD models: model_index.json names their library `{_LIBRARY_NAME}`."""',
                *[f"from .{name} import *  # noqa: F401,F403" for name in needed],
                "",
            ]
        )
        index_path = directory / "model_index.json"
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["_class_name"] = type(self).__name__
        for component, model in models.items():
            index[component] = [_LIBRARY_NAME, type(model).__name__]
            (directory / component / f"{_LIBRARY_NAME}.py").write_text(shim, encoding="utf-8")
            for name in needed:
                shutil.copyfile(source_dir / f"{name}.py", directory / component / f"{name}.py")
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ inputs

    def check_inputs(
        self,
        image,
        prompt,
        negative_prompt,
        num_inference_steps,
        guidance_scale,
        processing_resolution,
        num_images_per_prompt,
        generator,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        output_type,
        callback_on_step_end_tensor_inputs,
        instance_masks=None,
        phrases=None,
        masks=None,
        instance_guidance=None,
        segmenter=None,
        return_attention_maps=False,
    ) -> tuple[int, dict | None]:
        """
        Validate the call's arguments before any work; returns the number of input images and the checked
        instance-aware sampling inputs (`None` without phrases).
        """
        instance_inputs = self.check_instance_inputs(
            prompt, prompt_embeds, instance_masks, phrases, masks, instance_guidance, segmenter, return_attention_maps
        )
        if image is None:
            raise ValueError("`image` is required: the grey (or colour) photo to colourise.")
        if not is_valid_image_input(image):
            raise TypeError(
                "`image` must be a PIL image, a numpy array (HxW or HxWxC), a torch tensor (BxCxHxW) or a non-empty "
                f"list of them, got {type(image).__name__}."
            )
        num_images = count_images(image)
        if num_images == 0:
            raise ValueError("`image` holds no images.")

        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise TypeError(f"`{name}` must be a string or a list of strings, got {type(value).__name__}.")
            if len(value) != num_images:
                raise ValueError(f"`{name}` has {len(value)} entries but `image` has {num_images} images.")
        for name, value in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.ndim != 3:
                raise ValueError(f"`{name}` must be a (batch, tokens, dim) tensor.")
            if value.shape[0] != num_images:
                raise ValueError(f"`{name}` has batch size {value.shape[0]} but `image` has {num_images} images.")
        if negative_prompt_embeds is not None and prompt_embeds is None:
            raise ValueError("`negative_prompt_embeds` needs `prompt_embeds`.")
        if prompt_embeds is not None and negative_prompt_embeds is not None and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError("`prompt_embeds` and `negative_prompt_embeds` must have the same shape.")

        if num_inference_steps is not None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        if not isinstance(guidance_scale, (int, float)) or not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a number >= 0, got {guidance_scale!r}.")
        if processing_resolution is not None and (not isinstance(processing_resolution, int) or processing_resolution < 0):
            raise ValueError(f"`processing_resolution` must be an integer >= 0 (0: the input's size), got {processing_resolution!r}.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        if isinstance(generator, list) and len(generator) != num_images * num_images_per_prompt:
            raise ValueError(
                f"`generator` has {len(generator)} generators but {num_images * num_images_per_prompt} images are made."
            )
        if latents is not None and (not isinstance(latents, torch.Tensor) or latents.ndim != 4):
            raise ValueError("`latents` must be a (batch, channels, height, width) tensor.")
        if output_type not in self.supported_output_types:
            raise ValueError(f"`output_type` must be one of {self.supported_output_types}, got {output_type!r}.")
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}, got "
                f"{callback_on_step_end_tensor_inputs}."
            )
        return num_images, instance_inputs

    def prepare_luminance(
        self, lightness: list[torch.Tensor], size: tuple[int, int], device: torch.device, dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """Luminance features of the inputs' lightness resized to the processing `size` (one batch, no gradients)."""
        low = torch.cat([self.image_processor.resize(lum, size, mode="bilinear") for lum in lightness])
        luminance = self.image_processor.normalize_luminance(
            low, self.config.luminance_normalization, channels=self.vae.config.luminance_in_channels
        )
        with torch.no_grad():
            return self.vae.encode_luminance(luminance.to(device=device, dtype=dtype))

    def prepare_latents(self, batch_size, num_channels, height, width, dtype, device, generator, latents=None):
        shape = (batch_size, num_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape} for these inputs, got {tuple(latents.shape)}.")
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    # ------------------------------------------------------------------ instance-aware sampling (paper Sec. 3.4)

    instance_guidance_settings = (
        "strength", "mode", "layers", "resolutions", "step_fraction", "iterations", "reduction", "auto_mask_steps"
    )

    def check_instance_inputs(
        self, prompt, prompt_embeds, instance_masks, phrases, masks, instance_guidance, segmenter, return_attention_maps
    ) -> dict | None:
        """
        Validate the instance-aware sampling arguments (see `__call__`); `None` when no phrase is given. Returns the
        phrases, their mask specs (`None`: automatic), the argument named in errors, the phrases' token positions,
        the `InstanceAttentionGuidance` settings, the automatic phrases and the steps whose attention chooses them.
        """
        if instance_masks is None and phrases is None and masks is None:
            for name, value in (("instance_guidance", instance_guidance), ("segmenter", segmenter)):
                if value is not None:
                    raise ValueError(f"`{name}` needs `instance_masks` (or `phrases` / `masks`).")
            if return_attention_maps:
                raise ValueError("`return_attention_maps` needs `instance_masks` (or `phrases` / `masks`).")
            return None
        if prompt is None or prompt_embeds is not None:
            raise ValueError("Instance masks need the text `prompt` (not `prompt_embeds`) to find their phrases in.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if len(set(prompts)) != 1:
            raise ValueError("Instance masks need one prompt for all images; `prompt` holds different ones.")
        phrase_list, specs, argument = resolve_instance_inputs(prompts[0], instance_masks, phrases, masks)
        token_indices = find_phrase_token_spans(
            self.tokenizer, prompts[0], phrase_list, argument="instance_masks" if instance_masks is not None else "phrases"
        )
        specs = [None] * len(phrase_list) if specs is None else specs
        check_mask_specs(specs, phrase_list, argument)
        automatic = [p for p, spec in enumerate(specs) if spec is None]
        if automatic and not hasattr(segmenter, "propose_regions"):
            raise ValueError(
                f"`segmenter`: the phrases {[phrase_list[p] for p in automatic]} have no mask; automatic masks need a "
                "segmenter with region proposals, e.g. `lcad_pipeline.sam_masks.SamSegmenter.from_checkpoint(path)`."
            )
        if segmenter is not None and any(is_prompt_spec(spec) for spec in specs) and not hasattr(segmenter, "segment"):
            raise ValueError("`segmenter` must have a `segment(image, prompts)` method to turn boxes / points into masks.")
        if instance_guidance is not None and not isinstance(instance_guidance, dict):
            raise ValueError(f"`instance_guidance` must be a dict of settings {self.instance_guidance_settings}.")
        settings = dict(instance_guidance or {})
        unknown = sorted(set(settings) - set(self.instance_guidance_settings))
        if unknown:
            raise ValueError(f"`instance_guidance`: unknown settings {unknown}; known: {self.instance_guidance_settings}.")
        auto_mask_steps = settings.pop("auto_mask_steps", 1)
        if not isinstance(auto_mask_steps, int) or auto_mask_steps < 1:
            raise ValueError(f"`instance_guidance`: `auto_mask_steps` must be an integer >= 1, got {auto_mask_steps!r}.")
        try:
            InstanceAttentionGuidance(None, token_indices, **settings)
        except (TypeError, ValueError) as error:
            raise ValueError(f"`instance_guidance`: {error}") from None
        return {
            "phrases": phrase_list,
            "specs": specs,
            "argument": argument,
            "token_indices": token_indices,
            "settings": settings,
            "automatic": automatic,
            "auto_mask_steps": auto_mask_steps,
        }

    def prepare_instance_guidance(self, checked: dict, lightness, sizes, size, segmenter, return_attention_maps):
        """
        The phrases' masks at the processing `size`, `(images, phrases, H, W)` (automatic ones still zero), the region
        proposals for automatic masks (one `(R, H, W)` tensor per image), and the guidance for the denoising loop.
        """
        phrases, automatic = checked["phrases"], checked["automatic"]
        segment = segmenter is not None and any(is_prompt_spec(spec) for spec in checked["specs"])
        masks, regions = [], []
        for lum, image_size in zip(lightness, sizes):
            masks.append(
                prepare_instance_masks(
                    checked["specs"], phrases, size, image_size=image_size, argument=checked["argument"],
                    image=lightness_to_gray_rgb(lum) if segment else None, segmenter=segmenter if segment else None,
                )
            )
            if automatic:
                proposals = segmenter.propose_regions(lightness_to_gray_rgb(self.image_processor.resize(lum, size)))[0]
                if len(proposals) < len(automatic):
                    raise ValueError(
                        f"`segmenter` proposed {len(proposals)} regions for {len(automatic)} phrases without masks; give "
                        "some phrases masks, boxes or points, or relax the segmenter's thresholds."
                    )
                regions.append(proposals.to(torch.float32))
        masks = torch.stack(masks)
        guidance = InstanceAttentionGuidance(
            None if automatic else masks,
            checked["token_indices"],
            store_attention_maps=return_attention_maps or bool(automatic),
            **checked["settings"],
        )
        return masks, regions, guidance

    @staticmethod
    def assign_automatic_masks(guidance, masks, regions, automatic, num_images_per_prompt, return_attention_maps):
        """Give each automatic phrase the region where its recorded attention concentrates; start refining."""
        maps = guidance.attention_maps()
        for k, image_regions in enumerate(regions):
            chosen = assign_regions_to_phrases(maps[k * num_images_per_prompt, automatic], image_regions)
            masks[k, automatic] = image_regions[chosen]
        guidance.set_masks(masks)
        guidance.store_attention_maps = return_attention_maps
        guidance.reset_attention_maps()

    # ------------------------------------------------------------------ properties used by callbacks

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1

    @property
    def cross_attention_kwargs(self):
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    # ------------------------------------------------------------------ the call

    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 5.0,
        processing_resolution: int | None = None,
        preserve_luminance: bool = True,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        instance_masks: dict[str, Any] | None = None,
        phrases: list[str] | None = None,
        masks: list[Any] | None = None,
        instance_guidance: dict[str, Any] | None = None,
        segmenter: Any | None = None,
        return_attention_maps: bool = False,
    ) -> LCADPipelineOutput | tuple:
        r"""
        Colourise `image` following `prompt`.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The photo(s): PIL of any mode, numpy HxW / HxWxC (uint8, uint16 or float in [0, 1]), torch (B, C, H, W)
                float in [0, 1]. Colour inputs are reduced to their Lab lightness first. Any size and aspect ratio.
            prompt (`str` or `list[str]`, *optional*):
                The description: colours of every object, of a few, or none. Empty or `None` colourises automatically.
            negative_prompt (`str` or `list[str]`, *optional*): the unconditional branch of CFG (default: `""`, as released).
            num_inference_steps (`int`, *optional*): denoising steps (default: the pipeline's `default_denoising_steps`).
            timesteps, sigmas (*optional*): custom schedules, for schedulers that support them.
            guidance_scale (`float`, defaults to 5.0): classifier-free guidance; <= 1 disables it.
            processing_resolution (`int`, *optional*): longer side the model works at, a multiple of the VAE factor
                after rounding (default: the pipeline's `default_processing_resolution`; 0: the input's own size).
            preserve_luminance (`bool`, defaults to `True`): put the input's full-resolution lightness back into the
                result (Lab), so edges stay sharp and the grey values are exactly kept.
            num_images_per_prompt (`int`, defaults to 1): results per input image.
            eta (`float`, defaults to 0.0): DDIM's eta.
            generator, latents: randomness as in other diffusers pipelines; `latents` at the processing size.
            prompt_embeds, negative_prompt_embeds (*optional*): precomputed CLIP embeddings, one row per input image.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            cross_attention_kwargs (`dict`, *optional*): passed to the attention processors (e.g. `{"scale": 0.5}` for LoRA).
            clip_skip (`int`, *optional*): CLIP layers to skip.
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in other diffusers pipelines.
            instance_masks (`dict[str, mask]`, *optional*):
                Instance-aware sampling (paper Sec. 3.4): `{phrase: mask}`, each phrase a part of `prompt` whose
                colour should land on its mask. A mask is a PIL image, numpy array or tensor of any size, a box
                `(x0, y0, x1, y1)` or points `[(x, y), ...]` in the input's pixels (segmented by `segmenter` if given,
                else a rectangle / discs), or `None` to have it chosen automatically (needs `segmenter`). See
                `instance_masks.py`.
            phrases, masks (`list`, *optional*):
                The same as parallel lists. `masks` alone follows the release: the prompt's comma-separated parts are
                the phrases, in order. `phrases` alone: every mask chosen automatically.
            instance_guidance (`dict`, *optional*):
                Settings of the attention refinement: `strength` (1.0), `mode` (`"single_pass"`, or `"official"`: the
                released two-pass algorithm, mean BCE), `reduction` (`"sum"`; `"mean"` is the release's near no-op),
                `layers`, `resolutions`, `step_fraction`, `iterations` (see `attention_lcad.InstanceAttentionGuidance`),
                and `auto_mask_steps` (1): automatic masks are chosen from the cross-attention of the first this many
                steps, which run unrefined.
            segmenter (*optional*):
                Masks from boxes / points and automatic masks, e.g. `lcad_pipeline.sam_masks.SamSegmenter`.
            return_attention_maps (`bool`, defaults to `False`): return each phrase's cross-attention maps.

        Returns:
            [`LCADPipelineOutput`] or a tuple `(images,)`.
        """
        num_images, instance_inputs = self.check_inputs(
            image,
            prompt,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            processing_resolution,
            num_images_per_prompt,
            generator,
            latents,
            prompt_embeds,
            negative_prompt_embeds,
            output_type,
            callback_on_step_end_tensor_inputs,
            instance_masks=instance_masks,
            phrases=phrases,
            masks=masks,
            instance_guidance=instance_guidance,
            segmenter=segmenter,
            return_attention_maps=return_attention_maps,
        )
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        num_inference_steps = num_inference_steps or self.config.default_denoising_steps
        if processing_resolution is None:
            processing_resolution = self.config.default_processing_resolution

        self._guidance_scale = guidance_scale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device

        # 1. Lightness of each input at full resolution; one processing size for the batch (the first image's).
        lightness = self.image_processor.lightness(image)
        sizes = [tuple(lum.shape[-2:]) for lum in lightness]
        height, width = self.image_processor.processing_size(*sizes[0], processing_resolution)

        # 2. Text.
        if prompt_embeds is None:
            prompt = [""] * num_images if prompt is None else [prompt] * num_images if isinstance(prompt, str) else prompt
        if negative_prompt is None and negative_prompt_embeds is None:
            negative_prompt = [""] * num_images
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )

        # 3. Luminance features, computed once per image.
        features = self.prepare_luminance(lightness, (height, width), device, self.vae.dtype)
        features = [f.repeat_interleave(num_images_per_prompt, dim=0) for f in features]
        unet_luminance = features[-1].to(self.unet.dtype)
        if self.do_classifier_free_guidance:
            unet_luminance = torch.cat([unet_luminance, unet_luminance])
            encoder_hidden_states = torch.cat([negative_prompt_embeds, prompt_embeds])
        else:
            encoder_hidden_states = prompt_embeds

        # 3b. Instance-aware sampling: the phrases' masks and the cross-attention guidance around the denoising loop.
        guidance = None
        instance_context = contextlib.nullcontext()
        if instance_inputs is not None:
            instance_masks_used, regions, guidance = self.prepare_instance_guidance(
                instance_inputs, lightness, sizes, (height, width), segmenter, return_attention_maps
            )
            instance_context = guidance.attached(self.unet, self.do_classifier_free_guidance)

        # 4. Noise and schedule.
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        batch_size = num_images * num_images_per_prompt
        latents = self.prepare_latents(
            batch_size, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 5. Denoising.
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar, instance_context:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

                def predict_noise():
                    return self.unet(
                        latent_model_input,
                        t,
                        encoder_hidden_states=encoder_hidden_states,
                        luminance=unet_luminance,
                        cross_attention_kwargs=self.cross_attention_kwargs,
                        return_dict=False,
                    )[0]

                if guidance is None:
                    noise_pred = predict_noise()
                else:  # instance-aware sampling: one UNet pass ("official" mode: two)
                    guidance.set_step(i, len(timesteps))
                    noise_pred = guidance.run_unet(predict_noise)
                    if regions and i == min(instance_inputs["auto_mask_steps"], len(timesteps)) - 1:
                        self.assign_automatic_masks(
                            guidance, instance_masks_used, regions, instance_inputs["automatic"],
                            num_images_per_prompt, return_attention_maps,
                        )
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    step_locals = locals()  # not inside the comprehension: that has its own scope
                    callback_kwargs = {k: step_locals[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                    if self.do_classifier_free_guidance:
                        encoder_hidden_states = torch.cat([negative_prompt_embeds, prompt_embeds])
                    else:
                        encoder_hidden_states = prompt_embeds
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 6. Luminance-guided decoding and the inputs' sizes.
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(
                latents.to(self.vae.dtype) / self.vae.config.scaling_factor,
                luminance_features=features,
                return_dict=False,
            )[0]
            decoded = (decoded / 2 + 0.5).clamp(0, 1)
            results = [
                self.image_processor.postprocess(
                    decoded[k : k + 1].cpu(),
                    lightness[k // num_images_per_prompt],
                    sizes[k // num_images_per_prompt],
                    preserve_luminance=preserve_luminance,
                )
                for k in range(batch_size)
            ]
            images = self.image_processor.to_output(results, output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        if guidance is None:
            return LCADPipelineOutput(images=images)
        return LCADPipelineOutput(
            images=images,
            phrases=instance_inputs["phrases"],
            masks=instance_masks_used,
            attention_maps=guidance.attention_maps() if return_attention_maps else None,
        )


def _relative_import_closure(path: Path) -> list[str]:
    """Sibling modules `path` needs, directly or through each other (the same `from .x import` diffusers copies)."""
    seen: list[str] = []
    pending = [path]
    while pending:
        current = pending.pop()
        for name in _RELATIVE_IMPORT.findall(current.read_text(encoding="utf-8")):
            if name not in seen:
                seen.append(name)
                pending.append(path.parent / f"{name}.py")
    return seen
