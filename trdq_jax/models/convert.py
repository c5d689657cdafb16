"""Official facebookresearch/DiT checkpoints <-> Flax params.

The conversion is a table: each Flax path maps to one PyTorch key by turning ``name_N`` path
elements back into ``name.N`` (``nn.Sequential`` indices) and the leaf names ``kernel`` /
``embedding`` into ``weight``. Linear weights are transposed (``[out, in]`` -> ``[in, out]``),
conv weights go from ``[out, in, kh, kw]`` to ``[kh, kw, in, out]``. A top-level Flax param
(``pos_embed``) keeps its name.

The frozen ``pos_embed`` buffer: for a config with ``pos_embed="stored"`` (what
``infer_dit_config`` and ``load_official_dit`` give an official checkpoint) it is kept as a param,
cast to ``param_dtype``, so the converted model samples with the checkpoint's own table (a
float16 checkpoint's rounded values: recomputing the exact table loses most of the agreement
with the original); ``pos_embed_report`` says how far it is from the 2-D sin-cos table. For
``pos_embed="sincos"`` it is checked against the table the Flax model computes (within the
rounding of the dtype it is stored in) and dropped.

Every key of the state dict must be consumed: unknown, missing, mis-shaped and non-finite
(NaN/Inf) keys are reported together in one ``ConversionError``.
"""
from __future__ import annotations

import pathlib
import re
import zipfile
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from trdq_jax.config import DiTConfig
from trdq_jax.models import weight_files
from trdq_jax.models.dit import DIT_SIZES
from trdq_jax.models.factory import abstract_params
from trdq_jax.models.layers import sincos_2d

_INDEXED = re.compile(r"^(.*)_(\d+)$")


class ConversionError(ValueError):
    """A state dict does not match the model config it is converted for."""


# ----------------------------------------------------------------------------- reading files


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Read a PyTorch-layout state dict: ``.safetensors``, ``.npz`` or ``.pt``/``.pth``/``.bin``.

    ``.pt`` needs torch (``pip install 'trdq_jax[torch]'``; ``torch.load(weights_only=True)``).
    Training checkpoints of the official repo (``{"model": ..., "ema": ...}``) yield their
    ``ema`` weights. ``.safetensors`` keeps float16/bfloat16 as stored (bfloat16 as
    ``ml_dtypes.bfloat16``).

    Raises ``FileNotFoundError`` for a missing file, ``ConversionError`` naming the path for an
    empty or truncated file, one of another format than its suffix says, a pickle under a
    ``.safetensors``/``.npz`` name (never unpickled: ``trdq_jax.models.weight_files`` checks
    the bytes before any reader runs), a damaged one, or one holding non-numeric (e.g. pickled
    object) arrays; ``ImportError`` for ``.pt`` files without torch.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint file at {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".npz", ".pt", ".pth", ".bin"):
        raise ValueError(f"path: expected a .safetensors, .npz, .pt, .pth or .bin file, "
                         f"got {path.name!r}")
    if path.stat().st_size == 0:
        raise ConversionError(f"path: {str(path)!r} is empty (0 bytes); expected a {suffix} "
                              "checkpoint: truncated (an interrupted download or copy?)")
    if suffix == ".safetensors":
        return _load_safetensors(path)
    if suffix == ".npz":
        return _load_npz(path)
    return _load_torch(path, suffix)


def _damaged(path: pathlib.Path, kind: str, reason: str) -> ConversionError:
    """A file whose structure checked out but whose reader failed further in."""
    return ConversionError(f"path: {str(path)!r} is a damaged {kind} file ({reason}); download "
                           "or save it again")


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        weight_files.check_safetensors(path)
    except weight_files.WeightFileError as e:
        raise ConversionError(f"path: {e}") from None
    try:
        out = dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise _damaged(path, ".safetensors", str(e)) from None
    _check_numeric(path, out)
    return out


def _load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        weight_files.check_npz(path)
    except weight_files.WeightFileError as e:
        raise ConversionError(f"path: {e}") from None
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise _damaged(path, ".npz", f"{type(e).__name__}: {e}") from None
    out = {}
    with data:
        for key in data.files:
            try:
                out[key] = data[key]
            except ValueError as e:
                if "allow_pickle" in str(e):
                    raise ConversionError(
                        f"path: {str(path)!r}: array {key!r} is an object array (pickled Python "
                        "objects), which is never unpickled; expected numeric arrays") from None
                raise _damaged(path, ".npz", f"array {key!r}: {e}") from None
            except (zipfile.BadZipFile, EOFError, OSError) as e:
                raise _damaged(path, ".npz", f"array {key!r}: {type(e).__name__}: {e}") from None
    _check_numeric(path, out)
    return out


