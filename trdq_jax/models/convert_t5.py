"""Hugging Face T5 v1.1 checkpoints <-> Flax params of ``trdq_jax.models.t5.T5Encoder``, and
tokenization through ``transformers``.

A directory holds ``config.json`` (``model_type: "t5"``) and the weights: ``model.safetensors``,
or shards ``model-0000i-of-0000n.safetensors`` listed in ``model.safetensors.index.json`` (when
both exist, ``model.safetensors`` is read, as transformers does). A ``T5EncoderModel`` directory
converts as is; of a full ``T5ForConditionalGeneration`` / ``T5Model`` only the encoder is
read: the ``decoder.*`` keys and ``lm_head.weight`` are ignored. Other architectures are
refused from ``config.json`` in one line naming the file: another ``model_type`` (``mt5``,
``umt5``, ...), T5 v1.0 (``feed_forward_proj: "relu"``, transformers' default when the key is
absent), a decoder-only config (``is_decoder: true``).

Key table (``i`` over the blocks)::

    shared.weight                                              -> shared/embedding
    encoder.embed_tokens.weight (tied; must equal shared.weight, or be the only one of the two)
    encoder.block.{i}.layer.0.layer_norm.weight                -> block_i/layer_0/layer_norm/scale
    encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight   -> .../SelfAttention/{q,k,v,o}/kernel
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                         -> block_0/layer_0/SelfAttention/relative_attention_bias/embedding
    encoder.block.{i}.layer.1.layer_norm.weight                -> block_i/layer_1/layer_norm/scale
    encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight
                                        -> block_i/layer_1/DenseReluDense/{wi_0,wi_1,wo}/kernel
    encoder.final_layer_norm.weight                            -> final_layer_norm/scale

Linear weights go from ``[out, in]`` to ``[in, out]``; embeddings (``[vocab, d_model]``, the
bias table ``[num_buckets, num_heads]``) and norm weights keep their shape. Everything is cast
to ``cfg.param_dtype`` (float16 / bfloat16 files are accepted). Every key must be consumed:
unknown, missing, mis-shaped and non-finite (NaN/Inf, also after the cast) keys are reported
together in one ``ConversionError`` (a ``ValueError``). Files are read by
``convert.load_state_dict``: nothing is ever unpickled (``pytorch_model.bin`` is not read; a
pickle under a ``.safetensors`` name is refused).
"""
from __future__ import annotations

import functools
import json
import pathlib
import re
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from trdq_jax.config import ConfigError
from trdq_jax.models.convert import (ConversionError, _flat_paths, _param_dtype, _unflatten,
                                     convert_keys, key_problems, load_state_dict,
                                     raise_problems)
from trdq_jax.models.t5 import (DENSE_ACT_FN, FEED_FORWARD_PROJ, T5EncoderConfig,
                                abstract_t5_params)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MODEL_TYPE = "t5"
SHARED, TIED = "shared.weight", "encoder.embed_tokens.weight"
IGNORED_PREFIXES = ("decoder.", "lm_head.")
_INDEXED = re.compile(r"^(block|layer)_(\d+)$")

# transformers' T5Config defaults: what a config.json without the key means
_HF_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    layer_norm_epsilon=1e-6)


# ----------------------------------------------------------------------------- configs


