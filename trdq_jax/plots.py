"""The activation-range figure, drawn with matplotlib (object-oriented API on the Agg canvas:
no GUI backend, no pyplot state).

``save_range_figure`` is the paper's motivating figure: per layer, the activation range of every
sampling step before and after the recipe's smoothing + rotation (data from
``trdq_jax.quant.ranges.layer_ranges``). Sample grids are PIL images in ``trdq_jax.viz``.
"""
from __future__ import annotations

import math
import pathlib

import numpy as np

from trdq_jax import files

BEFORE_COLOR, AFTER_COLOR = "#d64541", "#266ec8"
PANEL_INCHES = (5.6, 3.3)  # one panel; the figure adds HEADER_INCHES for its title and legend
HEADER_INCHES = 0.7
DPI = 100


def segment_boundaries(segment_of_step) -> list[float]:
    """x of the dashed lines: ``i - 0.5`` wherever ``segment_of_step[i] != [i - 1]``."""
    table = np.asarray(segment_of_step)
    return [i - 0.5 for i in range(1, len(table)) if table[i] != table[i - 1]]


def range_figure(ranges: dict, segment_of_step, *, title: str, columns: int = 2):
    """The ``matplotlib.figure.Figure`` that ``save_range_figure`` writes (see there)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not ranges:
        raise ValueError("ranges: expected at least one {layer: (before, after)} entry")
    if isinstance(columns, bool) or not isinstance(columns, (int, np.integer)) or columns < 1:
        raise ValueError(f"columns: expected a positive int, got {columns!r}")
    table = np.asarray(segment_of_step)
    for layer, curves in ranges.items():
        for name, c in zip(("before", "after"), curves):
            if not (len(c.low) == len(c.high) == len(c.mean_absmax) == len(table)):
                raise ValueError(f"segment_of_step: {len(table)} steps, but the {name} curves "
                                 f"of ranges[{layer!r}] have {len(c.low)}")
    steps = np.arange(len(table))
    boundaries = segment_boundaries(table)
    cols = min(int(columns), len(ranges))
    rows = math.ceil(len(ranges) / cols)
    fig = Figure(figsize=(cols * PANEL_INCHES[0], HEADER_INCHES + rows * PANEL_INCHES[1]),
                 dpi=DPI, layout="constrained")
    for i, (layer, (before, after)) in enumerate(ranges.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, c, color in (("before", before, BEFORE_COLOR), ("after", after, AFTER_COLOR)):
            ax.fill_between(steps, c.low, c.high, color=color, alpha=0.22, linewidth=0,
                            label=f"{name}: min..max")
            ax.plot(steps, c.mean_absmax, color=color, linewidth=2,
                    label=f"{name}: mean channel abs-max")
        for j, x in enumerate(boundaries):
            ax.axvline(x, color="0.45", linestyle="--", linewidth=1,
                       label="time-segment boundary" if j == 0 else None)
        ax.set_xlim(-0.5, len(table) - 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
        ax.set_title(f"{layer}  (max |x|: {before.absmax:.3g} -> {after.absmax:.3g})",
                     fontsize=10)
        ax.set_xlabel("sampling step (0 = pure noise)", fontsize=9)
        ax.set_ylabel("layer input value", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center",
               ncols=5 if cols > 1 else 2, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=12, wrap=True)
    return fig


def save_range_figure(path, ranges: dict, segment_of_step, *, title: str, columns: int = 2,
                      overwrite: bool = False) -> tuple[int, int]:
    """One panel per layer: the min..max band and the mean per-channel abs-max of every sampling
    step, before (red) and after (blue) the transform; dashed lines mark time-segment
    boundaries. Written atomically as a PNG marked as a trdq_jax figure (``files.write_file``;
    ``overwrite`` replaces only such a figure).

    ``ranges``: ``{layer path: (before, after)}`` ``RangeCurves`` from ``layer_ranges``;
    ``segment_of_step``: int ``[steps]``; ``columns``: panels per row.
    Returns the PNG's (width, height) in pixels.
    """
    from PIL import Image

    if pathlib.Path(path).suffix.lower() != ".png":
        raise ValueError(f"path: expected a .png file, got {str(path)!r}")
    fig = range_figure(ranges, segment_of_step, title=title, columns=columns)
    target = files.write_file(
        path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI,
                                      metadata=files.png_marker("figure")),
        kind="figure", overwrite=overwrite, arg="path")
    with Image.open(target) as image:
        return image.size
