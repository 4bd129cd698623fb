"""SAM paths on a tiny randomly initialised SAM built in code, saved and loaded back like a real checkpoint."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from lcad_pipeline.instance_masks import assign_regions_to_phrases, prepare_instance_masks
from lcad_pipeline.sam_masks import SamSegmenter, box_nms, build_sam, load_sam, segment_anything_modules

TINY_SAM = dict(
    image_size=64,
    patch_size=8,
    prompt_embed_dim=32,
    window_size=0,
    use_rel_pos=False,
    mlp_ratio=2,
    mask_in_chans=4,
    decoder_depth=1,
    decoder_mlp_dim=32,
    decoder_num_heads=2,
    iou_head_depth=2,
    iou_head_hidden_dim=16,
    encoder_embed_dim=32,
    encoder_depth=1,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(),
)
PERMISSIVE = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, points_per_side=6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    sam = build_sam(TINY_SAM)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def image():
    rng = np.random.RandomState(0)
    gray = np.full((48, 40), 60, dtype=np.uint8)
    gray[8:30, 6:22] = 200  # a bright object on a dark background
    return PIL.Image.fromarray(np.clip(gray + rng.randint(0, 20, gray.shape), 0, 255).astype(np.uint8))


def test_checkpoint_loads_through_the_real_loader(checkpoint):
    sam = load_sam(checkpoint, TINY_SAM)
    saved = torch.load(checkpoint, weights_only=True)
    assert set(sam.state_dict()) == set(saved)
    assert all(torch.equal(sam.state_dict()[k], v) for k, v in saved.items())


def test_loading_errors_name_the_argument(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="`sam_checkpoint`: no file at"):
        SamSegmenter.from_checkpoint(tmp_path / "missing.pth", "vit_b")
    with pytest.raises(ValueError, match="`sam_model_type` must be one of"):
        load_sam(checkpoint, "vit_x")
    with pytest.raises(ValueError, match="is `sam_model_type` right"):
        load_sam(checkpoint, dict(TINY_SAM, encoder_embed_dim=48))


def test_released_architectures_are_known():
    from lcad_pipeline.sam_masks import SAM_CONFIGS

    assert {k: (c["encoder_embed_dim"], c["encoder_depth"]) for k, c in SAM_CONFIGS.items()} == {
        "vit_b": (768, 12),
        "vit_l": (1024, 24),
        "vit_h": (1280, 32),
    }


def test_segment_matches_sam_forward(checkpoint, image):
    """Masks from boxes / points equal those of segment-anything's own `Sam.forward` on the same inputs."""
    segmenter = SamSegmenter.from_checkpoint(checkpoint, TINY_SAM)
    prompts = [
        {"box": np.array([6.0, 8.0, 22.0, 30.0]), "points": None, "labels": None},
        {"box": None, "points": np.array([[12.0, 20.0], [35.0, 40.0]]), "labels": np.array([1, 0])},
    ]
    masks = segmenter.segment(image, prompts)
    assert [m.shape for m in masks] == [(48, 40), (48, 40)] and all(m.dtype == bool for m in masks)

    # the reference: SAM's batched forward with the image resized to the longest side (PIL bilinear, as
    # segment-anything's ResizeLongestSide does through torchvision) and the coordinates scaled alike
    rgb = image.convert("RGB")
    resized = np.array(rgb.resize((53, 64), PIL.Image.BILINEAR))  # 40 x 48 -> longest side 64
    scale = torch.tensor([53 / 40, 64 / 48])
    batched = [
        {
            "image": torch.from_numpy(resized).permute(2, 0, 1).float(),
            "original_size": (48, 40),
            "boxes": (torch.tensor(prompts[0]["box"]).float().reshape(2, 2) * scale).reshape(1, 4),
        },
        {
            "image": torch.from_numpy(resized).permute(2, 0, 1).float(),
            "original_size": (48, 40),
            "point_coords": torch.tensor(prompts[1]["points"]).float()[None] * scale,
            "point_labels": torch.tensor(prompts[1]["labels"])[None],
        },
    ]
    with torch.no_grad():
        reference = segmenter.sam(batched, multimask_output=False)
    for ours, ref in zip(masks, reference):
        np.testing.assert_array_equal(ours, ref["masks"][0, 0].numpy())


def test_image_embedding_is_computed_once_per_image(checkpoint, image):
    segmenter = SamSegmenter.from_checkpoint(checkpoint, TINY_SAM, **PERMISSIVE)
    calls = []
    segmenter.sam.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    segmenter.segment(image, [{"box": np.array([0.0, 0.0, 10.0, 10.0])}])
    segmenter.propose_regions(image)
    assert len(calls) == 1
    segmenter.segment(image.transpose(PIL.Image.FLIP_LEFT_RIGHT), [{"box": np.array([0.0, 0.0, 10.0, 10.0])}])
    assert len(calls) == 2


def test_box_nms():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 9]], dtype=torch.float32)
    scores = torch.tensor([0.5, 0.9, 0.7, 0.1])
    # box 1 (best) suppresses 0 (IoU 0.81) and 3 (IoU 0.72); box 2 does not overlap
    assert box_nms(boxes, scores, 0.7).tolist() == [1, 2]
    assert box_nms(boxes, scores, 0.8).tolist() == [1, 2, 3]


