"""Original PixArt-α / PixArt-Σ checkpoints (the ``PixArt-XL-2-*.pth`` files of the
PixArt-alpha / PixArt-sigma repositories) -> Flax params of ``trdq_jax.models.pixart.PixArt``.

The original layout is the module tree of ``diffusion/model/nets/PixArt.py`` / ``PixArtMS.py``
(names checked against that source and against PixArt-sigma's
``tools/convert_pixart_to_diffusers.py``). ``D`` = hidden size; linear weights ``[out, in]``
become Flax kernels ``[in, out]``, the patch conv ``[D, C, p, p]`` becomes ``[p, p, C, D]``::

    x_embedder.proj                    x_embedder/proj              (Conv2d, kernel = stride = p)
    t_embedder.mlp.{0,2}               t_embedder/mlp_{0,2}         (mlp.1 is the SiLU)
    t_block.1                          t_block                      (t_block.0 is the SiLU)
    csize_embedder.mlp.{0,2}           csize_embedder/mlp_{0,2}     (1024-MS micro-conditions)
    ar_embedder.mlp.{0,2}              ar_embedder/mlp_{0,2}        (1024-MS micro-conditions)
    y_embedder.y_proj.fc{1,2}          caption_projection/fc{1,2}   (timm Mlp)
    blocks.{i}.scale_shift_table       blocks_{i}/scale_shift_table [6, D]
    blocks.{i}.attn.qkv                blocks_{i}/attn/qkv          (already fused: q, k, v)
    blocks.{i}.attn.proj               blocks_{i}/attn/proj
    blocks.{i}.cross_attn.q_linear     blocks_{i}/cross_attn/q
    blocks.{i}.cross_attn.kv_linear    blocks_{i}/cross_attn/kv     (already fused: k, v)
    blocks.{i}.cross_attn.proj         blocks_{i}/cross_attn/proj
    blocks.{i}.mlp.fc{1,2}             blocks_{i}/mlp/fc{1,2}       (timm Mlp, GELU-tanh)
    final_layer.linear                 final_layer/linear
    final_layer.scale_shift_table      final_layer/scale_shift_table [2, D]

Two buffers are not parameters of the Flax model:

- ``y_embedder.y_embedding`` ``[max_tokens, caption_channels]``: the learned null caption the
  original code feeds for the unconditional (CFG) branch. Required; checked like a weight and
  returned separately, float32 (``convert_original_pixart_state_dict`` gives
  ``(params, y_embedding)``).
- ``pos_embed`` ``[1, num_patches, D]``: the fixed 2-D sin-cos table. Optional (the original
  conversion script treats it as optional too); when present it is checked against the table
  the Flax model computes (``trdq_jax.models.pixart.pos_embed``, within
  ``trdq_jax.models.convert.pos_embed_tolerance`` of the stored dtype) and then dropped: a
  mismatch (another ``interpolation_scale``, another size) is reported with the other
  problems. ``infer_original_pixart_config`` reads ``input_size`` and ``interpolation_scale``
  from it.

The micro-condition embedders: the original ``PixArtMS.forward`` embeds
``data_info["img_hw"]`` with ``csize_embedder`` and ``data_info["aspect_ratio"]`` with
``ar_embedder`` and adds ``cat([csize, ar])`` to the timestep embedding; the Flax model
concatenates ``csize_embedder(resolution)`` then ``ar_embedder(aspect_ratio)`` the same way
(diffusers: ``resolution_embedder`` then ``aspect_ratio_embedder``). So ``ar_embedder`` maps to
``ar_embedder``, never to ``csize_embedder`` (diffusers' ``convert_pixart_alpha_to_diffusers.py``
fills its aspect-ratio embedder from the ``csize_embedder`` weights; PixArt-sigma's
``tools/convert_pixart_to_diffusers.py`` takes ``ar_embedder``; the two embedders have the same
shapes, so only the names tell them apart).

Every key must be consumed: unknown, missing, mis-shaped and non-finite (NaN/Inf, also after
the cast to ``param_dtype``) keys, and a ``pos_embed`` that is not the config's table, are
reported together in one ``ConversionError``. Files: ``.pth``/``.pt`` through
``torch.load(weights_only=True)`` only (``ImportError`` without torch; a dict with a
``"state_dict"`` entry, as the released files are, or the bare state dict), ``.safetensors``
and ``.npz`` through ``trdq_jax.models.convert.load_state_dict``. No other pickle is read.
"""
from __future__ import annotations

