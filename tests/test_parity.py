"""Parity of converted checkpoints with the released computation (issue 4, point 2).

A random checkpoint in the released layout (reduced widths, every weight random, the zero convolutions included) is
converted with `lcad convert`; the pipeline loaded from the output folder must compute what the release computes on
the raw checkpoint (`ldm_reference`, written from the facts about the release) to within 1e-4 in float32: the
luminance preprocessing and features, the UNet's noise prediction, the luminance-guided decode, ldm's DDIM schedule
and update, and a full 50-step DDIM sampling with classifier-free guidance from given latents and prompt embeddings.
"""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler
from ldm_reference import (
    SMALL,
    ddim_sample,
    ddim_schedule,
    guided_decode,
    luminance_features,
    luminance_input,
    random_checkpoint,
    unet_eps,
)
from tiny_models import make_tokenizer

from lcad_pipeline import LCADPipeline
from lcad_pipeline.convert import convert_checkpoint

TOLERANCE = 1e-4
SIZE = 64  # image side: latents 8x8


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    state = random_checkpoint(SMALL, seed=1, unet_output_scale=0.3)
    torch.save(state, root / "lcad.ckpt")
    make_tokenizer().save_pretrained(root / "tokenizer")
    convert_checkpoint(root / "lcad.ckpt", root / "pipeline", tokenizer=root / "tokenizer", progress=False)
    pipe = LCADPipeline.from_pretrained(root / "pipeline")
    pipe.set_progress_bar_config(disable=True)

    generator = torch.Generator().manual_seed(2)
    # A grey photo-like image: smooth shapes plus texture, all 256 levels likely present.
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    pattern = 0.5 + 0.35 * torch.sin(3 * xs) * torch.cos(2 * ys) + 0.1 * torch.rand(SIZE, SIZE, generator=generator)
    gray = (pattern.clamp(0, 1) * 255).round().to(torch.uint8)
    luminance = luminance_input(gray[None, None])
    with torch.no_grad():
        reference_features = luminance_features(state, luminance)
    return {
        "state": state,
        "pipe": pipe,
        "gray": gray,
        "luminance": luminance,
        "features": reference_features,
        "generator": generator,
    }


def test_luminance_preprocessing_matches_release(setup):
    pipe = setup["pipe"]
    image = PIL.Image.fromarray(setup["gray"].numpy(), mode="L")
    lightness = pipe.image_processor.lightness(image)[0]
    normalised = pipe.image_processor.normalize_luminance(lightness, pipe.config.luminance_normalization, channels=3)
    assert pipe.config.luminance_normalization == "official"
    assert _max_error(normalised, setup["luminance"]) < 1e-5


def test_luminance_features(setup):
    pipe = setup["pipe"]
    with torch.no_grad():
        features = pipe.vae.encode_luminance(setup["luminance"])
    reference = setup["features"]
    assert len(features) == len(reference) == 10
    for ours, theirs in zip(features, reference):
        assert theirs.abs().max() > 0.1  # the zero convolutions are random here: real features
        assert _max_error(ours, theirs) < TOLERANCE


@pytest.mark.parametrize("timestep", [1, 481, 981])
def test_unet_noise_prediction(setup, timestep):
    pipe, state, generator = setup["pipe"], setup["state"], setup["generator"]
    latents = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=generator)
    context = torch.randn(2, 77, SMALL.context_dim, generator=generator)
    luminance = torch.cat([setup["features"][-1]] * 2)
    with torch.no_grad():
        ours = pipe.unet(latents, timestep, encoder_hidden_states=context, luminance=luminance).sample
        theirs = unet_eps(state, latents, timestep, context, luminance, SMALL)
    assert theirs.abs().max() > 0.1
    assert _max_error(ours, theirs) < TOLERANCE


def test_unet_reads_the_luminance(setup):
    """The luminance channels of the first convolution are wired: another feature changes the prediction."""
    pipe, generator = setup["pipe"], setup["generator"]
    latents = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=generator)
    context = torch.randn(1, 77, SMALL.context_dim, generator=generator)
    with torch.no_grad():
        a = pipe.unet(latents, 500, encoder_hidden_states=context, luminance=setup["features"][-1]).sample
        b = pipe.unet(latents, 500, encoder_hidden_states=context, luminance=-setup["features"][-1]).sample
    assert _max_error(a, b) > 1e-2


def test_guided_decode(setup):
    pipe, state, generator = setup["pipe"], setup["state"], setup["generator"]
    z = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=generator)
    with torch.no_grad():
        ours = pipe.vae.decode(z / pipe.vae.config.scaling_factor, luminance_features=setup["features"]).sample
        theirs = guided_decode(state, z, setup["features"])
        unguided = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert _max_error(ours, theirs) < TOLERANCE
    assert _max_error(ours, unguided) > 1e-2  # the features are actually added


