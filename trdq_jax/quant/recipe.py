"""One recipe type describes every quantization method.

A ``Recipe`` combines the building blocks: smoothing (SmoothQuant-style channel scales with
migration strength alpha), rotation (none, full Hadamard, block Hadamard, DuQuant greedy block
rotation + zigzag permutation), a weight quantizer, an activation quantizer (static per-tensor or
dynamic per-token), the number of time segments, which parameters vary per segment, and layers
kept in float by regex. ``RECIPES`` holds the named methods; adding a method is adding a recipe.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

from trdq_jax.config import ConfigError

# By default (``keep_float`` / ``weight_only`` None) the layers are chosen by the model's data
# flow (``trdq_jax.quant.roles``): the first and last layers stay in float, as in Q-Diffusion /
# PTQ4DM / TR-DQ, and the layers whose input is one conditioning vector per sample (adaLN
# modulation, a UNet's scale-shift projections, the timestep MLP: activations that cost nothing
# to keep in float, weights a third of a DiT's parameters) are quantized weight-only.
# The same choice by the bundled models' layer names, for recipes that name their layers:
DEFAULT_KEEP_FLOAT = (r"(^|/)(x|y)_embedder(/|$)", r"^final_layer/linear$", r"^conv_(in|out)$")
DEFAULT_WEIGHT_ONLY = (r"adaLN_modulation", r"(^|/)emb_proj$", r"(^|/)t_embedder/")

_BOOL_FIELDS = ("w_symmetric", "w_clip_search", "a_symmetric", "a_clip_search", "smoothing",
                "per_segment_weights", "gptq", "low_rank_per_segment", "fp8")
_CHOICES = {"a_mode": ("static", "dynamic"),
            "rotation": ("none", "hadamard", "block_hadamard", "duquant"),
            "segment_split": ("uniform", "similarity"), "search_weights": ("final", "rtn")}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A quantization method as data.

    Fields:
      w_bits, a_bits: 2..8; 16 means that side stays float (w16a16 = every transform applied
        with quantization disabled: the output must equal the float model's).
      w_symmetric: symmetric per-output-channel weight codes, the only kind implemented (True).
      w_clip_search: per-output-channel search of the weight clipping ratio over
        ``w_clip_grid`` (must hold 1.0), judged by the layer output error of the codes really
        used (GPTQ-fitted when ``gptq``).
      a_mode: "static" (per-tensor scale from calibration, one per segment) or "dynamic"
        (per-token min/max at run time; a per-segment clipping ratio is calibrated).
      a_symmetric: symmetric activation codes (else asymmetric with a zero point).
      smoothing: SmoothQuant scales ``s = a^alpha / w^(1-alpha)``; ``alpha_grid`` non-empty means
        alpha is searched (per segment when ``per_segment_weights``) to minimise layer output error.
      rotation: "none" | "hadamard" (full width, random signs) | "block_hadamard" |
        "duquant" (greedy block rotation, zigzag permutation, greedy block rotation).
      rotation_block: widest block (>= 2) of block rotations (a divisor of every quantized width
        is chosen automatically when this one does not divide).
      num_segments, segment_split: time segments over the sampling trajectory ("uniform" over the
        training-time axis, or "similarity": contiguous DP split of similar steps).
      min_segment_steps: the fewest sampling steps a similarity segment may hold (default 1);
        the similarity split otherwise may leave a segment of one step, whose clipping ratios
        are then fitted to one step's rows. Not used by the uniform split.
      per_segment_weights: each segment has its own smoothing/rotation AND its own quantized
        weight copy (TR-DQ as released); else one shared weight, activation-side params per segment.
      keep_float: None (default): the layers that read the model input or write its output
        (found from the data flow at calibration, ``trdq_jax.quant.roles``) stay in float; or
        regexes over module paths ("blocks_0/attn/qkv") of the layers kept in float instead.
      weight_only: None (default): the layers whose input is one vector per sample
        (conditioning, found the same way) are quantized weight-only (``w_bits`` weights, float
        activations, no smoothing or rotation); or regexes of those layers instead (keep_float
        wins where both apply).
      gptq: quantize weights with GPTQ (rounding errors spread onto the remaining input channels
        through the inverse Gram matrix of the transformed calibration rows: pooled over the
        trajectory for a shared weight, per segment for per-segment weights); else
        round-to-nearest. Every search (alpha, weight and activation clipping) judges its
        candidates with these final weights (see ``trdq_jax.quant.fit``).
      search_weights: "final" (default): each smoothing alpha is judged with its own GPTQ
        weights (exact, alphas x clip ratios GPTQ runs per layer); "rtn": alphas are compared
        with round-to-nearest weights and GPTQ runs once, at the chosen alpha (the clip grid
        only): several times cheaper at DiT-XL/2 widths, no longer a brute-force search.
      low_rank: rank r of a float branch beside the quantized matmul (0 = none, SVDQuant's
        idea): after smoothing / rotation ``W̃ ≈ L1 L2 + R``, ``L1 [K, r]``, ``L2 [r, N]`` the
        top-r singular part stored as bf16, the residual ``R`` quantized (GPTQ fitted on it),
        then the branch refitted to the rounding error ``W̃ - deq(R_q)`` in the metric of the
        calibration Gram when that lowers the layer's output error; the layer computes
        ``y = x̃ L1 L2 + deq(Q(x̃) Q(R))``. Not used by weight-only layers.
      low_rank_per_segment: one shared quantized residual, one branch per time segment fitted
        to that segment's activations (needs ``low_rank > 0`` and ``num_segments > 1``; with
        ``per_segment_weights`` every weight copy has its own branch already).
      fp8: weights and activations as float8 e4m3 codes (1 byte, symmetric: per-output-channel
        weight scales ``max |w| / 448``, dynamic per-token or static per-segment activation
        scales) instead of 8-bit integers: the 8-bit format of Hopper GPUs and recent TPUs.
        Needs ``w_bits = 8`` and ``a_bits = 8`` (16: weight-only); ``a_symmetric`` is implied.
        Weight-only (conditioning) layers keep int8 codes.
      w_group_size: 0 (default): one weight scale per output channel; g > 0: one per output
        channel and group of g input channels (GPTQ g128, SVDQuant's W4 g64), GPTQ with static
        groups (scales fixed from the weight, then errors spread). Dense layers with activation
        quantization only (g must divide their K): convolutions and weight-only layers keep
        per-channel scales. Not with ``fp8``.
      a_group_size: 0 (default): one dynamic activation scale (and zero point) per token; g > 0:
        one per token and group of g input channels (SVDQuant's INT4 format quantizes
        activations per group of 64). Dynamic integer activations only (unused when
        ``a_bits = 16``); equal to
        ``w_group_size`` when both are set (one int32 dot per group, both scales after it).
        Dense layers only (g must divide their K): convolutions keep per-token scales.
      seed: an int in [0, 2**32 - 1] seeding the Hadamard signs and DuQuant rotations.
    """

    name: str
    w_bits: int = 8
    a_bits: int = 8
    w_symmetric: bool = True
    w_clip_search: bool = False
    w_clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8)
    a_mode: Literal["static", "dynamic"] = "dynamic"
    a_symmetric: bool = False
    a_clip_search: bool = True
    smoothing: bool = False
    alpha: float = 0.5
    alpha_grid: tuple[float, ...] = ()
    rotation: Literal["none", "hadamard", "block_hadamard", "duquant"] = "none"
    rotation_block: int = 128
    num_segments: int = 1
    segment_split: Literal["uniform", "similarity"] = "uniform"
    min_segment_steps: int = 1
    per_segment_weights: bool = False
    keep_float: tuple[str, ...] | None = None
    weight_only: tuple[str, ...] | None = None
    gptq: bool = False
    search_weights: Literal["final", "rtn"] = "final"
    low_rank: int = 0
    low_rank_per_segment: bool = False
    fp8: bool = False
    w_group_size: int = 0
    a_group_size: int = 0
    seed: int = 0

    def __post_init__(self):
        def fail(field: str, expected: str):
            raise ConfigError(f"Recipe.{field}: expected {expected}, got {getattr(self, field)!r}")

        if not isinstance(self.name, str) or not self.name:
            fail("name", "a non-empty str")
        for field in _BOOL_FIELDS:
            if not isinstance(getattr(self, field), bool):
                fail(field, "a bool")
        for field in ("w_bits", "a_bits"):
            bits = getattr(self, field)
            if not _is_int(bits) or not (2 <= bits <= 8 or bits == 16):
                fail(field, "bits in 2..8 (or 16 = float)")
        if not self.w_symmetric:
            fail("w_symmetric", "True (only symmetric weight codes are implemented)")
        for field, options in _CHOICES.items():
            if not isinstance(getattr(self, field), str) or getattr(self, field) not in options:
                fail(field, " or ".join(map(repr, options)))
        if not _is_int(self.num_segments) or self.num_segments < 1:
            fail("num_segments", "a positive int")
        if not _is_int(self.min_segment_steps) or self.min_segment_steps < 1:
            fail("min_segment_steps", "a positive int (the fewest steps of a similarity segment)")
        if self.per_segment_weights and self.num_segments == 1:
            raise ConfigError("Recipe.per_segment_weights: needs num_segments > 1")
        if not _is_int(self.rotation_block) or self.rotation_block < 2:
            fail("rotation_block", "an int >= 2 (the widest block a block rotation may use; "
                 "a block of 1 rotates nothing and DuQuant needs 2)")
        if not _is_number(self.alpha) or not 0 <= self.alpha <= 1:
            fail("alpha", "a finite number in [0, 1]")
        if not isinstance(self.alpha_grid, tuple) or not all(
                _is_number(a) and 0 <= a <= 1 for a in self.alpha_grid):
            fail("alpha_grid", "a tuple of numbers in [0, 1] (empty: alpha is not searched)")
        if not isinstance(self.w_clip_grid, tuple) or 1.0 not in self.w_clip_grid or not all(
                _is_number(r) and 0 < r <= 1 for r in self.w_clip_grid):
            fail("w_clip_grid", "a tuple of ratios in (0, 1] holding 1.0 (no clipping)")
        if not _is_int(self.low_rank) or self.low_rank < 0:
            fail("low_rank", "an int >= 0 (the rank of the float branch; 0 = none)")
        if self.low_rank_per_segment and (self.low_rank == 0 or self.num_segments == 1
                                          or self.per_segment_weights):
            raise ConfigError("Recipe.low_rank_per_segment: needs low_rank > 0, num_segments > 1 "
                              "and one shared weight (per_segment_weights=False: each weight "
                              "copy has its own branch already)")
        if self.fp8 and (self.w_bits != 8 or self.a_bits not in (8, 16)):
            raise ConfigError(f"Recipe.fp8: float8 e4m3 codes are 8 bits: needs w_bits = 8 and "
                              f"a_bits = 8 (16: weight-only), got W{self.w_bits}A{self.a_bits}")
        if not _is_int(self.w_group_size) or self.w_group_size < 0 or self.w_group_size == 1:
            fail("w_group_size", "0 (per output channel) or an int >= 2 (input channels per "
                 "scale)")
        if self.fp8 and self.w_group_size:
            raise ConfigError("Recipe.w_group_size: group-wise scales are not implemented for "
                              "fp8 codes (per-channel float8 scales): use w_group_size=0")
        if not _is_int(self.a_group_size) or self.a_group_size < 0 or self.a_group_size == 1:
            fail("a_group_size", "0 (per token) or an int >= 2 (input channels per activation "
                 "scale)")
        if self.a_group_size and (self.a_mode != "dynamic" or self.fp8):
            raise ConfigError(f"Recipe.a_group_size: group-wise activation scales need dynamic "
                              f"integer activations (a_mode='dynamic', fp8=False), got "
                              f"a_mode={self.a_mode!r}, fp8={self.fp8}")
        if self.a_group_size and self.w_group_size and self.a_group_size != self.w_group_size:
            raise ConfigError(f"Recipe.a_group_size: must equal w_group_size when both are set "
                              f"(one integer dot per group), got {self.a_group_size} and "
                              f"{self.w_group_size}")
        if not _is_int(self.seed) or not 0 <= self.seed <= 2 ** 32 - 1:
            fail("seed", "an int in [0, 2**32 - 1]")
        for field in ("keep_float", "weight_only"):
            patterns = getattr(self, field)
            if patterns is None:
                continue
            if not isinstance(patterns, tuple) or not all(isinstance(p, str) for p in patterns):
                fail(field, "None (chosen by the data flow) or a tuple of str regexes")
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ConfigError(f"Recipe.{field}: invalid regex {pattern!r}: {e}") from None

    def is_weight_only(self, path: str) -> bool:
        """Whether ``weight_only``'s regexes name the layer at module path ``path`` (False when
        the weight-only layers are found from the data flow: a calibration knows them)."""
        return self.weight_only is not None and any(re.search(p, path) for p in self.weight_only)

    @property
    def float_activations(self) -> bool:
        return self.a_bits == 16

    @property
    def float_weights(self) -> bool:
        return self.w_bits == 16

    def with_bits(self, w_bits: int, a_bits: int) -> "Recipe":
        return dataclasses.replace(self, w_bits=w_bits, a_bits=a_bits)