def t5_config_from_hf(config: Any, path: str | pathlib.Path = CONFIG_NAME,
                      **overrides) -> T5EncoderConfig:
    """A Hugging Face T5 ``config.json`` (as a dict) -> ``T5EncoderConfig``; keys the file leaves
    out take transformers' ``T5Config`` defaults, keys that do not shape the encoder (dropout,
    decoder layers, token ids, ...) are ignored. ``overrides`` (``dtype``, ``param_dtype``)
    replace fields.

    Raises ``ConversionError`` (one line naming ``path``) for a config that is not an object,
    of another ``model_type``, of T5 v1.0 (``feed_forward_proj`` ``relu``, the default), of
    another feed-forward (``gated-silu``, ...), with ``is_decoder`` true, and for values
    ``T5EncoderConfig`` refuses.
    """
    where = str(path)
    if not isinstance(config, dict):
        raise ConversionError(f"{where}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ConversionError(f"{where}: foreign config: model_type {model_type!r}, expected "
                              f"{MODEL_TYPE!r} (a Hugging Face T5 v1.1 config.json; mT5, UMT5 "
                              "and others are not supported)")
    if config.get("is_decoder", False) is not False:
        raise ConversionError(f"{where}: is_decoder is {config['is_decoder']!r}: a decoder-only "
                              "T5 has no encoder to read; expected a T5EncoderModel or a full T5")
    proj = config.get("feed_forward_proj", "relu")
    if proj == "relu":
        raise ConversionError(f"{where}: feed_forward_proj 'relu'"
                              f"{'' if 'feed_forward_proj' in config else ' (the default)'} is "
                              "T5 v1.0, not supported; expected 'gated-gelu' (T5 v1.1)")
    if proj != FEED_FORWARD_PROJ:
        raise ConversionError(f"{where}: feed_forward_proj {proj!r} is not supported; expected "
                              f"{FEED_FORWARD_PROJ!r} (T5 v1.1)")
    act = config.get("dense_act_fn", DENSE_ACT_FN)
    if act != DENSE_ACT_FN:
        raise ConversionError(f"{where}: dense_act_fn {act!r} is not supported with "
                              f"'gated-gelu'; expected {DENSE_ACT_FN!r}")
    if config.get("is_gated_act", True) is not True:
        raise ConversionError(f"{where}: is_gated_act is {config['is_gated_act']!r}; "
                              "'gated-gelu' means true")
    fields = {k: config.get(k, v) for k, v in _HF_DEFAULTS.items()}
    fields.update(overrides)
    try:
        return T5EncoderConfig(**fields)
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"{where}: {e}") from None


def hf_config(cfg: T5EncoderConfig) -> dict:
    """``T5EncoderConfig`` -> a transformers ``T5EncoderModel`` ``config.json`` dict
    (``t5_config_from_hf`` inverts it, up to ``dtype`` / ``param_dtype``)."""
    return {"architectures": ["T5EncoderModel"], "model_type": MODEL_TYPE,
            "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv,
            "d_ff": cfg.d_ff, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
            "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
            "relative_attention_max_distance": cfg.relative_attention_max_distance,
            "layer_norm_epsilon": float(cfg.layer_norm_epsilon),
            "feed_forward_proj": cfg.feed_forward_proj, "dense_act_fn": cfg.dense_act_fn,
            "is_gated_act": True, "is_decoder": False, "is_encoder_decoder": False,
            "use_cache": False, "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1,
            "dtype": "float32"}


# ----------------------------------------------------------------------------- key table


@functools.lru_cache(maxsize=32)
def _expected(cfg: T5EncoderConfig) -> dict:
    """Flax path -> ShapeDtypeStruct (eval_shape once per config)."""
    return _flat_paths(abstract_t5_params(cfg))


def hf_key(path: tuple[str, ...]) -> str:
    """A Flax path -> its Hugging Face key: ``('block_1', 'layer_0', 'SelfAttention', 'q',
    'kernel')`` -> ``'encoder.block.1.layer.0.SelfAttention.q.weight'``, ``('shared',
    'embedding')`` -> ``'shared.weight'``."""
    *modules, _leaf = path
    if modules == ["shared"]:
        return SHARED
    parts = ["encoder"]
    for name in modules:
        m = _INDEXED.match(name)  # only block_N / layer_N: wi_0 and wi_1 keep their names
        parts.extend([m.group(1), m.group(2)] if m else [name])
    return ".".join(parts + ["weight"])