def _check_numeric(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
    bad = [f"{k} ({v.dtype})" for k, v in arrays.items()
           if not (v.dtype.kind in "biuf" or v.dtype == jnp.bfloat16)]
    if bad:
        hint = (" (.npz stores bfloat16 as raw 2-byte voids: save float32, or use .safetensors)"
                if any(v.dtype == np.dtype("V2") for v in arrays.values()) else "")
        raise ConversionError(f"path: {str(path)!r}: expected numeric arrays, got "
                              f"{', '.join(sorted(bad))}{hint}")


def _load_torch(path: pathlib.Path, suffix: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"path: reading {suffix} checkpoints needs PyTorch: pip install "
                          "'trdq_jax[torch]'; or convert the file to .safetensors where torch is "
                          "installed (safetensors.torch.save_file(torch.load(path), "
                          "'model.safetensors')) and load that") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises RuntimeError, UnpicklingError, EOFError...)
        raise ConversionError(f"path: torch.load(weights_only=True) cannot read {str(path)!r} "
                              f"(truncated, corrupt, or holding more than tensors): "
                              f"{type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ConversionError(f"path: {str(path)!r} holds a {type(obj).__name__}, expected a "
                              "state dict (a dict of tensors)")
    not_tensors = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ConversionError(f"path: {str(path)!r}: expected tensors, got other values at "
                              f"{', '.join(map(str, not_tensors))}")
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in obj.items()}


# ----------------------------------------------------------------------------- key table


def torch_key(flax_path: tuple[str, ...]) -> str:
    """``('blocks_3', 'attn', 'qkv', 'kernel')`` -> ``'blocks.3.attn.qkv.weight'``; a top-level
    param keeps its name (``('pos_embed',)`` -> ``'pos_embed'``)."""
    *modules, leaf = flax_path
    if not modules:
        return leaf
    parts = []
    for name in modules:
        m = _INDEXED.match(name)
        parts.extend([m.group(1), m.group(2)] if m else [name])
    parts.append("bias" if leaf == "bias" else "weight")
    return ".".join(parts)


def _to_torch(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    return value


def _flat_paths(tree) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in flat}


def _unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


# ----------------------------------------------------------------------------- conversion


POS_EMBED_ULPS = 4


def pos_embed_tolerance(dtype, reference: np.ndarray, atol: float = 1e-4) -> np.ndarray:
    """Per-entry tolerance for a stored sin-cos ``pos_embed`` of ``dtype`` against the float64
    ``reference``: ``atol + POS_EMBED_ULPS * eps(dtype) * |reference|``.

    Storing rounds each value by at most half an ulp, ``eps/2 * |v|``; the relative term allows a
    few ulps, so float16 (``eps`` ~ 1e-3) and bfloat16 (``eps`` ~ 8e-3) checkpoints pass while a
    learned table does not. For float32 (``eps`` ~ 1.2e-7) the bound stays ``atol``, as strict as
    before; an integer dtype gets ``atol`` alone.
    """
    dtype = np.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        return np.full(np.shape(reference), float(atol))
    eps = float(jnp.finfo(dtype).eps)
    return atol + POS_EMBED_ULPS * eps * np.abs(reference)


def _nonfinite(value: np.ndarray) -> str | None:
    """``"3 NaN, 1 Inf"`` when a floating array has non-finite entries, else None."""
    if not jnp.issubdtype(value.dtype, jnp.inexact) or np.isfinite(value).all():
        return None
    return f"{int(np.isnan(value).sum())} NaN, {int(np.isinf(value).sum())} Inf"


# ----------------------------------------------------------------------------- shared core
# What every converter here (DiT, T5, VAE, PixArt diffusers and original) does with its key
# table: check each stored tensor's shape, bring it to the Flax layout, cast it to param_dtype,
# and report every problem together in one ConversionError.

MAX_LISTED = 40  # keys listed per kind in an error (the count is always given)


