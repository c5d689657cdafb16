"""Typed, frozen configuration values.

Every config is a frozen dataclass validated in ``__post_init__``; a bad value raises
``ConfigError`` naming the field (``DiTConfig.hidden_size: expected ...``). Configs are plain
values you pass around: there is no global config state.

``apply_overrides(cfg, ["model.hidden_size=384", "sampler.num_steps=50"])`` returns a new config
with dotted fields replaced, parsing each value according to the field's declared type.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import numbers
import os
import pathlib
import typing
from typing import Any, Literal, Union

DTYPES = ("float32", "bfloat16", "float16")
CFG_SCALE_RANGE = (0.0, 100.0)


class ConfigError(ValueError):
    """A config field holds a value outside what it accepts."""


def _fail(cfg: Any, field: str, expected: str, got: Any) -> None:
    raise ConfigError(f"{type(cfg).__name__}.{field}: expected {expected}, got {got!r}")


def _check_positive_int(cfg: Any, *fields: str) -> None:
    for name in fields:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            _fail(cfg, name, "a positive int", value)


def _check_choice(cfg: Any, field: str, choices: tuple) -> None:
    value = getattr(cfg, field)
    if value not in choices:
        _fail(cfg, field, f"one of {choices}", value)


def _check_float_range(cfg: Any, field: str, lo: float, hi: float) -> None:
    value = getattr(cfg, field)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        _fail(cfg, field, f"a number in [{lo}, {hi}]", value)


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def check_cfg_scale(value: Any, where: str = "cfg_scale") -> float:
    """The one guidance-scale policy: a finite real number in ``CFG_SCALE_RANGE`` = [0, 100].

    Accepts Python ints/floats, numpy scalars and concrete 0-d numeric arrays (numpy or JAX);
    refuses bools, strings, complex numbers and arrays of any other shape. Returns the value as a
    Python float. Raises ``ConfigError`` (a ``ValueError``) naming ``where``:
    ``cfg_scale: expected a number in [0, 100], got -2.0``. (Traced values cannot be checked
    here; ``trdq_jax.sampling.sample`` checks only their shape and dtype.)
    """
    lo, hi = CFG_SCALE_RANGE
    expected = f"expected a number in [{_fmt_number(lo)}, {_fmt_number(hi)}]"
    dtype = getattr(value, "dtype", None)
    real_scalar = (isinstance(value, numbers.Real) and not isinstance(value, bool)) or (
        getattr(value, "shape", None) == ()  # a 0-d numpy/JAX array of a real numeric dtype
        and (getattr(dtype, "kind", "") in ("i", "u", "f")
             or getattr(dtype, "name", "") == "bfloat16"))  # ml_dtypes' numpy kind is "V"
    if not real_scalar:
        raise ConfigError(f"{where}: {expected}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):  # e.g. a tracer: its value cannot be checked
        raise ConfigError(f"{where}: {expected}, got {value!r}") from None
    if not (math.isfinite(number) and lo <= number <= hi):
        raise ConfigError(f"{where}: {expected}, got {number!r}")
    return number


def exact_width(size: int, ratio: float) -> int | None:
    """``size * ratio`` as an int when it is a whole number (up to float rounding, so
    ``112 * (61 / 112)`` is 61, where ``int()`` would give 60), else None."""
    width = size * ratio
    nearest = round(width)
    return int(nearest) if math.isclose(width, nearest, rel_tol=1e-9, abs_tol=0.0) else None


def _check_mlp_ratio(cfg: Any) -> None:
    _check_float_range(cfg, "mlp_ratio", 0.25, 64.0)
    if exact_width(cfg.hidden_size, cfg.mlp_ratio) is None:
        _fail(cfg, "mlp_ratio", f"hidden_size * mlp_ratio to be a whole MLP width (hidden_size="
              f"{cfg.hidden_size} gives {cfg.hidden_size * cfg.mlp_ratio:.6g})", cfg.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Class-conditional DiT (Peebles & Xie), parameter names as in facebookresearch/DiT.

    Images are NHWC: ``[B, input_size, input_size, in_channels]``.

    ``pos_embed`` says where the 2-D sin-cos position table comes from: "sincos" (default) computes
    it from the config, exactly, in float64, and it is no parameter; "stored" keeps a table in the
    params (a top-level ``pos_embed`` ``[1, num_patches, hidden_size]`` in ``param_dtype``,
    initialised to the sin-cos table), as a converted official checkpoint does with its frozen
    buffer: the official model samples with its stored (e.g. float16-rounded) values. A stored
    table is frozen: no gradient reaches it, and the model refuses ``train=True``.
    """

    family: Literal["dit"] = "dit"
    input_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    pos_embed: Literal["sincos", "stored"] = "sincos"

    def __post_init__(self):
        _check_choice(self, "family", ("dit",))
        _check_positive_int(self, "input_size", "in_channels", "patch_size", "hidden_size",
                            "depth", "num_heads", "num_classes")
        if self.input_size % self.patch_size:
            _fail(self, "input_size", f"a multiple of patch_size={self.patch_size}", self.input_size)
        if self.hidden_size % self.num_heads:
            _fail(self, "hidden_size", f"a multiple of num_heads={self.num_heads}", self.hidden_size)
        if (self.hidden_size // self.num_heads) % 2:
            _fail(self, "hidden_size", "hidden_size / num_heads even", self.hidden_size)
        if self.hidden_size % 4:
            _fail(self, "hidden_size", "a multiple of 4 (2-D sin-cos position embedding)",
                  self.hidden_size)
        _check_mlp_ratio(self)
        _check_float_range(self, "class_dropout_prob", 0.0, 1.0)
        _check_choice(self, "dtype", DTYPES)
        _check_choice(self, "param_dtype", DTYPES)
        _check_choice(self, "pos_embed", ("sincos", "stored"))

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def mlp_hidden_size(self) -> int:
        """Width of each block's MLP: exactly ``hidden_size * mlp_ratio`` (validated whole)."""
        return exact_width(self.hidden_size, self.mlp_ratio)

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class PixArtConfig:
    """Text-conditioned PixArt-α / PixArt-Σ transformer (Chen et al. 2023, 2024), NHWC latents
    ``[B, input_size, input_size, in_channels]`` conditioned on T5 caption embeddings
    ``[B, L, caption_channels]`` with a mask (``trdq_jax.models.pixart``).

    α and Σ share one architecture (diffusers' ``PixArtTransformer2DModel`` for both); what
    differs between checkpoints is data, not structure:

    - ``max_tokens``: the caption token count the model was trained with (T5 truncation): 120
      for α, 300 for Σ. Captions longer than this are refused.
    - ``interpolation_scale``: the 2-D sin-cos position table takes patch positions
      ``arange(grid) / interpolation_scale`` (diffusers' ``PatchEmbed`` at its base size):
      0.5 for 256 px, 1 for 512 px, 2 for 1024 px, 4 for 2K checkpoints. A diffusers config
      without the key means ``max(sample_size // 64, 1)``.
    - ``use_micro_conditions``: the resolution and aspect-ratio embedders of the α 1024-MS
      models (diffusers' ``use_additional_conditions``; off for Σ and the α 256/512 models).
      Each embeds into ``hidden_size // 3`` values (resolution: two of them), so it needs
      ``hidden_size`` divisible by 3.

    ``learn_sigma`` doubles the output channels (eps then variance values).
    """

    family: Literal["pixart"] = "pixart"
    input_size: int = 64
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    max_tokens: int = 120
    learn_sigma: bool = True
    use_micro_conditions: bool = False
    interpolation_scale: float = 1.0
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        _check_choice(self, "family", ("pixart",))
        _check_positive_int(self, "input_size", "in_channels", "patch_size", "hidden_size",
                            "depth", "num_heads", "caption_channels", "max_tokens")
        if self.input_size % self.patch_size:
            _fail(self, "input_size", f"a multiple of patch_size={self.patch_size}", self.input_size)
        if self.hidden_size % self.num_heads:
            _fail(self, "hidden_size", f"a multiple of num_heads={self.num_heads}", self.hidden_size)
        if self.hidden_size % 4:
            _fail(self, "hidden_size", "a multiple of 4 (2-D sin-cos position embedding)",
                  self.hidden_size)
        _check_mlp_ratio(self)
        for name in ("learn_sigma", "use_micro_conditions"):
            if not isinstance(getattr(self, name), bool):
                _fail(self, name, "True or False", getattr(self, name))
        if self.use_micro_conditions and self.hidden_size % 3:
            _fail(self, "hidden_size", "a multiple of 3 with use_micro_conditions (resolution "
                  "and aspect ratio embed into hidden_size // 3 values each)", self.hidden_size)
        value = self.interpolation_scale
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not math.isfinite(value) or not 0 < value <= 64):
            _fail(self, "interpolation_scale", "a number in (0, 64]", value)
        _check_choice(self, "dtype", DTYPES)
        _check_choice(self, "param_dtype", DTYPES)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def mlp_hidden_size(self) -> int:
        """Width of each block's MLP: exactly ``hidden_size * mlp_ratio`` (validated whole)."""
        return exact_width(self.hidden_size, self.mlp_ratio)

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class VideoDiTConfig:
    """Class-conditional spatio-temporal DiT (Latte-style alternating spatial/temporal blocks).

    Videos are ``[B, num_frames, input_size, input_size, in_channels]``. ``depth`` counts
    spatial+temporal block pairs. ``temporal_attention`` says what the second block of a pair
    attends over: "frames" (Latte: the ``num_frames`` tokens at one patch position) or "video"
    (all ``num_frames * tokens_per_frame`` tokens, full 3-D attention, so a token can follow
    content that moves to another patch position).
    """

    family: Literal["video_dit"] = "video_dit"
    num_frames: int = 8
    input_size: int = 16
    in_channels: int = 1
    patch_size: int = 4
    hidden_size: int = 192
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    temporal_attention: str = "frames"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        _check_choice(self, "family", ("video_dit",))
        _check_choice(self, "temporal_attention", ("frames", "video"))
        _check_positive_int(self, "num_frames", "input_size", "in_channels", "patch_size",
                            "hidden_size", "depth", "num_heads", "num_classes")
        if self.input_size % self.patch_size:
            _fail(self, "input_size", f"a multiple of patch_size={self.patch_size}", self.input_size)
        if self.hidden_size % self.num_heads:
            _fail(self, "hidden_size", f"a multiple of num_heads={self.num_heads}", self.hidden_size)
        if self.hidden_size % 4:
            _fail(self, "hidden_size", "a multiple of 4", self.hidden_size)
        _check_mlp_ratio(self)
        _check_float_range(self, "class_dropout_prob", 0.0, 1.0)
        _check_choice(self, "dtype", DTYPES)
        _check_choice(self, "param_dtype", DTYPES)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def mlp_hidden_size(self) -> int:
        """Width of each block's MLP: exactly ``hidden_size * mlp_ratio`` (validated whole)."""
        return exact_width(self.hidden_size, self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """ADM/DDPM-style UNet with time and class conditioning.

    Images are NHWC ``[B, input_size, input_size, in_channels]``. ``channel_mult[i]`` scales
    ``base_channels`` at resolution level i; self-attention runs at the resolutions listed in
    ``attention_resolutions`` (in pixels, e.g. ``(8, 4)``).
    """

    family: Literal["unet"] = "unet"
    input_size: int = 16
    in_channels: int = 1
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8,)
    num_heads: int = 4
    num_groups: int = 16
    num_classes: int = 10
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        _check_choice(self, "family", ("unet",))
        _check_positive_int(self, "input_size", "in_channels", "base_channels", "num_res_blocks",
                            "num_heads", "num_groups", "num_classes")
        if not self.channel_mult or not all(isinstance(m, int) and m > 0 for m in self.channel_mult):
            _fail(self, "channel_mult", "a non-empty tuple of positive ints", self.channel_mult)
        if self.input_size % (2 ** (len(self.channel_mult) - 1)):
            _fail(self, "input_size", f"divisible by 2**(len(channel_mult)-1)", self.input_size)
        for m in self.channel_mult:
            if (self.base_channels * m) % self.num_groups:
                _fail(self, "num_groups", f"a divisor of every level width "
                      f"{[self.base_channels * m for m in self.channel_mult]}", self.num_groups)
            if (self.base_channels * m) % self.num_heads:
                _fail(self, "num_heads", "a divisor of every level width", self.num_heads)
        _check_float_range(self, "class_dropout_prob", 0.0, 1.0)
        _check_choice(self, "dtype", DTYPES)
        _check_choice(self, "param_dtype", DTYPES)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Small CNN digit classifier used for digits-FID features and class-match accuracy.

    Inputs ``[B, input_size, input_size, in_channels]`` (``[B, F, H, W, C]`` videos are classified
    frame by frame by the evaluation code).
    """

    family: Literal["classifier"] = "classifier"
    input_size: int = 8
    in_channels: int = 1
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 128
    dropout: float = 0.1

    def __post_init__(self):
        _check_choice(self, "family", ("classifier",))
        _check_positive_int(self, "input_size", "in_channels", "num_classes", "width", "feature_dim")
        _check_float_range(self, "dropout", 0.0, 0.9)


@dataclasses.dataclass(frozen=True)
class ExternalModelConfig:
    """A denoiser this library did not define (your own Flax module, called as
    ``model.apply(variables, x, t[, cond])``): what sampling, offline generation and their
    records need to know of it. ``name`` names it in records; ``sample_shape`` is one sample,
    channels last (``(H, W, C)``, or ``(F, H, W, C)`` for a video). It has no classes: give its
    conditioning (or none) to ``generate_to_dir`` / ``generate``."""

    name: str = "external"
    sample_shape: tuple[int, ...] = (8, 8, 1)
    family: Literal["external"] = "external"

    def __post_init__(self):
        _check_choice(self, "family", ("external",))
        if not isinstance(self.name, str) or not self.name:
            _fail(self, "name", "a non-empty string", self.name)
        shape = self.sample_shape
        if not isinstance(shape, tuple) or not shape or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            _fail(self, "sample_shape", "a non-empty tuple of positive ints (channels last)",
                  shape)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The Stable Diffusion ``AutoencoderKL`` (the SD-VAE of DiT, PixArt, OpenSora), by the
    fields of a diffusers ``config.json`` of that class.

    Images are NHWC in ``[-1, 1]``: ``[B, H, W, in_channels]``; latents are
    ``[B, H / f, W / f, latent_channels]`` with ``f = 2 ** (len(block_out_channels) - 1)``.
    A denoiser samples in *scaled* latents ``z_s = (z - shift_factor) * scaling_factor``;
    decoding takes ``z = z_s / scaling_factor + shift_factor``. ``use_quant_conv`` /
    ``use_post_quant_conv`` are the 1x1 convolutions after the encoder and before the decoder
    (the SD-VAE has both; the SD3 / FLUX VAEs neither).
    """

    family: Literal["vae"] = "vae"
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    sample_size: int = 256
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        _check_choice(self, "family", ("vae",))
        _check_positive_int(self, "in_channels", "out_channels", "layers_per_block",
                            "latent_channels", "norm_num_groups", "sample_size")
        chans = self.block_out_channels
        if not isinstance(chans, tuple) or not chans or not all(
                isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in chans):
            _fail(self, "block_out_channels", "a non-empty tuple of positive ints", chans)
        for c in chans:
            if c % self.norm_num_groups:
                _fail(self, "block_out_channels",
                      f"multiples of norm_num_groups={self.norm_num_groups}", chans)
        for name in ("scaling_factor", "shift_factor"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(
                    value):
                _fail(self, name, "a finite number", value)
        if self.scaling_factor <= 0:
            _fail(self, "scaling_factor", "a positive number", self.scaling_factor)
        for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if not isinstance(getattr(self, name), bool):
                _fail(self, name, "true or false", getattr(self, name))
        if self.sample_size % self.downsample_factor:
            _fail(self, "sample_size", f"a multiple of the downsample factor "
                  f"{self.downsample_factor}", self.sample_size)
        _check_choice(self, "dtype", DTYPES)
        _check_choice(self, "param_dtype", DTYPES)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side: ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.block_out_channels) - 1)


