"""Instance-aware sampling at UNet level: the cross-attention refinement processor and its controller."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from lcad_pipeline.attention_lcad import InstanceAttentionGuidance, InstanceAttnProcessor

TOKENS = [[2, 3], [5, 6, 7]]  # two phrases, their token positions in a 77-token encoding


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
    ).eval()


def make_inputs(images: int = 1, seed: int = 0):
    """A CFG batch [unconditional; conditional] of `images` images: latents, timestep, text embeddings."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(images, 4, 16, 16, generator=g)
    uncond = torch.randn(images, 77, 32, generator=g)
    cond = torch.randn(images, 77, 32, generator=g)
    return torch.cat([latents] * 2), torch.tensor(500), torch.cat([uncond, cond])


def make_masks(height: int = 64, width: int = 64) -> torch.Tensor:
    """Phrase 0: the left half; phrase 1: the top-right quarter."""
    masks = torch.zeros(2, height, width)
    masks[0, :, : width // 2] = 1
    masks[1, : height // 2, width // 2 :] = 1
    return masks


def run(unet, guidance, inputs, step=(0, 10)):
    sample, t, embeds = inputs
    with torch.no_grad(), guidance.attached(unet, do_classifier_free_guidance=True):
        guidance.set_step(*step)
        return guidance.run_unet(lambda: unet(sample, t, encoder_hidden_states=embeds).sample)


def plain(unet, inputs):
    sample, t, embeds = inputs
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=embeds).sample


def share_inside(maps: dict[str, torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """Per layer and phrase, the share of the phrase's attention inside its mask; averaged over layers -> [P]."""
    shares = []
    for layer_map in maps.values():  # [B, P, h, w]
        resized = F.interpolate(masks[None], size=layer_map.shape[-2:], mode="nearest")
        shares.append(((layer_map * resized).sum((-1, -2)) / layer_map.sum((-1, -2))).mean(0))
    return torch.stack(shares).mean(0)


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("mode", ["single_pass", "official"])
def test_strength_zero_reproduces_stock_processors_exactly(unet, mode):
    inputs = make_inputs()
    guidance = InstanceAttentionGuidance(make_masks(), TOKENS, strength=0.0, mode=mode)
    assert torch.equal(run(unet, guidance, inputs), plain(unet, inputs))


def test_outside_step_range_reproduces_stock_processors_exactly(unet):
    inputs = make_inputs()
    guidance = InstanceAttentionGuidance(make_masks(), TOKENS, strength=1.0, step_fraction=0.5)
    assert torch.equal(run(unet, guidance, inputs, step=(5, 10)), plain(unet, inputs))
    assert not torch.allclose(run(unet, guidance, inputs, step=(4, 10)), plain(unet, inputs), atol=1e-4)


def test_explicit_attention_path_matches_sdpa(unet):
    # Recording maps forces the explicit softmax(QK^T)V path on every cross-attention layer, unrefined at strength 0.
    inputs = make_inputs()
    guidance = InstanceAttentionGuidance(make_masks(), TOKENS, strength=0.0, store_attention_maps=True)
    out = run(unet, guidance, inputs)
    torch.testing.assert_close(out, plain(unet, inputs), atol=1e-5, rtol=1e-5)
    maps = guidance.attention_maps(per_layer=True)
    assert len(maps) == 4  # all cross-attention layers of the tiny UNet
    assert {tuple(m.shape) for m in maps.values()} == {(1, 2, 16, 16), (1, 2, 8, 8)}
    averaged = guidance.attention_maps()
    assert averaged.shape == (1, 2, 16, 16) and (averaged >= 0).all()


def test_processors_installed_on_cross_attention_only_and_restored(unet):
    before = unet.attn_processors
    guidance = InstanceAttentionGuidance(make_masks(), TOKENS, layers=["up_blocks"])
    with pytest.raises(RuntimeError, match="boom"):
        with guidance.attached(unet):
            inside = unet.attn_processors
            ours = sorted(n for n, p in inside.items() if isinstance(p, InstanceAttnProcessor))
            assert ours == [
                "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
                "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor",
            ]
            assert all(inside[n] is before[n] for n in before if n not in ours)
            raise RuntimeError("boom")
    after = unet.attn_processors
    assert all(after[n] is before[n] for n in before)
    assert isinstance(next(iter(after.values())), AttnProcessor2_0)


def test_layer_and_resolution_selection_restrict_refinement(unet):
    inputs = make_inputs()
    masks = make_masks()
    maps = {}
    for key, kwargs in {"none": dict(strength=0.0), "mid": dict(resolutions=[2]), "all": {}}.items():
        guidance = InstanceAttentionGuidance(masks, TOKENS, store_attention_maps=True, **kwargs)
        run(unet, guidance, inputs)
        maps[key] = guidance.attention_maps(per_layer=True)
    mid = "mid_block.attentions.0.transformer_blocks.0.attn2"
    down = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    # the mid layer (latent/2) is refined, the first down layer (before it) sees exactly the unrefined attention
    assert torch.equal(maps["mid"][down], maps["none"][down])
    assert share_inside({mid: maps["mid"][mid]}, masks).mean() > share_inside({mid: maps["none"][mid]}, masks).mean() + 0.05
    assert share_inside({down: maps["all"][down]}, masks).mean() > share_inside({down: maps["none"][down]}, masks).mean() + 0.05
    with pytest.raises(ValueError, match="layers"):
        with InstanceAttentionGuidance(masks, TOKENS, layers=["no_such_block"]).attached(unet):
            pass


# ---------------------------------------------------------------------------------------------- effect


def test_refinement_raises_attention_share_inside_masks(unet):
    inputs = make_inputs(seed=1)
    masks = make_masks()
    shares = {}
    for name, kwargs in {
        "none": dict(strength=0.0),
        "default": {},
        "released_mean": dict(reduction="mean"),
        "two_iterations": dict(iterations=2),
    }.items():
        guidance = InstanceAttentionGuidance(masks, TOKENS, store_attention_maps=True, **kwargs)
        run(unet, guidance, inputs)
        shares[name] = share_inside(guidance.attention_maps(per_layer=True), masks)
    # every phrase gains clearly with the default (sum reduction, strength 1), more with two iterations
    assert (shares["default"] > shares["none"] + 0.1).all(), shares
    assert (shares["two_iterations"] > shares["default"] + 0.02).all(), shares
    # the released mean reduction moves the attention by a tiny amount only
    gain = shares["released_mean"] - shares["none"]
    assert (gain > 0).all() and (gain < 1e-3).all(), shares


def test_per_image_masks_in_a_batch(unet):
    # Two images in one CFG batch, each with its own masks, give what each image gives alone.
    batch = make_inputs(images=2, seed=3)
    masks = torch.stack([make_masks(), make_masks().flip(-1)])  # [2, P, H, W]
    out = run(unet, InstanceAttentionGuidance(masks, TOKENS), batch)
    sample, t, embeds = batch
    for i in range(2):
        single = (sample[[i, 2 + i]], t, embeds[[i, 2 + i]])
        alone = run(unet, InstanceAttentionGuidance(masks[i], TOKENS), single)
        torch.testing.assert_close(out[[i, 2 + i]], alone, atol=1e-5, rtol=1e-5)
    # the unconditional half is never refined
    torch.testing.assert_close(out[:2], plain(unet, batch)[:2], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- official mode


class _ReleasedTwoPassProcessor:
    """A straightforward reading of the released algorithm, for one layer: heads folded into the batch as in the
    release's attention, pass 1 keeps the logits (with autograd), pass 2 uses the refined logits given to it."""

    def __init__(self, store: dict, name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        if self.store["pass"] == 1:
            logits = (q @ k.transpose(-1, -2) * attn.scale).detach().requires_grad_(True)
            self.store["logits"][self.name] = logits
        else:
            logits = self.store["refined"][self.name]
        out = attn.batch_to_head_dim(logits.softmax(-1) @ v)
        return attn.to_out[1](attn.to_out[0](out))


def released_two_pass(unet, inputs, masks, token_indices, strength=1.0, reduction="mean"):
    sample, t, embeds = inputs
    store = {"pass": 1, "logits": {}, "refined": {}}
    originals = unet.attn_processors
    unet.set_attn_processor(
        {n: _ReleasedTwoPassProcessor(store, n) if "attn2" in n else p for n, p in originals.items()}
    )
    try:
        with torch.enable_grad():
            unet(sample, t, encoder_hidden_states=embeds)
            loss = 0.0
            for logits in store["logits"].values():  # [(B * heads), h*w, 77]
                side = int(logits.shape[1] ** 0.5)
                resized = F.interpolate(masks[None], size=(side, side), mode="nearest")[0].flatten(1)
                cond = logits[logits.shape[0] // 2 :]  # conditional half of the batch
                for p, tokens in enumerate(token_indices):
                    probs = torch.sigmoid(cond[..., tokens])
                    target = resized[p][None, :, None].expand_as(probs)
                    loss = loss + F.binary_cross_entropy(probs, target, reduction=reduction)
            names = list(store["logits"])
            grads = torch.autograd.grad(loss, [store["logits"][n] for n in names])
        store["refined"] = {n: (store["logits"][n] - strength * g).detach() for n, g in zip(names, grads)}
        store["pass"] = 2
        with torch.no_grad():
            return unet(sample, t, encoder_hidden_states=embeds).sample
    finally:
        unet.set_attn_processor(originals)


@pytest.mark.parametrize(
    "strength,reduction",
    [(1.0, "mean"), (2000.0, "mean"), (1.0, "sum")],
    ids=["released", "mean-large-step", "sum"],
)
def test_official_mode_matches_reference_of_released_algorithm(unet, strength, reduction):
    inputs = make_inputs(seed=2)
    masks = make_masks()
    reference = released_two_pass(unet, inputs, masks, TOKENS, strength, reduction)
    guidance = InstanceAttentionGuidance(masks, TOKENS, mode="official", strength=strength, reduction=reduction)
    ours = run(unet, guidance, inputs)
    effect = (reference - plain(unet, inputs)).abs().max()
    assert effect > 0
    assert (ours - reference).abs().max() <= 1e-2 * effect + 1e-6, (effect, (ours - reference).abs().max())


def test_official_mode_defaults_to_released_settings():
    guidance = InstanceAttentionGuidance(make_masks(), TOKENS, mode="official")
    assert (guidance.strength, guidance.reduction, guidance.layers, guidance.step_range) == (1.0, "mean", None, (0.0, 1.0))
    assert InstanceAttentionGuidance(make_masks(), TOKENS).reduction == "sum"


def test_official_mode_runs_the_unet_twice_single_pass_once(unet):
    inputs = make_inputs()
    sample, t, embeds = inputs
    for mode, expected in (("single_pass", 1), ("official", 2)):
        calls = []
        guidance = InstanceAttentionGuidance(make_masks(), TOKENS, mode=mode)
        with torch.no_grad(), guidance.attached(unet):
            guidance.set_step(0, 1)
            guidance.run_unet(lambda: calls.append(1) or unet(sample, t, encoder_hidden_states=embeds).sample)
        assert len(calls) == expected


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="three_pass"), "mode"),
        (dict(reduction="max"), "reduction"),
        (dict(strength=-1.0), "strength"),
        (dict(iterations=0), "iterations"),
        (dict(step_fraction=1.5), "step_fraction"),
        (dict(resolutions=[3]), "resolutions"),
        (dict(masks=torch.ones(3, 8, 8)), "masks"),
        (dict(masks=torch.full((2, 8, 8), 2.0)), "masks"),
        (dict(token_indices=[[2], []]), "token_indices"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    arguments = {"masks": make_masks(), "token_indices": TOKENS, **kwargs}
    with pytest.raises(ValueError, match=match):
        InstanceAttentionGuidance(**arguments)


def test_token_index_beyond_encoding_raises(unet):
    guidance = InstanceAttentionGuidance(make_masks(), [[2], [80]])
    with pytest.raises(ValueError, match="token_indices"):
        run(unet, guidance, make_inputs())


# ---------------------------------------------------------------------------------------------- pipeline level

PROMPT = "a red car and a blue cup"
STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    from tiny_models import make_tiny_pipeline

    return make_tiny_pipeline()


@pytest.fixture(scope="module")
def gray():
    rng = np.random.RandomState(0)
    return (rng.rand(40, 48) * 0.6 + 0.2).astype(np.float32)


def left_half(height=40, width=48):
    mask = np.zeros((height, width), dtype=bool)
    mask[:, : width // 2] = True
    return mask


def colourise(pipe, image, prompt=PROMPT, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(image, prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)


@pytest.mark.parametrize("mode", ["single_pass", "official"])
def test_pipeline_strength_zero_equals_plain_sampling_exactly(pipe, gray, mode):
    plain_out = colourise(pipe, gray)
    out = colourise(
        pipe, gray, instance_masks={"a red car": left_half(), "a blue cup": (24, 0, 48, 40)},
        instance_guidance={"strength": 0.0, "mode": mode},
    )
    assert np.array_equal(out.images, plain_out.images)
    # the masks used come back at the processing size (40 x 48 -> 26 x 32 at 32 px), the box in the input's frame
    assert out.phrases == ["a red car", "a blue cup"]
    assert out.masks.shape == (1, 2, 26, 32)
    assert out.masks[0, 0, :, :16].min() == 1 and out.masks[0, 0, :, 16:].max() == 0
    assert out.masks[0, 1, :, 16:].min() == 1 and out.masks[0, 1, :, :16].max() == 0
    assert out.attention_maps is None


def test_pipeline_refinement_moves_attention_into_masks(pipe, gray):
    masks = {"a red car": left_half(), "a blue cup": ~left_half()}
    plain_out = colourise(pipe, gray)
    shares, images = {}, {}
    for strength in (0.0, 1.0):
        out = colourise(pipe, gray, instance_masks=masks, instance_guidance={"strength": strength}, return_attention_maps=True)
        assert out.attention_maps.shape == (1, 2, 13, 16)  # the latent size
        inside = F.interpolate(out.masks, size=(13, 16), mode="nearest")
        shares[strength] = ((out.attention_maps * inside).sum((-1, -2)) / out.attention_maps.sum((-1, -2)))[0]
        images[strength] = out.images
    assert (shares[1.0] > shares[0.0] + 0.05).all(), shares
    assert np.abs(images[1.0] - plain_out.images).max() > 1e-3  # a visible change in the colours
    np.testing.assert_allclose(images[0.0], plain_out.images, atol=1e-4)  # the explicit attention path alone


def test_pipeline_without_cfg_refines_the_whole_batch(pipe, gray):
    masks = {"a red car": left_half(), "a blue cup": ~left_half()}
    plain_out = colourise(pipe, gray, guidance_scale=1.0)
    zero = colourise(pipe, gray, guidance_scale=1.0, instance_masks=masks, instance_guidance={"strength": 0.0})
    refined = colourise(pipe, gray, guidance_scale=1.0, instance_masks=masks)
    assert np.array_equal(zero.images, plain_out.images)
    assert np.abs(refined.images - plain_out.images).max() > 1e-3


def test_pipeline_official_mode_runs_two_unet_passes_per_step(pipe, gray):
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        plain_out = colourise(pipe, gray)
        plain_calls = len(calls)
        out = colourise(pipe, gray, instance_masks={"a red car": left_half()}, instance_guidance={"mode": "official"})
    finally:
        hook.remove()
    assert plain_calls == STEPS and len(calls) - plain_calls == 2 * STEPS
    difference = np.abs(out.images - plain_out.images).max()
    assert 0 < difference < 1e-2  # the released mean reduction: a near no-op


def test_pipeline_released_comma_convention_and_batches(pipe, gray):
    prompt = "a red car, a blue cup"
    wide = np.concatenate([gray, gray[:, ::-1]], axis=1)  # a second image of another size
    out = colourise(
        pipe, [gray, wide], prompt=prompt, masks=[left_half(), (0, 0, 10, 10)], num_images_per_prompt=2,
        return_attention_maps=True,
    )
    assert out.phrases == ["a red car", "a blue cup"]
    assert out.masks.shape == (2, 2, 26, 32) and out.attention_maps.shape == (4, 2, 13, 16)
    assert out.images[0].shape == (40, 48, 3) and out.images[2].shape == (40, 96, 3)
    # mask arrays are stretched over each image (both are squashed to the processing size); boxes are in each
    # image's own pixels, so the same box covers half as much of the twice as wide image
    assert out.masks[0, 0, :, :16].min() == 1 and torch.equal(out.masks[0, 0], out.masks[1, 0])
    assert out.masks[0, 1].sum().item() == pytest.approx(2 * out.masks[1, 1].sum().item(), rel=0.05)


def test_pipeline_restores_processors_after_an_error(pipe, gray):
    before = pipe.unet.attn_processors

    def fail(pipeline, step, timestep, kwargs):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        colourise(pipe, gray, instance_masks={"a red car": left_half()}, callback_on_step_end=fail)
    after = pipe.unet.attn_processors
    assert all(after[name] is before[name] for name in before)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt="a red car, a blue cup", masks=[left_half()]), "`masks` has 1 entries but the prompt has 2"),
        (dict(phrases=["a red car"], masks=[left_half(), left_half()]), "`masks` has 2 entries but `phrases` has 1"),
        (dict(instance_masks={"a green tree": left_half()}), "`instance_masks`: phrase 'a green tree' was not found"),
        (dict(phrases=["a green tree"], masks=[left_half()]), "`phrases`: phrase 'a green tree' was not found"),
        (dict(instance_masks={"a red car": np.zeros((8, 8))}), r"`instance_masks`\['a red car'\]: the mask is empty"),
        (dict(instance_masks={"a red car": np.ones((8, 8, 3))}), r"`instance_masks`\['a red car'\]: a mask must be H x W"),
        (dict(instance_masks={"a red car": None}), "`segmenter`: the phrases"),
        (dict(phrases=["a red car"]), "`segmenter`"),
        (dict(instance_masks={"a red car": left_half()}, instance_guidance={"strenght": 2}), "`instance_guidance`: unknown"),
        (dict(instance_masks={"a red car": left_half()}, instance_guidance={"mode": "x"}), "`instance_guidance`: `mode`"),
        (dict(instance_guidance={"strength": 2.0}), "`instance_guidance` needs `instance_masks`"),
        (dict(return_attention_maps=True), "`return_attention_maps` needs"),
        (dict(prompt=None, instance_masks={"a red car": left_half()}), "need the text `prompt`"),
    ],
)
def test_pipeline_bad_instance_inputs_raise_naming_the_argument(pipe, gray, kwargs, match):
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(gray, num_inference_steps=1, output_type="np", **kwargs)