import functools
import pathlib
from typing import Mapping

import numpy as np

from trdq_jax.config import ConfigError, PixArtConfig
from trdq_jax.models.convert import (ConversionError, _flat_paths, _listing, _nonfinite,
                                     _param_dtype, _unflatten, as_stored, convert_keys,
                                     key_problems, load_state_dict, pos_embed_tolerance,
                                     raise_problems)

Y_EMBEDDING = "y_embedder.y_embedding"
POS_EMBED = "pos_embed"
HEAD_DIM = 72  # PixArt-XL/2: 1152 / 16; the checkpoint does not say how many heads
_SCALES = (0.5, 1.0, 2.0, 4.0)  # interpolation scales of the released checkpoints
# Flax module under blocks_{i} -> the original linear under blocks.{i}
_BLOCK_LINEARS = ((("attn", "qkv"), "attn.qkv"), (("attn", "proj"), "attn.proj"),
                  (("cross_attn", "q"), "cross_attn.q_linear"),
                  (("cross_attn", "kv"), "cross_attn.kv_linear"),
                  (("cross_attn", "proj"), "cross_attn.proj"),
                  (("mlp", "fc1"), "mlp.fc1"), (("mlp", "fc2"), "mlp.fc2"))


# ----------------------------------------------------------------------------- key table


@functools.lru_cache(maxsize=32)
def original_key_table(cfg: PixArtConfig) -> dict[tuple[str, ...], str]:
    """Flax leaf path -> the original PixArt state-dict key it is read from (one each: the
    original fuses q/k/v and k/v the way the Flax model does)."""
    mods: dict[tuple[str, ...], str] = {
        ("x_embedder", "proj"): "x_embedder.proj",
        ("t_embedder", "mlp_0"): "t_embedder.mlp.0",
        ("t_embedder", "mlp_2"): "t_embedder.mlp.2",
        ("t_block",): "t_block.1",
        ("caption_projection", "fc1"): "y_embedder.y_proj.fc1",
        ("caption_projection", "fc2"): "y_embedder.y_proj.fc2",
        ("final_layer", "linear"): "final_layer.linear",
    }
    if cfg.use_micro_conditions:
        for name in ("csize_embedder", "ar_embedder"):
            mods[(name, "mlp_0")] = f"{name}.mlp.0"
            mods[(name, "mlp_2")] = f"{name}.mlp.2"
    table = {("final_layer", "scale_shift_table"): "final_layer.scale_shift_table"}
    for i in range(cfg.depth):
        b, o = f"blocks_{i}", f"blocks.{i}"
        table[(b, "scale_shift_table")] = f"{o}.scale_shift_table"
        for flax, orig in _BLOCK_LINEARS:
            mods[(b,) + flax] = f"{o}.{orig}"
    for mod, prefix in mods.items():
        table[mod + ("kernel",)] = f"{prefix}.weight"
        table[mod + ("bias",)] = f"{prefix}.bias"
    return table


@functools.lru_cache(maxsize=32)
def _expected(cfg: PixArtConfig) -> dict:
    from trdq_jax.models.factory import abstract_params
    return _flat_paths(abstract_params(cfg))


def _pos_embed_problem(stored: np.ndarray, cfg: PixArtConfig) -> str | None:
    """Why a stored ``pos_embed`` is not the sin-cos table of ``cfg`` (None when it is)."""
    from trdq_jax.models.pixart import pos_embed
    ref = pos_embed(cfg)
    if tuple(stored.shape) != (1,) + ref.shape:
        return f"{POS_EMBED}: expected {(1,) + ref.shape}, got {tuple(stored.shape)}"
    bad = _nonfinite(stored)
    if bad:
        return f"{POS_EMBED} ({bad})"
    diff = np.abs(stored[0].astype(np.float64) - ref.astype(np.float64))
    if not (diff <= pos_embed_tolerance(stored.dtype, ref)).all():
        return (f"{POS_EMBED}: not the 2-D sin-cos table of input_size={cfg.input_size}, "
                f"interpolation_scale={cfg.interpolation_scale} (max |difference| "
                f"{float(diff.max()):.3g}): another interpolation_scale?")
    return None


