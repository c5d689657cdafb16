"""diffusers ``PixArtTransformer2DModel`` checkpoints (PixArt-α and PixArt-Σ) <-> Flax params of
``trdq_jax.models.pixart.PixArt``.

A diffusers ``transformer/`` directory holds ``config.json`` (``_class_name``
``"PixArtTransformer2DModel"``, or ``"Transformer2DModel"`` with ``norm_type``
``"ada_norm_single"`` in the PixArt-α uploads made before that class existed) and
``diffusion_pytorch_model.safetensors`` (or ``diffusion_pytorch_model.fp16.safetensors``, or
shards listed by ``diffusion_pytorch_model.safetensors.index.json``).

The key table (``D`` = hidden size; linear weights ``[out, in]`` become Flax kernels
``[in, out]``, the patch conv ``[D, C, p, p]`` becomes ``[p, p, C, D]``)::

    pos_embed.proj                                  x_embedder/proj
    adaln_single.emb.timestep_embedder.linear_{1,2} t_embedder/mlp_{0,2}
    adaln_single.emb.resolution_embedder.linear_*   csize_embedder/mlp_*   (micro-conditions)
    adaln_single.emb.aspect_ratio_embedder.linear_* ar_embedder/mlp_*      (micro-conditions)
    adaln_single.linear                             t_block
    caption_projection.linear_{1,2}                 caption_projection/fc{1,2}
    transformer_blocks.{i}.scale_shift_table        blocks_{i}/scale_shift_table
    transformer_blocks.{i}.attn1.to_{q,k,v}         blocks_{i}/attn/qkv      (fused: q, k, v)
    transformer_blocks.{i}.attn1.to_out.0           blocks_{i}/attn/proj
    transformer_blocks.{i}.attn2.to_q               blocks_{i}/cross_attn/q
    transformer_blocks.{i}.attn2.to_{k,v}           blocks_{i}/cross_attn/kv (fused: k, v)
    transformer_blocks.{i}.attn2.to_out.0           blocks_{i}/cross_attn/proj
    transformer_blocks.{i}.ff.net.0.proj            blocks_{i}/mlp/fc1
    transformer_blocks.{i}.ff.net.2                 blocks_{i}/mlp/fc2
    scale_shift_table                               final_layer/scale_shift_table
    proj_out                                        final_layer/linear

(diffusers' blocks have no norm parameters: ``norm_elementwise_affine`` is false.) Everything
is cast to ``cfg.param_dtype``. Every key must be consumed: unknown, missing, mis-shaped and
non-finite (NaN/Inf, also after the cast) keys are reported together in one
``ConversionError`` (a ``ValueError``) naming the file. A config of another class, or one whose
settings change the architecture, is refused in one line naming the file and the key.

The transformer config does not say whether a checkpoint is α or Σ; what differs between
them is ``max_tokens`` (120 for α, 300 for Σ), which the caller passes (default 120).
"""
from __future__ import annotations

import functools
import json
import pathlib
from typing import Any, Mapping

import numpy as np

from trdq_jax.config import ConfigError, PixArtConfig
from trdq_jax.models.convert import (ConversionError, _flat_paths, _listing, _param_dtype,
                                     _unflatten, as_stored, convert_keys, key_problems,
                                     load_state_dict, raise_problems)

DIFFUSERS_CLASS = "PixArtTransformer2DModel"
LEGACY_CLASS = "Transformer2DModel"  # PixArt-α hub uploads that predate the PixArt class
CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
INDEX_NAMES = tuple(n + ".index.json" for n in WEIGHT_NAMES)

# diffusers' PixArtTransformer2DModel.__init__ defaults: what a config.json without the key means
_DEFAULTS = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                 num_layers=28, cross_attention_dim=1152, sample_size=128, patch_size=2,
                 interpolation_scale=None, use_additional_conditions=None, caption_channels=None)
# settings that must hold these values (anything else is another architecture)
_REQUIRED = dict(norm_type="ada_norm_single", activation_fn="gelu-approximate",
                 attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6,
                 attention_type="default", only_cross_attention=False,
                 double_self_attention=False, use_linear_projection=False,
                 num_vector_embeds=None)
# no effect on inference: dropout, GroupNorm groups (unused), ada-norm table size (unused by
# adaLN-single), attention upcasting (float32 here anyway)
_IGNORED = {"dropout", "norm_num_groups", "num_embeds_ada_norm", "upcast_attention"}


# ----------------------------------------------------------------------------- configs


