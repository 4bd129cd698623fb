"""`benchmarks/release_emulation.py`: the release's instance-aware sampling rebuilt for timing must compute the real
algorithm (what this port's `mode="official"` computes), do the release's work per step, and leave the models as
it found them."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from lcad_pipeline.attention_lcad import InstanceAttentionGuidance
from lcad_pipeline.instance_masks import find_phrase_token_spans, split_prompt_phrases
from scripts import load_script
from tiny_models import make_tiny_pipeline

PROMPT = "a red car, a green tree, a blue sky"


@pytest.fixture(scope="module")
def emulation():
    return load_script("benchmarks/release_emulation.py", "lcad_release_emulation")


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline()


def make_masks(size: int = 32) -> torch.Tensor:
    masks = torch.zeros(3, size, size)
    masks[0, size // 2 :, : size // 2] = 1  # car: bottom left
    masks[1, :, size // 2 :] = 1  # tree: right half
    masks[2, : size // 3] = 1  # sky: top third
    return masks


def step_inputs(pipe, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    side = size // pipe.vae_scale_factor
    latents = torch.randn(2, 4, side, side, generator=g)
    text = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, generator=g)
    luminance = torch.rand(1, pipe.vae.config.luminance_in_channels, size, size, generator=g) * 0.8 - 1
    return latents, torch.tensor(700), text, torch.cat([luminance, luminance])


def tokens(pipe):
    return find_phrase_token_spans(pipe.tokenizer, PROMPT, split_prompt_phrases(PROMPT))


def official(pipe, inputs, strength):
    latents, t, text, luminance_cfg = inputs
    with torch.no_grad():
        features = pipe.vae.encode_luminance(luminance_cfg)
    guidance = InstanceAttentionGuidance(make_masks(), tokens(pipe), mode="official", strength=strength)
    with torch.no_grad(), guidance.attached(pipe.unet, do_classifier_free_guidance=True):
        guidance.set_step(0, 1)
        return guidance.run_unet(lambda: pipe.unet(latents, t, text, luminance=features[-1], return_dict=False)[0])


def plain(pipe, inputs):
    latents, t, text, luminance_cfg = inputs
    with torch.no_grad():
        return pipe.unet(latents, t, text, luminance=pipe.vae.encode_luminance(luminance_cfg)[-1], return_dict=False)[0]


@pytest.mark.parametrize("strength", [1.0, 2000.0], ids=["released-step", "large-step"])
def test_emulated_step_computes_what_official_mode_computes(emulation, pipe, strength):
    # With self-attention recomputed in pass 2, the release's work (autograd gradient per layer) and this port's
    # closed form give the same UNet output.
    inputs = step_inputs(pipe)
    sampler = emulation.ReleasedInstanceSampler(
        pipe.unet, pipe.vae, make_masks(), tokens(pipe), strength=strength, reuse_self_attention_logits=False
    )
    with sampler.attached():
        emulated = sampler.predict_noise(*inputs)
    ours = official(pipe, inputs, strength)
    effect = (ours - plain(pipe, inputs)).abs().max()
    assert effect > 0
    assert (emulated - ours).abs().max() <= 1e-2 * effect + 1e-6, (effect, (emulated - ours).abs().max())


def test_released_step_does_the_release_work(emulation, pipe):
    inputs = step_inputs(pipe, seed=1)
    sampler = emulation.ReleasedInstanceSampler(pipe.unet, pipe.vae, make_masks(), tokens(pipe))
    seen_grad = []
    hook = pipe.unet.conv_out.register_forward_hook(lambda m, a, out: seen_grad.append(out.requires_grad))
    try:
        with sampler.attached():
            sampler.predict_noise(*inputs)
            procs = dict(sampler.processors)
    finally:
        hook.remove()
    # the luminance encoder ran inside the step; pass 1 recorded a graph, pass 2 did not
    assert sampler.luminance_encodings == 1
    assert seen_grad == [True, False]
    # every attention layer (self and cross) computed its logits once and used the kept ones once
    assert len(procs) == len(pipe.unet.attn_processors)
    assert any("attn1" in n for n in procs) and any("attn2" in n for n in procs)
    assert all((p.computed, p.reused, p.logits) == (1, 1, None) for p in procs.values())


def test_released_colorize_restores_the_models(emulation, pipe):
    before = {n: type(p) for n, p in pipe.unet.attn_processors.items()}
    vae_before = {n: type(p) for n, p in pipe.vae.attn_processors.items()}
    grads_before = [p.requires_grad for p in pipe.unet.parameters()]
    image = PIL.Image.fromarray(np.tile(np.linspace(40, 220, 48, dtype=np.uint8), (48, 1)), mode="L")
    counted = []
    out = emulation.released_colorize(
        pipe, image, PROMPT, make_masks(48), num_inference_steps=3,
        generator=torch.Generator().manual_seed(0), sampler_hook=counted.append,
    )
    again = emulation.released_colorize(pipe, image, PROMPT, make_masks(48), num_inference_steps=3,
                                        generator=torch.Generator().manual_seed(0))
    assert out.size == image.size and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(again))
    assert counted[0].luminance_encodings == 3 + 1  # every step, plus once for the decoder
    assert {n: type(p) for n, p in pipe.unet.attn_processors.items()} == before
    assert {n: type(p) for n, p in pipe.vae.attn_processors.items()} == vae_before
    assert [p.requires_grad for p in pipe.unet.parameters()] == grads_before


def test_bad_input_is_named(emulation, pipe):
    with pytest.raises(ValueError, match="image"):
        emulation.released_colorize(pipe, PIL.Image.new("L", (48, 32)), PROMPT, make_masks(), num_inference_steps=1)
    with pytest.raises(ValueError, match="contiguous"):
        emulation.ReleasedInstanceSampler(pipe.unet, pipe.vae, make_masks()[:2], [[1, 3], [5]])
    with pytest.raises(ValueError, match="masks"):
        emulation.ReleasedInstanceSampler(pipe.unet, pipe.vae, make_masks()[0], [[1, 2]])
    sampler = emulation.ReleasedInstanceSampler(pipe.unet, pipe.vae, make_masks(), tokens(pipe))
    with pytest.raises(RuntimeError, match="attached"):
        sampler.predict_noise(*step_inputs(pipe))