def key_table(cfg: T5EncoderConfig) -> dict[str, tuple[str, ...]]:
    """Hugging Face key -> Flax path, for every parameter of ``T5Encoder(cfg)``."""
    return {hf_key(path): path for path in _expected(cfg)}


# ----------------------------------------------------------------------------- conversion


def convert_t5_state_dict(state_dict: Mapping[str, np.ndarray], cfg: T5EncoderConfig, *,
                          where: str | None = None,
                          problems: Sequence[tuple[str, list[str]]] = ()) -> dict:
    """A Hugging Face T5 state dict (numpy, any float dtype) -> Flax params for
    ``T5Encoder(cfg)`` (numpy arrays in ``cfg.param_dtype``).

    ``decoder.*`` and ``lm_head.*`` keys (of a full T5) are ignored. ``encoder.embed_tokens.weight``
    stands for ``shared.weight`` when that is absent and must equal it when both are present.
    Raises one ``ConversionError`` listing every unknown, missing, mis-shaped and non-finite key
    (and the ``problems`` the caller found, e.g. in a shard index); ``where`` (a path) leads it.
    """
    expected = _expected(cfg)
    table = key_table(cfg)
    sd = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_PREFIXES)}
    problems = [(title, list(keys)) for title, keys in problems]
    tied = []
    if TIED in sd:
        embed = sd.pop(TIED)
        if SHARED not in sd:
            sd[SHARED] = embed
        elif np.shape(embed) != np.shape(sd[SHARED]) or not np.array_equal(
                np.asarray(embed), np.asarray(sd[SHARED]), equal_nan=True):
            tied.append(f"{TIED} differs from {SHARED} (they are one tied embedding)")
    unknown = sorted(set(sd) - set(table))
    missing = sorted(set(table) - set(sd))
    flat, misshaped, nonfinite = convert_keys(sd, table, expected, _param_dtype(cfg.param_dtype),
                                              f"param_dtype={cfg.param_dtype}")
    raise_problems(problems + key_problems(unknown, missing, misshaped, nonfinite)
                   + [("tied embedding", tied)], f"state dict does not match {cfg}", where=where)
    return _unflatten(flat)


def to_hf_state_dict(params, cfg: T5EncoderConfig) -> dict[str, np.ndarray]:
    """Flax params -> a Hugging Face ``T5EncoderModel`` state dict: C-contiguous float32 numpy,
    ``shared.weight`` only (transformers ties ``encoder.embed_tokens.weight`` to it). Raises
    ``ValueError`` when ``params`` is not the tree of ``T5Encoder(cfg)``."""
    flat = _flat_paths(params)
    expected = _expected(cfg)
    if set(flat) != set(expected) or any(
            tuple(np.shape(flat[p])) != tuple(expected[p].shape) for p in expected):
        raise ValueError(f"params: not the parameter tree of T5Encoder({cfg})")
    out = {}
    for path, v in flat.items():
        value = np.asarray(v, np.float32)
        out[hf_key(path)] = np.ascontiguousarray(value.T if path[-1] == "kernel" else value)
    return out


# ----------------------------------------------------------------------------- files


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConversionError(f"{str(path)!r}: not JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{str(path)!r}: not JSON ({e})") from None


def _load_sharded(directory: pathlib.Path, index_path: pathlib.Path
                  ) -> tuple[dict[str, np.ndarray], list[tuple[str, list[str]]]]:
    """Read every shard the index lists; every indexed key from the shard it names. Returns the
    state dict and the index problems (keys a shard lacks, keys no index entry names)."""
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ConversionError(f"{str(index_path)!r}: expected a JSON object whose 'weight_map' "
                              "maps each key to a shard file name")
    shards = sorted(set(weight_map.values()))
    odd = [s for s in shards if pathlib.PurePath(s).name != s or not s.endswith(".safetensors")]
    if odd:
        raise ConversionError(f"{str(index_path)!r}: shard names must be .safetensors files in "
                              f"the same directory, got {', '.join(map(repr, odd))}")
    absent = [s for s in shards if not (directory / s).is_file()]
    if absent:
        raise FileNotFoundError(f"{str(index_path)!r} lists {len(absent)} shard(s) missing from "
                                f"{str(directory)!r}: {', '.join(absent)}")
    state, not_in_shard, not_indexed = {}, [], []
    for shard in shards:
        held = load_state_dict(directory / shard)
        for key, name in weight_map.items():
            if name != shard:
                continue
            if key in held:
                state[key] = held[key]
            else:
                not_in_shard.append(f"{key} (listed in {shard})")
        not_indexed += [f"{key} (in {shard})" for key in sorted(held)
                        if weight_map.get(key) != shard]
    return state, [("keys the index lists but their shard lacks", sorted(not_in_shard)),
                   ("keys in a shard that the index does not list there", not_indexed)]


def load_t5_encoder(directory: str | pathlib.Path, **overrides
                    ) -> tuple[T5EncoderConfig, dict]:
    """Read a Hugging Face T5 v1.1 directory (``config.json`` + ``model.safetensors``, or the
    shards of ``model.safetensors.index.json``; float16/bfloat16 weights are cast to
    ``param_dtype``). ``overrides`` (``dtype``, ``param_dtype``) go to the config. Returns
    ``(cfg, params)`` for ``T5Encoder(cfg)``.

    Raises ``FileNotFoundError`` for a missing directory, ``config.json``, weights file or
    listed shard; ``ConversionError`` for a config that is not JSON or not a T5 v1.1 encoder's
    (one line naming the file), a damaged or pickled weights file, a malformed index, or weights
    that do not match the config; each names the path.
    """
    directory = pathlib.Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"directory: no such directory {str(directory)!r}")
    if not directory.is_dir():
        raise NotADirectoryError(f"directory: {str(directory)!r} is a file, expected a Hugging "
                                 "Face T5 directory (config.json + model.safetensors)")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r}: missing; expected the Hugging Face T5 "
                                "config.json")
    cfg = t5_config_from_hf(_read_json(config_path), repr(str(config_path)), **overrides)
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        state, problems, where = load_state_dict(single), [], single
    elif index.is_file():
        (state, problems), where = _load_sharded(directory, index), index
    else:
        pickled = sorted(p.name for p in directory.glob("pytorch_model*.bin"))
        hint = (f"; found {', '.join(pickled)} (a pickle, never read: convert it to "
                "safetensors where you trust it)") if pickled else ""
        raise FileNotFoundError(f"{str(directory)!r}: no weights file, expected {WEIGHTS_NAME} "
                                f"or {INDEX_NAME} with its shards{hint}")
    return cfg, convert_t5_state_dict(state, cfg, where=repr(str(where)), problems=problems)


def save_t5_encoder(directory: str | pathlib.Path, params, cfg: T5EncoderConfig
                    ) -> pathlib.Path:
    """Write ``config.json`` (``model_type: "t5"``, ``T5EncoderModel``) + ``model.safetensors``
    (float32) into a new (or empty) ``directory``, readable by transformers'
    ``T5EncoderModel.from_pretrained`` and ``load_t5_encoder``. Refuses an existing non-empty
    directory (``FileExistsError``). Returns the directory."""
    from safetensors.numpy import save_file
    directory = pathlib.Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"directory: {str(directory)!r} exists and is not an empty "
                              "directory; save into a new one")
    state_dict = to_hf_state_dict(params, cfg)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(hf_config(cfg), indent=2, sort_keys=True)
                                         + "\n")
    return directory


# ----------------------------------------------------------------------------- tokenization


