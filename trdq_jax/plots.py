"""Figures drawn with PIL alone: band/line charts in panels and labelled sample comparisons.

``save_range_figure`` is the paper's motivating figure: per layer, the activation range of every
sampling step before and after the recipe's smoothing + rotation (data from ``layer_ranges``).
Every writer goes through a temporary file and one rename.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import uuid

import numpy as np

PANEL_SIZE = (560, 330)   # (width, height) of one chart panel, pixels
HEADER_HEIGHT = 64        # figure title + legend above the panels
_MARGIN = {"left": 72, "right": 16, "top": 28, "bottom": 50}
_GRID, _AXIS, _TEXT = (225, 225, 225), (60, 60, 60), (20, 20, 20)
BEFORE_COLOR, AFTER_COLOR = (214, 69, 65), (38, 110, 200)


def _font(size: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def _save_atomic(image, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ----------------------------------------------------------------------------- charts


@dataclasses.dataclass(frozen=True)
class Band:
    """A filled region between ``low`` and ``high`` (float ``[n]`` each)."""
    label: str
    color: tuple[int, int, int]
    low: np.ndarray
    high: np.ndarray


@dataclasses.dataclass(frozen=True)
class Line:
    """A polyline ``y`` (float ``[n]``)."""
    label: str
    color: tuple[int, int, int]
    y: np.ndarray


@dataclasses.dataclass(frozen=True)
class Panel:
    """One chart: x float ``[n]`` shared by its bands and lines; dashed vertical ``vlines``."""
    title: str
    x: np.ndarray
    bands: tuple[Band, ...] = ()
    lines: tuple[Line, ...] = ()
    xlabel: str = ""
    ylabel: str = ""
    vlines: tuple[float, ...] = ()


def figure_size(num_panels: int, columns: int = 2) -> tuple[int, int]:
    """(width, height) in pixels of a ``save_panels`` figure."""
    columns = min(columns, num_panels)
    rows = math.ceil(num_panels / columns)
    return columns * PANEL_SIZE[0], HEADER_HEIGHT + rows * PANEL_SIZE[1]


def nice_ticks(lo: float, hi: float, count: int = 5) -> np.ndarray:
    """Round tick values (1, 2, 5 x 10^k steps) covering ``[lo, hi]`` with about ``count``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"lo, hi: expected finite limits, got {lo}, {hi}")
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    return np.arange(start, hi + step * 1e-9, step)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def _draw_panel(canvas, panel: Panel, origin: tuple[int, int]) -> None:
    from PIL import Image, ImageDraw
    draw = ImageDraw.Draw(canvas)
    ox, oy = origin
    w, h = PANEL_SIZE
    left, top = ox + _MARGIN["left"], oy + _MARGIN["top"]
    right, bottom = ox + w - _MARGIN["right"], oy + h - _MARGIN["bottom"]
    x = np.asarray(panel.x, np.float64)
    ys = [np.asarray(a, np.float64) for b in panel.bands for a in (b.low, b.high)]
    ys += [np.asarray(line.y, np.float64) for line in panel.lines]
    for a in ys:
        if a.shape != x.shape:
            raise ValueError(f"panel {panel.title!r}: series of shape {a.shape}, x has {x.shape}")
    y_lo, y_hi = min(float(a.min()) for a in ys), max(float(a.max()) for a in ys)
    pad = 0.05 * (y_hi - y_lo or 1.0)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_lo, x_hi = float(x.min()), float(x.max()) if x.max() > x.min() else float(x.min()) + 1

    def px(xv):
        return left + (np.asarray(xv) - x_lo) / (x_hi - x_lo) * (right - left)

    def py(yv):
        return bottom - (np.asarray(yv) - y_lo) / (y_hi - y_lo) * (bottom - top)

    small, normal = _font(11), _font(13)
    for t in nice_ticks(y_lo, y_hi):
        yy = float(py(t))
        draw.line([(left, yy), (right, yy)], fill=_GRID)
        draw.text((left - 5, yy), _fmt(t), fill=_TEXT, font=small, anchor="rm")
    for t in nice_ticks(x_lo, x_hi, 6):
        xx = float(px(t))
        draw.line([(xx, top), (xx, bottom)], fill=_GRID)
        draw.text((xx, bottom + 4), _fmt(t), fill=_TEXT, font=small, anchor="mt")
    for v in panel.vlines:
        xx = float(px(v))
        for y0 in range(int(top), int(bottom), 8):
            draw.line([(xx, y0), (xx, min(y0 + 4, bottom))], fill=(150, 150, 150))
    if y_lo < 0 < y_hi:
        draw.line([(left, float(py(0))), (right, float(py(0)))], fill=(170, 170, 170))

    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    shade = ImageDraw.Draw(overlay)
    for band in panel.bands:
        upper = list(zip(px(x).tolist(), py(band.high).tolist()))
        lower = list(zip(px(x).tolist(), py(band.low).tolist()))
        shade.polygon(upper + lower[::-1], fill=(*band.color, 70))
    canvas.alpha_composite(overlay)
    draw = ImageDraw.Draw(canvas)
    for band in panel.bands:  # outline the band edges so overlaps stay readable
        for edge in (band.low, band.high):
            draw.line(list(zip(px(x).tolist(), py(edge).tolist())), fill=(*band.color, 255),
                      width=1)
    for line in panel.lines:
        draw.line(list(zip(px(x).tolist(), py(line.y).tolist())), fill=(*line.color, 255), width=2)

    draw.rectangle([left, top, right, bottom], outline=_AXIS)
    draw.text(((left + right) / 2, oy + 6), panel.title, fill=_TEXT, font=normal, anchor="mt")
    draw.text(((left + right) / 2, oy + h - 8), panel.xlabel, fill=_TEXT, font=small, anchor="mb")
    if panel.ylabel:
        label = Image.new("RGBA", (bottom - top, 16), (255, 255, 255, 0))
        ImageDraw.Draw(label).text(((bottom - top) / 2, 8), panel.ylabel, fill=_TEXT, font=small,
                                   anchor="mm")
        canvas.alpha_composite(label.rotate(90, expand=True), (ox + 4, int(top)))


