# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""Convert the authors' released L-CAD checkpoints into an `LCADPipeline` folder (`lcad convert`).

The release (`coco_weight.ckpt`, `multi_weight.ckpt`, `auto_weight.ckpt`, `init_model.ckpt`) is one CompVis `ldm`
state dict: `model.diffusion_model.*` (the UNet, first convolution 4 + 512 input channels),
`first_stage_model.*` (the SD VAE plus the luminance encoder `g_encoder`), `cond_stage_model.transformer.*` (CLIP's
text model) and the diffusion schedule buffers. The standard parts are mapped with diffusers' own single-file
conversion code; the L-CAD parts (the luminance encoder's zero convolutions, the UNet's luminance channels) are renamed
here. Every key is accounted for: weights go into a model, known buffers are checked and dropped, anything else is an
error naming it, and so is any model parameter that no checkpoint tensor filled.

Widths are read from the tensors' shapes, so reduced-size checkpoints of the same layout convert too. Models are
built on the meta device and take the checkpoint's (memory-mapped) tensors without copies, so the peak memory stays
near twice the checkpoint's size (the mapped file plus the serialised output).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from diffusers.utils import logging as diffusers_logging
from tqdm.auto import tqdm

logger = diffusers_logging.get_logger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
LUMINANCE_PREFIX = "first_stage_model.g_encoder."
TEXT_PREFIX = "cond_stage_model.transformer."

DEFAULT_TOKENIZER = "openai/clip-vit-large-patch14"
RELEASED_ATTENTION_HEADS = 8
RELEASED_RESOLUTION = 256  # the released working resolution (latent 32x32)
RELEASED_SCALE_FACTOR = 0.18215
RELEASED_LICENSE = "cc-by-nc-4.0"
BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# Buffers of ldm's DDPM/LatentDiffusion: derived from the noise schedule (checked against the scheduler's, then
# dropped; diffusers' scheduler recomputes them).
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",  # the training loss's per-timestep log-variance (constant unless learnt): not used for sampling
    "lvlb_weights",  # variational-bound loss weights, saved by some ldm versions
)
# Other bookkeeping tensors ldm may save beside the weights. `scale_factor` is the latent scale (used, not dropped).
BOOKKEEPING_BUFFERS = (
    "model_ema.decay",  # EMA bookkeeping (the release has no EMA weights; EMA weight tensors are not accepted)
    "model_ema.num_updates",
    "cond_ids",  # the conditioning schedule of `shorten_cond_schedule`
)
SCALE_FACTOR_KEY = "scale_factor"
# CLIP's position ids: a constant buffer (0..76) that newer transformers no longer store.
POSITION_IDS_KEYS = (
    TEXT_PREFIX + "text_model.embeddings.position_ids",
    TEXT_PREFIX + "embeddings.position_ids",
)
# The luminance encoder's output head exists in the release but its forward never uses it.
UNUSED_LUMINANCE_HEAD = tuple(
    LUMINANCE_PREFIX + name for name in ("norm_out.weight", "norm_out.bias", "conv_out.weight", "conv_out.bias")
)


class ConversionError(Exception):
    """A checkpoint that cannot be converted, with a message meant for the user (no traceback needed)."""


# ---------------------------------------------------------------------------------------------------- reading