def test_ddim_scheduler_reproduces_ldm_ddim(setup):
    """diffusers' DDIMScheduler with the pipeline's default config: ldm's timesteps, alphas and eta-0 update."""
    state = setup["state"]
    scheduler = DDIMScheduler(**LCADPipeline.default_scheduler_config())
    assert isinstance(setup["pipe"].scheduler, DDIMScheduler)
    assert dict(setup["pipe"].scheduler.config).items() >= LCADPipeline.default_scheduler_config().items()
    scheduler.set_timesteps(50)
    timesteps, alphas, alphas_prev = ddim_schedule(state["alphas_cumprod"], 50)
    assert scheduler.timesteps.tolist() == timesteps.flip(0).tolist()
    assert timesteps.tolist()[:3] == [1, 21, 41] and timesteps[-1] == 981
    assert _max_error(scheduler.alphas_cumprod, state["alphas_cumprod"]) < 1e-6

    generator = torch.Generator().manual_seed(3)
    for index in reversed(range(50)):
        t = int(timesteps[index])
        x = torch.randn(1, 4, 8, 8, generator=generator)
        e = torch.randn(1, 4, 8, 8, generator=generator)
        a_t, a_prev = alphas[index], alphas_prev[index]
        expected = a_prev.sqrt() * (x - (1 - a_t).sqrt() * e) / a_t.sqrt() + (1 - a_prev).sqrt() * e
        ours = scheduler.step(e, t, x, eta=0.0).prev_sample
        assert _max_error(ours, expected) < 1e-5, t


def test_each_sampling_step(setup):
    """Each step of the pipeline's loop (UNet on both branches, CFG 5, DDIM update) from the pipeline's own latents."""
    pipe, state, generator = setup["pipe"], setup["state"], setup["generator"]
    latents = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=generator)
    cond = torch.randn(1, 77, SMALL.context_dim, generator=generator)
    uncond = torch.randn(1, 77, SMALL.context_dim, generator=generator)
    trajectory = [latents]

    def record(pipeline, step, timestep, tensors):
        trajectory.append(tensors["latents"].clone())
        return {}

    image = PIL.Image.fromarray(setup["gray"].numpy(), mode="L")
    pipe(
        image=image,
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        latents=latents,
        num_inference_steps=10,
        processing_resolution=0,
        output_type="latent",
        callback_on_step_end=record,
    )
    assert len(trajectory) == 11
    guidance_effect = 0.0
    timesteps, alphas, alphas_prev = ddim_schedule(state["alphas_cumprod"], 10)
    luminance = torch.cat([setup["features"][-1]] * 2)
    worst = 0.0
    for step, index in enumerate(reversed(range(10))):
        x = trajectory[step]
        with torch.no_grad():
            e_uncond, e_cond = unet_eps(
                state, torch.cat([x, x]), timesteps[index], torch.cat([uncond, cond]), luminance, SMALL
            ).chunk(2)
        e = e_uncond + 5.0 * (e_cond - e_uncond)
        guidance_effect = max(guidance_effect, _max_error(e_cond, e_uncond))
        a_t, a_prev = alphas[index], alphas_prev[index]
        expected = a_prev.sqrt() * (x - (1 - a_t).sqrt() * e) / a_t.sqrt() + (1 - a_prev).sqrt() * e
        worst = max(worst, _max_error(trajectory[step + 1], expected))
    assert guidance_effect > 1e-2  # the two branches differ, so the guidance formula is tested
    assert worst < TOLERANCE


def test_full_ddim_sampling_with_cfg(setup):
    """50 DDIM steps with CFG 5 from given latents and prompt embeddings, then the luminance-guided decode."""
    pipe, state, generator = setup["pipe"], setup["state"], setup["generator"]
    latents = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=generator)
    cond = torch.randn(1, 77, SMALL.context_dim, generator=generator)
    uncond = torch.randn(1, 77, SMALL.context_dim, generator=generator)
    final = {}

    def record(pipeline, step, timestep, tensors):
        final["latents"] = tensors["latents"].clone()
        return {}

    decoded = pipe(
        image=PIL.Image.fromarray(setup["gray"].numpy(), mode="L"),
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        latents=latents,
        guidance_scale=5.0,
        processing_resolution=0,
        output_type="pt",
        preserve_luminance=False,
        callback_on_step_end=record,
    ).images
    assert pipe.config.default_denoising_steps == 50 and pipe.scheduler.num_inference_steps == 50
    with torch.no_grad():
        theirs = ddim_sample(state, latents, cond, uncond, setup["features"][-1], SMALL, steps=50, guidance_scale=5.0)
        expected = (guided_decode(state, theirs, setup["features"]) / 2 + 0.5).clamp(0, 1)
    assert _max_error(final["latents"], theirs) < TOLERANCE
    assert _max_error(decoded, expected) < TOLERANCE
    assert 0.05 < expected.mean() < 0.95  # not a saturated image: the comparison is meaningful
