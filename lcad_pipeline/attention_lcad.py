# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""Instance-aware sampling (L-CAD paper Sec. 3.4, Algorithm 1): cross-attention refined toward phrase masks.

For every selected cross-attention layer (the UNet's ``attn2`` modules) and every phrase, the pre-softmax
attention logits ``x`` of the phrase's tokens (conditional half of the classifier-free guidance batch only) take
a gradient step of ``BCE(sigmoid(x), m)`` toward the phrase's mask ``m``, nearest-resized to the layer's
``h x w``; then softmax and the rest of the attention run as usual. The gradient is computed in closed form:
``d BCE(sigmoid(x), m) / dx = (sigmoid(x) - m) * c`` with ``c = 1`` for the ``"sum"`` reduction and
``c = 1 / (heads * phrase tokens * h * w)`` for the ``"mean"`` reduction. Losses are summed over phrases, so a
token in two phrases gets both gradients.

Two modes:

- ``"single_pass"`` (default): the refinement happens inside the one UNet forward pass of the step, so a step
  costs one UNet pass. A layer's refinement sees the already refined layers before it (in the release every layer
  is refined from an unrefined first pass).
- ``"official"``: the released algorithm. Pass 1 runs the UNet and keeps every selected layer's logits, refined;
  pass 2 runs the UNet again, using the refined logits in place of its own. The release obtains the gradient with
  autograd (so pass 1 also has to keep its graph); here it is the same closed form, so this mode costs two passes,
  not two passes plus a backward.

Reductions. The release mean-reduces the BCE over heads x tokens x h x w, which divides the step by about 10^4 to
10^6 (maximum logit change around 3e-5 on random weights): as released the refinement is close to a no-op. The
default here is ``"sum"``: each element's logit moves by ``strength * (m - sigmoid(x))``, i.e. up to ``strength``
logit units per iteration, up inside the mask and down outside it, so at ``strength=1`` a phrase's attention
weight inside its mask can grow by up to e (about 2.7x) relative to outside in one step: a visible effect on the
colours, still a bounded one. ``reduction="mean"`` (the default of ``mode="official"``) keeps the released step.
With ``"mean"`` the average is taken per image (the release runs one image at a time), so results do not depend on
the batch size.

How the pipeline drives it::

    guidance = InstanceAttentionGuidance(
        masks=masks,                        # float tensor [P, H, W] (or [B, P, H, W], one set per image) in [0, 1]
        token_indices=token_indices,        # P lists of token positions in the encoded prompt (0 = start token)
        strength=1.0, layers="all", resolutions=None, step_fraction=1.0, iterations=1,
        reduction=None,                     # None: "sum" for single_pass, "mean" (released) for official
        mode="single_pass",                 # or "official"
        store_attention_maps=False,
    )
    with guidance.attached(unet, do_classifier_free_guidance=True):   # installs processors, restores on exit
        for i, t in enumerate(timesteps):
            guidance.set_step(i, len(timesteps))
            noise_pred = guidance.run_unet(lambda: unet(latent_model_input, t, encoder_hidden_states=embeds).sample)
    maps = guidance.attention_maps()        # [B, P, h, w] when store_attention_maps, else None

