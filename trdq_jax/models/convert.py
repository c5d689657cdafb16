"""Official facebookresearch/DiT checkpoints <-> Flax params.

The conversion is a table: each Flax path maps to one PyTorch key by turning ``name_N`` path
elements back into ``name.N`` (``nn.Sequential`` indices) and the leaf names ``kernel`` /
``embedding`` into ``weight``. Linear weights are transposed (``[out, in]`` -> ``[in, out]``),
conv weights go from ``[out, in, kh, kw]`` to ``[kh, kw, in, out]``. The frozen sin-cos
``pos_embed`` is checked against the constant the Flax model computes and then dropped.

Every key of the state dict must be consumed: unknown, missing and mis-shaped keys are reported
together in one ``ConversionError``.
"""
from __future__ import annotations

import pathlib
import re
from typing import Mapping

import jax
import numpy as np

from trdq_jax.config import DiTConfig
from trdq_jax.models.dit import DIT_SIZES
from trdq_jax.models.layers import sincos_2d

_INDEXED = re.compile(r"^(.*)_(\d+)$")


class ConversionError(ValueError):
    """A state dict does not match the model config it is converted for."""


# ----------------------------------------------------------------------------- reading files


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Read a PyTorch-layout state dict from ``.safetensors``, ``.npz`` or ``.pt``/``.pth``.

    ``.pt`` needs torch (``torch.load(weights_only=True)``). Training checkpoints of the official
    repo (``{"model": ..., "ema": ...}``) yield their ``ema`` weights.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint file at {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file
        return dict(load_file(str(path)))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if suffix in (".pt", ".pth", ".bin"):
        try:
            import torch
        except ImportError:
            raise ImportError(f"path: reading {suffix} files needs torch; install it or convert the "
                              "checkpoint to .safetensors/.npz first") from None
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
            obj = obj["ema"]
        elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
            obj = obj["model"]
        return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                for k, v in obj.items()}
    raise ValueError(f"path: expected a .safetensors, .npz, .pt or .pth file, got {path.name!r}")


# ----------------------------------------------------------------------------- key table


def torch_key(flax_path: tuple[str, ...]) -> str:
    """``('blocks_3', 'attn', 'qkv', 'kernel')`` -> ``'blocks.3.attn.qkv.weight'``."""
    *modules, leaf = flax_path
    parts = []
    for name in modules:
        m = _INDEXED.match(name)
        parts.extend([m.group(1), m.group(2)] if m else [name])
    parts.append("bias" if leaf == "bias" else "weight")
    return ".".join(parts)


def _to_flax(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value


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


def convert_dit_state_dict(state_dict: Mapping[str, np.ndarray], cfg: DiTConfig,
                           pos_embed_atol: float = 1e-4) -> dict:
    """Official DiT state dict -> Flax ``params`` for ``DiT(cfg)`` (numpy arrays, ``param_dtype``).

    Raises ``ConversionError`` listing every unknown, missing and mis-shaped key.
    """
    from trdq_jax.models import abstract_params

    expected = _flat_paths(abstract_params(cfg))
    table = {torch_key(path): path for path in expected}
    unknown = sorted(set(state_dict) - set(table) - {"pos_embed"})
    missing = sorted(set(table) - set(state_dict))
    if "pos_embed" not in state_dict:
        missing.append("pos_embed")
    misshaped, flat = [], {}
    for key, path in table.items():
        if key not in state_dict:
            continue
        value = np.asarray(_to_flax(np.asarray(state_dict[key]), path[-1]))
        if value.shape != tuple(expected[path].shape):
            torch_shape = _to_torch(np.empty(expected[path].shape), path[-1]).shape
            misshaped.append(f"{key}: expected {torch_shape}, got {tuple(state_dict[key].shape)}")
            continue
        flat[path] = value.astype(np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16"
                                  else jax.numpy.bfloat16)
    if "pos_embed" in state_dict:
        pos = np.asarray(state_dict["pos_embed"], np.float64)
        want = (1, cfg.num_patches, cfg.hidden_size)
        if pos.shape != want:
            misshaped.append(f"pos_embed: expected {want}, got {pos.shape}")
        elif not np.allclose(pos[0], sincos_2d(cfg.hidden_size, cfg.input_size // cfg.patch_size),
                             atol=pos_embed_atol):
            misshaped.append("pos_embed: values differ from the fixed 2-D sin-cos embedding "
                             "(a learned pos_embed is not supported)")
    if unknown or missing or misshaped:
        lines = [f"state dict does not match {cfg}:"]
        for title, keys in (("unknown keys", unknown), ("missing keys", missing),
                            ("mis-shaped keys", misshaped)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        raise ConversionError("\n".join(lines))
    return _unflatten(flat)


def to_official_state_dict(params, cfg: DiTConfig) -> dict[str, np.ndarray]:
    """Flax params -> official DiT state dict (float32 numpy), ``pos_embed`` included."""
    out = {torch_key(path): np.asarray(_to_torch(np.asarray(v, np.float32), path[-1]))
           for path, v in _flat_paths(params).items()}
    grid = cfg.input_size // cfg.patch_size
    out["pos_embed"] = sincos_2d(cfg.hidden_size, grid)[None].astype(np.float32)
    return out


def infer_dit_config(state_dict: Mapping[str, np.ndarray], **overrides) -> DiTConfig:
    """Guess a ``DiTConfig`` from tensor shapes (heads from the official size table).

    ``overrides`` win over inferred values (pass ``num_heads`` for non-official sizes).
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
    heads = {(d, h): n for d, h, n in DIT_SIZES.values()}.get((depth, hidden))
    fields = dict(input_size=int(round(n_tokens ** 0.5)) * patch, in_channels=in_ch,
                  patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads,
                  mlp_ratio=mlp / hidden, learn_sigma=out_ch == 2 * in_ch)
    fields.update(overrides)
    if "num_classes" not in overrides:
        # An official table has one extra null row when trained with label dropout.
        fields["num_classes"] = n_rows - 1 if fields.get("class_dropout_prob", 0.1) > 0 else n_rows
    if fields["num_heads"] is None:
        raise ConversionError(f"state_dict: depth={depth}, hidden={hidden} is not an official DiT "
                              "size; pass num_heads=...")
    return DiTConfig(**{k: int(v) if isinstance(v, np.integer) else v for k, v in fields.items()})


def load_official_dit(path: str | pathlib.Path, cfg: DiTConfig | None = None):
    """Read and convert an official DiT checkpoint. Returns ``(cfg, params)``."""
    state_dict = load_state_dict(path)
    cfg = cfg or infer_dit_config(state_dict)
    return cfg, convert_dit_state_dict(state_dict, cfg)