def pixart_config_from_diffusers(config: Any, path: str | pathlib.Path = CONFIG_NAME, *,
                                 max_tokens: int = 120, **overrides) -> PixArtConfig:
    """A diffusers PixArt transformer ``config.json`` (as a dict) -> ``PixArtConfig``.

    ``interpolation_scale: null`` means ``max(sample_size // 64, 1)`` and
    ``use_additional_conditions: null`` means ``sample_size == 128`` (diffusers' rules);
    ``out_channels`` must be ``in_channels`` or twice it (learned sigma), ``cross_attention_dim``
    the hidden size (``num_attention_heads * attention_head_dim``) and ``caption_channels``
    set. ``max_tokens``: 120 (α) or 300 (Σ). ``overrides`` (``dtype``, ``param_dtype``, ...)
    replace fields of the result. Raises ``ConversionError``, one line naming ``path``.
    """
    where = str(path)
    if not isinstance(config, dict):
        raise ConversionError(f"{where}: expected a JSON object, got {type(config).__name__}")
    cls = config.get("_class_name")
    if cls is None:
        raise ConversionError(f"{where}: foreign config: no _class_name, expected "
                              f"{DIFFUSERS_CLASS!r} (a diffusers PixArt transformer config.json)")
    if cls not in (DIFFUSERS_CLASS, LEGACY_CLASS) or (
            cls == LEGACY_CLASS and config.get("norm_type") != "ada_norm_single"):
        raise ConversionError(f"{where}: foreign config: _class_name {cls!r}"
                              + (f" with norm_type {config.get('norm_type')!r}"
                                 if cls == LEGACY_CLASS else "")
                              + f", expected {DIFFUSERS_CLASS!r}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DEFAULTS
                     and k not in _REQUIRED and k not in _IGNORED)
    if unknown:
        raise ConversionError(f"{where}: unsupported PixArt config keys {', '.join(unknown)} "
                              "(they may change the architecture)")
    for key, want in _REQUIRED.items():
        got = config.get(key, want)
        same = (isinstance(got, float) and isinstance(want, float) and np.isclose(got, want,
                                                                                  rtol=1e-9)) \
            or (type(got) is type(want) and got == want)
        if not same:
            raise ConversionError(f"{where}: {key} {got!r} is not supported, expected {want!r}")
    f = {k: config.get(k, v) for k, v in _DEFAULTS.items()}
    for key in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers",
                "sample_size", "patch_size"):
        if not isinstance(f[key], int) or isinstance(f[key], bool):
            raise ConversionError(f"{where}: {key}: expected an int, got {f[key]!r}")
    hidden = f["num_attention_heads"] * f["attention_head_dim"]
    if f["caption_channels"] is None:
        raise ConversionError(f"{where}: caption_channels is null: a PixArt transformer "
                              "projects T5 captions (caption_channels 4096 for T5-XXL)")
    if f["cross_attention_dim"] != hidden:
        raise ConversionError(f"{where}: cross_attention_dim {f['cross_attention_dim']!r} is not "
                              f"the hidden size num_attention_heads * attention_head_dim = "
                              f"{hidden} (PixArt attends to the projected caption)")
    out = f["in_channels"] if f["out_channels"] is None else f["out_channels"]
    if out not in (f["in_channels"], 2 * f["in_channels"]):
        raise ConversionError(f"{where}: out_channels {out!r}: expected in_channels="
                              f"{f['in_channels']} or twice it (learned sigma)")
    scale = f["interpolation_scale"]
    if scale is None:
        scale = max(f["sample_size"] // 64, 1)
    micro = f["use_additional_conditions"]
    if micro is None:
        micro = f["sample_size"] == 128
    if not isinstance(micro, bool):
        raise ConversionError(f"{where}: use_additional_conditions: expected true, false or "
                              f"null, got {micro!r}")
    fields = dict(input_size=f["sample_size"], in_channels=f["in_channels"],
                  patch_size=f["patch_size"], hidden_size=hidden, depth=f["num_layers"],
                  num_heads=f["num_attention_heads"], mlp_ratio=4.0,
                  caption_channels=f["caption_channels"], max_tokens=max_tokens,
                  learn_sigma=out == 2 * f["in_channels"], use_micro_conditions=micro,
                  interpolation_scale=float(scale) if isinstance(scale, (int, float))
                  and not isinstance(scale, bool) else scale)
    fields.update(overrides)
    try:
        return PixArtConfig(**fields)
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"{where}: {e}") from None


