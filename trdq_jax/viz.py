"""Image grids as PNG: one labelled row per class, channels-last samples in [-1, 1]."""
from __future__ import annotations

import pathlib

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[..., H, W, C]`` floats in [-1, 1] -> uint8 (values outside are clipped for display)."""
    return np.round((np.clip(np.asarray(images, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def save_grid(path: str | pathlib.Path, rows: list[np.ndarray], row_labels: list[str], *,
              scale: int = 4, pad: int = 2, label_width: int = 60, title: str | None = None) -> None:
    """Write a grid PNG.

    Args:
      rows: each ``[N, H, W, C]`` (C = 1 or 3) in [-1, 1]; rows may have different N.
      row_labels: one text label per row, drawn at the left.
      scale: nearest-neighbour upscaling factor (8x8 digits are tiny).
    """
    from PIL import Image, ImageDraw

    if len(rows) != len(row_labels):
        raise ValueError(f"row_labels: expected {len(rows)} labels, got {len(row_labels)}")
    if not rows:
        raise ValueError("rows: expected at least one row")
    h, w = rows[0].shape[1] * scale, rows[0].shape[2] * scale
    ncol = max(r.shape[0] for r in rows)
    top = 16 if title else 0
    width = label_width + ncol * (w + pad) + pad
    if title:  # widen narrow grids so the title is not cut off
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        width = max(width, int(np.ceil(probe.textlength(title))) + 2 * pad)
    canvas = Image.new("RGB", (width, top + len(rows) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 2), title, fill=(0, 0, 0))
    for r, (row, label) in enumerate(zip(rows, row_labels)):
        y0 = top + pad + r * (h + pad)
        draw.text((pad, y0 + h // 2 - 6), label, fill=(0, 0, 0))
        for c, img in enumerate(to_uint8(row)):
            if img.shape[-1] == 1:
                img = np.repeat(img, 3, axis=-1)
            tile = Image.fromarray(img).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_width + pad + c * (w + pad), y0))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    canvas.save(tmp)
    tmp.replace(path)
