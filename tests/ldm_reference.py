"""The released L-CAD layout and computation, written plainly for tests (no code of the authors).

Two things, both from the facts in the project's reference notes on the authors' release:

* `released_layout_shapes(layout)`: every key and shape of a released checkpoint (CompVis `ldm` layout) for given
  widths. At the full size it reproduces the released key list exactly (checked in tests against
  `ldm_reference_checkpoint_keys.tsv`); with reduced widths it makes small checkpoints of the same layout.
* Functional forwards on such a raw state dict, with ldm's key names and conventions: the luminance encoder
  (`g_encoder`), the luminance-guided decoder, the UNet with its 4 + luminance input channels, ldm's DDIM sampler
  with classifier-free guidance, and the release's luminance preprocessing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Layout:
    """Widths of a checkpoint in the released layout (defaults: the released, full-size model)."""

    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # ldm attention_resolutions 4, 2, 1
    num_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 768
    latent_channels: int = 4
    vae_ch: int = 128
    vae_ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    vae_num_res_blocks: int = 2
    image_channels: int = 3
    text_hidden: int = 768
    text_intermediate: int = 3072
    text_layers: int = 12
    vocab_size: int = 49408
    max_positions: int = 77
    num_timesteps: int = 1000

    @property
    def luminance_channels(self) -> int:
        return self.vae_ch * self.vae_ch_mult[-1]


FULL = Layout()
# Reduced widths for tests: every width a multiple of 32 so GroupNorm(32) works, 8 heads as released.
SMALL = Layout(
    model_channels=32,
    context_dim=64,
    vae_ch=32,
    text_hidden=64,
    text_intermediate=128,
    text_layers=2,
    vocab_size=1000,
)

SCHEDULE_KEYS = (
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
    "logvar",
)


# ---------------------------------------------------------------------------------------------------- layout


def _unet_resblock(shapes, prefix, c_in, c_out, emb):
    shapes[f"{prefix}.in_layers.0.weight"] = (c_in,)
    shapes[f"{prefix}.in_layers.0.bias"] = (c_in,)
    shapes[f"{prefix}.in_layers.2.weight"] = (c_out, c_in, 3, 3)
    shapes[f"{prefix}.in_layers.2.bias"] = (c_out,)
    shapes[f"{prefix}.emb_layers.1.weight"] = (c_out, emb)
    shapes[f"{prefix}.emb_layers.1.bias"] = (c_out,)
    shapes[f"{prefix}.out_layers.0.weight"] = (c_out,)
    shapes[f"{prefix}.out_layers.0.bias"] = (c_out,)
    shapes[f"{prefix}.out_layers.3.weight"] = (c_out, c_out, 3, 3)
    shapes[f"{prefix}.out_layers.3.bias"] = (c_out,)
    if c_in != c_out:
        shapes[f"{prefix}.skip_connection.weight"] = (c_out, c_in, 1, 1)
        shapes[f"{prefix}.skip_connection.bias"] = (c_out,)


def _spatial_transformer(shapes, prefix, c, context, depth):
    shapes[f"{prefix}.norm.weight"] = (c,)
    shapes[f"{prefix}.norm.bias"] = (c,)
    shapes[f"{prefix}.proj_in.weight"] = (c, c, 1, 1)
    shapes[f"{prefix}.proj_in.bias"] = (c,)
    for d in range(depth):
        t = f"{prefix}.transformer_blocks.{d}"
        shapes[f"{t}.attn1.to_q.weight"] = (c, c)
        shapes[f"{t}.attn1.to_k.weight"] = (c, c)
        shapes[f"{t}.attn1.to_v.weight"] = (c, c)
        shapes[f"{t}.attn1.to_out.0.weight"] = (c, c)
        shapes[f"{t}.attn1.to_out.0.bias"] = (c,)
        shapes[f"{t}.ff.net.0.proj.weight"] = (8 * c, c)
        shapes[f"{t}.ff.net.0.proj.bias"] = (8 * c,)
        shapes[f"{t}.ff.net.2.weight"] = (c, 4 * c)
        shapes[f"{t}.ff.net.2.bias"] = (c,)
        shapes[f"{t}.attn2.to_q.weight"] = (c, c)
        shapes[f"{t}.attn2.to_k.weight"] = (c, context)
        shapes[f"{t}.attn2.to_v.weight"] = (c, context)
        shapes[f"{t}.attn2.to_out.0.weight"] = (c, c)
        shapes[f"{t}.attn2.to_out.0.bias"] = (c,)
        for n in (1, 2, 3):
            shapes[f"{t}.norm{n}.weight"] = (c,)
            shapes[f"{t}.norm{n}.bias"] = (c,)
    shapes[f"{prefix}.proj_out.weight"] = (c, c, 1, 1)
    shapes[f"{prefix}.proj_out.bias"] = (c,)


def _unet_shapes(layout: Layout, shapes: dict) -> None:
    p = "model.diffusion_model"
    mc, emb = layout.model_channels, 4 * layout.model_channels
    shapes[f"{p}.time_embed.0.weight"] = (emb, mc)
    shapes[f"{p}.time_embed.0.bias"] = (emb,)
    shapes[f"{p}.time_embed.2.weight"] = (emb, emb)
    shapes[f"{p}.time_embed.2.bias"] = (emb,)
    shapes[f"{p}.input_blocks.0.0.weight"] = (mc, layout.latent_channels + layout.luminance_channels, 3, 3)
    shapes[f"{p}.input_blocks.0.0.bias"] = (mc,)
    chans, ch, block = [mc], mc, 1
    for level, mult in enumerate(layout.channel_mult):
        for _ in range(layout.num_res_blocks):
            _unet_resblock(shapes, f"{p}.input_blocks.{block}.0", ch, mult * mc, emb)
            ch = mult * mc
            if level in layout.attention_levels:
                _spatial_transformer(
                    shapes, f"{p}.input_blocks.{block}.1", ch, layout.context_dim, layout.transformer_depth
                )
            chans.append(ch)
            block += 1
        if level != len(layout.channel_mult) - 1:
            shapes[f"{p}.input_blocks.{block}.0.op.weight"] = (ch, ch, 3, 3)
            shapes[f"{p}.input_blocks.{block}.0.op.bias"] = (ch,)
            chans.append(ch)
            block += 1
    _unet_resblock(shapes, f"{p}.middle_block.0", ch, ch, emb)
    _spatial_transformer(shapes, f"{p}.middle_block.1", ch, layout.context_dim, layout.transformer_depth)
    _unet_resblock(shapes, f"{p}.middle_block.2", ch, ch, emb)
    block = 0
    for level, mult in reversed(list(enumerate(layout.channel_mult))):
        for i in range(layout.num_res_blocks + 1):
            _unet_resblock(shapes, f"{p}.output_blocks.{block}.0", ch + chans.pop(), mult * mc, emb)
            ch = mult * mc
            index = 1
            if level in layout.attention_levels:
                _spatial_transformer(
                    shapes, f"{p}.output_blocks.{block}.1", ch, layout.context_dim, layout.transformer_depth
                )
                index = 2
            if level and i == layout.num_res_blocks:
                shapes[f"{p}.output_blocks.{block}.{index}.conv.weight"] = (ch, ch, 3, 3)
                shapes[f"{p}.output_blocks.{block}.{index}.conv.bias"] = (ch,)
            block += 1
    shapes[f"{p}.out.0.weight"] = (mc,)
    shapes[f"{p}.out.0.bias"] = (mc,)
    shapes[f"{p}.out.2.weight"] = (layout.latent_channels, mc, 3, 3)
    shapes[f"{p}.out.2.bias"] = (layout.latent_channels,)


def _vae_resblock(shapes, prefix, c_in, c_out):
    shapes[f"{prefix}.norm1.weight"] = (c_in,)
    shapes[f"{prefix}.norm1.bias"] = (c_in,)
    shapes[f"{prefix}.conv1.weight"] = (c_out, c_in, 3, 3)
    shapes[f"{prefix}.conv1.bias"] = (c_out,)
    shapes[f"{prefix}.norm2.weight"] = (c_out,)
    shapes[f"{prefix}.norm2.bias"] = (c_out,)
    shapes[f"{prefix}.conv2.weight"] = (c_out, c_out, 3, 3)
    shapes[f"{prefix}.conv2.bias"] = (c_out,)
    if c_in != c_out:
        shapes[f"{prefix}.nin_shortcut.weight"] = (c_out, c_in, 1, 1)
        shapes[f"{prefix}.nin_shortcut.bias"] = (c_out,)


def _vae_mid(shapes, prefix, c):
    _vae_resblock(shapes, f"{prefix}.mid.block_1", c, c)
    shapes[f"{prefix}.mid.attn_1.norm.weight"] = (c,)
    shapes[f"{prefix}.mid.attn_1.norm.bias"] = (c,)
    for name in ("q", "k", "v", "proj_out"):
        shapes[f"{prefix}.mid.attn_1.{name}.weight"] = (c, c, 1, 1)
        shapes[f"{prefix}.mid.attn_1.{name}.bias"] = (c,)
    _vae_resblock(shapes, f"{prefix}.mid.block_2", c, c)


def _vae_encoder(shapes, prefix, layout: Layout, luminance: bool):
    ch, mult = layout.vae_ch, layout.vae_ch_mult
    shapes[f"{prefix}.conv_in.weight"] = (ch, layout.image_channels, 3, 3)
    shapes[f"{prefix}.conv_in.bias"] = (ch,)
    c_in = ch
    for level, m in enumerate(mult):
        c_out = ch * m
        for j in range(layout.vae_num_res_blocks):
            _vae_resblock(shapes, f"{prefix}.down.{level}.block.{j}", c_in, c_out)
            c_in = c_out
        if luminance:
            for j in range(layout.vae_num_res_blocks):
                shapes[f"{prefix}.down.{level}.zero_conv.{j}.weight"] = (c_out, c_out, 1, 1)
                shapes[f"{prefix}.down.{level}.zero_conv.{j}.bias"] = (c_out,)
        if level != len(mult) - 1:
            shapes[f"{prefix}.down.{level}.downsample.conv.weight"] = (c_out, c_out, 3, 3)
            shapes[f"{prefix}.down.{level}.downsample.conv.bias"] = (c_out,)
    _vae_mid(shapes, prefix, c_in)
    if luminance:
        for name in ("zero_conv_mid1", "zero_conv_mid2"):
            shapes[f"{prefix}.{name}.weight"] = (c_in, c_in, 1, 1)
            shapes[f"{prefix}.{name}.bias"] = (c_in,)
    shapes[f"{prefix}.norm_out.weight"] = (c_in,)
    shapes[f"{prefix}.norm_out.bias"] = (c_in,)
    shapes[f"{prefix}.conv_out.weight"] = (2 * layout.latent_channels, c_in, 3, 3)
    shapes[f"{prefix}.conv_out.bias"] = (2 * layout.latent_channels,)


def _vae_decoder(shapes, prefix, layout: Layout):
    ch, mult = layout.vae_ch, layout.vae_ch_mult
    c = ch * mult[-1]
    shapes[f"{prefix}.conv_in.weight"] = (c, layout.latent_channels, 3, 3)
    shapes[f"{prefix}.conv_in.bias"] = (c,)
    _vae_mid(shapes, prefix, c)
    for level in reversed(range(len(mult))):
        c_out = ch * mult[level]
        for j in range(layout.vae_num_res_blocks + 1):
            _vae_resblock(shapes, f"{prefix}.up.{level}.block.{j}", c, c_out)
            c = c_out
        if level != 0:
            shapes[f"{prefix}.up.{level}.upsample.conv.weight"] = (c, c, 3, 3)
            shapes[f"{prefix}.up.{level}.upsample.conv.bias"] = (c,)
    shapes[f"{prefix}.norm_out.weight"] = (c,)
    shapes[f"{prefix}.norm_out.bias"] = (c,)
    shapes[f"{prefix}.conv_out.weight"] = (layout.image_channels, c, 3, 3)
    shapes[f"{prefix}.conv_out.bias"] = (layout.image_channels,)


def _text_shapes(layout: Layout, shapes: dict) -> None:
    p, h = "cond_stage_model.transformer", layout.text_hidden
    shapes[f"{p}.text_model.embeddings.position_ids"] = (1, layout.max_positions)
    shapes[f"{p}.embeddings.token_embedding.weight"] = (layout.vocab_size, h)
    shapes[f"{p}.embeddings.position_embedding.weight"] = (layout.max_positions, h)
    for layer in range(layout.text_layers):
        q = f"{p}.encoder.layers.{layer}"
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{q}.self_attn.{name}.weight"] = (h, h)
            shapes[f"{q}.self_attn.{name}.bias"] = (h,)
        shapes[f"{q}.layer_norm1.weight"] = (h,)
        shapes[f"{q}.layer_norm1.bias"] = (h,)
        shapes[f"{q}.mlp.fc1.weight"] = (layout.text_intermediate, h)
        shapes[f"{q}.mlp.fc1.bias"] = (layout.text_intermediate,)
        shapes[f"{q}.mlp.fc2.weight"] = (h, layout.text_intermediate)
        shapes[f"{q}.mlp.fc2.bias"] = (h,)
        shapes[f"{q}.layer_norm2.weight"] = (h,)
        shapes[f"{q}.layer_norm2.bias"] = (h,)
    shapes[f"{p}.final_layer_norm.weight"] = (h,)
    shapes[f"{p}.final_layer_norm.bias"] = (h,)


def released_layout_shapes(layout: Layout = FULL) -> dict[str, tuple[int, ...]]:
    """Every key of a released L-CAD checkpoint with its shape, for the widths of `layout`."""
    shapes: dict[str, tuple[int, ...]] = {key: (layout.num_timesteps,) for key in SCHEDULE_KEYS}
    _unet_shapes(layout, shapes)
    _vae_encoder(shapes, "first_stage_model.encoder", layout, luminance=False)
    _vae_decoder(shapes, "first_stage_model.decoder", layout)
    shapes["first_stage_model.quant_conv.weight"] = (2 * layout.latent_channels, 2 * layout.latent_channels, 1, 1)
    shapes["first_stage_model.quant_conv.bias"] = (2 * layout.latent_channels,)
    shapes["first_stage_model.post_quant_conv.weight"] = (layout.latent_channels, layout.latent_channels, 1, 1)
    shapes["first_stage_model.post_quant_conv.bias"] = (layout.latent_channels,)
    _vae_encoder(shapes, "first_stage_model.g_encoder", layout, luminance=True)
    _text_shapes(layout, shapes)
    return shapes


def schedule_buffers(num_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012):
    """ldm's registered schedule buffers (float32), from its "linear" (= scaled_linear) betas in float64."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
        "logvar": torch.zeros(num_timesteps, dtype=torch.float64),
    }
    return {k: v.float() for k, v in values.items()}