def _legend(draw, panel: Panel, y: int, width: int) -> None:
    items = [(b.label, b.color, "band") for b in panel.bands]
    items += [(line.label, line.color, "line") for line in panel.lines]
    font = _font(13)
    widths = [34 + draw.textlength(label, font=font) + 18 for label, _, _ in items]
    x = max(8, (width - sum(widths)) / 2)
    for (label, color, kind), w in zip(items, widths):
        if kind == "band":
            draw.rectangle([x, y - 6, x + 26, y + 6], fill=tuple(int(c * 0.3 + 255 * 0.7)
                                                                 for c in color), outline=color)
        else:
            draw.line([(x, y), (x + 26, y)], fill=color, width=3)
        draw.text((x + 32, y), label, fill=_TEXT, font=font, anchor="lm")
        x += w


def save_panels(path, panels: list[Panel], *, title: str, columns: int = 2) -> tuple[int, int]:
    """Write panels on a grid (``columns`` wide) under a title and a legend taken from the
    first panel's series. Returns the figure size ``figure_size(len(panels), columns)``."""
    from PIL import Image, ImageDraw
    if not panels:
        raise ValueError("panels: expected at least one panel")
    if columns < 1:
        raise ValueError(f"columns: expected a positive int, got {columns}")
    size = figure_size(len(panels), columns)
    canvas = Image.new("RGBA", size, (255, 255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((size[0] / 2, 8), title, fill=_TEXT, font=_font(15), anchor="mt")
    _legend(draw, panels[0], 44, size[0])
    cols = min(columns, len(panels))
    for i, panel in enumerate(panels):
        _draw_panel(canvas, panel, ((i % cols) * PANEL_SIZE[0],
                                    HEADER_HEIGHT + (i // cols) * PANEL_SIZE[1]))
    _save_atomic(canvas.convert("RGB"), path)
    return size


# ----------------------------------------------------------------------------- activation ranges


@dataclasses.dataclass(frozen=True)
class RangeCurves:
    """The range of a layer's input per sampling step, float64 ``[steps]`` each.

    low, high: min / max over the rows and channels of the step.
    mean_absmax: per-channel abs-max over the rows, averaged over channels.
    """
    low: np.ndarray
    high: np.ndarray
    mean_absmax: np.ndarray

    @property
    def absmax(self) -> float:
        """Largest magnitude over all steps."""
        return float(max(np.abs(self.low).max(), np.abs(self.high).max()))


def range_curves(rows) -> RangeCurves:
    """``rows [steps, R, K]`` -> ``RangeCurves`` (float64)."""
    rows = np.asarray(rows, np.float64)
    if rows.ndim != 3 or rows.size == 0:
        raise ValueError(f"rows: expected a non-empty [steps, R, K] array, got {rows.shape}")
    return RangeCurves(low=rows.min(axis=(1, 2)), high=rows.max(axis=(1, 2)),
                       mean_absmax=np.abs(rows).max(axis=1).mean(axis=1))


def transformed_rows(stats, q, segment_of_step) -> np.ndarray:
    """``stats.rows [steps, R, K]`` after ``q``'s smoothing + rotation, each step with its own
    segment's transform (``transform_activation``); float32, same shape."""
    import jax.numpy as jnp

    from trdq_jax.quant.qlinear import transform_activation
    rows = np.asarray(stats.rows, np.float32)
    table = np.asarray(segment_of_step)
    if table.shape != (rows.shape[0],):
        raise ValueError(f"segment_of_step: expected shape ({rows.shape[0]},), got {table.shape}")
    out = np.empty_like(rows)
    for segment in np.unique(table):
        steps = table == segment
        out[steps] = np.asarray(transform_activation(q, jnp.asarray(rows[steps]),
                                                     jnp.int32(segment)))
    return out


def layer_ranges(stats, q, segment_of_step) -> tuple[RangeCurves, RangeCurves]:
    """(before, after) range curves of one layer from its calibration rows ``stats.rows`` and
    its ``QLinear`` ``q``."""
    return range_curves(stats.rows), range_curves(transformed_rows(stats, q, segment_of_step))


def save_range_figure(path, ranges: dict, segment_of_step, *, title: str,
                      columns: int = 2) -> tuple[int, int]:
    """One panel per layer: min/max band and mean per-channel abs-max per sampling step, before
    (red) and after (blue) the transform; dashed lines mark time-segment boundaries.

    ``ranges``: ``{layer path: (before, after)}`` from ``layer_ranges``.
    """
    table = np.asarray(segment_of_step)
    steps = np.arange(len(table), dtype=np.float64)
    boundaries = tuple(float(i) - 0.5 for i in range(1, len(table)) if table[i] != table[i - 1])
    panels = []
    for layer, (before, after) in ranges.items():
        panels.append(Panel(
            title=f"{layer}  (max |x|: {before.absmax:.3g} -> {after.absmax:.3g})", x=steps,
            bands=(Band("before: min..max", BEFORE_COLOR, before.low, before.high),
                   Band("after: min..max", AFTER_COLOR, after.low, after.high)),
            lines=(Line("before: mean channel abs-max", BEFORE_COLOR, before.mean_absmax),
                   Line("after: mean channel abs-max", AFTER_COLOR, after.mean_absmax)),
            xlabel="sampling step (0 = pure noise; dashed: time-segment boundary)",
            ylabel="layer input value", vlines=boundaries))
    return save_panels(path, panels, title=title, columns=columns)


# ----------------------------------------------------------------------------- sample comparison


def save_comparison_grid(path, settings: dict, row_labels: list[str], *, title: str,
                         scale: int = 4, pad: int = 2) -> tuple[int, int]:
    """Side-by-side labelled panels of samples, one row per class.

    ``settings``: ``{name: [rows]}``, each row ``[n, H, W, C]`` in [-1, 1] (C = 1 or 3); every
    setting has ``len(row_labels)`` rows with the same image size. Returns the image size.
    """
    from PIL import Image, ImageDraw

    from trdq_jax.viz import to_uint8
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
                img = np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img
                tile = Image.fromarray(img).resize((tw, th), Image.NEAREST)
                canvas.paste(tile, (x0 + c * (tw + pad), y0))
        x0 += panel_w[name] + gap
    for r, label in enumerate(row_labels):
        draw.text((6, top + r * (th + pad) + th / 2), label, fill=_TEXT, font=_font(13),
                  anchor="lm")
    _save_atomic(canvas, path)
    return width, height
