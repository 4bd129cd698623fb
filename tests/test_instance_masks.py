"""Phrases, token spans and mask preparation for instance-aware sampling."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from lcad_pipeline.instance_masks import (
    assign_regions_to_phrases,
    find_phrase_token_spans,
    prepare_instance_masks,
    resolve_instance_inputs,
    split_prompt_phrases,
)

from offline_tokenizer import make_offline_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_offline_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


class _SlowTokenizer:
    """The same tokenizer seen as a slow one: no offsets."""

    is_fast = False

    def __init__(self, fast):
        self.fast = fast
        self.model_max_length = fast.model_max_length

    def __call__(self, text, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("slow tokenizers have no offsets")
        return self.fast(text, **kwargs)


def test_offline_tokenizer_gives_offsets(tokenizer):
    assert tokenizer.is_fast
    encoding = tokenizer("a red car", return_offsets_mapping=True)
    assert tokenizer.convert_ids_to_tokens(encoding["input_ids"]) == ["<|startoftext|>", "a</w>", "red</w>", "car</w>", "<|endoftext|>"]
    assert encoding["offset_mapping"][1:4] == [(0, 1), (2, 5), (6, 9)]


def test_split_prompt_phrases_released_convention():
    assert split_prompt_phrases("a red car, the blue sky ,, green grass,") == ["a red car", "the blue sky", "green grass"]


@pytest.mark.parametrize("slow", [False, True], ids=["offsets", "slow-tokenizer"])
def test_token_spans(tokenizer, slow):
    tok = _SlowTokenizer(tokenizer) if slow else tokenizer
    # repeated words: each phrase maps to its own occurrence
    prompt = "a red car and a blue car"
    assert find_phrase_token_spans(tok, prompt, ["a red car", "a blue car"]) == [[1, 2, 3], [5, 6, 7]]
    assert find_phrase_token_spans(tok, prompt, ["car", "car"]) == [[3], [7]]
    assert find_phrase_token_spans(tok, prompt, ["a blue car", "car"]) == [[5, 6, 7], [3]]
    # case and whitespace insensitive; a word the vocabulary lacks spans several byte tokens
    spans = find_phrase_token_spans(tok, "The  RED mug, green grass", ["red mug", "green grass"])
    assert spans == [[2, 3, 4, 5], [7, 8]]  # "red</w>", "m", "u", "g</w>" | "," is token 6


def test_token_spans_match_whole_words_only(tokenizer):
    with pytest.raises(ValueError, match="`phrases`.*'car' was not found"):
        find_phrase_token_spans(tokenizer, "a red cart", ["car"])
    with pytest.raises(ValueError, match="`instance_masks`.*'car' occurs only where an earlier phrase"):
        find_phrase_token_spans(tokenizer, "a red car", ["red car", "car"], argument="instance_masks")


def test_token_spans_beyond_the_77_token_limit(tokenizer):
    prompt = "a " * 80 + "red car"
    with pytest.raises(ValueError, match="77-token limit"):
        find_phrase_token_spans(tokenizer, prompt, ["red car"])


def test_resolve_instance_inputs():
    mask = np.ones((4, 4), dtype=bool)
    assert resolve_instance_inputs("x", instance_masks={"a red car": mask, "sky": (0, 0, 2, 2)})[::2] == (
        ["a red car", "sky"],
        "instance_masks",
    )
    assert resolve_instance_inputs("a red car, blue sky", masks=[mask, mask])[0] == ["a red car", "blue sky"]
    assert resolve_instance_inputs("p", phrases=["p"], masks=[mask])[2] == "masks"
    assert resolve_instance_inputs("p", phrases=["p"]) == (["p"], None, "phrases")
    assert resolve_instance_inputs("p") == ([], None, "")
    with pytest.raises(ValueError, match="`masks` has 1 entries but the prompt has 2 comma-separated phrases"):
        resolve_instance_inputs("a red car, blue sky", masks=[mask])
    with pytest.raises(ValueError, match="`masks` has 2 entries but `phrases` has 1"):
        resolve_instance_inputs("x", phrases=["x"], masks=[mask, mask])
    with pytest.raises(ValueError, match="either `instance_masks` or `phrases`"):
        resolve_instance_inputs("x", instance_masks={"x": mask}, phrases=["x"])
    with pytest.raises(ValueError, match="`instance_masks` must be a non-empty dict"):
        resolve_instance_inputs("x", instance_masks={})


def _pil(array: np.ndarray, mode: str) -> PIL.Image.Image:
    image = PIL.Image.fromarray((array * 255).astype(np.uint8), mode="L")
    if mode == "RGBA":
        rgba = PIL.Image.new("RGBA", image.size, (255, 255, 255, 0))
        rgba.putalpha(image)  # the mask in the alpha channel over a white colour
        return rgba
    return image.convert(mode)


@pytest.mark.parametrize(
    "make",
    [
        lambda a: _pil(a, "1"),
        lambda a: _pil(a, "L"),
        lambda a: _pil(a, "RGB"),
        lambda a: _pil(a, "RGBA"),
        lambda a: _pil(a, "I"),
        lambda a: _pil(a, "F").point(lambda v: v / 255.0),
        lambda a: a.astype(bool),
        lambda a: (a * 255).astype(np.uint8),
        lambda a: a.astype(np.float32),
        lambda a: a.astype(np.float64)[None],
        lambda a: torch.from_numpy(a).float(),
        lambda a: torch.from_numpy(a).bool()[None],
    ],
    ids=["pil-1", "pil-L", "pil-RGB", "pil-RGBA-alpha", "pil-I", "pil-F", "np-bool", "np-uint8", "np-float32", "np-1xHxW", "pt-float", "pt-1xHxW-bool"],
)
def test_mask_types_are_read_and_resized(make):
    array = np.zeros((64, 96))
    array[16:48, :48] = 1  # the left half of the middle band
    masks = prepare_instance_masks([make(array)], ["p"], size=(32, 48))
    assert masks.shape == (1, 32, 48) and masks.dtype == torch.float32
    expected = torch.zeros(32, 48)
    expected[8:24, :24] = 1
    torch.testing.assert_close(masks[0], expected)


def test_boxes_and_points_without_segmenter():
    # boxes are in pixels of the input image (here 100 x 200), masks come at the working size (50 x 100)
    masks = prepare_instance_masks(
        [(20, 10, 60, 50), [(150, 50)], {"box": (0, 0, 200, 100), "points": [(100, 50)], "labels": [0]}],
        ["box", "point", "box minus point"],
        size=(50, 100),
        image_size=(100, 200),
        point_radius=10,
    )
    expected_box = torch.zeros(50, 100)
    expected_box[5:25, 10:30] = 1
    torch.testing.assert_close(masks[0], expected_box)
    assert masks[1, 25, 75] == 1 and masks[1, 25, 90] == 0 and masks[1, 25, 60] == 0  # a disc of radius 5 at (75, 25)
    assert masks[1].sum().item() == pytest.approx(np.pi * 25, rel=0.2)
    assert masks[2, 25, 50] == 0 and masks[2, 5, 5] == 1  # the whole image but the negative point's disc


def test_boxes_and_points_go_to_the_segmenter_when_given():
    class Segmenter:
        def segment(self, image, prompts):
            self.calls = (image, prompts)
            return [np.eye(8, dtype=bool) for _ in prompts]

    segmenter = Segmenter()
    raster = np.ones((8, 8), dtype=np.uint8) * 255
    masks = prepare_instance_masks(
        [(1, 1, 4, 4), raster, [(2, 3), (5, 5)]], ["a", "b", "c"], size=(8, 8), image="IMAGE", segmenter=segmenter
    )
    image, prompts = segmenter.calls
    assert image == "IMAGE" and len(prompts) == 2
    np.testing.assert_array_equal(prompts[0]["box"], [1, 1, 4, 4])
    np.testing.assert_array_equal(prompts[1]["points"], [[2, 3], [5, 5]])
    np.testing.assert_array_equal(prompts[1]["labels"], [1, 1])
    assert torch.equal(masks[0], torch.eye(8)) and torch.equal(masks[1], torch.ones(8, 8)) and torch.equal(masks[2], torch.eye(8))


@pytest.mark.parametrize(
    "spec,argument,match",
    [
        (np.zeros((8, 8)), "masks", r"`masks`\[0\] \('p'\): the mask is empty"),
        (np.zeros((8, 8)), "instance_masks", r"`instance_masks`\['p'\]: the mask is empty"),
        (np.ones((8, 8, 3)), "masks", r"`masks`\[0\] \('p'\): a mask must be H x W"),
        (torch.ones(2, 8, 8), "masks", "a mask must be H x W"),
        (np.full((8, 8), 1.5), "masks", r"float mask must lie in \[0, 1\]"),
        ((4, 4, 2, 2), "masks", "x1 > x0"),
        ({"points": [(1, 1)], "labels": [0]}, "masks", "at least one positive point"),
        ({"box": (0, 0, 2, 2), "colour": "red"}, "masks", "unknown keys"),
        ("mask.png", "masks", "expected a mask"),
    ],
)
def test_bad_masks_raise_naming_the_argument(spec, argument, match):
    with pytest.raises(ValueError, match=match):
        prepare_instance_masks([spec], ["p"], size=(8, 8), argument=argument)


def test_mask_count_must_match_phrases():
    with pytest.raises(ValueError, match="`masks` has 1 masks for 2 phrases"):
        prepare_instance_masks([np.ones((4, 4))], ["a", "b"], size=(4, 4))


def test_assign_regions_to_phrases():
    regions = torch.zeros(4, 16, 16, dtype=torch.bool)
    regions[0, :, :8] = True  # left half
    regions[1, :, 8:] = True  # right half
    regions[2] = True  # everything
    regions[3, :2, :2] = True  # a speck in the corner
    left = torch.zeros(8, 8)
    left[:, :4] = 1.0
    right = left.flip(-1)
    assert assign_regions_to_phrases(torch.stack([right, left]), regions) == [1, 0]
    # both phrases prefer the left half: the better match gets it, the other its next best (everything)
    narrow_left = torch.zeros(8, 8)
    narrow_left[:, :3] = 1.0
    assert assign_regions_to_phrases(torch.stack([narrow_left, left]), regions) == [2, 0]
    assert assign_regions_to_phrases(narrow_left[None], regions) == [0]
    with pytest.raises(ValueError, match="Only 1 region proposals for 2 phrases"):
        assign_regions_to_phrases(torch.stack([right, left]), regions[:1])