def test_propose_regions(checkpoint, image):
    segmenter = SamSegmenter.from_checkpoint(checkpoint, TINY_SAM, box_nms_thresh=1.0, **PERMISSIVE)
    regions, scores = segmenter.propose_regions(image)
    # no NMS, no thresholds: every non-tiny mask of the 3 per grid point is kept
    assert regions.dtype == torch.bool and regions.shape[1:] == (48, 40)
    assert 1 <= len(regions) <= 3 * 36 and len(scores) == len(regions)
    assert torch.all(scores[:-1] >= scores[1:])
    assert (regions.flatten(1).sum(1) >= 0.002 * 48 * 40).all()
    strict = SamSegmenter.from_checkpoint(checkpoint, TINY_SAM, box_nms_thresh=0.0, **PERMISSIVE)
    kept, _ = strict.propose_regions(image)
    assert len(kept) < len(regions)  # NMS at IoU 0 keeps only boxes that do not overlap at all
    strict.pred_iou_thresh = 1.0
    assert len(strict.propose_regions(image)[0]) == 0


def test_boxes_through_sam_in_mask_preparation(checkpoint, image):
    segmenter = SamSegmenter.from_checkpoint(checkpoint, TINY_SAM)
    box = (6, 8, 22, 30)
    masks = prepare_instance_masks([box], ["the object"], size=(24, 20), image_size=(48, 40), image=image, segmenter=segmenter)
    expected = segmenter.segment(image, [{"box": np.array(box, dtype=np.float32), "points": None, "labels": None}])[0]
    expected = torch.nn.functional.interpolate(torch.from_numpy(expected).float()[None, None], size=(24, 20), mode="area")
    torch.testing.assert_close(masks, expected[0])


def test_automatic_regions_assigned_from_attention(checkpoint, image):
    segmenter = SamSegmenter.from_checkpoint(checkpoint, TINY_SAM, box_nms_thresh=1.0, **PERMISSIVE)
    regions, _ = segmenter.propose_regions(image)
    assert len(regions) >= 2
    # attention maps that each equal one proposal pick that proposal back, each its own one
    flat = regions.flatten(1).float()
    overlap = (flat @ flat[0]) / (flat.sum(1) + flat[0].sum() - flat @ flat[0])
    targets = [0, int(overlap.argmin())]  # the first proposal and the one least like it
    chosen = assign_regions_to_phrases(regions[targets].float(), regions)
    assert len(set(chosen)) == 2
    for target, pick in zip(targets, chosen):
        assert torch.equal(regions[pick], regions[target])


def test_segment_anything_loaded_without_its_torchvision_imports():
    modules = segment_anything_modules()
    assert hasattr(modules.modeling, "Sam") and hasattr(modules.amg, "calculate_stability_score")
    import sys

    assert not any(name.endswith(("segment_anything.predictor", "segment_anything.automatic_mask_generator")) for name in sys.modules)


# ---------------------------------------------------------------------------------------------- pipeline level


@pytest.fixture(scope="module")
def pipe():
    from tiny_models import make_tiny_pipeline

    return make_tiny_pipeline()


def _colourise(pipe, image, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    return pipe(image, "a red car and a blue cup", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)


def test_pipeline_box_through_sam(pipe, checkpoint, image):
    from lcad_pipeline.image_processor_lcad import lightness_to_gray_rgb

    segmenter = SamSegmenter.from_checkpoint(checkpoint, TINY_SAM)
    box = (6, 8, 22, 30)
    out = _colourise(pipe, image, instance_masks={"a red car": box}, segmenter=segmenter)
    # what SAM gives for the box on the grey input, at the processing size (48 x 40 -> 32 x 26)
    gray = lightness_to_gray_rgb(pipe.image_processor.lightness(image)[0])
    expected = segmenter.segment(gray, [{"box": np.array(box, dtype=np.float32), "points": None, "labels": None}])[0]
    expected = torch.nn.functional.interpolate(torch.from_numpy(expected).float()[None, None], size=(32, 26), mode="area")
    torch.testing.assert_close(out.masks, expected)


def test_pipeline_automatic_masks_from_attention_and_sam_proposals(pipe, checkpoint, image):
    from lcad_pipeline.image_processor_lcad import lightness_to_gray_rgb

    segmenter = SamSegmenter.from_checkpoint(checkpoint, TINY_SAM, box_nms_thresh=1.0, **PERMISSIVE)
    phrases = ["a red car", "a blue cup"]
    out = _colourise(pipe, image, phrases=phrases, segmenter=segmenter)
    assert out.phrases == phrases and out.masks.shape == (1, 2, 32, 26)

    # the proposals SAM makes for the grey image at the processing size ...
    lightness = pipe.image_processor.lightness(image)[0]
    regions, _ = segmenter.propose_regions(lightness_to_gray_rgb(pipe.image_processor.resize(lightness, (32, 26))))
    # ... and the phrases' cross-attention in the first (unrefined) step, recorded here by a run that does not refine
    probe = _colourise(pipe, image, instance_masks={p: np.ones((4, 4)) for p in phrases},
                       instance_guidance={"strength": 0.0}, num_inference_steps=1, return_attention_maps=True)
    chosen = assign_regions_to_phrases(probe.attention_maps[0], regions)
    assert len(set(chosen)) == 2
    assert torch.equal(out.masks[0], regions[chosen].float())

    # refinement starts after the choice: choosing at the last step leaves the whole run unrefined
    plain = _colourise(pipe, image)
    late = _colourise(pipe, image, phrases=phrases, segmenter=segmenter, instance_guidance={"auto_mask_steps": 3})
    assert np.abs(late.images - plain.images).max() < 1e-3  # explicit attention's rounding only
    assert np.abs(out.images - plain.images).max() > 5e-3