def load_checkpoint(checkpoint_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    r"""
    Read a released checkpoint as a flat `{key: tensor}` dict without executing pickled code.

    Accepts a torch pickle (`torch.load(weights_only=True)`, memory-mapped when the file is in the zip format) of a
    state dict or of `{"state_dict": state_dict, ...}` (a Lightning checkpoint), or a `.safetensors` file.
    Raises `ConversionError` for a missing, truncated or corrupt file, or one holding anything but tensors.
    """
    path = Path(checkpoint_path)
    if not path.exists():
        raise ConversionError(f"checkpoint {str(path)!r} does not exist.")
    if not path.is_file():
        raise ConversionError(f"checkpoint {str(path)!r} is not a file.")
    if path.stat().st_size == 0:
        raise ConversionError(f"checkpoint {str(path)!r} is empty.")

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                state = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise ConversionError(
                f"cannot read {str(path)!r} as safetensors (truncated or corrupt?): {error}"
            ) from None
    else:
        # Zip-format pickles (torch >= 1.6) can be memory-mapped: tensors are read on use, not copied up front.
        mmap = zipfile.is_zipfile(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if "weights_only" in str(error) or "Unsupported global" in str(error):
                raise ConversionError(
                    f"{str(path)!r} contains pickled objects other than tensors, which are not loaded (loading "
                    "them could execute code). Re-save its state dict alone: "
                    "torch.save(ckpt['state_dict'], 'weights.ckpt'). "
                    f"({message})"
                ) from None
            raise ConversionError(f"cannot read checkpoint {str(path)!r} (truncated or corrupt?): {message}") from None

    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state:
        raise ConversionError(f"{str(path)!r} holds no state dict (found {type(state).__name__}).")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ConversionError(f"{str(path)!r}: these entries are not tensors: {_names(not_tensors)}")
    return dict(state)


# ---------------------------------------------------------------------------------------------------- helpers


def _names(keys: Iterable[str], limit: int = 40) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _require(state: Mapping[str, torch.Tensor], key: str, prefix: str = "") -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"missing weight {prefix + key}")
    return state[key]


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (a regex with one group) in `keys`."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in keys if (m := regex.match(key))})


def released_betas(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """ldm's "linear" schedule (diffusers' "scaled_linear"), computed in float64 as ldm does."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


# ---------------------------------------------------------------------------------------------------- configs


def infer_unet_config(unet_state: Mapping[str, torch.Tensor], attention_heads: int = RELEASED_ATTENTION_HEADS) -> dict:
    """`LCADUNet2DConditionModel` config from an ldm UNet state dict (keys without `model.diffusion_model.`)."""
    p = UNET_PREFIX
    conv_in = _require(unet_state, "input_blocks.0.0.weight", p)
    out_channels = _require(unet_state, "out.2.weight", p).shape[0]
    total_in = conv_in.shape[1]
    latent_channels = out_channels
    luminance_channels = total_in - latent_channels
    if luminance_channels < 1:
        raise ConversionError(
            f"{p}input_blocks.0.0.weight has {total_in} input channels: expected the {latent_channels} latent "
            f"channels plus the luminance feature's (L-CAD's first convolution reads both)."
        )

    # Walk the input blocks: res blocks (with an optional spatial transformer) grouped into levels by downsamplers.
    levels: list[list[tuple[int, int]]] = [[]]  # per level: (channels, transformer depth, 0 if none)
    for i in _indices(unet_state, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in unet_state:
            levels.append([])
            continue
        channels = _require(unet_state, f"input_blocks.{i}.0.out_layers.3.weight", p).shape[0]
        depth = len(_indices(unet_state, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\."))
        levels[-1].append((channels, depth))
    layers = {len(level) for level in levels}
    if len(layers) != 1 or 0 in layers:
        raise ConversionError(f"{p}input_blocks: levels have differing numbers of res blocks {sorted(layers)}.")
    layers_per_block = layers.pop()
    block_out_channels = [level[-1][0] for level in levels]
    depths = [max(depth for _, depth in level) for level in levels]
    down_block_types = ["CrossAttnDownBlock2D" if depth else "DownBlock2D" for depth in depths]

    up_block_types = []
    for level in range(len(levels)):  # deepest first, (layers_per_block + 1) output blocks each
        blocks = range(level * (layers_per_block + 1), (level + 1) * (layers_per_block + 1))
        has_attention = any(f"output_blocks.{j}.1.proj_in.weight" in unet_state for j in blocks)
        up_block_types.append("CrossAttnUpBlock2D" if has_attention else "UpBlock2D")
    if [t.startswith("CrossAttn") for t in up_block_types] != [t.startswith("CrossAttn") for t in down_block_types][
        ::-1
    ]:
        raise ConversionError(f"{p}: attention levels of the input and output blocks do not mirror each other.")
    if "middle_block.1.proj_in.weight" not in unet_state:
        raise ConversionError(f"missing weight {p}middle_block.1.proj_in.weight (the mid block's transformer)")

    to_k = sorted(k for k in unet_state if k.endswith("attn2.to_k.weight"))
    if not to_k:
        raise ConversionError(f"{p}: no cross-attention weights (attn2.to_k) found.")
    cross_attention_dim = unet_state[to_k[0]].shape[1]
    use_linear_projection = unet_state["middle_block.1.proj_in.weight"].ndim == 2
    for channels in block_out_channels:
        if channels % attention_heads:
            raise ConversionError(f"UNet width {channels} is not divisible by {attention_heads} attention heads.")

    time_embedding_dim = _require(unet_state, "time_embed.0.weight", p).shape[0]
    attention_depths = [d for d in depths if d] or [1]
    config = {
        "sample_size": None,  # set from the VAE
        "in_channels": latent_channels,
        "out_channels": out_channels,
        "down_block_types": down_block_types,
        "up_block_types": up_block_types,
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block,
        "cross_attention_dim": cross_attention_dim,
        # diffusers' legacy name: for SD1.x `attention_head_dim` is the number of heads.
        "attention_head_dim": attention_heads,
        "use_linear_projection": use_linear_projection,
        "transformer_layers_per_block": attention_depths[0] if len(set(attention_depths)) == 1 else depths,
        "luminance_channels": luminance_channels,
        "luminance_injection": "conv_in",
    }
    if time_embedding_dim != 4 * block_out_channels[0]:
        config["time_embedding_dim"] = time_embedding_dim
    return config


def infer_vae_config(vae_state: Mapping[str, torch.Tensor]) -> dict:
    """`LuminanceAutoencoderKL` config from the ldm `first_stage_model` state dict (keys without that prefix)."""
    p = VAE_PREFIX
    levels = _indices(vae_state, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise ConversionError(f"missing weights {p}encoder.down.* (the VAE encoder)")
    layers_per_block = len(_indices(vae_state, r"encoder\.down\.0\.block\.(\d+)\."))
    block_out_channels = [
        _require(vae_state, f"encoder.down.{i}.block.{layers_per_block - 1}.conv2.weight", p).shape[0] for i in levels
    ]
    latent_channels = _require(vae_state, "decoder.conv_in.weight", p).shape[1]
    encoder_out = _require(vae_state, "encoder.conv_out.weight", p).shape[0]
    if encoder_out != 2 * latent_channels:
        raise ConversionError(
            f"{p}encoder.conv_out.weight has {encoder_out} outputs; a KL VAE with {latent_channels} latent channels "
            f"has {2 * latent_channels}."
        )
    decoder_layers = len(_indices(vae_state, r"decoder\.up\.0\.block\.(\d+)\."))
    if decoder_layers != layers_per_block + 1:
        raise ConversionError(f"{p}decoder.up.0 has {decoder_layers} res blocks, expected {layers_per_block + 1}.")

    # The luminance encoder must have the VAE encoder's architecture (LuminanceAutoencoderKL builds it so).
    g = "g_encoder."
    g_levels = _indices(vae_state, r"g_encoder\.down\.(\d+)\.")
    g_layers = len(_indices(vae_state, r"g_encoder\.down\.0\.block\.(\d+)\."))
    if not g_levels:
        raise ConversionError(f"missing weights {LUMINANCE_PREFIX}* (the luminance encoder): not an L-CAD checkpoint?")
    g_channels = [_require(vae_state, f"{g}down.{i}.block.{g_layers - 1}.conv2.weight", p).shape[0] for i in g_levels]
    if g_levels != levels or g_layers != layers_per_block or g_channels != block_out_channels:
        raise ConversionError(
            f"the luminance encoder ({len(g_levels)} levels, {g_layers} res blocks, widths {g_channels}) does not "
            f"have the VAE encoder's architecture ({len(levels)} levels, {layers_per_block}, {block_out_channels})."
        )
    return {
        "in_channels": _require(vae_state, "encoder.conv_in.weight", p).shape[1],
        "out_channels": _require(vae_state, "decoder.conv_out.weight", p).shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block,
        "latent_channels": latent_channels,
        "norm_num_groups": 32,
        "sample_size": RELEASED_RESOLUTION,
        "scaling_factor": RELEASED_SCALE_FACTOR,
        "use_quant_conv": any(k.startswith("quant_conv.") for k in vae_state),
        "use_post_quant_conv": any(k.startswith("post_quant_conv.") for k in vae_state),
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in vae_state,
        "luminance_in_channels": _require(vae_state, f"{g}conv_in.weight", p).shape[1],
    }


def clip_vit_l14_text_config():
    """The text model config of openai/clip-vit-large-patch14 (SD1.x's text encoder), built offline."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        projection_dim=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )


def load_text_encoder_config(name_or_path: str | os.PathLike):
    """A `CLIPTextConfig` from a config.json file, a folder holding one (or a `text_encoder/` one), or a Hub id."""
    from transformers import CLIPTextConfig

    path = Path(name_or_path)
    try:
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            data = data.get("text_config", data)  # a full CLIPConfig holds the text config inside
            data.pop("model_type", None)
            return CLIPTextConfig(**{k: v for k, v in data.items() if not k.startswith("_")})
        if path.is_dir() and not (path / "config.json").exists() and (path / "text_encoder" / "config.json").exists():
            return CLIPTextConfig.from_pretrained(str(path / "text_encoder"))
        if path.exists():
            return CLIPTextConfig.from_pretrained(str(path))
        try:  # a Hub id: the local cache first, the Hub only when it can be reached
            return CLIPTextConfig.from_pretrained(str(name_or_path), local_files_only=True)
        except Exception:
            if not _hub_reachable():
                raise ConversionError(
                    f"--text-encoder-config {str(name_or_path)!r} is neither a local file or folder nor cached, "
                    "and the Hugging Face Hub cannot be reached (offline?)."
                ) from None
        return CLIPTextConfig.from_pretrained(str(name_or_path))
    except ConversionError:
        raise
    except Exception as error:
        raise ConversionError(f"cannot load --text-encoder-config {str(name_or_path)!r}: {error}") from None


def infer_text_encoder_config(text_state: Mapping[str, torch.Tensor], base=None, explicit: bool = False):
    r"""
    `CLIPTextConfig` for the checkpoint's CLIP text model (keys without `cond_stage_model.transformer.` and without
    `text_model.`). Widths and depth come from the tensors; the rest (heads, activation, eps) from `base` (CLIP
    ViT-L/14 by default). With an `explicit` base, any disagreement with the tensors is an error.
    """
    base = base or clip_vit_l14_text_config()
    p = TEXT_PREFIX
    token_embedding = _require(text_state, "embeddings.token_embedding.weight", p)
    found = {
        "vocab_size": token_embedding.shape[0],
        "hidden_size": token_embedding.shape[1],
        "max_position_embeddings": _require(text_state, "embeddings.position_embedding.weight", p).shape[0],
        "num_hidden_layers": len(_indices(text_state, r"encoder\.layers\.(\d+)\.")),
        "intermediate_size": _require(text_state, "encoder.layers.0.mlp.fc1.weight", p).shape[0],
    }
    differing = {k: (getattr(base, k), v) for k, v in found.items() if getattr(base, k) != v}
    if differing and explicit:
        details = ", ".join(f"{k}: config {a}, checkpoint {b}" for k, (a, b) in differing.items())
        raise ConversionError(f"--text-encoder-config disagrees with the checkpoint's text encoder ({details}).")
    values = {**base.to_dict(), **found}
    values.pop("model_type", None)
    heads = base.num_attention_heads
    if found["hidden_size"] % heads:
        # Heads cannot be read from weights; keep CLIP's 64-wide heads where possible.
        heads = found["hidden_size"] // 64 if found["hidden_size"] % 64 == 0 else math.gcd(found["hidden_size"], 8)
        logger.warning(
            "The text encoder is %d wide, which %d heads do not divide; using %d heads. Pass --text-encoder-config "
            "to set the right number.",
            found["hidden_size"],
            base.num_attention_heads,
            heads,
        )
    elif differing:
        logger.warning(
            "The checkpoint's text encoder is not CLIP ViT-L/14 (%s); kept %d attention heads. Pass "
            "--text-encoder-config if that is wrong.",
            ", ".join(f"{k}={v[1]}" for k, v in differing.items()),
            heads,
        )
    values["num_attention_heads"] = heads
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if values.get(name) is not None and values[name] >= found["vocab_size"]:
            values[name] = None
    return base.__class__(**values)


# ---------------------------------------------------------------------------------------------------- key mapping


@dataclass
class ConvertedCheckpoint:
    """The checkpoint's tensors split into diffusers state dicts, with the inferred configs."""

    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    unet_config: dict
    vae_config: dict
    text_encoder_config: Any
    dropped: dict[str, str] = field(default_factory=dict)  # ldm key -> why it is not in any model
    source: dict[str, str] = field(default_factory=dict)  # "component.key" -> ldm key it came from


class _Provenance:
    r"""
    Which checkpoint key a converted tensor came from. diffusers' converters move the checkpoint's tensors or take
    views of them (1x1 attention convolutions become linear weights), so a converted tensor is a checkpoint tensor or
    starts at the same memory address as one.
    """

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self._key_of = {id(tensor): key for key, tensor in state.items()}
        self._keys_at: dict[int, list[str]] = {}
        for key, tensor in state.items():
            if tensor.numel():
                self._keys_at.setdefault(tensor.data_ptr(), []).append(key)

    def key_of(self, tensor: torch.Tensor) -> str | None:
        if id(tensor) in self._key_of:
            return self._key_of[id(tensor)]
        keys = self._keys_at.get(tensor.data_ptr(), []) if tensor.numel() else []
        return keys[0] if len(keys) == 1 else None

    def aliases(self, key: str, tensor: torch.Tensor) -> list[str]:
        """Every checkpoint key sharing `tensor`'s memory (tied weights saved once), `key` included."""
        return self._keys_at.get(tensor.data_ptr(), [key]) if tensor.numel() else [key]


@contextlib.contextmanager
def _missing_as_error(prefix: str, strip: str = ""):
    """diffusers' converters index some weights directly (a bias after checking its weight): name a missing one."""
    try:
        yield
    except KeyError as error:
        key = str(error.args[0]) if error.args else "?"
        raise ConversionError(
            f"missing weight {prefix}{key[len(strip) :] if key.startswith(strip) else key}"
        ) from None


def _check_schedule(state: Mapping[str, torch.Tensor]) -> None:
    """The checkpoint's betas must be the scheduler's (scaled_linear 0.00085 -> 0.012 over 1000 steps)."""
    if "betas" not in state:
        logger.info("No `betas` in the checkpoint: the noise schedule could not be checked.")
        return
    rtol = max(1e-4, 2 * torch.finfo(state["betas"].dtype).eps)  # fp16 / bf16 checkpoints store rounded betas
    betas = state["betas"].to(torch.float64)
    expected = released_betas()
    if betas.shape != expected.shape or not torch.allclose(betas, expected, rtol=rtol, atol=1e-8):
        raise ConversionError(
            "the checkpoint's `betas` are not SD1.x's scaled_linear schedule (0.00085 -> 0.012 over 1000 steps) that "
            f"the pipeline's DDIM scheduler uses (got {betas.numel()} values from {betas[0].item():.6g} to "
            f"{betas[-1].item():.6g})."
        )


def split_and_map(state: dict[str, torch.Tensor], text_encoder_config=None) -> ConvertedCheckpoint:
    r"""
    Map a released L-CAD state dict to diffusers key names, accounting for every key.

    Returns the UNet, VAE (with `luminance_encoder.*`) and CLIP text model state dicts and their configs. Raises
    `ConversionError` naming the keys when a key is unknown or a required weight is missing.
    """
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    dropped: dict[str, str] = {}
    for key in SCHEDULE_BUFFERS:
        if key in state:
            dropped[key] = "noise-schedule buffer (the scheduler recomputes it)"
    for key in BOOKKEEPING_BUFFERS:
        if key in state:
            dropped[key] = "training bookkeeping"
    for key in POSITION_IDS_KEYS:
        if key in state:
            dropped[key] = "CLIP position ids (a constant buffer)"
    for key in UNUSED_LUMINANCE_HEAD:
        if key in state:
            dropped[key] = "luminance encoder output head, unused by the released model"
    _check_schedule(state)
    scale_factor = RELEASED_SCALE_FACTOR
    if SCALE_FACTOR_KEY in state:
        scale_factor = float(state[SCALE_FACTOR_KEY].float().item())
        dropped[SCALE_FACTOR_KEY] = "latent scale factor (kept as the VAE's scaling_factor)"

    provenance = _Provenance(state)
    unet_ldm = {k[len(UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    vae_ldm = {k[len(VAE_PREFIX) :]: v for k, v in state.items() if k.startswith(VAE_PREFIX) and k not in dropped}
    text_ldm = {k: v for k, v in state.items() if k.startswith(TEXT_PREFIX) and k not in dropped}
    unknown = [k for k in state if k not in dropped and not k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX))]
    if unknown:
        raise ConversionError(f"unknown keys in the checkpoint (not part of L-CAD's layout): {_names(unknown)}")

    # Configs from shapes (missing structural weights are reported here by name).
    unet_config = infer_unet_config(unet_ldm)
    vae_config = infer_vae_config(vae_ldm)
    vae_config["scaling_factor"] = scale_factor
    unet_config["sample_size"] = RELEASED_RESOLUTION // 2 ** (len(vae_config["block_out_channels"]) - 1)
    if unet_config["luminance_channels"] != vae_config["block_out_channels"][-1]:
        raise ConversionError(
            f"the UNet's first convolution reads {unet_config['luminance_channels']} luminance channels but the "
            f"luminance encoder's last feature has {vae_config['block_out_channels'][-1]}."
        )

    # UNet: diffusers' mapping (conv_in keeps its 4 + luminance input channels).
    with _missing_as_error(UNET_PREFIX):
        unet = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in unet_ldm.items()}, unet_config)

    # VAE proper: the standard mapping, on the encoder/decoder/quant convs only (the converter's substring matching
    # would otherwise also catch the luminance encoder's keys).
    vae_standard = {VAE_PREFIX + k: v for k, v in vae_ldm.items() if not k.startswith("g_encoder.")}
    with _missing_as_error(VAE_PREFIX):
        vae = convert_ldm_vae_checkpoint(vae_standard, vae_config)

    # Luminance encoder: the VAE-encoder mapping applied to `g_encoder`, plus its zero convolutions.
    layers_per_block = vae_config["layers_per_block"]
    luminance_ldm = {k[len("g_encoder.") :]: v for k, v in vae_ldm.items() if k.startswith("g_encoder.")}
    zero_conv = re.compile(r"down\.(\d+)\.zero_conv\.(\d+)\.(weight|bias)$")
    mid_zero_conv = re.compile(r"zero_conv_mid([12])\.(weight|bias)$")
    encoder_part = {}
    for key, tensor in luminance_ldm.items():
        if m := zero_conv.match(key):
            level, block, kind = int(m.group(1)), int(m.group(2)), m.group(3)
            if block >= layers_per_block:
                encoder_part[key] = tensor  # left unmapped: reported as unknown below
                continue
            vae[f"luminance_encoder.down_zero_convs.{level * layers_per_block + block}.{kind}"] = tensor
        elif m := mid_zero_conv.match(key):
            vae[f"luminance_encoder.mid_zero_convs.{int(m.group(1)) - 1}.{m.group(2)}"] = tensor
        else:
            encoder_part["encoder." + key] = tensor
    with _missing_as_error(LUMINANCE_PREFIX, strip="encoder."):
        luminance = convert_ldm_vae_checkpoint(encoder_part, vae_config)
    for key, tensor in luminance.items():
        if key.startswith("encoder."):
            vae["luminance_encoder." + key[len("encoder.") :]] = tensor

    # CLIP text model: strip the prefix; transformers >= 5 has no `text_model.` level, older versions do.
    text = {}
    for key, tensor in convert_ldm_clip_checkpoint(text_ldm).items():
        bare = key[len("text_model.") :] if key.startswith("text_model.") else key
        if bare in text:
            raise ConversionError(
                f"the text encoder weight {TEXT_PREFIX}{bare} appears twice (with and without text_model.)"
            )
        text[bare] = tensor
    text_config = infer_text_encoder_config(text, base=text_encoder_config, explicit=text_encoder_config is not None)

    # Account: every source tensor must have been placed exactly where the converters put it.
    # (diffusers' converters write None for some weights they expect but do not find: those are reported as missing
    # when the models are filled.)
    source: dict[str, str] = {}
    aliased: set[str] = set()
    for component, mapped in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        for key in [k for k, v in mapped.items() if v is None]:
            del mapped[key]
        for key, tensor in mapped.items():
            origin = provenance.key_of(tensor)
            if origin is None:  # not expected: every converter output is a checkpoint tensor or a view of one
                raise ConversionError(f"internal error: {component}.{key} does not come from a checkpoint tensor")
            source[f"{component}.{key}"] = origin
            aliased.update(provenance.aliases(origin, tensor))
    used = set(source.values()) | aliased
    unknown = [k for k in state if k not in used and k not in dropped]
    if unknown:
        raise ConversionError(f"unknown keys in the checkpoint (not part of L-CAD's layout): {_names(unknown)}")
    reasons: dict[str, list[str]] = {}
    for key, why in dropped.items():
        reasons.setdefault(why, []).append(key)
    for why, keys in reasons.items():
        logger.info("not converted (%s): %s", why, ", ".join(sorted(keys)))

    return ConvertedCheckpoint(
        unet=unet,
        vae=vae,
        text_encoder=text,
        unet_config=unet_config,
        vae_config=vae_config,
        text_encoder_config=text_config,
        dropped=dropped,
        source=source,
    )


# ---------------------------------------------------------------------------------------------------- models


def _source_name(component: str, key: str, source: Mapping[str, str]) -> str:
    r"""
    The checkpoint key a missing model weight should have had: found through the nearest mapped weight sharing a
    module with it (e.g. its bias, or a sibling projection), whose names agree below that module in both layouts.
    """
    parts = key.split(".")
    for level in range(len(parts) - 1, 0, -1):
        prefix = f"{component}.{'.'.join(parts[:level])}."
        for mapped, ldm_key in source.items():
            if not mapped.startswith(prefix):
                continue
            relative = mapped[len(prefix) :]
            if ldm_key.endswith("." + relative):
                return f"{ldm_key[: -len(relative)]}{'.'.join(parts[level:])} ({component}.{key})"
    return f"{component}.{key}"


def _checkpoint_dtype(converted: ConvertedCheckpoint) -> torch.dtype:
    return converted.unet["conv_in.weight"].dtype


def _fill(
    model: torch.nn.Module, state: dict[str, torch.Tensor], component: str, converted: ConvertedCheckpoint, dtype
):
    """Give the meta-device `model` the checkpoint's tensors (no copy where the dtype already matches)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        names = [f"{converted.source.get(f'{component}.{k}', k)} (-> {component}.{k})" for k in unexpected]
        raise ConversionError(f"unknown keys in the checkpoint (no {type(model).__name__} weight): {_names(names)}")
    if missing:
        names = [_source_name(component, k, converted.source) for k in missing]
        raise ConversionError(f"missing weights (needed by {type(model).__name__}): {_names(names)}")
    wrong_shape = [
        f"{converted.source[f'{component}.{k}']}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong_shape:
        raise ConversionError(f"weights of an unexpected shape: {_names(wrong_shape, limit=10)}")
    state = {k: (v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    from .loading_lcad import check_materialized

    check_materialized(model)
    return model.eval()


def build_models(converted: ConvertedCheckpoint, dtype: torch.dtype | None = None) -> dict[str, torch.nn.Module]:
    """The UNet, VAE and text encoder holding the converted weights (built on the meta device, then assigned)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextModel

    from .autoencoder_lcad import LuminanceAutoencoderKL
    from .unet_lcad import LCADUNet2DConditionModel

    dtype = dtype or _checkpoint_dtype(converted)
    with init_empty_weights():
        unet = LCADUNet2DConditionModel.from_config(converted.unet_config)
        vae = LuminanceAutoencoderKL.from_config(converted.vae_config)
        text_encoder = CLIPTextModel(converted.text_encoder_config)
    return {
        "unet": _fill(unet, converted.unet, "unet", converted, dtype),
        "vae": _fill(vae, converted.vae, "vae", converted, dtype),
        "text_encoder": _fill(text_encoder, converted.text_encoder, "text_encoder", converted, dtype),
    }


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hub can be asked at all: not in offline mode, and its host answers (or a proxy is configured)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(constants.ENDPOINT)
    try:
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def load_tokenizer(name_or_path: str | os.PathLike):
    r"""
    A CLIP tokenizer from a local folder (or its `tokenizer/` subfolder) or a Hub id. A Hub id is taken from the
    local cache when it is there, and only fetched when the Hub can be reached: offline, this fails at once with a
    clear message instead of retrying for minutes.
    """
    from transformers import CLIPTokenizer

    path = Path(name_or_path)

    def attempt(candidate: str, **kwargs):
        try:
            tokenizer = CLIPTokenizer.from_pretrained(candidate, **kwargs)
        except Exception as error:  # OSError, ValueError, huggingface_hub errors...
            return None, str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        # transformers >= 5 returns an empty tokenizer (special tokens only) when it finds no vocabulary files.
        if len(tokenizer) <= 256:
            return None, "no CLIP vocabulary (vocab.json and merges.txt, or tokenizer.json) found"
        return tokenizer, None

    if path.exists():
        candidates = [str(path / "tokenizer"), str(path)] if (path / "tokenizer").is_dir() else [str(path)]
        for candidate in candidates:
            tokenizer, error = attempt(candidate)
            if tokenizer is not None:
                return tokenizer
        raise ConversionError(f"cannot load the tokenizer from {str(path)!r}: {error}.")

    text = str(name_or_path)
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text:
        raise ConversionError(f"the tokenizer folder {text!r} does not exist.")
    tokenizer, error = attempt(str(name_or_path), local_files_only=True)
    if tokenizer is not None:
        return tokenizer
    if not _hub_reachable():
        raise ConversionError(
            f"the tokenizer {str(name_or_path)!r} is not in the local cache and the Hugging Face Hub cannot be "
            "reached (offline?): pass --tokenizer with a local folder holding a CLIP tokenizer "
            "(vocab.json, merges.txt)."
        )
    tokenizer, error = attempt(str(name_or_path))
    if tokenizer is None:
        raise ConversionError(
            f"cannot load the tokenizer {str(name_or_path)!r} from the Hugging Face Hub: {error}. Pass --tokenizer "
            "with a local folder or another Hub id."
        )
    return tokenizer


# ---------------------------------------------------------------------------------------------------- output


def _prepare_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"output {str(output_dir)!r} exists and is not a folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise ConversionError(f"output folder {str(output_dir)!r} is not empty (pass --overwrite to replace it).")
        if not (output_dir / "model_index.json").exists():
            raise ConversionError(
                f"refusing to replace {str(output_dir)!r}: it is not a pipeline folder (no model_index.json)."
            )


def _replace_folder(staging: Path, output_dir: Path) -> None:
    """Move the finished `staging` folder to `output_dir`, replacing a previous pipeline folder there."""
    if output_dir.exists():
        old = output_dir.with_name(output_dir.name + ".old-" + staging.name.rsplit("-", 1)[-1])
        output_dir.rename(old)
        staging.rename(output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(output_dir)


def convert_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    tokenizer: str | os.PathLike = DEFAULT_TOKENIZER,
    text_encoder_config: str | os.PathLike | None = None,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
):
    r"""
    Convert a released L-CAD checkpoint into an `LCADPipeline` folder and return the pipeline.

    Args:
        checkpoint_path: `coco_weight.ckpt`, `multi_weight.ckpt`, `auto_weight.ckpt`, `init_model.ckpt` (or a
            reduced-size checkpoint of the same layout; a `.safetensors` file too).
        output_dir: the folder to write (safetensors weights, configs, model_index.json, code files, README.md).
        tokenizer: a CLIP tokenizer: a local folder or a Hub id (only fetched if not local).
        text_encoder_config: a CLIPTextConfig (config.json, folder or Hub id) for the text encoder; by default CLIP
            ViT-L/14's, with widths taken from the checkpoint.
        overwrite: replace a non-empty `output_dir` that holds a previous pipeline.
        dtype: `"float32"`, `"float16"`, `"bfloat16"` or a torch dtype; by default the checkpoint's.
        progress: show a progress bar over the conversion's stages.

    Returns:
        `LCADPipeline` holding the converted weights, configured as released (DDIM 50 steps, eta 0, CFG 5.0,
        luminance L/127.5 - 1, 256x256 processing).

    Raises:
        `ConversionError` with a message naming the problem (bad file, unknown or missing keys, bad output folder).
    """
    from diffusers import DDIMScheduler

    from .pipeline_lcad import LCADPipeline

    output_dir = Path(output_dir)
    _prepare_output(output_dir, overwrite)
    if isinstance(dtype, str):
        if dtype == "auto":
            dtype = None
        elif dtype in ("float32", "float16", "bfloat16"):
            dtype = getattr(torch, dtype)
        else:
            raise ConversionError(f"`dtype` must be auto, float32, float16 or bfloat16, got {dtype!r}.")

    stages = ["tokenizer", "reading checkpoint", "mapping keys", "building models", "saving"]
    bar = tqdm(total=len(stages), desc="lcad convert", unit="stage", disable=not progress, file=sys.stderr)

    def stage(index: int) -> None:
        bar.set_postfix_str(stages[index])
        logger.info("%s", stages[index])

    try:
        stage(0)
        base_text_config = load_text_encoder_config(text_encoder_config) if text_encoder_config else None
        clip_tokenizer = load_tokenizer(tokenizer)
        bar.update()

        stage(1)
        state = load_checkpoint(checkpoint_path)
        bar.update()

        stage(2)
        converted = split_and_map(state, text_encoder_config=base_text_config)
        del state
        vocab = converted.text_encoder_config.vocab_size
        if len(clip_tokenizer) > vocab:
            logger.warning(
                "The tokenizer has %d tokens but the text encoder only %d embeddings: prompts with token ids >= %d "
                "will fail. Is --tokenizer the one this checkpoint was trained with?",
                len(clip_tokenizer),
                vocab,
                vocab,
            )
        bar.update()

        stage(3)
        models = build_models(converted, dtype)
        pipe = LCADPipeline(
            vae=models["vae"],
            unet=models["unet"],
            text_encoder=models["text_encoder"],
            tokenizer=clip_tokenizer,
            scheduler=DDIMScheduler(**LCADPipeline.default_scheduler_config()),
            default_denoising_steps=50,
            default_processing_resolution=RELEASED_RESOLUTION,
            luminance_normalization="official",
        )
        bar.update()

        stage(4)
        try:
            output_dir.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.converting-", dir=output_dir.parent))
        except OSError as error:
            raise ConversionError(f"cannot write into {str(output_dir.parent)!r}: {error}") from None
        try:
            pipe.save_pretrained(staging, safe_serialization=True)
            from .hub import write_model_card

            write_model_card(
                staging,
                license=RELEASED_LICENSE,
                base_model=BASE_MODEL,
                converted_from=Path(checkpoint_path).name,
            )
            _replace_folder(staging, output_dir)
        except OSError as error:  # disk full, permissions...
            shutil.rmtree(staging, ignore_errors=True)
            raise ConversionError(f"cannot write {str(output_dir)!r}: {error}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        bar.update()
    finally:
        bar.close()
    logger.info("wrote %s", output_dir)
    return pipe


# ---------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the released checkpoint (.ckpt torch pickle or .safetensors)")
    parser.add_argument("output_dir", help="folder to write the LCADPipeline into")
    parser.add_argument(
        "--tokenizer",
        default=DEFAULT_TOKENIZER,
        help=f"CLIP tokenizer: a local folder or a Hub id (default: {DEFAULT_TOKENIZER})",
    )
    parser.add_argument(
        "--text-encoder-config",
        default=None,
        help="CLIPTextConfig (config.json, folder or Hub id) of the text encoder (default: CLIP ViT-L/14's)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights' dtype in the output (default: the checkpoint's)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing pipeline folder")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    """`lcad convert`: 0 on success; 2 with a one-line message on stderr for a user error."""
    package_logger = logging.getLogger("lcad_pipeline")
    handler = None
    if not args.quiet:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("lcad convert: %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
    try:
        convert_checkpoint(
            args.checkpoint,
            args.output_dir,
            tokenizer=args.tokenizer,
            text_encoder_config=args.text_encoder_config,
            overwrite=args.overwrite,
            dtype=args.dtype,
            progress=not args.quiet,
        )
    except ConversionError as error:
        print(f"lcad convert: error: {error}", file=sys.stderr)
        return 2
    except MemoryError:
        print("lcad convert: error: out of memory while converting.", file=sys.stderr)
        return 2
    finally:
        if handler is not None:
            package_logger.removeHandler(handler)
    return 0


__all__ = [
    "ConversionError",
    "ConvertedCheckpoint",
    "build_models",
    "convert_checkpoint",
    "infer_text_encoder_config",
    "infer_unet_config",
    "infer_vae_config",
    "load_checkpoint",
    "split_and_map",
]
