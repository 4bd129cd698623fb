# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""The released L-CAD sampler's computation, rebuilt from this port's modules, so its cost can be timed.

`benchmarks/speed.py` compares our defaults with "the release's defaults". This port's `mode="official"` gives the
release's *results* with less work (the logit gradient in closed form, luminance encoded once); timing it would
understate what the release costs. This module does the work the released code does (its instance-aware DDIM
sampler and its `apply_model`, see `shared/reference/official-implementation.md`, "Instance-aware sampling as
released"), per DDIM step:

1. The luminance encoder runs again on the grey image, for both classifier-free-guidance halves, without
   gradients (the release's `apply_model` encodes the hint inside every UNet call).
2. Pass 1: the UNet on the CFG batch with autograd recording: the noisy latent requires a gradient and so do the
   cross-attention (`attn2`) weights. Every attention layer, self and cross, computes its logits explicitly (the
   release's attention class, which has no fused kernel) and keeps them.
3. For every cross-attention layer: the BCE between the sigmoid of the conditional half's logits of each phrase's
   tokens and the phrase's mask (nearest-resized), mean-reduced, summed over phrases; `torch.autograd.grad` of it
   with respect to that layer's kept logits; logits -= 1.0 x gradient.
4. Pass 2 without gradients: every attention layer uses the logits kept in pass 1 instead of computing Q K^T (the
   refined ones for cross-attention; pass 1's own for self-attention, as the release does), then CFG and DDIM.

Once per image: the text encodings, the luminance features for the decoder, the luminance-guided decoding (VAE
attention explicit too) and the conversion to an 8-bit RGB image (the release does no Lab recombination and no
resize back; both are left out here, which only flatters the release).

`reuse_self_attention_logits=False` recomputes self-attention in pass 2: the emulation then computes exactly what
this port's `mode="official"` computes (the tests check it), so the timed work is the real algorithm and not an
imitation of its cost.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F


class ReleasedAttnProcessor:
    """Explicit attention as the release computes it: logits kept on one call, used (and dropped) on the next.

    `keep` decides per call whether fresh logits are kept for the next call (pass 1) or the kept ones are used
    (pass 2); `computed` / `reused` count the calls of each kind (tests).
    """

    def __init__(self, name: str, reuse: bool = True):
        self.name = name
        self.reuse = reuse
        self.logits: torch.Tensor | None = None
        self.computed = 0
        self.reused = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection or attn.norm_cross:
            raise NotImplementedError(f"{self.name}: ReleasedAttnProcessor covers the SD1.5 UNet's transformer attention.")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # [(B heads), N, d], the release's layout
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        if self.logits is None or not self.reuse:
            logits = torch.bmm(query, key.transpose(-1, -2)) * attn.scale
            self.logits = logits
            self.computed += 1
        else:
            logits, self.logits = self.logits, None
            self.reused += 1
        out = attn.batch_to_head_dim(torch.bmm(logits.softmax(dim=-1), value))
        return attn.to_out[1](attn.to_out[0](out))


def phrase_slices(token_indices: Sequence[Sequence[int]]) -> list[slice]:
    """The release takes each phrase's tokens as one contiguous range between commas."""
    slices = []
    for tokens in token_indices:
        if list(tokens) != list(range(min(tokens), max(tokens) + 1)):
            raise ValueError(f"The release's phrases are contiguous token ranges; got {list(tokens)}.")
        slices.append(slice(min(tokens), max(tokens) + 1))
    return slices


class ReleasedInstanceSampler:
    """One UNet + luminance VAE driven the way the release's instance-aware DDIM sampler drives its models.

    Use as a context manager (`with sampler.attached(): ...`): it installs `ReleasedAttnProcessor` on every UNet
    attention layer and explicit attention in the VAE, and restores both afterwards.
    """

    def __init__(
        self,
        unet,
        vae,
        masks: torch.Tensor,
        token_indices: Sequence[Sequence[int]],
        strength: float = 1.0,
        reuse_self_attention_logits: bool = True,
    ):
        if masks.ndim != 3:
            raise ValueError(f"`masks` must be [phrases, height, width], got {tuple(masks.shape)}.")
        if masks.shape[0] != len(token_indices):
            raise ValueError(f"{masks.shape[0]} masks for {len(token_indices)} phrases.")
        self.unet, self.vae = unet, vae
        self.masks = masks.float()
        self.slices = phrase_slices(token_indices)
        self.strength = strength
        self.reuse_self = reuse_self_attention_logits
        self.processors: dict[str, ReleasedAttnProcessor] = {}
        self.luminance_encodings = 0

    @contextlib.contextmanager
    def attached(self) -> Iterator["ReleasedInstanceSampler"]:
        from diffusers.models.attention_processor import AttnProcessor

        unet_originals, vae_originals = self.unet.attn_processors, self.vae.attn_processors
        self.processors = {
            name: ReleasedAttnProcessor(name, reuse=("attn2" in name) or self.reuse_self) for name in unet_originals
        }
        self.unet.set_attn_processor(dict(self.processors))
        self.vae.set_attn_processor(AttnProcessor())
        try:
            yield self
        finally:
            self.unet.set_attn_processor(unet_originals)
            self.vae.set_attn_processor(vae_originals)
            self.processors = {}

    def encode_luminance(self, luminance: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            self.luminance_encodings += 1
            return self.vae.encode_luminance(luminance)

    def predict_noise(self, latents: torch.Tensor, t, text: torch.Tensor, luminance_cfg: torch.Tensor) -> torch.Tensor:
        """One step's UNet work: per-step luminance encoding, pass 1 with autograd, the logit steps, pass 2.

        `latents` and `text` are the CFG batch (unconditional half first), `luminance_cfg` the normalised grey image
        for both halves. Returns the UNet output of pass 2 (before the CFG combination).
        """
        if not self.processors:
            raise RuntimeError("ReleasedInstanceSampler.predict_noise must run inside `attached()`.")
        unet_luminance = self.encode_luminance(luminance_cfg)[-1]
        x_in = latents.detach().clone().requires_grad_(True)
        cross_weights = [p for n, p in self.unet.named_parameters() if "attn2" in n]
        flags = [p.requires_grad for p in cross_weights]
        try:
            for p in cross_weights:  # the release's prep_unet: cross-attention weights require gradients
                p.requires_grad_(True)
            with torch.enable_grad():
                self.unet(x_in, t, encoder_hidden_states=text, luminance=unet_luminance, return_dict=False)
                for name, proc in self.processors.items():
                    if "attn2" in name:
                        proc.logits = self._refined(proc.logits)
        finally:
            for p, flag in zip(cross_weights, flags):
                p.requires_grad_(flag)
        with torch.no_grad():
            out = self.unet(x_in, t, encoder_hidden_states=text, luminance=unet_luminance, return_dict=False)[0]
        for proc in self.processors.values():  # nothing may leak into the next step (all were used in pass 2)
            proc.logits = None
        return out.detach()

    def _refined(self, logits: torch.Tensor) -> torch.Tensor:
        """logits - strength * d(sum over phrases of mean BCE)/d(logits), for one cross-attention layer."""
        side = int(round(logits.shape[1] ** 0.5))
        if side * side != logits.shape[1]:
            raise ValueError("The release's refinement assumes square attention maps (square images).")
        masks = F.interpolate(self.masks[None].to(logits.device), size=(side, side), mode="nearest")[0].flatten(1)
        cond = logits[logits.shape[0] // 2 :]  # conditional half of the (B heads) batch
        loss = 0.0
        for p, tokens in enumerate(self.slices):
            probs = torch.sigmoid(cond[..., tokens])
            target = masks[p][None, :, None].expand_as(probs).to(probs.dtype)
            loss = loss + F.binary_cross_entropy(probs, target)
        (grad,) = torch.autograd.grad(loss, logits)
        return logits - self.strength * grad


def released_colorize(
    pipe,
    image: PIL.Image.Image,
    prompt: str,
    masks: torch.Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float = 5.0,
    generator: torch.Generator | None = None,
    scheduler=None,
    reuse_self_attention_logits: bool = True,
    sampler_hook: Callable[[ReleasedInstanceSampler], None] | None = None,
) -> PIL.Image.Image:
    """Colourise `image` at its own (square) size the way the release's instance-aware sampling computes it.

    `pipe` is an `LCADPipeline` whose models, tokenizer and image processor are used; `scheduler` defaults to DDIM
    with the released configuration. `masks` are [phrases, H, W], one per comma-separated phrase of `prompt`.
    """
    from diffusers import DDIMScheduler

    from lcad_pipeline.instance_masks import find_phrase_token_spans, split_prompt_phrases

    if image.size[0] != image.size[1]:
        raise ValueError(f"`image` must be square (the release's refinement assumes it), got {image.size}.")
    device = pipe._execution_device
    scheduler = scheduler or DDIMScheduler(**pipe.default_scheduler_config())
    token_indices = find_phrase_token_spans(pipe.tokenizer, prompt, split_prompt_phrases(prompt))
    sampler = ReleasedInstanceSampler(pipe.unet, pipe.vae, masks, token_indices,
                                      reuse_self_attention_logits=reuse_self_attention_logits)
    if sampler_hook is not None:
        sampler_hook(sampler)
    size = image.size[::-1]
    with torch.no_grad():
        prompt_embeds, negative_embeds = pipe.encode_prompt([prompt], device, 1, True, [""])
        text = torch.cat([negative_embeds, prompt_embeds])
        lightness = pipe.image_processor.lightness(image)[0]
        luminance = pipe.image_processor.normalize_luminance(
            pipe.image_processor.resize(lightness, size), pipe.config.luminance_normalization,
            channels=pipe.vae.config.luminance_in_channels,
        ).to(device=device, dtype=pipe.vae.dtype)
        features = sampler.encode_luminance(luminance)  # for the decoder, once
        luminance_cfg = torch.cat([luminance, luminance])  # the release's hint: the same grey image for both halves
        scheduler.set_timesteps(num_inference_steps, device=device)
        latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, *size, text.dtype, device, generator)
        with sampler.attached():
            for t in scheduler.timesteps:
                noise = sampler.predict_noise(torch.cat([latents] * 2), t, text, luminance_cfg)
                uncond, cond = noise.chunk(2)
                latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents, return_dict=False)[0]
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, luminance_features=features,
                                      return_dict=False)[0]
    rgb = ((decoded[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
    return PIL.Image.fromarray((rgb * 255).round().astype(np.uint8))