def random_checkpoint(
    layout: Layout = SMALL, seed: int = 0, dtype: torch.dtype = torch.float32, unet_output_scale: float = 1.0
) -> dict[str, torch.Tensor]:
    r"""
    A checkpoint in the released layout with distinct random values in every weight (the zero convolutions too),
    scaled so activations stay O(1) through the networks: weights ~ N(0, 1/fan_in), norms' scales ~ 1 + N(0, 0.1).

    `unet_output_scale` scales the UNet's last convolution. A random UNet's noise prediction is unrelated to the
    noise, so DDIM's x0 estimate (x - sqrt(1 - a) eps) / sqrt(a) is amplified ~15x at the first steps; with full-size
    outputs, 50 guided steps become chaotic and float32 rounding alone moves the result by ~1e-4. A smaller output
    (eps ~ 0.5 rather than ~2) keeps sampling well-conditioned, so a 1e-4 tolerance detects real differences.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in released_layout_shapes(layout).items():
        if key in SCHEDULE_KEYS:
            continue
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[1]).unsqueeze(0)
            continue
        noise = torch.randn(shape, generator=generator)
        if len(shape) == 1:
            is_norm = any(n in key for n in ("norm", "in_layers.0", "out_layers.0", "out.0")) and key.endswith(
                "weight"
            )
            value = 1.0 + 0.1 * noise if is_norm else 0.05 * noise
        else:
            fan_in = math.prod(shape[1:])
            value = noise / math.sqrt(fan_in)
            if "embedding" in key:
                value = 0.5 * noise
        if key.startswith("model.diffusion_model.out.2."):
            value = value * unet_output_scale
        state[key] = value.to(dtype)
    state.update(schedule_buffers(layout.num_timesteps))
    return state


# ---------------------------------------------------------------------------------------------------- computation


def _conv(x, sd, p, stride=1, padding=None):
    w = sd[p + ".weight"]
    return F.conv2d(x, w, sd[p + ".bias"], stride=stride, padding=w.shape[-1] // 2 if padding is None else padding)


def _gn(x, sd, p, eps):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps)


def _swish(x):
    return x * torch.sigmoid(x)


def vae_resblock(x, sd, p):
    """ldm VAE ResnetBlock without time embedding: GroupNorm(32, eps 1e-6), swish, 3x3 convs, 1x1 nin shortcut."""
    h = _conv(_swish(_gn(x, sd, p + ".norm1", 1e-6)), sd, p + ".conv1")
    h = _conv(_swish(_gn(h, sd, p + ".norm2", 1e-6)), sd, p + ".conv2")
    if p + ".nin_shortcut.weight" in sd:
        x = _conv(x, sd, p + ".nin_shortcut")
    return x + h


def vae_attention(x, sd, p):
    """ldm AttnBlock: single-head spatial self-attention with 1x1 convolutions for q, k, v and the output."""
    h = _gn(x, sd, p + ".norm", 1e-6)
    q, k, v = (_conv(h, sd, f"{p}.{n}") for n in ("q", "k", "v"))
    b, c, hh, ww = q.shape
    q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
    weights = torch.softmax(torch.bmm(q, k.reshape(b, c, hh * ww)) * c**-0.5, dim=2)
    h = torch.bmm(v.reshape(b, c, hh * ww), weights.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(h, sd, p + ".proj_out")


def _vae_downsample(x, sd, p):
    return _conv(F.pad(x, (0, 1, 0, 1)), sd, p, stride=2, padding=0)


def _upsample(x, sd, p):
    return _conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), sd, p)


def luminance_features(sd, luminance, levels=4, num_res_blocks=2, prefix="first_stage_model.g_encoder"):
    """The g_encoder's 10 outputs: per level the zero-conv taps after res blocks 0 and 1, then mid1, mid2."""
    features = []
    h = _conv(luminance, sd, prefix + ".conv_in")
    for level in range(levels):
        for j in range(num_res_blocks):
            h = vae_resblock(h, sd, f"{prefix}.down.{level}.block.{j}")
            features.append(_conv(h, sd, f"{prefix}.down.{level}.zero_conv.{j}"))
        if level != levels - 1:
            h = _vae_downsample(h, sd, f"{prefix}.down.{level}.downsample.conv")
    h = vae_resblock(h, sd, prefix + ".mid.block_1")
    features.append(_conv(h, sd, prefix + ".zero_conv_mid1"))
    h = vae_attention(h, sd, prefix + ".mid.attn_1")
    h = vae_resblock(h, sd, prefix + ".mid.block_2")
    features.append(_conv(h, sd, prefix + ".zero_conv_mid2"))
    return features