# ----------------------------------------------------------------------------- conversion


def convert_original_pixart_state_dict(state_dict: Mapping[str, np.ndarray], cfg: PixArtConfig,
                                       *, where: str | None = None
                                       ) -> tuple[dict, np.ndarray]:
    """An original PixArt state dict (numpy, any float dtype) -> ``(params, y_embedding)``:
    Flax params of ``PixArt(cfg)`` (numpy, ``cfg.param_dtype``) and the learned null caption
    ``[cfg.max_tokens, cfg.caption_channels]`` float32. Raises one ``ConversionError``
    listing every unknown, missing, mis-shaped and non-finite key and a ``pos_embed`` that is
    not ``cfg``'s table; ``where`` leads it."""
    expected = _expected(cfg)
    table = original_key_table(cfg)
    if set(table) != set(expected):  # the table and the model disagree: a bug here, not input
        raise AssertionError(f"key table vs model: {sorted(set(table) ^ set(expected))}")
    used = set(table.values()) | {Y_EMBEDDING}
    unknown = sorted(set(state_dict) - used - {POS_EMBED})
    missing = sorted(used - set(state_dict))
    dtype = _param_dtype(cfg.param_dtype)
    by_key = {key: path for path, key in table.items()}
    flat, misshaped, nonfinite = convert_keys(state_dict, by_key, expected, dtype, dtype.name)
    y_embedding, bad_shape, bad_values = convert_keys(
        state_dict, {Y_EMBEDDING: Y_EMBEDDING},
        {Y_EMBEDDING: (cfg.max_tokens, cfg.caption_channels)}, np.float32, "float32",
        rule=as_stored)
    misshaped += bad_shape
    nonfinite += bad_values
    other = []
    if POS_EMBED in state_dict:
        problem = _pos_embed_problem(np.asarray(state_dict[POS_EMBED]), cfg)
        if problem:
            other.append(problem)
    raise_problems(key_problems(unknown, missing, misshaped, nonfinite) + [("other", other)],
                   f"original PixArt state dict does not match {cfg}", where=where)
    return _unflatten(flat), y_embedding[Y_EMBEDDING]


def infer_original_pixart_config(state_dict: Mapping[str, np.ndarray], *,
                                 where: str | None = None, **overrides) -> PixArtConfig:
    """A ``PixArtConfig`` read off an original state dict's shapes: ``depth`` (the ``blocks.*``
    count), ``hidden_size``, ``patch_size``, ``in_channels`` (the patch conv), ``learn_sigma``
    (``final_layer.linear``), ``caption_channels`` and ``max_tokens`` (``y_embedding``),
    ``use_micro_conditions`` (``csize_embedder`` present), ``num_heads`` = hidden / 72
    (PixArt-XL/2's head width), ``input_size`` and ``interpolation_scale`` (the ``pos_embed``
    buffer: its token count and which of 0.5, 1, 2, 4 gives its table). ``overrides`` replace
    any of them (``input_size`` and ``interpolation_scale`` are required when the state dict has
    no ``pos_embed``) and set ``dtype`` / ``param_dtype``. Raises ``ConversionError``."""
    head = f"{where}: " if where else ""

    def shape(key):
        if key not in state_dict:
            raise ConversionError(f"{head}no {key!r}: not an original PixArt state dict "
                                  f"(keys start {_listing(sorted(state_dict)[:5])})")
        return tuple(np.shape(state_dict[key]))

    conv = shape("x_embedder.proj.weight")
    out = shape("final_layer.linear.weight")
    y_emb = shape(Y_EMBEDDING)
    if len(conv) != 4 or conv[2] != conv[3] or len(out) != 2 or len(y_emb) != 2:
        raise ConversionError(f"{head}unexpected shapes: x_embedder.proj.weight {conv}, "
                              f"final_layer.linear.weight {out}, {Y_EMBEDDING} {y_emb}")
    hidden, in_ch, patch = conv[0], conv[1], conv[2]
    out_ch = out[0] // (patch * patch)
    fields = dict(hidden_size=hidden, in_channels=in_ch, patch_size=patch,
                  depth=len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")}),
                  learn_sigma=out_ch == 2 * in_ch, caption_channels=y_emb[1],
                  max_tokens=y_emb[0],
                  use_micro_conditions=any(k.startswith("csize_embedder.") for k in state_dict))
    if hidden % HEAD_DIM == 0:
        fields["num_heads"] = hidden // HEAD_DIM
    pos = state_dict.get(POS_EMBED)
    if pos is not None and np.ndim(pos) == 3:
        grid = int(round(np.sqrt(np.shape(pos)[1])))
        if grid * grid == np.shape(pos)[1]:
            fields["input_size"] = grid * patch
    fields.update(overrides)
    for key in ("input_size", "num_heads"):
        if key not in fields:
            raise ConversionError(f"{head}{key} cannot be read from the state dict"
                                  + (" (no pos_embed)" if key == "input_size" else
                                     f" (hidden {hidden} is not a multiple of {HEAD_DIM})")
                                  + f": pass {key}=...")
    try:
        if "interpolation_scale" in fields:
            return PixArtConfig(**fields)
        if pos is None:
            raise ConversionError(f"{head}no pos_embed: pass interpolation_scale=... (PixArt-α: "
                                  "1 at 256 and 512 px, 2 at 1024; PixArt-Σ: 0.5, 1, 2, 4 at "
                                  "256, 512, 1024, 2K)")
        for scale in _SCALES:
            cfg = PixArtConfig(**fields, interpolation_scale=scale)
            if _pos_embed_problem(np.asarray(pos), cfg) is None:
                return cfg
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"{head}{e}") from None
    raise ConversionError(f"{head}pos_embed is not the sin-cos table of any interpolation_scale "
                          f"in {_SCALES} at input_size={fields['input_size']}: pass "
                          "interpolation_scale=... (it is then reported against that one)")


