"""Tiny, seeded L-CAD components built in code, after diffusers' own pipeline tests.

Nothing here downloads anything: the CLIP tokenizer is built from an in-memory vocabulary, so tests
run with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from offline_tokenizer import clip_vocab


LATENT_CHANNELS = 4
VAE_CHANNELS = (8, 16)
LUMINANCE_CHANNELS = VAE_CHANNELS[-1]
CROSS_ATTENTION_DIM = 32


def make_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer (bytes, a few whole words, the special tokens), built offline in memory."""
    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def make_text_encoder(vocab_size: int, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=CROSS_ATTENTION_DIM,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
    )
    return CLIPTextModel(config).eval()


def make_stock_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
    ).eval()


def make_stock_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=VAE_CHANNELS,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        latent_channels=LATENT_CHANNELS,
        layers_per_block=2,
        norm_num_groups=4,
        sample_size=32,
    ).eval()


def randomize_zero_initialised(pipe, seed: int = 0, scale: float = 0.05) -> None:
    """Give the zero-initialised L-CAD parts random values, so tests see the luminance actually used."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in pipe.vae.zero_convolutions():
            for p in conv.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
        weight = pipe.unet.conv_in.weight
        extra = weight[:, pipe.unet.config.in_channels :]
        extra.copy_(torch.randn(extra.shape, generator=generator) * scale)


def make_tiny_pipeline(trained: bool = True, seed: int = 0, **pipeline_kwargs):
    """A CPU L-CAD pipeline of tiny random components (processing resolution 32 by default)."""
    from lcad_pipeline import LCADPipeline, LCADUNet2DConditionModel, LuminanceAutoencoderKL

    tokenizer = make_tokenizer()
    pipe = LCADPipeline(
        vae=LuminanceAutoencoderKL.from_vae(make_stock_vae(seed)),
        unet=LCADUNet2DConditionModel.from_unet(make_stock_unet(seed), luminance_channels=LUMINANCE_CHANNELS),
        text_encoder=make_text_encoder(len(tokenizer), seed),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**LCADPipeline.default_scheduler_config()),
        **{"default_processing_resolution": 32, **pipeline_kwargs},
    )
    if trained:
        randomize_zero_initialised(pipe, seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe
