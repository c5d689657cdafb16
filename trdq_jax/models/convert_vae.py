"""Stable Diffusion VAE checkpoints (diffusers ``AutoencoderKL`` and original LDM) <-> Flax params
of ``trdq_jax.models.vae.AutoencoderKL``.

Two layouts are read:

* diffusers: a directory with ``config.json`` (``_class_name: "AutoencoderKL"``) and
  ``diffusion_pytorch_model.safetensors`` (or ``diffusion_pytorch_model.fp16.safetensors``);
  keys such as ``encoder.down_blocks.0.resnets.1.conv1.weight``. The Flax module names are these
  keys with ``name.N`` written ``name_N``, so the table is ``convert.torch_key``. The mid-block
  attention is accepted under the current names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) or
  the legacy ones of older hub uploads (``query``, ``key``, ``value``, ``proj_attn``), never a
  mix of both in one block.
* LDM / original Stable Diffusion: the ``first_stage_model.*`` keys of a full ``.ckpt`` /
  ``.safetensors`` checkpoint (its other keys are ignored), or a bare VAE file holding the same
  keys without the prefix (``loss.*`` training-loss keys of such files are ignored). Names:
  ``encoder.down.{i}.block.{j}``, ``encoder.down.{i}.downsample.conv``, ``mid.block_1``,
  ``mid.attn_1`` (``norm``, and ``q``/``k``/``v``/``proj_out`` as 1x1 convs ``[C, C, 1, 1]``),
  ``mid.block_2``, ``decoder.up.{i}.block.{j}`` / ``decoder.up.{i}.upsample.conv`` with LDM's
  ``up.{i}`` being diffusers' ``up_blocks.{n-1-i}``, ``nin_shortcut``, ``norm_out``.

Conv weights go from ``[out, in, kh, kw]`` to ``[kh, kw, in, out]``, linear weights from
``[out, in]`` to ``[in, out]``; everything is cast to ``cfg.param_dtype``. Every key must be
consumed: unknown, missing, mis-shaped and non-finite (NaN/Inf, also after the cast) keys are
reported together in one ``ConversionError`` (a ``ValueError``). Files are read by
``convert.load_state_dict``: nothing is ever unpickled (``.ckpt`` goes through
``torch.load(weights_only=True)`` and needs torch). A missing directory or file raises
``FileNotFoundError``; every message names the path.
"""
from __future__ import annotations

import functools
import json
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from trdq_jax.config import ConfigError, VAEConfig
from trdq_jax.models.convert import (ConversionError, _flat_paths, _param_dtype, _to_torch,
                                     _unflatten, convert_keys, key_problems, load_state_dict,
                                     raise_problems, torch_key, torch_layout)
from trdq_jax.models.vae import abstract_vae_params

DIFFUSERS_CLASS = "AutoencoderKL"
CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
LDM_PREFIX = "first_stage_model."
_DOWN, _UP = "DownEncoderBlock2D", "UpDecoderBlock2D"

# diffusers' AutoencoderKL.__init__ defaults: what a config.json without the key means
_DIFFUSERS_DEFAULTS = dict(in_channels=3, out_channels=3, block_out_channels=(64,),
                           layers_per_block=1, latent_channels=4, norm_num_groups=32,
                           sample_size=32, scaling_factor=0.18215, shift_factor=None,
                           use_quant_conv=True, use_post_quant_conv=True,
                           mid_block_add_attention=True)
_CHECKED_KEYS = {"down_block_types", "up_block_types", "act_fn", "latents_mean", "latents_std"}
_IGNORED_KEYS = {"force_upcast"}  # diffusers' hint to run the VAE in float32: no weights in it

_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.0)\."
                        r"(query|key|value|proj_attn)\.(weight|bias)$")
_CURRENT_RE = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.0)\."
                         r"(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")


# ----------------------------------------------------------------------------- configs


def vae_config_from_diffusers(config: Any, path: str | pathlib.Path = CONFIG_NAME,
                              **overrides) -> VAEConfig:
    """A diffusers ``AutoencoderKL`` ``config.json`` (as a dict) -> ``VAEConfig``.

    Keys the file leaves out take diffusers' defaults (``use_quant_conv`` /
    ``use_post_quant_conv`` / ``mid_block_add_attention`` true); ``shift_factor: null`` is 0.0;
    ``force_upcast`` and ``_``-keys are ignored. ``overrides`` (e.g. ``dtype``,
    ``param_dtype``) replace fields of the result.

    Raises ``ConversionError`` (one line naming ``path``) for a config without ``_class_name``
    or of another class ("foreign config"), block types other than DownEncoderBlock2D /
    UpDecoderBlock2D or not one per ``block_out_channels`` entry, ``act_fn`` other than silu,
    non-null ``latents_mean`` / ``latents_std`` (not supported), keys it does not know, and
    values ``VAEConfig`` refuses.
    """
    where = str(path)
    if not isinstance(config, dict):
        raise ConversionError(f"{where}: expected a JSON object, got {type(config).__name__}")
    cls = config.get("_class_name")
    if cls is None:
        raise ConversionError(f"{where}: foreign config: no _class_name, expected "
                              f"{DIFFUSERS_CLASS!r} (a diffusers AutoencoderKL config.json)")
    if cls != DIFFUSERS_CLASS:
        raise ConversionError(f"{where}: foreign config: _class_name {cls!r}, expected "
                              f"{DIFFUSERS_CLASS!r}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS
                     and k not in _CHECKED_KEYS and k not in _IGNORED_KEYS)
    if unknown:
        raise ConversionError(f"{where}: unsupported AutoencoderKL config keys "
                              f"{', '.join(unknown)} (they may change the architecture)")
    for name in ("latents_mean", "latents_std"):
        if config.get(name) is not None:
            raise ConversionError(f"{where}: {name} is set ({config[name]!r}): per-channel "
                                  "latent statistics are not supported, only scaling_factor "
                                  "and shift_factor")
    act = config.get("act_fn", "silu")
    if act != "silu":
        raise ConversionError(f"{where}: act_fn {act!r} is not supported, expected 'silu'")
    fields = {k: config.get(k, v) for k, v in _DIFFUSERS_DEFAULTS.items()}
    chans = fields["block_out_channels"]
    if not isinstance(chans, (list, tuple)):
        raise ConversionError(f"{where}: block_out_channels: expected a list of ints, got "
                              f"{chans!r}")
    fields["block_out_channels"] = tuple(chans)
    for name, kind, default in (("down_block_types", _DOWN, (_DOWN,)),
                                ("up_block_types", _UP, (_UP,))):
        types = config.get(name, default)
        if not isinstance(types, (list, tuple)) or len(types) != len(chans):
            raise ConversionError(f"{where}: {name}: expected one per block_out_channels entry "
                                  f"({len(chans)}), got {types!r}")
        other = sorted({t for t in types if t != kind}, key=str)
        if other:
            raise ConversionError(f"{where}: {name}: {', '.join(map(repr, other))} not "
                                  f"supported, expected only {kind!r}")
    if fields["shift_factor"] is None:
        fields["shift_factor"] = 0.0
    size = fields["sample_size"]
    if isinstance(size, (list, tuple)) and size and all(s == size[0] for s in size):
        fields["sample_size"] = size[0]
    for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not isinstance(fields[name], bool):
            raise ConversionError(f"{where}: {name}: expected true or false, got "
                                  f"{fields[name]!r}")
    fields.update(overrides)
    try:
        return VAEConfig(**fields)
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"{where}: {e}") from None


def diffusers_config(cfg: VAEConfig) -> dict:
    """``VAEConfig`` -> the diffusers ``AutoencoderKL`` ``config.json`` dict
    (``vae_config_from_diffusers`` inverts it, up to ``dtype`` / ``param_dtype``)."""
    n = len(cfg.block_out_channels)
    return {"_class_name": DIFFUSERS_CLASS, "act_fn": "silu",
            "block_out_channels": list(cfg.block_out_channels),
            "down_block_types": [_DOWN] * n, "up_block_types": [_UP] * n,
            "force_upcast": True, "in_channels": cfg.in_channels,
            "latent_channels": cfg.latent_channels, "latents_mean": None, "latents_std": None,
            "layers_per_block": cfg.layers_per_block,
            "mid_block_add_attention": cfg.mid_block_add_attention,
            "norm_num_groups": cfg.norm_num_groups, "out_channels": cfg.out_channels,
            "sample_size": cfg.sample_size, "scaling_factor": float(cfg.scaling_factor),
            "shift_factor": float(cfg.shift_factor), "use_quant_conv": cfg.use_quant_conv,
            "use_post_quant_conv": cfg.use_post_quant_conv}


# ----------------------------------------------------------------------------- key tables


@functools.lru_cache(maxsize=32)
def _expected(cfg: VAEConfig) -> dict:
    """Flax path -> ShapeDtypeStruct (eval_shape once per config: the converters run often)."""
    return _flat_paths(abstract_vae_params(cfg))


_LDM_SUBMODULE = {"conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q",
                  "to_k": "k", "to_v": "v", "to_out_0": "proj_out"}


def ldm_key(path: tuple[str, ...], cfg: VAEConfig) -> str:
    """A Flax path -> its key in an LDM checkpoint (without ``first_stage_model.``):
    ``('decoder', 'up_blocks_0', 'upsamplers_0', 'conv', 'kernel')`` ->
    ``'decoder.up.1.upsample.conv.weight'`` for two levels."""
    top, *mods, leaf = path
    out = [top]
    n = len(cfg.block_out_channels)
    i = 0
    while i < len(mods):
        name = mods[i]
        level = re.fullmatch(r"(down|up)_blocks_(\d+)", name)
        if level:
            kind, idx = level.group(1), int(level.group(2))
            out += [kind, str(idx if kind == "down" else n - 1 - idx)]
        elif name == "mid_block":
            out.append("mid")
        elif re.fullmatch(r"resnets_\d+", name):
            j = int(name.split("_")[1])
            out += [f"block_{j + 1}"] if mods[i - 1] == "mid_block" else ["block", str(j)]
        elif name == "attentions_0":
            out.append("attn_1")
        elif name in ("downsamplers_0", "upsamplers_0"):
            out.append(name[:-len("samplers_0")] + "sample")
        elif name == "conv_norm_out":
            out.append("norm_out")
        else:
            out.append(_LDM_SUBMODULE.get(name, name))
        i += 1
    out.append("bias" if leaf == "bias" else "weight")
    return ".".join(out)


def _is_attention_kernel(path: tuple[str, ...]) -> bool:
    return "attentions_0" in path and path[-1] == "kernel"


# ----------------------------------------------------------------------------- conversion


def _ldm_layout(path: tuple[str, ...], want: tuple[int, ...], stored: np.ndarray
                ) -> tuple[np.ndarray | None, tuple[int, ...]]:
    """``convert.torch_layout``, but the attention's q/k/v/proj_out kernels are LDM's 1x1 convs
    ``[C, C, 1, 1]`` (or already squeezed ``[C, C]``)."""
    if not _is_attention_kernel(path):
        return torch_layout(path, want, stored)
    torch_shape = (want[1], want[0], 1, 1)
    if stored.shape == torch_shape:
        return stored[:, :, 0, 0].T, torch_shape
    return (stored.T if stored.shape == torch_shape[:2] else None), torch_shape


def _convert(state_dict: Mapping[str, np.ndarray], cfg: VAEConfig, table: dict, *,
             ldm: bool, where: str | None, problems: list[tuple[str, list[str]]]) -> dict:
    """``table``: stored key -> Flax path. Raises one ``ConversionError`` for every problem."""
    unknown = sorted(set(state_dict) - set(table))
    missing = sorted(set(table) - set(state_dict))
    flat, misshaped, nonfinite = convert_keys(state_dict, table, _expected(cfg),
                                              _param_dtype(cfg.param_dtype),
                                              f"param_dtype={cfg.param_dtype}",
                                              rule=_ldm_layout if ldm else torch_layout)
    raise_problems(problems + key_problems(unknown, missing, misshaped, nonfinite),
                   f"state dict does not match {cfg}", where=where)
    return _unflatten(flat)


def _rename_legacy_attention(state_dict: Mapping[str, np.ndarray]):
    """Legacy ``query``/``key``/``value``/``proj_attn`` -> current names; returns the renamed
    dict and a list of blocks that mix both namings."""
    out, legacy_blocks, current_blocks = {}, set(), set()
    for key, value in state_dict.items():
        m = _LEGACY_RE.match(key)
        if m:
            legacy_blocks.add(m.group(1))
            key = f"{m.group(1)}.{_LEGACY_ATTN[m.group(2)]}.{m.group(3)}"
        elif _CURRENT_RE.match(key):
            current_blocks.add(_CURRENT_RE.match(key).group(1))
        out[key] = value
    mixed = sorted(legacy_blocks & current_blocks)
    if mixed:  # keep the original keys so the report shows what the file holds
        out = dict(state_dict)
    return out, [f"{b} (both query/key/value/proj_attn and to_q/to_k/to_v/to_out.0)"
                 for b in mixed]


def convert_diffusers_vae_state_dict(state_dict: Mapping[str, np.ndarray], cfg: VAEConfig, *,
                                     where: str | None = None) -> dict:
    """A diffusers ``AutoencoderKL`` state dict (numpy, any float dtype) -> Flax params for
    ``AutoencoderKL(cfg)`` (numpy arrays in ``cfg.param_dtype``).

    Accepts the current or the legacy mid-block attention names (not both in one block).
    Raises ``ConversionError`` listing every unknown, missing, mis-shaped and non-finite key
    (and blocks mixing the two attention namings); ``where`` (a path) leads the message.
    """
    renamed, mixed = _rename_legacy_attention(state_dict)
    table = {torch_key(path): path for path in _expected(cfg)}
    return _convert(renamed, cfg, table, ldm=False, where=where,
                    problems=[("attention blocks with two namings", mixed)])


def convert_ldm_vae_state_dict(state_dict: Mapping[str, np.ndarray], cfg: VAEConfig, *,
                               where: str | None = None) -> dict:
    """The VAE of an original LDM / Stable Diffusion checkpoint -> Flax params.

    With any ``first_stage_model.`` key present, only those keys are read (the UNet, text
    encoder and other keys are ignored); otherwise the dict is taken as a bare VAE (keys
    ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``; ``loss.*`` ignored).
    The attention's q/k/v/proj_out may be ``[C, C, 1, 1]`` (LDM) or ``[C, C]``. Raises
    ``ConversionError`` as ``convert_diffusers_vae_state_dict``.
    """
    if any(k.startswith(LDM_PREFIX) for k in state_dict):
        vae = {k[len(LDM_PREFIX):]: v for k, v in state_dict.items() if k.startswith(LDM_PREFIX)}
    else:
        vae = {k: v for k, v in state_dict.items() if not k.startswith("loss.")}
    table = {ldm_key(path, cfg): path for path in _expected(cfg)}
    return _convert(vae, cfg, table, ldm=True, where=where, problems=[])


def to_diffusers_state_dict(params, cfg: VAEConfig) -> dict[str, np.ndarray]:
    """Flax params -> diffusers ``AutoencoderKL`` state dict: C-contiguous float32 numpy
    (``safetensors.numpy.save_file`` writes an array's memory as it lies). Raises
    ``ValueError`` when ``params`` is not the tree of ``AutoencoderKL(cfg)``."""
    flat = _flat_paths(params)
    expected = _expected(cfg)
    if set(flat) != set(expected) or any(
            tuple(np.shape(flat[p])) != tuple(expected[p].shape) for p in expected):
        raise ValueError(f"params: not the parameter tree of AutoencoderKL({cfg})")
    return {torch_key(path): np.ascontiguousarray(_to_torch(np.asarray(v, np.float32), path[-1]))
            for path, v in flat.items()}


# ----------------------------------------------------------------------------- files