# ----------------------------------------------------------------------------- files


def _load_torch_checkpoint(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"path: reading {path.suffix} checkpoints needs PyTorch: pip install "
                          "'trdq_jax[torch]'; or convert the file to .safetensors where torch is "
                          "installed and load that") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (RuntimeError, UnpicklingError, EOFError, ...)
        raise ConversionError(f"path: torch.load(weights_only=True) cannot read {str(path)!r} "
                              f"(truncated, corrupt, or holding more than tensors): "
                              f"{type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"path: {str(path)!r} holds a {type(obj).__name__}, expected a "
                              "state dict (a dict of tensors, or one under 'state_dict')")
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ConversionError(f"path: {str(path)!r}: expected tensors, got other values at "
                              f"{_listing(not_tensors)}")
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in obj.items()}


def load_original_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Read an original PixArt checkpoint file: ``.pth``/``.pt``/``.bin`` (torch,
    ``weights_only=True``; the ``"state_dict"`` entry when there is one), ``.safetensors`` or
    ``.npz``. Raises ``FileNotFoundError``, ``ConversionError`` (naming the path), or
    ``ImportError`` for a torch file without torch."""
    path = pathlib.Path(path)
    if path.suffix.lower() in (".pth", ".pt", ".bin"):
        if not path.is_file():
            raise FileNotFoundError(f"path: no checkpoint file at {str(path)!r}")
        if path.stat().st_size == 0:
            raise ConversionError(f"path: {str(path)!r} is empty (0 bytes): truncated?")
        return _load_torch_checkpoint(path)
    return load_state_dict(path)


def load_original_pixart(path: str | pathlib.Path, cfg: PixArtConfig | None = None,
                         **overrides) -> tuple[PixArtConfig, dict, np.ndarray]:
    """Read an original PixArt-α/Σ checkpoint. Returns ``(cfg, params, y_embedding)``.

    ``cfg`` None: inferred (``infer_original_pixart_config``, with ``overrides``); given, it is
    used as is (``overrides`` then must be empty). Raises as ``load_original_state_dict`` and
    ``convert_original_pixart_state_dict``, naming the file."""
    state_dict = load_original_state_dict(path)
    where = repr(str(path))
    if cfg is None:
        cfg = infer_original_pixart_config(state_dict, where=where, **overrides)
    elif overrides:
        raise TypeError(f"overrides {sorted(overrides)} need cfg=None (they go to the inferred "
                        "config)")
    params, y_embedding = convert_original_pixart_state_dict(state_dict, cfg, where=where)
    return cfg, params, y_embedding


__all__ = ["ConversionError", "convert_original_pixart_state_dict",
           "infer_original_pixart_config", "load_original_pixart", "load_original_state_dict",
           "original_key_table"]
