"""Captioned training batches for text-conditioned (PixArt) models.

Every training caption is encoded once, before the loop (``caption_bank``); each batch then
picks, per example, one template of its digit and, with probability ``caption_dropout_prob``,
the empty prompt instead (the null branch of classifier-free guidance, as diffusers samples
it). The picks depend only on ``(seed, step)``, so a resumed run sees the same captions.
"""
from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple

import numpy as np

from trdq_jax.data.captions import TRAIN_TEMPLATES, caption_table


class CaptionBank(NamedTuple):
    """emb float32 ``[T, 10, L, C]`` and mask int32 ``[T, 10, L]`` of template ``t`` filled for
    digit ``d``; null_emb ``[L, C]`` and null_mask ``[L]``: the empty prompt."""

    emb: np.ndarray
    mask: np.ndarray
    null_emb: np.ndarray
    null_mask: np.ndarray


def caption_bank(text_encoder: str, max_tokens: int, caption_channels: int,
                 templates=TRAIN_TEMPLATES) -> CaptionBank:
    """Encode every ``templates`` x digit caption and the empty prompt with ``text_encoder``
    (a bundled name or a directory; ``trdq_jax.models.text_encoder``)."""
    from trdq_jax.models.text_encoder import load_text_encoder
    encoder = load_text_encoder(text_encoder)
    if encoder.width != caption_channels:
        raise ValueError(f"cfg.model.caption_channels: {caption_channels}, but the text encoder "
                         f"{encoder.where!r} gives {encoder.width} channels per token")
    prompts = [c for row in caption_table(templates) for c in row] + [""]
    emb, mask = encoder.encode(prompts, max_tokens)
    count = len(templates)
    return CaptionBank(emb[:-1].reshape(count, 10, *emb.shape[1:]),
                       mask[:-1].reshape(count, 10, -1), emb[-1], mask[-1])


def captioned_batches(batches: Iterable, bank: CaptionBank, seed: int, start: int,
                      dropout: float) -> Iterator[tuple[np.ndarray, dict]]:
    """``(images [B, ...], labels int [B])`` batches of steps ``start, start + 1, ...`` ->
    ``(images, {"caption": float32 [B, L, C], "mask": int32 [B, L]})``."""
    count = bank.emb.shape[0]
    for step, (images, labels) in enumerate(batches, start):
        rng = np.random.default_rng((seed, 23, step))
        template = rng.integers(0, count, size=len(labels))
        drop = rng.random(len(labels)) < dropout
        caption = np.where(drop[:, None, None], bank.null_emb[None],
                           bank.emb[template, labels])
        mask = np.where(drop[:, None], bank.null_mask[None], bank.mask[template, labels])
        yield images, {"caption": caption.astype(np.float32), "mask": mask.astype(np.int32)}