def guided_decode(sd, z, features, scale_factor=0.18215, levels=4, num_res_blocks=2):
    """z / scale -> post_quant_conv -> the decoder, adding the features as a stack (last first)."""
    p = "first_stage_model.decoder"
    stack = list(features)
    h = _conv(z / scale_factor, sd, "first_stage_model.post_quant_conv")
    h = _conv(h, sd, p + ".conv_in")
    h = vae_resblock(h, sd, p + ".mid.block_1")
    h = h + stack.pop()
    h = vae_attention(h, sd, p + ".mid.attn_1")
    h = vae_resblock(h, sd, p + ".mid.block_2")
    h = h + stack.pop()
    for level in reversed(range(levels)):
        for j in range(num_res_blocks + 1):
            h = vae_resblock(h, sd, f"{p}.up.{level}.block.{j}")
            if j < num_res_blocks:
                h = h + stack.pop()
        if level != 0:
            h = _upsample(h, sd, f"{p}.up.{level}.upsample.conv")
    assert not stack
    return _conv(_swish(_gn(h, sd, p + ".norm_out", 1e-6)), sd, p + ".conv_out")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def unet_resblock(x, emb, sd, p):
    """ldm ResBlock: GroupNorm32(32, eps 1e-5), SiLU, conv; + Linear(SiLU(emb)); GroupNorm, SiLU, conv; skip."""
    h = _conv(F.silu(_gn(x, sd, p + ".in_layers.0", 1e-5)), sd, p + ".in_layers.2")
    h = h + F.linear(F.silu(emb), sd[p + ".emb_layers.1.weight"], sd[p + ".emb_layers.1.bias"])[:, :, None, None]
    h = _conv(F.silu(_gn(h, sd, p + ".out_layers.0", 1e-5)), sd, p + ".out_layers.3")
    if p + ".skip_connection.weight" in sd:
        x = _conv(x, sd, p + ".skip_connection")
    return x + h