With classifier-free guidance the batch is ``[unconditional; conditional]`` (diffusers' order); only the second
half is refined. Outside the step range, on layers not selected, with ``strength=0`` or without phrases, the
layer runs its original processor (stock SDPA), so ``strength=0`` reproduces plain sampling exactly.

Differences from the release, on purpose: the release caches logits on one attention call and reuses them on the
next, so in plain (non-instance) sampling every second UNet call reuses the previous call's logits; that is a bug
and is not reproduced. Where sigmoid saturates in float32 (logits above about 17) autograd through torch's BCE gives
a zero gradient for a zero target while the closed form gives 1; logits that large do not occur in practice.

This file is Hub remote code: it imports only torch, diffusers and the standard library.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from diffusers.models.attention_processor import Attention
from diffusers.utils import logging


logger = logging.get_logger(__name__)

MODES = ("single_pass", "official")
REDUCTIONS = ("sum", "mean")


class InstanceAttentionGuidance:
    r"""
    Refines the cross-attention of phrase tokens toward phrase masks during sampling (L-CAD's instance-aware
    sampling). See the module docstring for the algorithm and the loop that drives it.

    Args:
        masks (`torch.Tensor` or `None`):
            Float masks in [0, 1], `[P, H, W]` (the same for every image) or `[B, P, H, W]` (one set per image of the
            conditional batch; if B divides that batch, each set is repeated for consecutive images, as
            `num_images_per_prompt` does). Any size: they are nearest-resized to each layer. `None`: nothing is
            refined (attention maps can still be recorded); see `set_masks`.
        token_indices (`list[list[int]]`):
            For each phrase, its token positions in the encoded prompt (see `instance_masks.find_phrase_token_spans`).
        strength (`float`, defaults to 1.0):
            The step size lambda. 0 disables the refinement.
        layers (`str` or `list[str]`, defaults to `"all"`):
            Which cross-attention layers: `"all"`, or regular expressions searched in the layer names (e.g.
            `"up_blocks"`, `"down_blocks.1"`, `"mid_block"`), as diffusers' PAG selects layers.
        resolutions (`list[int]`, *optional*):
            Restrict to layers whose resolution is the latent's divided by one of these factors (1, 2, 4, 8).
        step_fraction (`float` or `(float, float)`, defaults to 1.0):
            The part of the schedule where refinement runs: `f` means the first `f` of the steps, `(a, b)` the steps
            `i` with `a * n <= i < b * n`.
        iterations (`int`, defaults to 1):
            Gradient steps per layer and denoising step.
        reduction (`str`, *optional*):
            `"sum"` or `"mean"` (the release's): see the module docstring. Defaults to `"sum"` for `"single_pass"` and
            `"mean"` for `"official"`.
        mode (`str`, defaults to `"single_pass"`):
            `"single_pass"` or `"official"` (the released two-pass algorithm).
        store_attention_maps (`bool`, defaults to False):
            Record, for each phrase, its attention (softmax probabilities after refinement, conditional half, mean over
            heads and the phrase's tokens) on the selected layers in the active steps; see `attention_maps`.
    """

    def __init__(
        self,
        masks: torch.Tensor | None,
        token_indices: Sequence[Sequence[int]],
        strength: float = 1.0,
        layers: str | Sequence[str] = "all",
        resolutions: Iterable[int] | None = None,
        step_fraction: float | tuple[float, float] = 1.0,
        iterations: int = 1,
        reduction: str | None = None,
        mode: str = "single_pass",
        store_attention_maps: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        if reduction is None:
            reduction = "mean" if mode == "official" else "sum"
        if reduction not in REDUCTIONS:
            raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")
        if int(iterations) != iterations or iterations < 1:
            raise ValueError(f"`iterations` must be an integer >= 1, got {iterations!r}.")
        if isinstance(step_fraction, (int, float)):
            step_fraction = (0.0, float(step_fraction))
        start, end = (float(v) for v in step_fraction)
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"`step_fraction` must be f or (start, end) with 0 <= start <= end <= 1, got {step_fraction}.")
        if isinstance(layers, str):
            layers = None if layers == "all" else [layers]
        elif layers is not None:
            layers = list(layers)
            if not layers or not all(isinstance(p, str) for p in layers):
                raise ValueError(f"`layers` must be 'all' or a non-empty list of layer-name patterns, got {layers!r}.")
        if resolutions is not None:
            resolutions = {int(r) for r in resolutions}
            if not resolutions or any(r < 1 or r & (r - 1) for r in resolutions):
                raise ValueError(f"`resolutions` must be powers of two (1, 2, 4, 8, ...), got {sorted(resolutions)}.")

        self.token_indices = [list(map(int, span)) for span in token_indices]
        if not self.token_indices or any(not span for span in self.token_indices) or any(i < 0 for s in self.token_indices for i in s):
            raise ValueError("`token_indices` must hold one non-empty list of token positions (>= 0) per phrase.")
        self.strength = strength
        self.layers = layers
        self.resolutions = resolutions
        self.step_range = (start, end)
        self.iterations = int(iterations)
        self.reduction = reduction
        self.mode = mode
        self.store_attention_maps = bool(store_attention_maps)
        self.masks: torch.Tensor | None = None
        self.set_masks(masks)

        # phrase -> token selection, over the union of the phrases' tokens
        tokens = sorted({i for span in self.token_indices for i in span})
        self._tokens = tokens
        self._token_index = torch.tensor(tokens, dtype=torch.long)
        selection = torch.zeros(len(self.token_indices), len(tokens))
        column = {tok: k for k, tok in enumerate(tokens)}
        for p, span in enumerate(self.token_indices):
            for tok in span:
                selection[p, column[tok]] = 1.0
        self._selection = selection  # [P, K]

        # per-call state
        self._unet = None
        self._cfg = False
        self._latent_hw: tuple[int, int] | None = None
        self._step_on = True
        self._phase = "single"  # "single" | "record" (official pass 1) | "replay" (official pass 2)
        self._refined_logits: dict[str, torch.Tensor] = {}
        self._maps: dict[str, list] = {}

    # ------------------------------------------------------------------ public API

    def set_masks(self, masks: torch.Tensor | None) -> None:
        """Set (or replace, e.g. after choosing masks from an early step's attention) the phrase masks."""
        if masks is not None:
            if not isinstance(masks, torch.Tensor) or masks.ndim not in (3, 4):
                raise ValueError("`masks` must be a float tensor [P, H, W] or [B, P, H, W].")
            if masks.shape[-3] != len(self.token_indices):
                raise ValueError(
                    f"`masks` has {masks.shape[-3]} masks but `token_indices` has {len(self.token_indices)} phrases."
                )
            masks = masks.float()
            if masks.ndim == 3:
                masks = masks[None]
            if not torch.isfinite(masks).all() or masks.min() < 0 or masks.max() > 1:
                raise ValueError("`masks` values must lie in [0, 1].")
        self.masks = masks
        self._targets_cache: dict = {}

    @property
    def strength(self) -> float:
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"`strength` must be a finite number >= 0, got {value}.")
        self._strength = value
        self._targets_cache = {}  # the cached targets include the strength

    @property
    def refines(self) -> bool:
        """Whether this guidance changes the attention at all (strength > 0, masks set)."""
        return self.strength > 0 and self.masks is not None

    @contextlib.contextmanager
    def attached(self, unet: torch.nn.Module, do_classifier_free_guidance: bool = True):
        """Install the processors on the selected cross-attention layers of `unet` for the duration of the block.

        The previous processors are restored on exit, also when the block raises.
        """
        if self._unet is not None:
            raise RuntimeError("This InstanceAttentionGuidance is already attached to a UNet.")
        selected = []
        for name, module in unet.named_modules():
            if isinstance(module, Attention) and module.is_cross_attention and name.endswith("attn2"):
                if self.layers is None or any(re.search(p, name) for p in self.layers):
                    selected.append((name, module))
        if not selected:
            raise ValueError(f"`layers`={self.layers!r} selects none of the UNet's cross-attention layers.")
        originals = [(module, module.processor) for _, module in selected]
        hook = unet.register_forward_pre_hook(self._capture_latent_size, with_kwargs=True)
        self._unet, self._cfg = unet, bool(do_classifier_free_guidance)
        self._maps = {}
        try:
            for name, module in selected:
                module.set_processor(InstanceAttnProcessor(self, name, module.processor))
            yield self
        finally:
            for module, processor in originals:
                module.set_processor(processor)
            hook.remove()
            self._unet, self._latent_hw, self._phase = None, None, "single"
            self._refined_logits = {}
            self._step_on = True

    def set_step(self, step_index: int, num_steps: int) -> None:
        """Tell the guidance which denoising step comes next (decides whether it is in `step_fraction`)."""
        start, end = self.step_range
        self._step_on = start * num_steps <= step_index < end * num_steps

    @property
    def active(self) -> bool:
        """Whether the processors do anything in the current step (refine or record attention maps)."""
        return self._step_on and (self.refines or self.store_attention_maps)

    def run_unet(self, unet_call: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run one denoising step's UNet evaluation: one call, or the two passes of `mode="official"`."""
        if self.mode != "official" or not (self._step_on and self.refines):
            return unet_call()
        try:
            self._phase = "record"
            unet_call()
            self._phase = "replay"
            return unet_call()
        finally:
            self._phase = "single"
            self._refined_logits = {}

    def reset_attention_maps(self) -> None:
        """Forget the attention maps recorded so far."""
        self._maps = {}

    def attention_maps(self, per_layer: bool = False) -> torch.Tensor | dict[str, torch.Tensor] | None:
        """The recorded per-phrase attention maps, averaged over the recorded steps.

        Returns `[B, P, h, w]` (B: conditional batch; the layers averaged at the largest layer resolution, each map a
        mean of probabilities over heads and the phrase's tokens), or with `per_layer=True` a dict layer name ->
        `[B, P, h_l, w_l]`; `None` when nothing was recorded.
        """
        if not self._maps:
            return None
        layer_maps = {name: total / count for name, (total, count) in self._maps.items()}
        if per_layer:
            return layer_maps
        size = max((m.shape[-2:] for m in layer_maps.values()), key=lambda s: s[0] * s[1])
        resized = [
            m if m.shape[-2:] == size else F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
            for m in layer_maps.values()
        ]
        return torch.stack(resized).mean(0)

    # ------------------------------------------------------------------ internals

    def _capture_latent_size(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        self._latent_hw = tuple(sample.shape[-2:])

    def _layer_size(self, num_pixels: int) -> tuple[int, int, int]:
        """(h, w, factor) of a layer with `num_pixels` query positions, from the latent size of this UNet call."""
        if self._latent_hw is None:
            raise RuntimeError("InstanceAttentionGuidance: the UNet has to be called inside `attached(unet)`.")
        h, w = self._latent_hw
        factor = 1
        while h * w > num_pixels:
            h, w, factor = (h + 1) // 2, (w + 1) // 2, factor * 2  # stride-2, padding-1 downsampling
        if h * w != num_pixels:
            raise RuntimeError(f"Cannot relate an attention layer of {num_pixels} positions to latent size {self._latent_hw}.")
        return h, w, factor

    def _targets(self, h: int, w: int, heads: int, cond_batch: int, device, dtype):
        """Per layer geometry: token columns, gradient coefficient [K] and target [B|1, 1, h*w, K] (cached)."""
        key = (h, w, heads, cond_batch, device, dtype)
        cached = self._targets_cache.get(key)
        if cached is not None:
            return cached
        masks = self.masks
        if masks.shape[0] != 1:
            if cond_batch % masks.shape[0]:
                raise ValueError(
                    f"`masks` holds {masks.shape[0]} mask sets, which does not divide the conditional batch of {cond_batch}."
                )
            masks = masks.repeat_interleave(cond_batch // masks.shape[0], dim=0)
        resized = F.interpolate(masks, size=(h, w), mode="nearest").flatten(2)  # [B|1, P, h*w]
        weights = self._selection.clone()  # [P, K]
        if self.reduction == "mean":
            weights /= weights.sum(1, keepdim=True) * heads * h * w
        # the step x - strength * (coef * sigmoid(x) - target), with strength folded into coef and target
        target = self.strength * torch.einsum("pk,bpn->bnk", weights, resized)[:, None]  # [B|1, 1, h*w, K]
        coef = self.strength * weights.sum(0)  # [K]
        cached = (
            self._token_index.to(device),
            coef.to(device=device, dtype=dtype),
            target.to(device=device, dtype=dtype),
        )
        self._targets_cache[key] = cached
        return cached

    def _refine(self, logits: torch.Tensor, h: int, w: int, cond: slice) -> torch.Tensor:
        """Gradient step(s) on the phrase tokens' logits of the conditional rows. Writes into `logits`."""
        batch, heads = logits.shape[:2]
        cond_batch = len(range(*cond.indices(batch)))
        if self._tokens[-1] >= logits.shape[-1]:
            raise ValueError(
                f"`token_indices` reaches position {self._tokens[-1]} but the text encoding has {logits.shape[-1]} tokens."
            )
        index, coef, target = self._targets(h, w, heads, cond_batch, logits.device, logits.dtype)
        x = logits[cond, :, :, index]  # [Bc, heads, h*w, K], a copy
        for _ in range(self.iterations):
            x = torch.addcmul(x + target, coef, torch.sigmoid(x), value=-1)
        logits[cond, :, :, index] = x
        return logits

    def _record(self, name: str, probs: torch.Tensor, h: int, w: int, cond: slice) -> None:
        selection = self._selection.to(probs.device, probs.dtype)
        per_token = probs[cond][..., self._token_index.to(probs.device)].mean(1)  # [Bc, h*w, K]
        maps = (per_token @ (selection / selection.sum(1, keepdim=True)).T).transpose(1, 2)  # [Bc, P, h*w]
        maps = maps.reshape(maps.shape[0], maps.shape[1], h, w).detach().float()
        total, count = self._maps.get(name, (0.0, 0))
        self._maps[name] = (total + maps, count + 1)

    def _attend(self, name, attn: Attention, hidden_states, encoder_hidden_states, attention_mask, temb):
        """Cross-attention with explicit logits (AttnProcessor2_0's steps, softmax(logits) @ V in place of SDPA)."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, num_pixels, _ = hidden_states.shape
        h, w, factor = self._layer_size(num_pixels)
        cond = slice(batch_size // 2, None) if self._cfg else slice(None)
        if self._cfg and batch_size % 2:
            raise ValueError(f"With classifier-free guidance the UNet batch must be even, got {batch_size}.")
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = value.shape[-1] // attn.heads
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        refine = self.refines and (self.resolutions is None or factor in self.resolutions)
        if self._phase == "replay" and refine:
            logits = self._refined_logits.pop(name)
        else:
            query = attn.to_q(hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            key = attn.to_k(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            logits = torch.matmul(query, key.transpose(-1, -2)).mul_(attn.scale)
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            if attention_mask is not None:
                logits = logits + attention_mask
            if refine:
                if self._phase == "record":
                    self._refined_logits[name] = self._refine(logits.clone(), h, w, cond)
                else:
                    logits = self._refine(logits, h, w, cond)
        probs = logits.softmax(dim=-1)
        if self.store_attention_maps and self._phase != "record":
            self._record(name, probs, h, w, cond)
        hidden_states = torch.matmul(probs.to(value.dtype), value)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class InstanceAttnProcessor:
    r"""
    Cross-attention processor installed by `InstanceAttentionGuidance.attached` on one `attn2` layer.

    While the guidance is active it computes the attention with explicit logits and refines them; otherwise it
    calls the layer's original processor unchanged.
    """

    def __init__(self, guidance: InstanceAttentionGuidance, name: str, original):
        self.guidance = guidance
        self.name = name
        self.original = original

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        guidance = self.guidance
        if encoder_hidden_states is None or not guidance.active:
            if temb is not None:
                kwargs["temb"] = temb
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        return guidance._attend(self.name, attn, hidden_states, encoder_hidden_states, attention_mask, temb)