def vae_config_from_dict(d: dict) -> VAEConfig:
    """Inverse of ``to_dict`` for a ``VAEConfig``."""
    if d.get("family", "vae") != "vae":
        raise ConfigError(f"vae.family: expected 'vae', got {d.get('family')!r}")
    return _from_dict(VAEConfig, d, "vae")


ModelConfig = Union[DiTConfig, VideoDiTConfig, UNetConfig, ClassifierConfig, ExternalModelConfig,
                    PixArtConfig]
MODEL_CONFIGS = {"dit": DiTConfig, "video_dit": VideoDiTConfig, "unet": UNetConfig,
                 "classifier": ClassifierConfig, "external": ExternalModelConfig,
                 "pixart": PixArtConfig}


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How to sample: solver, step count, schedule and guidance.

    ``prediction`` is what the model was trained to output (eps solvers only): "epsilon" (DDPM,
    DiT) or "v" (``v = sqrt(abar) eps - sqrt(1 - abar) x0``, Salimans & Ho 2022; the model then
    predicts the data directly at high noise, where eps-prediction amplifies its errors by
    ``sqrt(1 / abar - 1)``). ``flow_euler`` models always output the flow velocity.
    """

    solver: str = "ddim"
    num_steps: int = 50
    schedule: str = "linear"
    num_train_steps: int = 1000
    prediction: str = "epsilon"
    eta: float = 0.0
    cfg_scale: float = 4.0
    num_segments: int = 1

    def __post_init__(self):
        _check_choice(self, "solver", ("ddpm", "ddim", "dpm_solver_pp_2m", "flow_euler"))
        _check_choice(self, "schedule", ("linear", "cosine"))
        _check_choice(self, "prediction", ("epsilon", "v"))
        if self.solver == "flow_euler" and self.prediction != "epsilon":
            _fail(self, "prediction", "'epsilon' (the default) with solver='flow_euler', whose "
                  "model outputs the flow velocity", self.prediction)
        _check_positive_int(self, "num_steps", "num_train_steps", "num_segments")
        if self.num_steps > self.num_train_steps:
            _fail(self, "num_steps", f"<= num_train_steps={self.num_train_steps}", self.num_steps)
        if self.num_segments > self.num_steps:
            _fail(self, "num_segments", f"<= num_steps={self.num_steps}", self.num_segments)
        _check_float_range(self, "eta", 0.0, 1.0)
        check_cfg_scale(self.cfg_scale, "SamplerConfig.cfg_scale")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser and loop settings for ``trdq train``.

    ``min_snr_gamma``: 0 trains diffusion models on the plain epsilon MSE; ``gamma > 0`` weights
    each example's epsilon MSE by ``min(SNR(t), gamma) / SNR(t)`` (Min-SNR-gamma, Hang et al.
    2023), which stops the hard, detail-only low-noise steps from dominating the gradient.

    ``image_batch_size`` (video models only): joint image-video training (VDM, Latte). Every step
    also trains on this many still frames drawn from the training videos, fed as 1-frame videos;
    the loss is the mean over all frames of the step. Stills are ``num_frames`` times cheaper than
    videos, so the spatial blocks see many more digits for the same compute. 0 turns it off.

    ``dataset="captioned_digits"`` (PixArt models): each digit image is paired with a caption
    (``trdq_jax.data.captions.TRAIN_TEMPLATES``, one drawn per example and step) encoded by
    ``text_encoder`` (a bundled text encoder's name, e.g. "digits-t5", or a Hugging Face T5
    directory holding its tokenizer); with probability ``caption_dropout_prob`` the caption is
    replaced by the empty prompt's encoding, the null branch of classifier-free guidance.
    """

    dataset: str = "digits"
    num_steps: int = 20000
    batch_size: int = 128
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 500
    ema_decay: float = 0.999
    min_snr_gamma: float = 0.0
    image_batch_size: int = 0
    checkpoint_every: int = 1000
    log_every: int = 100
    seed: int = 0
    text_encoder: str = ""
    caption_dropout_prob: float = 0.1

    def __post_init__(self):
        _check_choice(self, "dataset", ("digits", "moving_digits", "captioned_digits"))
        if not isinstance(self.text_encoder, str):
            _fail(self, "text_encoder", "a string (a bundled text encoder's name or a "
                  "directory)", self.text_encoder)
        if (self.dataset == "captioned_digits") != bool(self.text_encoder):
            _fail(self, "text_encoder", "a text encoder with dataset 'captioned_digits' (and "
                  "only then)", self.text_encoder)
        _check_float_range(self, "caption_dropout_prob", 0.0, 1.0)
        _check_positive_int(self, "num_steps", "batch_size", "checkpoint_every", "log_every")
        _check_float_range(self, "learning_rate", 1e-8, 1.0)
        _check_float_range(self, "weight_decay", 0.0, 1.0)
        _check_float_range(self, "ema_decay", 0.0, 1.0)
        _check_float_range(self, "min_snr_gamma", 0.0, 1e6)
        for name in ("warmup_steps", "image_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(self, name, "a non-negative int", value)
        if not isinstance(self.seed, int):
            _fail(self, "seed", "an int", self.seed)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Offline generation: how many samples, in which batches, from which seed."""

    num_samples: int = 40
    batch_size: int = 40
    seed: int = 0

    def __post_init__(self):
        _check_positive_int(self, "num_samples", "batch_size")
        if not isinstance(self.seed, int) or self.seed < 0:
            _fail(self, "seed", "a non-negative int", self.seed)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run needs. ``name`` doubles as the bundled-model name."""

    name: str
    model: ModelConfig
    sampler: SamplerConfig = SamplerConfig()
    train: TrainConfig = TrainConfig()
    generation: GenerationConfig = GenerationConfig()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            _fail(self, "name", "a non-empty string", self.name)
        if not isinstance(self.model, tuple(MODEL_CONFIGS.values())):
            _fail(self, "model", f"one of {[c.__name__ for c in MODEL_CONFIGS.values()]}",
                  self.model)
        if self.train.image_batch_size and not isinstance(self.model, VideoDiTConfig):
            raise ConfigError(f"ExperimentConfig.train.image_batch_size: joint image-video "
                              f"training needs a video_dit model, got family "
                              f"{self.model.family!r} with image_batch_size="
                              f"{self.train.image_batch_size}")


# ----------------------------------------------------------------------------- (de)serialisation

# Fields added after configs were first stored, omitted while at the value every older config
# had: digests and fingerprints of existing runs, plans and checkpoints stay what they were.
_OMITTED_AT_DEFAULT = {DiTConfig: {"pos_embed": "sincos"},
                       TrainConfig: {"text_encoder": "", "caption_dropout_prob": 0.1}}


def _without_new_defaults(obj: Any, d: Any) -> Any:
    if not dataclasses.is_dataclass(obj) or not isinstance(d, dict):
        return d
    for name, value in _OMITTED_AT_DEFAULT.get(type(obj), {}).items():
        if d.get(name) == value:
            del d[name]
    for f in dataclasses.fields(obj):
        if f.name in d:
            d[f.name] = _without_new_defaults(getattr(obj, f.name), d[f.name])
    return d


def to_dict(cfg: Any) -> dict:
    """Config -> JSON-compatible dict (tuples become lists). A field added later is left out
    while it holds the value older configs implied (``DiTConfig.pos_embed == "sincos"``), so
    what was stored before it existed keeps its digest."""
    return _without_new_defaults(cfg, json.loads(json.dumps(dataclasses.asdict(cfg))))


def model_config_from_dict(d: dict) -> ModelConfig:
    """Inverse of ``to_dict`` for model configs; dispatches on ``family``."""
    family = d.get("family")
    if family not in MODEL_CONFIGS:
        raise ConfigError(f"model.family: expected one of {tuple(MODEL_CONFIGS)}, got {family!r}")
    return _from_dict(MODEL_CONFIGS[family], d, "model")


def experiment_from_dict(d: dict) -> ExperimentConfig:
    return ExperimentConfig(
        name=d["name"],
        model=model_config_from_dict(d["model"]),
        sampler=_from_dict(SamplerConfig, d.get("sampler", {}), "sampler"),
        train=_from_dict(TrainConfig, d.get("train", {}), "train"),
        generation=_from_dict(GenerationConfig, d.get("generation", {}), "generation"),
    )


def _from_dict(cls: type, d: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in d.items()})


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Convert JSON/CLI values to the declared field type (lists -> tuples, "3" -> 3, ...)."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        return tuple(_coerce(item, v, where) for v in value)
    if origin is Literal:
        return value
    try:
        if hint is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if hint in (int, float, str) and isinstance(value, str):
            return hint(value)
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    except ValueError:
        raise ConfigError(f"{where}: cannot parse {value!r} as {hint.__name__}") from None
    return value


