"""An offline CLIP tokenizer for tests: no Hub, built from vocab/merges files written on the spot.

The vocabulary is byte-level BPE like CLIP's: the 256 byte symbols and their end-of-word (``</w>``)
variants, so any text tokenizes (unknown words fall apart into single bytes), plus merges that make a
few whole words single tokens (``"red</w>"``, ``"car</w>"``, ...), and the special tokens
``<|startoftext|>`` / ``<|endoftext|>``. Sequences are padded to 77 tokens like CLIP's.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

DEFAULT_WORDS = (
    "a", "the", "and", "with", "of", "on", "in",
    "red", "blue", "green", "yellow", "white", "black",
    "car", "cup", "cat", "dog", "sky", "grass", "tree", "shirt", "man", "woman", "table",
)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP's reversible byte -> printable unicode mapping
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _apply_merges(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def clip_vocab(words=DEFAULT_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges: byte symbols, their ``</w>`` variants, one token per word of ``words``, specials."""
    byte_symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in byte_symbols:
        vocab[symbol] = len(vocab)
    for symbol in byte_symbols:
        vocab[symbol + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        # Apply the merges so far (lowest rank first, as BPE does), then merge what is left from the left with new,
        # lowest-priority merges: each word ends as one token and the words added before keep their tokenization.
        symbols = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], merges)
        while len(symbols) > 1:
            merges.append((symbols[0], symbols[1]))
            vocab.setdefault(symbols[0] + symbols[1], len(vocab))
            symbols = _apply_merges(symbols, merges)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_clip_vocab(directory: str | Path, words=DEFAULT_WORDS) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and a tokenizer config into ``directory`` and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab(words)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    config = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def make_offline_clip_tokenizer(directory: str | Path, words=DEFAULT_WORDS) -> CLIPTokenizer:
    """A CLIP tokenizer loaded from files written into ``directory`` (a pytest ``tmp_path``)."""
    return CLIPTokenizer.from_pretrained(str(write_clip_vocab(directory, words)))