def _attention(x, context, sd, p, heads):
    q = F.linear(x, sd[p + ".to_q.weight"])
    k = F.linear(context, sd[p + ".to_k.weight"])
    v = F.linear(context, sd[p + ".to_v.weight"])
    b, n, inner = q.shape
    d = inner // heads

    def split(t):
        return (
            t.reshape(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3).reshape(t.shape[0] * heads, t.shape[1], d)
        )

    q, k, v = split(q), split(k), split(v)
    sim = torch.einsum("bid,bjd->bij", q, k) * d**-0.5
    out = torch.einsum("bij,bjd->bid", sim.softmax(dim=-1), v)
    out = out.reshape(b, heads, n, d).permute(0, 2, 1, 3).reshape(b, n, inner)
    return F.linear(out, sd[p + ".to_out.0.weight"], sd[p + ".to_out.0.bias"])


def spatial_transformer(x, context, sd, p, heads, depth=1):
    """ldm SpatialTransformer with convolutional proj_in/out (SD1.x): GroupNorm(32, eps 1e-6), blocks, residual."""
    b, c, hh, ww = x.shape
    h = _conv(_gn(x, sd, p + ".norm", 1e-6), sd, p + ".proj_in")
    h = h.permute(0, 2, 3, 1).reshape(b, hh * ww, c)
    for d in range(depth):
        t = f"{p}.transformer_blocks.{d}"

        def ln(y, n):
            return F.layer_norm(y, (c,), sd[f"{t}.norm{n}.weight"], sd[f"{t}.norm{n}.bias"], 1e-5)

        h = _attention(ln(h, 1), ln(h, 1), sd, t + ".attn1", heads) + h
        h = _attention(ln(h, 2), context, sd, t + ".attn2", heads) + h
        projected = F.linear(ln(h, 3), sd[t + ".ff.net.0.proj.weight"], sd[t + ".ff.net.0.proj.bias"])
        value, gate = projected.chunk(2, dim=-1)
        h = F.linear(value * F.gelu(gate), sd[t + ".ff.net.2.weight"], sd[t + ".ff.net.2.bias"]) + h
    h = h.reshape(b, hh, ww, c).permute(0, 3, 1, 2)
    return _conv(h, sd, p + ".proj_out") + x