_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)

# The methods compared in BENCHMARKS.md. Bits are set per row with ``with_bits``.
RECIPES: dict[str, Recipe] = {
    # naive PTQ: per-channel min-max weights, static per-tensor activations
    "minmax": Recipe("minmax", a_mode="static", a_clip_search=False),
    # SmoothQuant: channel scales (alpha 0.5), static per-tensor activations
    "smoothquant": Recipe("smoothquant", a_mode="static", smoothing=True, alpha=0.5),
    # QuaRot as published: full-width randomized Hadamard, GPTQ weights with a clipping-ratio
    # search, dynamic per-token activations, time-agnostic
    "quarot": Recipe("quarot", rotation="hadamard", a_mode="dynamic", a_clip_search=False,
                     gptq=True, w_clip_search=True),
    # QuaRot's rotation with round-to-nearest weights (the "RTN" rows of the QuaRot paper)
    "quarot_rtn": Recipe("quarot_rtn", rotation="hadamard", a_mode="dynamic",
                         a_clip_search=False),
    # ViDiT-Q as published: static-dynamic channel balancing = smoothing then rotation, dynamic
    # per-token activations, per-channel min-max round-to-nearest weights
    "viditq": Recipe("viditq", smoothing=True, alpha=0.5, rotation="hadamard", a_mode="dynamic",
                     a_clip_search=False),
    # TR-DQ as released: per-segment smoothing (alpha searched per segment), per-segment DuQuant
    # rotation/permutation and per-segment weight copies; dynamic asymmetric per-token activations
    "trdq_release": Recipe("trdq_release", smoothing=True, alpha_grid=_ALPHAS, rotation="duquant",
                           num_segments=4, per_segment_weights=True, a_mode="dynamic",
                           a_clip_search=False),
    # ours: one shared quantized weight (full Hadamard, GPTQ fitted on the whole calibration
    # trajectory with a clipping search), per-segment activation clipping ratios over a
    # similarity split of the trajectory. No smoothing: measured on the bundled UNet, the
    # searched smoothing (each alpha judged by its finished layer's error on the calibration
    # rows) costs 1.9 dB at W4A8 end to end although it lowers every layer's error; see
    # BENCHMARKS.md (the ablation ``trdq_smoothing`` keeps it)
    "trdq": Recipe("trdq", rotation="hadamard", num_segments=4, segment_split="similarity",
                   a_mode="dynamic", a_clip_search=True, w_clip_search=True, gptq=True),
}
# SVDQuant as published (INT4 format): SmoothQuant scales (alpha searched per layer, SVDQuant's
# migration), no rotation, the smoothed weight's top-32 singular part kept in 16 bits beside
# round-to-nearest 4-bit codes of the residual, weights AND dynamic activations quantized per
# group of 64 input channels (a layer whose K 64 does not divide is refused: override
# ``w_group_size`` / ``a_group_size``).
RECIPES["svdquant"] = Recipe("svdquant", smoothing=True, alpha_grid=_ALPHAS, rotation="none",
                             low_rank=32, a_mode="dynamic", a_clip_search=False,
                             w_group_size=64, a_group_size=64)
