"""Captions of the digits: the text side of the bundled text-to-image model.

A caption is a *template* filled with the digit's word ("seven", ``{w}``) or numeral ("7",
``{n}``). Templates are made from a prefix, the digit and a suffix ("a small blurry {w},
centered"): ``len(PREFIXES) x 2 x len(SUFFIXES)`` phrasings, so that a model trained on them
learns to read the digit out of varied context instead of memorising a few sentences.
``HELDOUT_TEMPLATES`` are combinations taken out of that grid: the denoiser never sees them in
training (nor does the bundled tokenizer learn its merges from them), so samples drawn from them
measure whether the model follows the digit named in a new sentence.
"""
from __future__ import annotations

import itertools

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

PREFIXES = ("", "a ", "a handwritten ", "the number ", "digit ", "a picture of the digit ",
            "an image of a ", "a small blurry ", "the numeral ", "a drawing of a ",
            "a photo of the number ", "a sketch of a ", "a thick ", "a thin ", "a messy ",
            "a neat ")
SUFFIXES = ("", ", thin strokes", " written by hand", " on paper", ", bold strokes",
            " in black ink", " on a dark background", ", centered", ", slightly rotated",
            ", low resolution", " drawn quickly", ", scanned")
HELDOUT_TEMPLATES = (
    "a drawing of a {w} on a dark background",
    "digit {n} written by hand",
    "the numeral {w}, slightly rotated",
    "a messy {n} in black ink",
)
TRAIN_TEMPLATES = tuple(
    t for t in (f"{p}{{{form}}}{s}" for p, form, s in itertools.product(PREFIXES, "wn", SUFFIXES))
    if t not in HELDOUT_TEMPLATES)


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