def dict_diff(stored: dict, other: dict, other_label: str = "expected", prefix: str = "") -> list[str]:
    """``["model.depth: stored 1, expected 2", ...]`` for nested config dicts that differ."""
    out = []
    for key in sorted(set(stored) | set(other)):
        a, b = stored.get(key), other.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(dict_diff(a, b, other_label, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: stored {a!r}, {other_label} {b!r}")
    return out


# ----------------------------------------------------------------------------- overrides & files

def override_label(arg: str, key: str) -> str:
    """How an error names one override: ``--set model.depth`` on the command line,
    ``overrides: model.depth`` for a Python argument."""
    return f"{arg} {key}" if arg.startswith("-") else f"{arg}: {key}"


def apply_overrides(cfg: ExperimentConfig, overrides: list[str],
                    arg: str = "overrides") -> ExperimentConfig:
    """Apply ``section.field=value`` overrides (``--set`` on the CLI) to an experiment config.
    Errors name ``arg`` and the key (the command line passes ``--set``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{override_label(arg, repr(item))}: expected section.field=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        cfg = _replace_path(cfg, parts, raw, override_label(arg, key))
    return cfg


def _replace_path(obj: Any, parts: list[str], raw: str, where: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    head = parts[0]
    if head not in names:
        raise ConfigError(f"{where}: {type(obj).__name__} has no field {head!r}; "
                          f"fields: {sorted(names)}")
    if len(parts) == 1:
        hint = typing.get_type_hints(type(obj))[head]
        if dataclasses.is_dataclass(getattr(obj, head)):
            raise ConfigError(f"{where}: {head!r} is a section; name one of its fields")
        try:
            return dataclasses.replace(obj, **{head: _coerce(hint, raw, where)})
        except ConfigError as e:  # the config's own check of the value
            if str(e).startswith(where):
                raise
            raise ConfigError(f"{where}: {e}") from None
    child = getattr(obj, head)
    if not dataclasses.is_dataclass(child):
        raise ConfigError(f"{where}: {head!r} is not a section")
    return dataclasses.replace(obj, **{head: _replace_path(child, parts[1:], raw, where)})


def _user_line(path: pathlib.Path, tb) -> int | None:
    """The line of ``path`` in traceback ``tb`` closest to where the exception was raised."""
    line, name = None, os.path.abspath(path)
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == name:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _in_file(path: pathlib.Path, line: int | None, arg: str) -> str:
    return f"{arg}: {str(path)!r}" + (f", line {line}" if line is not None else "")


def load_config_file(path: str | pathlib.Path, arg: str = "path") -> ExperimentConfig:
    """Import a ``configs/*.py`` file and call its ``get_config()``.

    Every failure is a ``ConfigError`` naming ``arg`` (the command line passes ``--config``),
    the file and the line, where there is one: no such file, a syntax error, an exception
    while the file runs or inside ``get_config()`` (a bad config value there keeps its own
    message, prefixed with the file and line), no ``get_config``, or one that returns
    something else than an ``ExperimentConfig``.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"{arg}: no such file {str(path)!r}")
    spec = importlib.util.spec_from_file_location(f"_trdq_config_{path.stem}", path)
    if spec is None or spec.loader is None:  # no Python suffix: nothing imports it
        raise ConfigError(f"{arg}: {str(path)!r} is not a Python file (expected a .py file "
                          "defining get_config())")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:  # IndentationError too; possibly in a file it imports
        where = (path if not e.filename or os.path.abspath(e.filename) == os.path.abspath(path)
                 else pathlib.Path(e.filename))
        text = f" ({' '.join(e.text.split())!r})" if e.text and e.text.strip() else ""
        raise ConfigError(f"{_in_file(where, e.lineno, arg)}: syntax error: {e.msg}{text}") \
            from None
    except Exception as e:  # noqa: BLE001 (the user's code may raise anything)
        raise ConfigError(f"{_in_file(path, _user_line(path, e.__traceback__), arg)}: running "
                          f"the file raised {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{_in_file(path, None, arg)}: the file defines no get_config()")
    try:
        cfg = module.get_config()
    except ConfigError as e:
        raise ConfigError(f"{_in_file(path, _user_line(path, e.__traceback__), arg)}: "
                          f"{e}") from None
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{_in_file(path, _user_line(path, e.__traceback__), arg)}: "
                          f"get_config() raised {type(e).__name__}: {e}") from None
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigError(f"{_in_file(path, None, arg)}: get_config() returned "
                          f"{type(cfg).__name__}, expected ExperimentConfig")
    return cfg
