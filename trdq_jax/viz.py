"""Image grids as PNG (PIL): one labelled row per class, channels-last samples in [-1, 1].

Every grid is written atomically through ``files.write_file`` and marked as a trdq_jax
``figure`` (a PNG text chunk), so that ``overwrite=True`` can later replace it.
"""
from __future__ import annotations

import pathlib

import numpy as np

from trdq_jax import files

_TEXT = (20, 20, 20)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[..., H, W, C]`` floats in [-1, 1] -> uint8 (values outside are clipped for display)."""
    return np.round((np.clip(np.asarray(images, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def _tile(img: np.ndarray, size: tuple[int, int]):
    from PIL import Image
    img = np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img
    return Image.fromarray(img).resize(size, Image.NEAREST)


def _save_png(path, image, overwrite: bool) -> pathlib.Path:
    from PIL.PngImagePlugin import PngInfo
    if pathlib.Path(path).suffix.lower() != ".png":
        raise ValueError(f"path: expected a .png file, got {str(path)!r}")
    info = PngInfo()
    for key, value in files.png_marker("figure").items():
        info.add_text(key, value)
    return files.write_file(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info),
                            kind="figure", overwrite=overwrite, arg="path")


def save_grid(path: str | pathlib.Path, rows: list[np.ndarray], row_labels: list[str], *,
              scale: int = 4, pad: int = 2, label_width: int = 60, title: str | None = None,
              overwrite: bool = False) -> None:
    """Write a grid PNG.

    Args:
      rows: each ``[N, H, W, C]`` (C = 1 or 3) in [-1, 1]; rows may have different N.
      row_labels: one text label per row, drawn at the left.
      scale: nearest-neighbour upscaling factor (8x8 digits are tiny).
      overwrite: replace an existing trdq_jax figure at ``path`` (anything else is refused).
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
            canvas.paste(_tile(img, (w, h)), (label_width + pad + c * (w + pad), y0))
    _save_png(path, canvas, overwrite)


def save_comparison_grid(path, settings: dict, row_labels: list[str], *, title: str,
                         scale: int = 4, pad: int = 2, overwrite: bool = False) -> tuple[int, int]:
    """Side-by-side labelled panels of samples (e.g. float | W8A8 | W4A8), one row per class.

    ``settings``: ``{name: [rows]}``, each row ``[n, H, W, C]`` in [-1, 1] (C = 1 or 3); every
    setting has ``len(row_labels)`` rows with the same image size. ``overwrite`` replaces an
    existing trdq_jax figure. Returns the image size.
    """
    from PIL import Image, ImageDraw

    if not settings:
        raise ValueError("settings: expected at least one {name: rows} entry")
    for name, rows in settings.items():
        if len(rows) != len(row_labels):
            raise ValueError(f"settings[{name!r}]: expected {len(row_labels)} rows, "
                             f"got {len(rows)}")
    first = next(iter(settings.values()))[0]
    th, tw = first.shape[1] * scale, first.shape[2] * scale
    ncols = {n: max(r.shape[0] for r in rows) for n, rows in settings.items()}
    label_w, gap, top = 70, 16, 46
    panel_w = {n: c * (tw + pad) for n, c in ncols.items()}
    width = label_w + sum(panel_w.values()) + gap * (len(settings) - 1) + pad
    height = top + len(row_labels) * (th + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((width / 2, 4), title, fill=_TEXT, font=_font(14), anchor="mt")
    x0 = label_w
    for name, rows in settings.items():
        draw.text((x0 + panel_w[name] / 2, top - 6), name, fill=_TEXT, font=_font(14), anchor="mb")
        for r, row in enumerate(rows):
            y0 = top + r * (th + pad)
            for c, img in enumerate(to_uint8(row)):
                canvas.paste(_tile(img, (tw, th)), (x0 + c * (tw + pad), y0))
        x0 += panel_w[name] + gap
    for r, label in enumerate(row_labels):
        draw.text((6, top + r * (th + pad) + th / 2), label, fill=_TEXT, font=_font(13),
                  anchor="lm")
    _save_png(path, canvas, overwrite)
    return width, height
