"""Any-level descriptions (paper Sec. 3.5): the colour lexicon, partial/scarce derivation and the sampler's ratios."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from lcad_pipeline.descriptions import (
    COLOUR_WORDS,
    GENERIC_SCARCE_DESCRIPTION,
    check_ratio,
    find_colour_phrases,
    is_colour_token,
    make_partial,
    make_scarce,
    remove_colour_words,
    sample_description,
)


THREE_PHRASES = "a red car parked beside a green tree under a light blue sky"


def _colour_words_in(text: str) -> list[str]:
    return [word for word in text.lower().replace(",", " ").split() if is_colour_token(word)]


@pytest.mark.parametrize(
    "caption, phrases",
    [
        ("a red car parked beside a green tree.", ["red car", "green tree"]),
        ("An orange cat on a light blue sofa", ["orange cat", "light blue sofa"]),
        ("a black and white dog", ["black and white dog"]),
        ("a red, white and blue flag", ["red, white and blue flag"]),
        ("a man in a black-and-white shirt with a cream-colored cup", ["black-and-white shirt", "cream-colored cup"]),
        ("a dark-green field and a bright red umbrella", ["dark-green field", "bright red umbrella"]),
        ("two dogs playing on the grass", []),
        ("a light in a dark room", []),  # modifiers alone are not colours
        ("the car is red.", ["red"]),  # predicative: no noun
    ],
)
def test_colour_phrases(caption, phrases):
    assert [phrase.text for phrase in find_colour_phrases(caption)] == phrases


@pytest.mark.parametrize(
    "caption, scarce",
    [
        ("a red car parked beside a green tree.", "a car parked beside a tree."),
        ("An orange cat on a light blue sofa", "A cat on a sofa"),
        ("Red and white bus, blue sky", "Bus, sky"),
        ("a man in a black-and-white shirt holding a cream-colored cup", "a man in a shirt holding a cup"),
        ("a cat with an orange hat and a grey elephant", "a cat with a hat and an elephant"),
        ("an apple on a table", "an apple on a table"),  # articles not next to a removal are left alone
        ("two dogs on the grass", "two dogs on the grass"),
    ],
)
def test_scarce_removes_every_colour_word_and_repairs_the_text(caption, scarce):
    assert make_scarce(caption, "remove") == scarce
    assert _colour_words_in(make_scarce(caption, "remove")) == []
    assert make_scarce(caption, "generic") == GENERIC_SCARCE_DESCRIPTION


def test_lexicon_has_basic_colours_and_spelling_variants():
    for word in ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "grey"]:
        assert word in COLOUR_WORDS
    assert is_colour_token("light-blue") and is_colour_token("blue-green") and is_colour_token("reddish")
    assert not is_colour_token("light") and not is_colour_token("car") and not is_colour_token("colorful")


def test_partial_removes_a_non_empty_proper_subset_of_the_colour_phrases():
    rng = random.Random(0)
    phrases = find_colour_phrases(THREE_PHRASES)
    assert len(phrases) == 3
    words = {phrase.text: set(_colour_words_in(phrase.text)) for phrase in phrases}
    seen = set()
    for _ in range(300):
        partial = make_partial(THREE_PHRASES, rng)
        remaining = set(_colour_words_in(partial))
        kept = frozenset(name for name, colour in words.items() if colour <= remaining)
        dropped = {name for name, colour in words.items() if not colour & remaining}
        assert kept and dropped and len(kept) + len(dropped) == 3, partial
        seen.add(kept)
        # Only colour words go: the rest of the caption is intact.
        assert remove_colour_words(partial) == remove_colour_words(THREE_PHRASES)
    # Every non-empty proper subset is reachable.
    assert seen == {frozenset(c) for r in (1, 2) for c in itertools.combinations(words, r)}


def test_partial_needs_two_colour_phrases():
    assert make_partial("a red car on the road", random.Random(0)) is None
    assert make_partial("a car on the road", random.Random(0)) is None


def _within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


@pytest.mark.parametrize(
    "partial_ratio, scarce_ratio, text_dropout",
    [(0.5, 0.3, 0.1), (0.3, 0.3, 0.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.25)],
)
def test_sampler_ratios(partial_ratio, scarce_ratio, text_dropout):
    n = 10_000
    rng = random.Random(1234)
    draws = [sample_description(THREE_PHRASES, rng, partial_ratio, scarce_ratio, text_dropout) for _ in range(n)]
    levels = Counter(level for _, level in draws)
    expected = {
        "empty": text_dropout,
        "scarce": (1 - text_dropout) * scarce_ratio,
        "partial": (1 - text_dropout) * (1 - scarce_ratio) * partial_ratio,
        "complete": (1 - text_dropout) * (1 - scarce_ratio) * (1 - partial_ratio),
    }
    for level, p in expected.items():
        assert _within(levels[level], n, p), (level, levels[level] / n, p)
    # Each level's text is what it claims to be.
    for text, level in draws[:500]:
        colours = _colour_words_in(text)
        if level == "empty":
            assert text == ""
        elif level == "scarce":
            assert colours == []
        elif level == "complete":
            assert text == THREE_PHRASES
        else:
            assert 0 < len(colours) < len(_colour_words_in(THREE_PHRASES))


def test_sampler_on_captions_without_two_phrases_never_gives_partial():
    rng = random.Random(0)
    levels = Counter(sample_description("a red car", rng, 1.0, 0.0, 0.0)[1] for _ in range(200))
    assert levels == {"complete": 200}


def test_sampler_is_reproducible_and_generic_mode():
    first = [sample_description(THREE_PHRASES, random.Random(7)) for _ in range(3)]
    second = [sample_description(THREE_PHRASES, random.Random(7)) for _ in range(3)]
    assert first == second
    rng = random.Random(0)
    scarce = {sample_description(THREE_PHRASES, rng, 0.0, 1.0, 0.0, scarce_mode="generic") for _ in range(20)}
    assert scarce == {(GENERIC_SCARCE_DESCRIPTION, "scarce")}


@pytest.mark.parametrize("value", [-0.1, 1.5, "x", None])
@pytest.mark.parametrize("flag", ["--scarce_ratio", "--partial_ratio", "--text_dropout"])
def test_ratios_outside_unit_interval_are_refused_naming_the_flag(flag, value):
    with pytest.raises(ValueError, match=flag):
        check_ratio(value, flag)
    keyword = {"--scarce_ratio": "scarce_ratio", "--partial_ratio": "partial_ratio", "--text_dropout": "text_dropout"}
    with pytest.raises(ValueError, match=flag):
        sample_description(THREE_PHRASES, random.Random(0), **{keyword[flag]: value})