def diffusers_config(cfg: PixArtConfig) -> dict:
    """``PixArtConfig`` -> a diffusers ``PixArtTransformer2DModel`` ``config.json`` dict
    (``pixart_config_from_diffusers`` inverts it, up to ``max_tokens`` and the dtypes).
    Raises ``ValueError`` for an MLP width diffusers cannot express (``mlp_ratio`` != 4)."""
    if cfg.mlp_ratio != 4.0:
        raise ValueError(f"cfg: diffusers' PixArt has mlp_ratio 4, got {cfg.mlp_ratio}")
    scale = cfg.interpolation_scale
    return {"_class_name": DIFFUSERS_CLASS, "activation_fn": "gelu-approximate",
            "attention_bias": True, "attention_head_dim": cfg.head_dim,
            "attention_type": "default", "caption_channels": cfg.caption_channels,
            "cross_attention_dim": cfg.hidden_size, "dropout": 0.0,
            "in_channels": cfg.in_channels,
            "interpolation_scale": int(scale) if float(scale).is_integer() else scale,
            "norm_elementwise_affine": False, "norm_eps": 1e-6, "norm_num_groups": 32,
            "norm_type": "ada_norm_single", "num_attention_heads": cfg.num_heads,
            "num_embeds_ada_norm": 1000, "num_layers": cfg.depth,
            "out_channels": cfg.out_channels, "patch_size": cfg.patch_size,
            "sample_size": cfg.input_size, "upcast_attention": False,
            "use_additional_conditions": cfg.use_micro_conditions}


# ----------------------------------------------------------------------------- key table


def _linear(prefix: str) -> dict:
    return {("kernel",): [f"{prefix}.weight"], ("bias",): [f"{prefix}.bias"]}


def _fused(prefixes: list[str]) -> dict:
    return {("kernel",): [f"{p}.weight" for p in prefixes],
            ("bias",): [f"{p}.bias" for p in prefixes]}