def unet_eps(sd, x, t, context, luminance, layout: Layout):
    """The released UNet's noise prediction: input concat([latent, luminance feature]) into input_blocks.0."""
    p = "model.diffusion_model"
    heads = layout.num_heads
    t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
    emb = timestep_embedding(t, layout.model_channels).to(x.dtype)
    emb = F.linear(emb, sd[p + ".time_embed.0.weight"], sd[p + ".time_embed.0.bias"])
    emb = F.linear(F.silu(emb), sd[p + ".time_embed.2.weight"], sd[p + ".time_embed.2.bias"])

    h = _conv(torch.cat([x, luminance], dim=1), sd, p + ".input_blocks.0.0")
    skips = [h]
    block = 1
    for level in range(len(layout.channel_mult)):
        for _ in range(layout.num_res_blocks):
            h = unet_resblock(h, emb, sd, f"{p}.input_blocks.{block}.0")
            if level in layout.attention_levels:
                h = spatial_transformer(h, context, sd, f"{p}.input_blocks.{block}.1", heads, layout.transformer_depth)
            skips.append(h)
            block += 1
        if level != len(layout.channel_mult) - 1:
            h = _conv(h, sd, f"{p}.input_blocks.{block}.0.op", stride=2, padding=1)
            skips.append(h)
            block += 1
    h = unet_resblock(h, emb, sd, p + ".middle_block.0")
    h = spatial_transformer(h, context, sd, p + ".middle_block.1", heads, layout.transformer_depth)
    h = unet_resblock(h, emb, sd, p + ".middle_block.2")
    block = 0
    for level in reversed(range(len(layout.channel_mult))):
        for i in range(layout.num_res_blocks + 1):
            h = unet_resblock(torch.cat([h, skips.pop()], dim=1), emb, sd, f"{p}.output_blocks.{block}.0")
            index = 1
            if level in layout.attention_levels:
                h = spatial_transformer(
                    h, context, sd, f"{p}.output_blocks.{block}.1", heads, layout.transformer_depth
                )
                index = 2
            if level and i == layout.num_res_blocks:
                h = _upsample(h, sd, f"{p}.output_blocks.{block}.{index}.conv")
            block += 1
    return _conv(F.silu(_gn(h, sd, p + ".out.0", 1e-5)), sd, p + ".out.2")


