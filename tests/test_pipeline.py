"""LCADPipeline on tiny models and a real photo: sizes, lightness, determinism, batching, inputs, errors."""

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from lcad_pipeline import LCADPipeline, LCADPipelineOutput
from lcad_pipeline.image_processor_lcad import rgb_to_lightness
from tiny_models import make_stock_unet, make_stock_vae, make_text_encoder, make_tiny_pipeline, make_tokenizer

STEPS = 2


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline()


def _run(pipe, image, prompt="a red cup", seed=0, **kwargs):
    return pipe(image, prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), **kwargs)


def _lightness(image: PIL.Image.Image) -> torch.Tensor:
    rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0).permute(2, 0, 1)[None]
    return rgb_to_lightness(rgb)


def _psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 100.0) -> float:
    return float(10 * torch.log10(peak**2 / ((a - b) ** 2).mean()))


def test_real_photo_keeps_size_lightness_and_is_deterministic(pipe, coffee_gray):
    out = _run(pipe, coffee_gray)
    assert isinstance(out, LCADPipelineOutput)
    image = out.images[0]
    assert image.size == coffee_gray.size == (600, 400)
    assert image.mode == "RGB"
    assert np.asarray(image).std(axis=2).mean() > 0.5  # not grey
    assert _psnr(_lightness(image), _lightness(coffee_gray)) >= 35.0
    again = _run(pipe, coffee_gray).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(again))
    other_seed = _run(pipe, coffee_gray, seed=1).images[0]
    assert not np.array_equal(np.asarray(image), np.asarray(other_seed))


def test_lightness_kept_even_for_out_of_gamut_colours(coffee_gray):
    """Strongly coloured predictions (here: an exaggerated decoder) still keep the input's lightness."""
    pipe = make_tiny_pipeline()
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.mul_(25)
    image = _run(pipe, coffee_gray).images[0]
    assert np.asarray(image).std(axis=2).mean() > 5
    assert _psnr(_lightness(image), _lightness(coffee_gray)) >= 35.0


def test_without_preserve_luminance_the_output_is_the_upsampled_prediction(pipe, coffee_gray):
    image = _run(pipe, coffee_gray, preserve_luminance=False).images[0]
    assert image.size == coffee_gray.size
    assert _psnr(_lightness(image), _lightness(coffee_gray)) < 35.0


def test_batch_of_two_equals_two_single_calls(pipe, coffee_gray):
    small = coffee_gray.resize((90, 60))
    prompts = ["a red cup", "a blue cup"]
    batch = pipe(
        [coffee_gray, small],
        prompts,
        num_inference_steps=STEPS,
        generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
        output_type="np",
        processing_resolution=32,
    ).images
    for k, (image, prompt, seed) in enumerate(zip([coffee_gray, small], prompts, (3, 4))):
        single = _run(pipe, image, prompt, seed=seed, output_type="np", processing_resolution=32).images
        # Different sizes come back as a list, one array each.
        np.testing.assert_allclose(batch[k], single[0], atol=1e-3)


def test_save_load_round_trip_reproduces_output(pipe, coffee_gray, tmp_path):
    expected = _run(pipe, coffee_gray, output_type="np").images
    pipe.save_pretrained(tmp_path)
    loaded = LCADPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.default_processing_resolution == pipe.config.default_processing_resolution
    np.testing.assert_array_equal(_run(loaded, coffee_gray, output_type="np").images, expected)
    assert list((tmp_path / "unet").glob("*.safetensors")) and list((tmp_path / "vae").glob("*.safetensors"))


@pytest.mark.parametrize(
    "make_input",
    [
        lambda img: img.convert("RGB"),
        lambda img: img.convert("RGBA"),
        lambda img: img.convert("I;16"),
        lambda img: np.asarray(img),
        lambda img: np.asarray(img.convert("RGB")).astype(np.float32) / 255.0,
        lambda img: torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255.0,
        lambda img: [np.asarray(img)],
    ],
    ids=["pil-rgb", "pil-rgba", "pil-i16", "np-hw-uint8", "np-hwc-float", "torch-bchw", "list"],
)
def test_input_kinds_all_give_the_same_result(pipe, coffee_gray, make_input):
    small = coffee_gray.resize((48, 32))
    expected = _run(pipe, small, output_type="np").images
    np.testing.assert_allclose(_run(pipe, make_input(small), output_type="np").images, expected, atol=2e-3)


def test_colour_photo_is_recoloured_from_its_lightness(pipe):
    from skimage import data

    colour = PIL.Image.fromarray(data.astronaut()).resize((64, 48))
    grey_of_it = torch.from_numpy(np.asarray(colour, dtype=np.float64) / 255.0).permute(2, 0, 1)[None]
    out = _run(pipe, colour, output_type="pt").images
    assert _psnr(rgb_to_lightness(out.double()), rgb_to_lightness(grey_of_it)) >= 35.0


def test_output_types_and_images_per_prompt(pipe, coffee_gray):
    small = coffee_gray.resize((40, 24))
    np_out = _run(pipe, small, output_type="np", num_images_per_prompt=2).images
    assert np_out.shape == (2, 24, 40, 3) and np_out.dtype == np.float32
    assert 0 <= np_out.min() and np_out.max() <= 1
    assert not np.array_equal(np_out[0], np_out[1])
    pt_out = _run(pipe, small, output_type="pt").images
    assert pt_out.shape == (1, 3, 24, 40)
    latents = _run(pipe, small, output_type="latent", processing_resolution=32).images
    assert latents.shape == (1, 4, 10, 16)  # 32x20 processing size (multiple of 2), VAE factor 2
    assert _run(pipe, small, return_dict=False)[0][0].size == small.size