def quiet_transformers() -> None:
    """Before transformers is first imported, default its verbosity to "error"
    (``TRANSFORMERS_VERBOSITY``, which it reads when it sets its logger up; a value the user set
    is kept): its import-time notice that PyTorch is absent (this project never uses it) and
    its over-length warnings (``tokenize`` warns itself, naming the prompt) would otherwise add
    lines to every command's output."""
    import os
    import sys
    if "transformers" not in sys.modules:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def load_tokenizer(tokenizer_dir: str | pathlib.Path):
    """``transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)``:
    nothing downloads. Raises ``ImportError`` without transformers, ``FileNotFoundError`` for a
    missing directory, ``ValueError`` naming the directory when transformers cannot load it."""
    path = pathlib.Path(tokenizer_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer_dir: no such directory {str(path)!r}")
    quiet_transformers()
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("tokenizer_dir: tokenizing needs transformers (and tokenizers): pip "
                          "install transformers tokenizers") from None
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"tokenizer_dir: transformers cannot load a tokenizer from "
                         f"{str(path)!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def check_tokenizer(tokenizer, cfg: T5EncoderConfig) -> None:
    """Refuse (``ValueError``) a tokenizer whose vocabulary (``len(tokenizer)``, added tokens
    included) does not fit the encoder's ``vocab_size`` embedding rows, or that has no pad
    token (padding needs one). T5 v1.1's own: 32100 tokens for 32128 rows."""
    size = len(tokenizer)
    if size > cfg.vocab_size:
        raise ValueError(f"tokenizer: vocabulary of {size} tokens does not fit the encoder's "
                         f"embedding of vocab_size={cfg.vocab_size} (a tokenizer of another "
                         "model?)")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("tokenizer: has no pad token; padding a batch needs one (T5's is "
                         "<pad> = 0)")


def tokenize(tokenizer_dir, prompts: Sequence[str], max_length: int, *,
             cfg: T5EncoderConfig | None = None, tokenizer=None
             ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Tokenize ``prompts`` as T5 does for PixArt: padded to ``max_length`` tokens
    (``padding="max_length"``), longer ones truncated (the end-of-sequence token kept).

    ``tokenizer_dir``: a directory ``transformers.AutoTokenizer`` loads offline
    (``local_files_only=True``); or pass a loaded ``tokenizer`` (then ``tokenizer_dir`` may be
    None). With ``cfg`` the tokenizer is checked against the encoder (``check_tokenizer``).

    Returns ``(input_ids, attention_mask, truncated)``: int32 ``[len(prompts), max_length]``
    each, and the indices of the prompts that were cut; each truncation also emits a
    ``UserWarning`` naming the prompt index and its token count.

    Raises ``ValueError`` naming ``prompts`` for an empty list or one holding a non-string (a
    bare string too: pass ``[prompt]``), naming ``max_length`` when it is not a positive int.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts: empty list; expected at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"prompts: expected strings, got {type(prompts[bad[0]]).__name__} at "
                         f"index {bad[0]}{more}")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ValueError(f"max_length: expected a positive int, got {max_length!r}")
    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_dir)
    if cfg is not None:
        check_tokenizer(tokenizer, cfg)
    lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False)["input_ids"]]
    truncated = [i for i, n in enumerate(lengths) if n > max_length]
    for i in truncated:
        warnings.warn(f"prompts[{i}]: {lengths[i]} tokens, truncated to max_length={max_length}"
                      f" ({prompts[i][:40]!r}{'...' if len(prompts[i]) > 40 else ''})",
                      UserWarning, stacklevel=2)
    enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.asarray(enc["attention_mask"], np.int32)
    if ids.shape != (len(prompts), max_length):  # a tokenizer that ignores max_length
        raise ValueError(f"tokenizer: returned input_ids of shape {ids.shape}, expected "
                         f"{(len(prompts), max_length)}")
    return ids, mask, truncated


__all__ = ["ConversionError", "check_tokenizer", "convert_t5_state_dict", "hf_config", "hf_key",
           "key_table", "load_t5_encoder", "load_tokenizer", "save_t5_encoder",
           "t5_config_from_hf", "to_hf_state_dict", "tokenize"]