@functools.lru_cache(maxsize=32)
def key_table(cfg: PixArtConfig) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Flax leaf path -> the diffusers keys it is made of (several for a fused projection,
    concatenated along the output axis in this order)."""
    mods: dict[tuple[str, ...], dict] = {
        ("x_embedder", "proj"): _linear("pos_embed.proj"),
        ("t_embedder", "mlp_0"): _linear("adaln_single.emb.timestep_embedder.linear_1"),
        ("t_embedder", "mlp_2"): _linear("adaln_single.emb.timestep_embedder.linear_2"),
        ("t_block",): _linear("adaln_single.linear"),
        ("caption_projection", "fc1"): _linear("caption_projection.linear_1"),
        ("caption_projection", "fc2"): _linear("caption_projection.linear_2"),
        ("final_layer", "linear"): _linear("proj_out"),
        ("final_layer",): {("scale_shift_table",): ["scale_shift_table"]},
    }
    if cfg.use_micro_conditions:
        for flax, name in (("csize_embedder", "resolution_embedder"),
                           ("ar_embedder", "aspect_ratio_embedder")):
            mods[(flax, "mlp_0")] = _linear(f"adaln_single.emb.{name}.linear_1")
            mods[(flax, "mlp_2")] = _linear(f"adaln_single.emb.{name}.linear_2")
    for i in range(cfg.depth):
        b, t = f"blocks_{i}", f"transformer_blocks.{i}"
        mods[(b,)] = {("scale_shift_table",): [f"{t}.scale_shift_table"]}
        mods[(b, "attn", "qkv")] = _fused([f"{t}.attn1.to_q", f"{t}.attn1.to_k",
                                           f"{t}.attn1.to_v"])
        mods[(b, "attn", "proj")] = _linear(f"{t}.attn1.to_out.0")
        mods[(b, "cross_attn", "q")] = _linear(f"{t}.attn2.to_q")
        mods[(b, "cross_attn", "kv")] = _fused([f"{t}.attn2.to_k", f"{t}.attn2.to_v"])
        mods[(b, "cross_attn", "proj")] = _linear(f"{t}.attn2.to_out.0")
        mods[(b, "mlp", "fc1")] = _linear(f"{t}.ff.net.0.proj")
        mods[(b, "mlp", "fc2")] = _linear(f"{t}.ff.net.2")
    return {mod + leaf: tuple(keys)
            for mod, leaves in mods.items() for leaf, keys in leaves.items()}


@functools.lru_cache(maxsize=32)
def _expected(cfg: PixArtConfig) -> dict:
    from trdq_jax.models.factory import abstract_params
    return _flat_paths(abstract_params(cfg))


def _source_shape(want: tuple[int, ...], path: tuple[str, ...], n: int) -> tuple[int, ...]:
    """The torch shape of each of the ``n`` keys that make up a Flax leaf of shape ``want``."""
    if path[-1] == "kernel" and len(want) == 4:  # conv [p, p, C, D] <- [D, C, p, p]
        return (want[3], want[2], want[0], want[1])
    if path[-1] == "kernel":  # [in, n * out] <- n x [out, in]
        return (want[1] // n, want[0])
    if path[-1] == "bias":
        return (want[0] // n,)
    return want


def convert_diffusers_pixart_state_dict(state_dict: Mapping[str, np.ndarray],
                                        cfg: PixArtConfig, *, where: str | None = None) -> dict:
    """A diffusers ``PixArtTransformer2DModel`` state dict (numpy, any float dtype) -> Flax
    params of ``PixArt(cfg)`` (numpy, ``cfg.param_dtype``). Raises one ``ConversionError``
    listing every unknown, missing, mis-shaped and non-finite key; ``where`` leads it."""
    expected = _expected(cfg)
    table = key_table(cfg)
    if set(table) != set(expected):  # the table and the model disagree: a bug here, not input
        raise AssertionError(f"key table vs model: {sorted(set(table) ^ set(expected))}")
    used = {k for keys in table.values() for k in keys}
    unknown = sorted(set(state_dict) - used)
    missing = sorted(used - set(state_dict))
    shapes = {key: _source_shape(tuple(expected[path].shape), path, len(keys))
              for path, keys in table.items() for key in keys}
    parts, misshaped, nonfinite = convert_keys(state_dict, {k: k for k in shapes}, shapes,
                                               _param_dtype(cfg.param_dtype),
                                               f"param_dtype={cfg.param_dtype}", rule=as_stored)
    flat = {}
    for path, keys in table.items():
        if not all(key in parts for key in keys):
            continue
        want = expected[path].shape
        if path[-1] == "kernel" and len(want) == 4:
            value = parts[keys[0]].transpose(2, 3, 1, 0)
        elif path[-1] == "kernel":
            value = np.concatenate([parts[key] for key in keys], axis=0).T
        elif path[-1] == "bias":
            value = np.concatenate([parts[key] for key in keys], axis=0)
        else:
            value = parts[keys[0]]
        flat[path] = np.ascontiguousarray(value)
    raise_problems(key_problems(unknown, missing, misshaped, nonfinite),
                   f"state dict does not match {cfg}", where=where)
    return _unflatten(flat)


def to_diffusers_state_dict(params, cfg: PixArtConfig) -> dict[str, np.ndarray]:
    """Flax params -> diffusers ``PixArtTransformer2DModel`` state dict: C-contiguous float32
    numpy (fused projections split again). Raises ``ValueError`` when ``params`` is not the
    tree of ``PixArt(cfg)``."""
    flat = _flat_paths(params)
    expected = _expected(cfg)
    if set(flat) != set(expected) or any(
            tuple(np.shape(flat[p])) != tuple(expected[p].shape) for p in expected):
        raise ValueError(f"params: not the parameter tree of PixArt({cfg})")
    out = {}
    for path, keys in key_table(cfg).items():
        value = np.asarray(flat[path], np.float32)
        if path[-1] == "kernel" and value.ndim == 4:
            pieces = [value.transpose(3, 2, 0, 1)]
        elif path[-1] == "kernel":
            pieces = np.split(value.T, len(keys), axis=0)
        elif path[-1] == "bias":
            pieces = np.split(value, len(keys), axis=0)
        else:
            pieces = [value]
        for key, piece in zip(keys, pieces):
            out[key] = np.ascontiguousarray(piece)
    return out


# ----------------------------------------------------------------------------- files


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConversionError(f"{str(path)!r}: not JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{str(path)!r}: not JSON ({e})") from None


def _load_sharded(index: pathlib.Path) -> dict[str, np.ndarray]:
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise ConversionError(f"{str(index)!r}: expected a 'weight_map' of tensor name -> "
                              "shard file name")
    shards = sorted(set(weight_map.values()))
    bad = [s for s in shards if pathlib.Path(s).name != s]
    if bad:
        raise ConversionError(f"{str(index)!r}: shard names must be plain file names in the "
                              f"directory, got {bad}")
    absent = [s for s in shards if not (index.parent / s).is_file()]
    if absent:
        raise FileNotFoundError(f"{str(index)!r}: shard files missing: {', '.join(absent)}")
    out: dict[str, np.ndarray] = {}
    for shard in shards:
        part = load_state_dict(index.parent / shard)
        listed = {k for k, v in weight_map.items() if v == shard}
        stray = sorted(set(part) - listed)
        again = sorted(set(part) & set(out))
        if stray or again:
            raise ConversionError(f"{str(index.parent / shard)!r}: holds tensors the index "
                                  f"does not list for it: {_listing(stray or again)}")
        out.update(part)
    return out


def _weights_of(directory: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
    for name in WEIGHT_NAMES:
        if (directory / name).is_file():
            return load_state_dict(directory / name), repr(str(directory / name))
    for name in INDEX_NAMES:
        if (directory / name).is_file():
            return _load_sharded(directory / name), repr(str(directory / name))
    pickled = sorted(p.name for p in directory.glob("diffusion_pytorch_model*.bin"))
    hint = (f"; found {', '.join(pickled)} (a pickle, never read: convert it to safetensors "
            "where you trust it)") if pickled else ""
    raise FileNotFoundError(f"{str(directory)!r}: no weights file, expected "
                            f"{' or '.join(WEIGHT_NAMES + INDEX_NAMES)}{hint}")


def load_diffusers_pixart(directory: str | pathlib.Path, *, max_tokens: int = 120,
                          latent_channels: int | None = None,
                          text_width: int | None = None,
                          **overrides) -> tuple[PixArtConfig, dict]:
    """Read a diffusers PixArt ``transformer/`` directory. Returns ``(cfg, params)``.

    ``max_tokens``: 120 for PixArt-α, 300 for PixArt-Σ (the config file does not say).
    ``latent_channels`` (the VAE's, e.g. ``VAEConfig.latent_channels``) and ``text_width``
    (the text encoder's hidden size, 4096 for T5-XXL), when given, must agree with the
    transformer's ``in_channels`` and ``caption_channels``. ``overrides`` go to the config.

    Raises ``FileNotFoundError`` for a missing directory, config or weights file (or shard),
    ``ConversionError`` for a config that is not JSON or not a PixArt transformer's, a
    disagreement with ``latent_channels`` / ``text_width``, a damaged or pickled weights file,
    or weights that do not match the config; each names the path.
    """
    directory = pathlib.Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"directory: no such directory {str(directory)!r}")
    if not directory.is_dir():
        raise NotADirectoryError(f"directory: {str(directory)!r} is a file, expected a diffusers "
                                 "PixArt transformer directory (config.json + safetensors)")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r}: missing; expected the diffusers "
                                "PixArtTransformer2DModel config.json")
    where = repr(str(config_path))
    cfg = pixart_config_from_diffusers(_read_json(config_path), where, max_tokens=max_tokens,
                                       **overrides)
    if latent_channels is not None and latent_channels != cfg.in_channels:
        raise ConversionError(f"{where}: in_channels {cfg.in_channels} disagrees with the VAE's "
                              f"latent_channels {latent_channels}: another VAE than the model's?")
    if text_width is not None and text_width != cfg.caption_channels:
        raise ConversionError(f"{where}: caption_channels {cfg.caption_channels} disagrees with "
                              f"the text encoder's width {text_width}: another text encoder "
                              "than the model's? (PixArt-α/Σ take T5-XXL, 4096)")
    state_dict, weights = _weights_of(directory)
    return cfg, convert_diffusers_pixart_state_dict(state_dict, cfg, where=weights)


def save_diffusers_pixart(directory: str | pathlib.Path, params,
                          cfg: PixArtConfig) -> pathlib.Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (float32) into a new (or
    empty) ``directory``, readable by diffusers' ``PixArtTransformer2DModel.from_pretrained``
    and ``load_diffusers_pixart``. Refuses an existing non-empty directory
    (``FileExistsError``). Returns the directory."""
    from safetensors.numpy import save_file
    directory = pathlib.Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"directory: {str(directory)!r} exists and is not an empty "
                              "directory; save into a new one")
    state_dict = to_diffusers_state_dict(params, cfg)
    config = diffusers_config(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(directory / WEIGHT_NAMES[0]))
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


__all__ = ["ConversionError", "convert_diffusers_pixart_state_dict", "diffusers_config",
           "key_table", "load_diffusers_pixart", "pixart_config_from_diffusers",
           "save_diffusers_pixart", "to_diffusers_state_dict"]