def _param_dtype(name: str) -> np.dtype:
    """A config's ``param_dtype`` name -> numpy dtype (``"bfloat16"`` -> ``ml_dtypes``')."""
    return np.dtype(jnp.bfloat16) if name == "bfloat16" else np.dtype(name)


def _listing(keys: list[str], limit: int | None = MAX_LISTED) -> str:
    """``keys`` joined with ", ": the first ``limit`` (None: all) and a count of the rest."""
    if limit is None or len(keys) <= limit:
        return ", ".join(keys)
    return ", ".join(keys[:limit]) + f", ... ({len(keys) - limit} more)"


def torch_layout(path: tuple[str, ...], want: tuple[int, ...], stored: np.ndarray
                 ) -> tuple[np.ndarray | None, tuple[int, ...]]:
    """The usual accepted-shape rule: a ``kernel`` of Flax shape ``want`` is stored as a torch
    conv ``[out, in, kh, kw]`` (4-D) or Linear ``[out, in]`` (2-D); anything else as is.
    Returns ``(stored in the Flax layout, or None when its shape is not the torch one, the torch
    shape expected)``."""
    if path[-1] == "kernel" and len(want) == 4:  # conv [kh, kw, in, out] <- [out, in, kh, kw]
        torch_shape = (want[3], want[2], want[0], want[1])
        return (stored.transpose(2, 3, 1, 0) if stored.shape == torch_shape else None), torch_shape
    if path[-1] == "kernel" and len(want) == 2:  # Dense [in, out] <- Linear [out, in]
        torch_shape = (want[1], want[0])
        return (stored.T if stored.shape == torch_shape else None), torch_shape
    return (stored if stored.shape == want else None), want


def as_stored(target, want: tuple[int, ...], stored: np.ndarray
              ) -> tuple[np.ndarray | None, tuple[int, ...]]:
    """The accepted-shape rule for a tensor read in its stored layout: exactly ``want``."""
    return (stored if stored.shape == want else None), want


def convert_keys(state_dict: Mapping[str, np.ndarray], table: Mapping[str, object],
                 shapes: Mapping[object, object], dtype, cast_label: str, *,
                 rule=torch_layout) -> tuple[dict, list[str], list[str]]:
    """Read every key of ``table`` (stored key -> target, e.g. a Flax path) that ``state_dict``
    holds: ``rule(target, want, stored)`` (``want``: ``shapes[target]``, a shape or anything with
    a ``.shape``) gives the value in the Flax layout, or None with the shape it expected; the
    value is cast to ``dtype`` (C-contiguous). Returns ``(values by target, mis-shaped keys,
    non-finite keys)``: NaN/Inf in the file, or made by the cast ("... after the cast to
    {cast_label}: stored values overflow it"); such values are left out. Keys that
    ``state_dict`` lacks are skipped (the caller lists them as missing)."""
    flat, misshaped, nonfinite = {}, [], []
    for key, target in table.items():
        if key not in state_dict:
            continue
        stored = np.asarray(state_dict[key])
        want = tuple(getattr(shapes[target], "shape", shapes[target]))
        value, torch_shape = rule(target, want, stored)
        if value is None:
            misshaped.append(f"{key}: expected {torch_shape}, got {tuple(stored.shape)}")
            continue
        with np.errstate(over="ignore", invalid="ignore"):  # reported below as non-finite
            cast = np.ascontiguousarray(value.astype(dtype))
        bad = _nonfinite(cast)
        if bad:
            nonfinite.append(f"{key} ({bad})" if _nonfinite(stored) else
                             f"{key} ({bad} after the cast to {cast_label}: stored values "
                             "overflow it)")
            continue
        flat[target] = cast
    return flat, misshaped, nonfinite


def key_problems(unknown: list[str], missing: list[str], misshaped: list[str],
                 nonfinite: list[str]) -> list[tuple[str, list[str]]]:
    """The four kinds every converter reports, titled as in its ``ConversionError``."""
    return [("unknown keys", unknown), ("missing keys", missing),
            ("mis-shaped keys", misshaped), ("non-finite keys", nonfinite)]