def test_empty_and_missing_prompt_are_the_same_automatic_colourisation(pipe, coffee_gray):
    small = coffee_gray.resize((32, 32))
    a = _run(pipe, small, prompt=None, output_type="np").images
    b = _run(pipe, small, prompt="", output_type="np").images
    c = _run(pipe, small, prompt="a red cup", output_type="np").images
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_released_scheduler_defaults():
    config = LCADPipeline.default_scheduler_config()
    scheduler = DDIMScheduler(**config)
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert scheduler.config.steps_offset == 1 and scheduler.config.set_alpha_to_one is False
    assert scheduler.config.timestep_spacing == "leading" and scheduler.config.clip_sample is False
    scheduler.set_timesteps(50)
    assert scheduler.timesteps[0] == 981 and scheduler.timesteps[-1] == 1


@pytest.mark.parametrize("scheduler_cls", [DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_other_schedulers_swap_in(coffee_gray, scheduler_cls):
    pipe = make_tiny_pipeline()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    image = _run(pipe, coffee_gray.resize((40, 30))).images[0]
    assert image.size == (40, 30)
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()


def test_callback_on_step_end_sees_and_can_change_latents(pipe, coffee_gray):
    seen = []

    def callback(pipeline, step, timestep, kwargs):
        seen.append(step)
        return {"latents": torch.zeros_like(kwargs["latents"])}

    small = coffee_gray.resize((32, 32))
    a = _run(pipe, small, output_type="latent", callback_on_step_end=callback).images
    assert seen == list(range(STEPS))
    assert torch.count_nonzero(a) == 0


def test_guidance_one_disables_cfg_and_prompt_embeds_work(pipe, coffee_gray):
    small = coffee_gray.resize((32, 32))
    embeds, negative = pipe.encode_prompt("a red cup", "cpu", 1, True, "")
    a = _run(pipe, small, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative, output_type="np").images
    b = _run(pipe, small, output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert _run(pipe, small, guidance_scale=1.0).images[0].size == small.size


def test_from_stable_diffusion_builds_an_untrained_lcad(tmp_path, coffee_gray):
    tokenizer = make_tokenizer()
    sd = StableDiffusionPipeline(
        vae=make_stock_vae(),
        unet=make_stock_unet(),
        text_encoder=make_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        scheduler=EulerDiscreteScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.save_pretrained(tmp_path / "sd")
    for source in (sd, str(tmp_path / "sd")):
        pipe = LCADPipeline.from_stable_diffusion(source, default_processing_resolution=32)
        assert isinstance(pipe.scheduler, DDIMScheduler)
        assert not pipe.vae.is_luminance_encoder_trained()
        assert pipe.unet.config.luminance_channels == pipe.vae.luminance_feature_channels
        pipe.set_progress_bar_config(disable=True)
        assert _run(pipe, coffee_gray).images[0].size == coffee_gray.size
    with pytest.raises(TypeError, match="pretrained"):
        LCADPipeline.from_stable_diffusion(object())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"image": "photo.jpg"}, TypeError, "image"),
        ({"image": 3}, TypeError, "image"),
        ({"image": []}, TypeError, "image"),
        ({"image": np.zeros((0, 5), np.uint8)}, ValueError, "image"),
        ({"image": PIL.Image.new("L", (1, 1))}, ValueError, "image"),
        ({"image": np.full((8, 8), np.nan, np.float32)}, ValueError, "image.*NaN"),
        ({"image": np.zeros((8, 8, 5), np.uint8)}, ValueError, "image"),
        ({"image": np.full((8, 8), 2.0, np.float32)}, ValueError, "image"),
        ({"prompt": ["a", "b"]}, ValueError, "prompt"),
        ({"prompt": 5}, TypeError, "prompt"),
        ({"negative_prompt": ["a", "b"]}, ValueError, "negative_prompt"),
        ({"num_inference_steps": -2}, ValueError, "num_inference_steps"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps"),
        ({"guidance_scale": -1.0}, ValueError, "guidance_scale"),
        ({"guidance_scale": float("nan")}, ValueError, "guidance_scale"),
        ({"processing_resolution": -8}, ValueError, "processing_resolution"),
        ({"num_images_per_prompt": 0}, ValueError, "num_images_per_prompt"),
        ({"output_type": "jpeg"}, ValueError, "output_type"),
        ({"generator": [torch.Generator(), torch.Generator()]}, ValueError, "generator"),
        ({"latents": torch.zeros(1, 4, 3, 3)}, ValueError, "latents"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, ValueError, "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_input_raises_naming_the_argument(pipe, kwargs, error, match):
    call = {"image": PIL.Image.new("L", (16, 16), 100), "prompt": "a red cup", "num_inference_steps": 1, **kwargs}
    with pytest.raises(error, match=match):
        pipe(**call)


def test_bad_pipeline_settings_are_refused():
    pipe = make_tiny_pipeline()
    with pytest.raises(ValueError, match="luminance_normalization"):
        LCADPipeline(**pipe.components, luminance_normalization="minmax")
    with pytest.raises(TypeError, match="vae"):
        LCADPipeline(**{**pipe.components, "vae": make_stock_vae()})


def test_symmetric_normalisation_changes_the_luminance_input(coffee_gray):
    small = coffee_gray.resize((32, 32))
    official = make_tiny_pipeline()
    symmetric = make_tiny_pipeline(luminance_normalization="symmetric")
    a = _run(official, small, output_type="np").images
    b = _run(symmetric, small, output_type="np").images
    assert not np.allclose(a, b)


def test_runs_under_bf16_autocast(pipe, coffee_gray):
    """Training scripts validate under autocast: the colour conversion must still happen in float32."""
    small = coffee_gray.resize((40, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image = _run(pipe, small).images[0]
    assert image.size == small.size
    assert _psnr(_lightness(image), _lightness(small)) >= 35.0
