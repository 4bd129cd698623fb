# Copyright 2026 The L-CAD diffusers port authors. Licensed under the Apache License, Version 2.0.
"""Any-level descriptions for training L-CAD (paper Sec. 3.5).

L-CAD is trained so that one model follows a *complete* description (every object's colour), a *partial* one (only
some objects' colours) and a *scarce* one (no colour at all: it then colourises automatically). Datasets only hold
complete captions, so the lower levels are derived from them here:

- complete: the caption as is;
- partial: the colour words of a random non-empty proper subset of the caption's colour phrases removed (so at least
  one colour phrase is kept and at least one is dropped; captions with fewer than two colour phrases stay complete);
- scarce: every colour word removed ("a red car on a green lawn" -> "a car on a lawn"), or the generic
  "a colorful image" the paper uses for datasets without captions.

The paper replaces 30% of the complete/partial descriptions by scarce ones; classifier-free guidance additionally
needs some empty prompts. The released code does neither and does not say how partial descriptions were made, so the
rules here are this port's: see :func:`sample_description`.

Colour phrases are found with a lexicon (:data:`COLOUR_WORDS`, :data:`COLOUR_MODIFIERS`): a maximal run of colour
words, their modifiers ("light", "dark", ...) and connectors ("red and white", "blue-green", "cream-colored"),
followed by the word it describes. Words that are also common nouns ("rose", "lime", "salmon", ...) are left out of
the lexicon on purpose: removing them would damage more captions than it helps.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass


#: Colour words: basic colour terms, frequent named colours, spelling variants and "-ish" forms.
COLOUR_WORDS = frozenset(
    """
    red orange yellow green blue purple pink brown black white gray grey violet
    cyan magenta beige tan gold golden silver maroon navy teal turquoise indigo lavender ivory crimson scarlet
    khaki burgundy amber bronze copper aqua azure fuchsia mauve ochre charcoal blond blonde brunette auburn
    reddish orangish orangey yellowish greenish bluish blueish purplish pinkish brownish blackish whitish grayish
    greyish
    """.split()
)

#: Words that modify a following colour word ("light blue", "dark-red", "hot pink"); alone they are not colours.
COLOUR_MODIFIERS = frozenset(
    """
    light dark bright pale deep pastel vivid dull faded neon dusty muted rich hot baby royal sky dim
    """.split()
)

#: Second halves of hyphenated colour compounds: "cream-colored", "two-toned", "red-tinted".
COLOUR_SUFFIXES = frozenset({"colored", "coloured", "toned", "tinted", "hued"})

#: Joins colour words inside one phrase: "black and white", "red, white and blue", "blue or green".
_CONNECTORS = frozenset({"and", "or", "&"})

#: The generic scarce description the paper uses.
GENERIC_SCARCE_DESCRIPTION = "a colorful image"

DESCRIPTION_LEVELS = ("complete", "partial", "scarce", "empty")
SCARCE_MODES = ("remove", "generic")

_TOKEN = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*|\d+|[^\sA-Za-z\d]")
_WORD = re.compile(r"[A-Za-z]")
_VOWEL_SOUND = re.compile(r"^(?:[aeio]|u(?!ni|se|sa|ro|ku|tv))", re.IGNORECASE)


@dataclass(frozen=True)
class ColourPhrase:
    """A colour phrase of a caption: token indices of its colour part and of the word it describes (or None)."""

    colour_tokens: tuple[int, ...]
    noun_token: int | None
    text: str


def tokenize(text: str) -> list[tuple[str, int, int]]:
    """Words (with inner hyphens/apostrophes), numbers and punctuation marks, as (token, start, end)."""
    return [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


def is_colour_token(token: str) -> bool:
    """True for a colour word ("red"), a colour compound ("light-blue", "blue-green", "cream-colored")."""
    parts = token.lower().split("-")
    if len(parts) == 1:
        return parts[0] in COLOUR_WORDS
    if parts[-1] in COLOUR_SUFFIXES:
        # "cream-colored", "dark-colored", "two-toned": colour information whatever the first half is.
        return True
    known = COLOUR_WORDS | COLOUR_MODIFIERS | _CONNECTORS
    if all(part in known for part in parts) and any(part in COLOUR_WORDS for part in parts):
        return True
    # "black-haired", "red-roofed": a colour attribute of a part; the whole compound carries the colour.
    return parts[0] in COLOUR_WORDS or (parts[0] in COLOUR_MODIFIERS and parts[1] in COLOUR_WORDS)


def find_colour_phrases(text: str) -> list[ColourPhrase]:
    """
    The colour phrases of `text`, in order.

    A phrase is a maximal run of colour tokens, modifiers directly before a colour token and connectors (`and`, `or`,
    `&`, commas) between colour tokens, plus the next word if there is one (the thing the colour describes; for a
    predicative colour at the end of a clause, "the car is red.", there is none).
    """
    tokens = [token.lower() for token, _, _ in tokenize(text)]
    phrases: list[ColourPhrase] = []
    i = 0
    while i < len(tokens):
        if not _starts_run(tokens, i):
            i += 1
            continue
        colour_indices = []
        j = i
        while j < len(tokens):
            if _starts_run(tokens, j):
                colour_indices.append(j)
                j += 1
            elif tokens[j] in _CONNECTORS and _starts_run(tokens, j + 1):
                colour_indices.append(j)  # "black and white"
                j += 1
            elif tokens[j] == "," and (
                _starts_run(tokens, j + 1) or (j + 1 < len(tokens) and tokens[j + 1] in _CONNECTORS and _starts_run(tokens, j + 2))
            ):
                colour_indices.append(j)  # "red, white and blue", "red, and blue"
                j += 1
            else:
                break
        noun = j if j < len(tokens) and _WORD.match(tokens[j]) and tokens[j] not in _CONNECTORS else None
        words = [tokens[k] for k in colour_indices] + ([tokens[noun]] if noun is not None else [])
        phrases.append(ColourPhrase(tuple(colour_indices), noun, " ".join(words).replace(" ,", ",")))
        i = j
    return phrases


def _starts_run(tokens: list[str], i: int) -> bool:
    """True if token `i` is a colour token, or a modifier right before one ("light" in "light blue")."""
    if i >= len(tokens):
        return False
    if is_colour_token(tokens[i]):
        return True
    return tokens[i] in COLOUR_MODIFIERS and i + 1 < len(tokens) and is_colour_token(tokens[i + 1])


def remove_colour_words(text: str, phrases: list[ColourPhrase] | None = None) -> str:
    """
    `text` without the colour words of `phrases` (default: all its colour phrases). The space before each removed
    word goes with it; an article before a removed word is made to agree with the new next word ("an orange cat" ->
    "a cat"); a removed capitalised first word passes its capital on ("Red cars" -> "Cars").
    """
    if phrases is None:
        phrases = find_colour_phrases(text)
    drop = {index for phrase in phrases for index in phrase.colour_tokens}
    if not drop:
        return text
    tokens = tokenize(text)
    kept = [i for i in range(len(tokens)) if i not in drop]
    replacements: dict[int, str] = {}
    for a, b in zip(kept, kept[1:]):
        article, following = tokens[a][0], tokens[b][0]
        if b > a + 1 and article.lower() in ("a", "an") and _WORD.match(following) and following.lower() not in _CONNECTORS:
            wanted = "an" if _VOWEL_SOUND.match(following) else "a"
            replacements[a] = wanted.capitalize() if article[0].isupper() else wanted
    if kept and kept[0] > 0 and tokens[0][0][:1].isupper() and _WORD.match(tokens[kept[0]][0]):
        first = tokens[kept[0]][0]
        replacements[kept[0]] = replacements.get(kept[0], first)[:1].upper() + replacements.get(kept[0], first)[1:]

    pieces, position = [], 0
    for index, (token, start, end) in enumerate(tokens):
        if index in drop:
            cut = start
            while cut > position and text[cut - 1] in " \t":
                cut -= 1
            pieces.append(text[position:cut])
            position = end
        elif index in replacements:
            pieces.append(text[position:start])
            pieces.append(replacements[index])
            position = end
    pieces.append(text[position:])
    result = "".join(pieces)
    if not text[:1].isspace():
        result = result.lstrip(" \t")
    return result


def make_partial(text: str, rng: random.Random, phrases: list[ColourPhrase] | None = None) -> str | None:
    """
    A partial description: the colour words of a random non-empty proper subset of the colour phrases removed; None
    when `text` has fewer than two colour phrases (no partial description exists).
    """
    if phrases is None:
        phrases = find_colour_phrases(text)
    if len(phrases) < 2:
        return None
    count = rng.randint(1, len(phrases) - 1)
    removed = rng.sample(phrases, count)
    return remove_colour_words(text, removed)


def make_scarce(text: str, mode: str = "remove", generic: str = GENERIC_SCARCE_DESCRIPTION) -> str:
    """A scarce description: `text` without colour words (`mode="remove"`) or the generic one (`"generic"`)."""
    if mode == "generic":
        return generic
    if mode != "remove":
        raise ValueError(f"`scarce_mode` must be one of {SCARCE_MODES}, got {mode!r}.")
    return remove_colour_words(text)


def check_ratio(value: float, flag: str) -> float:
    """`value` if it is a probability, else a ValueError naming `flag`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} must be a number in [0, 1], got {value!r}.") from None
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{flag} must be in [0, 1], got {value}.")
    return number