def ddim_schedule(alphas_cumprod: torch.Tensor, steps: int, num_timesteps: int = 1000):
    """ldm's DDIM: timesteps range(0, T, T // steps) + 1; alphas and previous alphas (alphas_cumprod[0] last)."""
    timesteps = torch.arange(0, num_timesteps, num_timesteps // steps) + 1
    alphas = alphas_cumprod[timesteps]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
    return timesteps, alphas, alphas_prev


def ddim_sample(sd, x, cond, uncond, luminance, layout: Layout, steps=50, guidance_scale=5.0):
    """ldm DDIM sampling, eta 0, with classifier-free guidance against `uncond` (same luminance for both branches)."""
    timesteps, alphas, alphas_prev = ddim_schedule(sd["alphas_cumprod"], steps, layout.num_timesteps)
    for index in reversed(range(len(timesteps))):
        t = timesteps[index]
        both = unet_eps(sd, torch.cat([x, x]), t, torch.cat([uncond, cond]), torch.cat([luminance, luminance]), layout)
        e_uncond, e_cond = both.chunk(2)
        e = e_uncond + guidance_scale * (e_cond - e_uncond)
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - (1.0 - a_t).sqrt() * e) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e
    return x


def luminance_input(gray_uint8: torch.Tensor) -> torch.Tensor:
    """The released preprocessing of a grey sRGB image (B, 1, H, W) uint8: Lab L (D65) / 127.5 - 1, to 3 channels."""
    c = gray_uint8.double() / 255.0
    linear = torch.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)  # R = G = B, so Y = linear
    delta = 6.0 / 29.0
    f = torch.where(linear > delta**3, linear ** (1.0 / 3.0), linear / (3 * delta**2) + 4.0 / 29.0)
    lightness = 116.0 * f - 16.0
    return (lightness / 127.5 - 1.0).float().repeat(1, 3, 1, 1)