# ours with the branch: trdq (rotation, GPTQ on the residual, per-segment clipping) + rank 16
RECIPES["trdq_lowrank"] = dataclasses.replace(RECIPES["trdq"], name="trdq_lowrank", low_rank=16)
# Static time-aware activations: one per-tensor scale per segment (no per-token reduction in
# the hot path), searched per segment; with and without the rotation.
RECIPES["trdq_static"] = dataclasses.replace(RECIPES["trdq"], name="trdq_static",
                                             a_mode="static")
RECIPES["trdq_static_norot"] = dataclasses.replace(RECIPES["trdq_static"],
                                                   name="trdq_static_norot", rotation="none")

# The ablation family: ``trdq`` minus one component each (plus the smoothing it dropped), as
# recipe overrides.
ABLATIONS: dict[str, dict] = {
    "no_segments": {"num_segments": 1, "segment_split": "uniform"},
    "no_rotation": {"rotation": "none"},
    "smoothing": {"smoothing": True, "alpha_grid": _ALPHAS},  # the one component added back
    "no_gptq": {"gptq": False},
    "no_clip": {"w_clip_search": False, "a_clip_search": False},
}
for _name, _overrides in ABLATIONS.items():
    RECIPES[f"trdq_{_name}"] = dataclasses.replace(RECIPES["trdq"], name=f"trdq_{_name}",
                                                   **_overrides)
# the branch's own ablations: without segments, without rotation
for _name in ("no_segments", "no_rotation"):
    RECIPES[f"trdq_lowrank_{_name}"] = dataclasses.replace(
        RECIPES["trdq_lowrank"], name=f"trdq_lowrank_{_name}", **ABLATIONS[_name])


def get_recipe(name: str, w_bits: int = 8, a_bits: int = 8, **overrides) -> Recipe:
    """A named recipe at the given bit widths, e.g. ``get_recipe("trdq", 4, 8)``."""
    if name not in RECIPES:
        raise ConfigError(f"recipe: unknown {name!r}; known: {sorted(RECIPES)}")
    return dataclasses.replace(RECIPES[name], w_bits=w_bits, a_bits=a_bits, **overrides)