def sample_description(
    caption: str,
    rng: random.Random,
    partial_ratio: float = 0.3,
    scarce_ratio: float = 0.3,
    text_dropout: float = 0.0,
    scarce_mode: str = "remove",
    generic_scarce: str = GENERIC_SCARCE_DESCRIPTION,
) -> tuple[str, str]:
    """
    Draw a training description of any level from a complete `caption`; returns `(description, level)`.

    1. With probability `text_dropout`: `("", "empty")`, the unconditional prompt of classifier-free guidance.
    2. Otherwise a complete or partial description: partial with probability `partial_ratio` when the caption has at
       least two colour phrases (else complete);
    3. which is then replaced by a scarce one with probability `scarce_ratio` (the paper's 30%).

    So P(empty) = d, P(scarce) = (1-d)s, P(partial) = (1-d)(1-s)p, P(complete) = (1-d)(1-s)(1-p) for captions with two
    or more colour phrases. `rng` is a `random.Random`; seeded, the draw is reproducible.
    """
    partial_ratio = check_ratio(partial_ratio, "--partial_ratio")
    scarce_ratio = check_ratio(scarce_ratio, "--scarce_ratio")
    text_dropout = check_ratio(text_dropout, "--text_dropout")
    if scarce_mode not in SCARCE_MODES:
        raise ValueError(f"--scarce_mode must be one of {SCARCE_MODES}, got {scarce_mode!r}.")
    # Always draw the same number of random numbers, so one caption's draw does not shift the next one's.
    u_dropout, u_partial, u_scarce = rng.random(), rng.random(), rng.random()
    partial_seed = rng.getrandbits(32)
    if u_dropout < text_dropout:
        return "", "empty"
    if u_scarce < scarce_ratio:
        return make_scarce(caption, scarce_mode, generic_scarce), "scarce"
    if u_partial < partial_ratio:
        partial = make_partial(caption, random.Random(partial_seed))
        if partial is not None:
            return partial, "partial"
    return caption, "complete"


__all__ = [
    "COLOUR_WORDS",
    "COLOUR_MODIFIERS",
    "DESCRIPTION_LEVELS",
    "GENERIC_SCARCE_DESCRIPTION",
    "SCARCE_MODES",
    "ColourPhrase",
    "check_ratio",
    "find_colour_phrases",
    "is_colour_token",
    "make_partial",
    "make_scarce",
    "remove_colour_words",
    "sample_description",
]