def load_diffusers_vae(directory: str | pathlib.Path, **overrides) -> tuple[VAEConfig, dict]:
    """Read a diffusers ``AutoencoderKL`` directory (``config.json`` +
    ``diffusion_pytorch_model.safetensors``, else ``diffusion_pytorch_model.fp16.safetensors``;
    float16/bfloat16 files are cast to ``param_dtype``). ``overrides`` (``dtype``,
    ``param_dtype``) go to the config. Returns ``(cfg, params)``.

    Raises ``FileNotFoundError`` for a missing directory, ``config.json`` or weights file and
    ``ConversionError`` for a config that is not JSON or not an AutoencoderKL's, a damaged or
    pickled weights file, or weights that do not match the config; each names the path.
    """
    directory = pathlib.Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"directory: no such directory {str(directory)!r}")
    if not directory.is_dir():
        raise NotADirectoryError(f"directory: {str(directory)!r} is a file, expected a diffusers "
                                 "AutoencoderKL directory (config.json + safetensors)")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r}: missing; expected the diffusers "
                                "AutoencoderKL config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConversionError(f"{str(config_path)!r}: not JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{str(config_path)!r}: not JSON ({e})") from None
    cfg = vae_config_from_diffusers(config, repr(str(config_path)), **overrides)
    weights = next((directory / n for n in WEIGHT_NAMES if (directory / n).is_file()), None)
    if weights is None:
        pickled = sorted(p.name for p in directory.glob("diffusion_pytorch_model*.bin"))
        hint = (f"; found {', '.join(pickled)} (a pickle, never read: convert it to "
                "safetensors where you trust it)") if pickled else ""
        raise FileNotFoundError(f"{str(directory)!r}: no weights file, expected "
                                f"{' or '.join(WEIGHT_NAMES)}{hint}")
    state_dict = load_state_dict(weights)
    return cfg, convert_diffusers_vae_state_dict(state_dict, cfg, where=repr(str(weights)))


def _load_ckpt(path: pathlib.Path) -> dict[str, np.ndarray]:
    """An LDM ``.ckpt`` (a PyTorch pickle holding ``{"state_dict": ...}``) through
    ``torch.load(weights_only=True)``."""
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint file at {str(path)!r}")
    try:
        import torch
    except ImportError:
        raise ImportError("path: reading .ckpt checkpoints needs PyTorch: pip install "
                          "'trdq_jax[torch]'; or convert the file to .safetensors") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many kinds)
        raise ConversionError(f"path: torch.load(weights_only=True) cannot read {str(path)!r}: "
                              f"{type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"path: {str(path)!r} holds a {type(obj).__name__}, expected a "
                              "state dict")
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
            for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_ldm_vae(path: str | pathlib.Path, cfg: VAEConfig | None = None
                 ) -> tuple[VAEConfig, dict]:
    """Read the VAE of an LDM / Stable Diffusion checkpoint (``.safetensors``, ``.ckpt``,
    ``.pt``, ...; a full model or a bare VAE). ``cfg`` defaults to ``VAEConfig()``, the SD-VAE
    (LDM files carry no config). Returns ``(cfg, params)``; errors as ``load_diffusers_vae``."""
    path = pathlib.Path(path)
    cfg = cfg or VAEConfig()
    state_dict = _load_ckpt(path) if path.suffix.lower() == ".ckpt" else load_state_dict(path)
    return cfg, convert_ldm_vae_state_dict(state_dict, cfg, where=repr(str(path)))


def save_diffusers_vae(directory: str | pathlib.Path, params, cfg: VAEConfig) -> pathlib.Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (float32) into a new (or
    empty) ``directory``, readable by diffusers' ``AutoencoderKL.from_pretrained`` and
    ``load_diffusers_vae``. Refuses an existing non-empty directory (``FileExistsError``).
    Returns the directory."""
    from safetensors.numpy import save_file
    directory = pathlib.Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"directory: {str(directory)!r} exists and is not an empty "
                              "directory; save into a new one")
    state_dict = to_diffusers_state_dict(params, cfg)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(directory / WEIGHT_NAMES[0]))
    (directory / CONFIG_NAME).write_text(json.dumps(diffusers_config(cfg), indent=2,
                                                    sort_keys=True) + "\n")
    return directory


__all__ = ["ConversionError", "convert_diffusers_vae_state_dict", "convert_ldm_vae_state_dict",
           "diffusers_config", "ldm_key", "load_diffusers_vae", "load_ldm_vae",
           "save_diffusers_vae", "to_diffusers_state_dict", "vae_config_from_diffusers"]