def raise_problems(problems, subject: str, *, where: str | None = None,
                   limit: int | None = MAX_LISTED) -> None:
    """Raise one ``ConversionError`` when any ``(title, keys)`` of ``problems`` has keys:
    ``"{where}: {subject}:"`` and a line ``"  {title} ({count}): key, key, ..."`` per kind."""
    if not any(keys for _, keys in problems):
        return
    lines = [f"{where}: {subject}:" if where else f"{subject}:"]
    for title, keys in problems:
        if keys:
            lines.append(f"  {title} ({len(keys)}): {_listing(keys, limit)}")
    raise ConversionError("\n".join(lines))


def pos_embed_report(state_dict: Mapping[str, np.ndarray], cfg: DiTConfig,
                     pos_embed_atol: float = 1e-4) -> dict | None:
    """How far a state dict's ``pos_embed`` is from the fixed 2-D sin-cos table of ``cfg``:
    ``{"stored_dtype", "max_abs_deviation_from_sincos", "sincos_within_rounding"}`` (the last:
    every entry within ``pos_embed_tolerance`` of its stored dtype, i.e. the sin-cos table up to
    storage rounding, not a learned one). None when it is missing, mis-shaped or non-finite
    (``convert_dit_state_dict`` reports those)."""
    if "pos_embed" not in state_dict:
        return None
    stored = np.asarray(state_dict["pos_embed"])
    if stored.shape != (1, cfg.num_patches, cfg.hidden_size) or _nonfinite(stored):
        return None
    ref = sincos_2d(cfg.hidden_size, cfg.input_size // cfg.patch_size)
    diff = np.abs(stored[0].astype(np.float64) - ref)
    return {"stored_dtype": str(stored.dtype),
            "max_abs_deviation_from_sincos": float(diff.max()),
            "sincos_within_rounding": bool(
                (diff <= pos_embed_tolerance(stored.dtype, ref, pos_embed_atol)).all())}


def convert_dit_state_dict(state_dict: Mapping[str, np.ndarray], cfg: DiTConfig,
                           pos_embed_atol: float = 1e-4) -> dict:
    """Official DiT state dict -> Flax ``params`` for ``DiT(cfg)`` (numpy arrays, ``param_dtype``).

    Any float dtype converts (float16/bfloat16 checkpoints too): weights are cast to
    ``cfg.param_dtype``. The ``pos_embed`` buffer: with ``cfg.pos_embed == "stored"`` it becomes
    the ``pos_embed`` param like any weight (any values: a learned table converts too); with
    "sincos" it is compared with the fixed table within the stored dtype's rounding
    (``pos_embed_tolerance``; ``pos_embed_atol`` is its absolute floor) and dropped.

    Raises ``ConversionError`` listing every unknown, missing, mis-shaped and non-finite (NaN/Inf,
    also after the cast to ``param_dtype``) key.
    """
    expected = _flat_paths(abstract_params(cfg))
    table = {torch_key(path): path for path in expected}
    unknown = sorted(set(state_dict) - set(table) - {"pos_embed"})
    missing = sorted(set(table) - set(state_dict))
    if "pos_embed" not in state_dict and "pos_embed" not in table:
        missing.append("pos_embed")
    flat, misshaped, nonfinite = convert_keys(state_dict, table, expected,
                                              _param_dtype(cfg.param_dtype),
                                              f"param_dtype={cfg.param_dtype}")
    if "pos_embed" in state_dict and "pos_embed" not in table:
        stored = np.asarray(state_dict["pos_embed"])
        pos = stored.astype(np.float64)
        want = (1, cfg.num_patches, cfg.hidden_size)
        ref = sincos_2d(cfg.hidden_size, cfg.input_size // cfg.patch_size)
        if pos.shape != want:
            misshaped.append(f"pos_embed: expected {want}, got {pos.shape}")
        elif _nonfinite(stored):
            nonfinite.append(f"pos_embed ({_nonfinite(stored)})")
        else:
            diff = np.abs(pos[0] - ref)
            if (diff > pos_embed_tolerance(stored.dtype, ref, pos_embed_atol)).any():
                misshaped.append(f"pos_embed: values differ from the fixed 2-D sin-cos embedding "
                                 f"by up to {diff.max():.3g}, beyond {stored.dtype} rounding (a "
                                 "learned pos_embed converts with pos_embed='stored')")
    raise_problems(key_problems(unknown, missing, misshaped, nonfinite),
                   f"state dict does not match {cfg}", limit=None)
    return _unflatten(flat)


def to_official_state_dict(params, cfg: DiTConfig) -> dict[str, np.ndarray]:
    """Flax params -> official DiT state dict (float32 numpy, C-contiguous), ``pos_embed``
    included: the params' own table where they hold one (``pos_embed="stored"``), else the
    sin-cos table of ``cfg``. Contiguous because ``safetensors.numpy.save_file`` writes an
    array's memory as it lies: a transposed view would be saved scrambled, without an error."""
    out = {torch_key(path): np.ascontiguousarray(_to_torch(np.asarray(v, np.float32), path[-1]))
           for path, v in _flat_paths(params).items()}
    if "pos_embed" not in out:
        grid = cfg.input_size // cfg.patch_size
        out["pos_embed"] = sincos_2d(cfg.hidden_size, grid)[None].astype(np.float32)
    return out


def infer_dit_config(state_dict: Mapping[str, np.ndarray], **overrides) -> DiTConfig:
    """Guess a ``DiTConfig`` from tensor shapes (heads from the official size table), with
    ``pos_embed="stored"``: the converted model keeps the checkpoint's own table.

    ``overrides`` win over inferred values (pass ``num_heads`` for non-official sizes,
    ``pos_embed="sincos"`` to recompute the table, refusing one that is not sin-cos).
    """
    try:
        proj = np.shape(state_dict["x_embedder.proj.weight"])  # [D, C, p, p]
        hidden, in_ch, patch = proj[0], proj[1], proj[2]
        depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
        n_tokens = np.shape(state_dict["pos_embed"])[1]
        out_ch = np.shape(state_dict["final_layer.linear.weight"])[0] // patch ** 2
        n_rows = np.shape(state_dict["y_embedder.embedding_table.weight"])[0]
        mlp = np.shape(state_dict["blocks.0.mlp.fc1.weight"])[0]
    except KeyError as e:
        raise ConversionError(f"state_dict: cannot infer a DiT config, key {e} is missing") from None
    except IndexError:
        raise ConversionError("state_dict: cannot infer a DiT config: expected "
                              "x_embedder.proj.weight [D, C, p, p], pos_embed [1, T, D] and 2-D "
                              "linear/embedding weights, got shapes " + ", ".join(
                                  f"{k} {tuple(np.shape(state_dict[k]))}" for k in (
                                      "x_embedder.proj.weight", "pos_embed",
                                      "final_layer.linear.weight",
                                      "y_embedder.embedding_table.weight",
                                      "blocks.0.mlp.fc1.weight") if k in state_dict)) from None
    grid = int(round(n_tokens ** 0.5))
    if grid * grid != n_tokens:
        raise ConversionError(f"state_dict: pos_embed has {n_tokens} tokens, expected a square "
                              "patch grid (grid**2 tokens)")
    if np.shape(state_dict["final_layer.linear.weight"])[0] % patch ** 2:
        raise ConversionError(f"state_dict: final_layer.linear.weight has "
                              f"{np.shape(state_dict['final_layer.linear.weight'])[0]} outputs, "
                              f"expected a multiple of patch_size**2 = {patch ** 2}")
    heads = {(d, h): n for d, h, n in DIT_SIZES.values()}.get((depth, hidden))
    fields = dict(input_size=grid * patch, in_channels=in_ch,
                  patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads,
                  mlp_ratio=mlp / hidden, learn_sigma=out_ch == 2 * in_ch, pos_embed="stored")
    fields.update(overrides)
    if "num_classes" not in overrides:
        # An official table has one extra null row when trained with label dropout.
        fields["num_classes"] = n_rows - 1 if fields.get("class_dropout_prob", 0.1) > 0 else n_rows
    if fields["num_heads"] is None:
        raise ConversionError(f"state_dict: depth={depth}, hidden={hidden} is not an official DiT "
                              "size; pass num_heads=...")
    return DiTConfig(**{k: int(v) if isinstance(v, np.integer) else v for k, v in fields.items()})


def load_official_dit(path: str | pathlib.Path, cfg: DiTConfig | None = None):
    """Read and convert an official DiT checkpoint. Returns ``(cfg, params)``; ``cfg`` defaults
    to ``infer_dit_config`` (``pos_embed="stored"``: the checkpoint's own table is kept)."""
    state_dict = load_state_dict(path)
    cfg = cfg or infer_dit_config(state_dict)
    return cfg, convert_dit_state_dict(state_dict, cfg)
