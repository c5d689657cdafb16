"""Captions of the digits: the text side of the bundled text-to-image model.

Each digit ``d`` is described by templates filled with its word ("seven") or numeral ("7").
``TRAIN_TEMPLATES`` are the only phrasings the denoiser is trained on (and the only text the
bundled tokenizer learns its merges from); ``HELDOUT_TEMPLATES`` are never seen in training, so
samples drawn from them measure whether the model follows the digit named, not a memorised
sentence. Both sets use every digit's word and numeral forms.
"""
from __future__ import annotations

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w}: the digit's word, {n}: its numeral
TRAIN_TEMPLATES = (
    "a handwritten {w}",
    "the number {n}, thin strokes",
    "digit {n}",
    "a picture of the digit {w}",
    "{w}",
    "an image of a {n}",
    "a small blurry {w}",
    "the numeral {n} written by hand",
)
HELDOUT_TEMPLATES = (
    "a drawing of the number {w}",
    "handwritten digit {n}",
    "{n} on a dark background",
    "a scanned {w}, bold strokes",
)


def caption(digit: int, template: str) -> str:
    """``template`` filled for ``digit`` (0..9): ``caption(7, "a handwritten {w}")`` ->
    ``"a handwritten seven"``."""
    if isinstance(digit, bool) or not isinstance(digit, (int, np.integer)) or not 0 <= digit <= 9:
        raise ValueError(f"digit: expected an int in [0, 9], got {digit!r}")
    return template.format(w=WORDS[digit], n=str(int(digit)))


def caption_table(templates=TRAIN_TEMPLATES) -> list[list[str]]:
    """``table[t][d]``: template ``t`` filled for digit ``d`` (``len(templates)`` x 10)."""
    return [[caption(d, t) for d in range(10)] for t in templates]


def prompts_for(labels, templates=HELDOUT_TEMPLATES) -> list[str]:
    """One prompt per label: the ``k``-th occurrence of a digit takes template
    ``k % len(templates)``, so every digit cycles through every template whatever the label
    layout (the prompts of a class-match evaluation)."""
    seen: dict[int, int] = {}
    out = []
    for d in np.asarray(labels).reshape(-1):
        k = seen.get(int(d), 0)
        seen[int(d)] = k + 1
        out.append(caption(int(d), templates[k % len(templates)]))
    return out
