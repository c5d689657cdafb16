"""Prompts -> caption embeddings: a Hugging Face T5 encoder directory with its tokenizer.

::

    encoder = load_text_encoder("t5-dir")          # config.json, weights, tokenizer files
    emb, mask = encoder.encode(["a handwritten seven"], max_tokens=120)
    # emb float32 [P, max_tokens, d_model], mask int32 [P, max_tokens] (1 = a real token)

The directory is the one transformers' ``T5EncoderModel`` and ``AutoTokenizer`` read (nothing
downloads): PixArt's ``text_encoder/`` + ``tokenizer/`` (give both with ``tokenizer_dir``), or a
single directory holding both, as the bundled ``digits-t5``. ``fingerprint`` identifies the
encoder weights and the tokenizer files (what a cached embedding is keyed by).
"""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Any, Sequence

import numpy as np

from trdq_jax.models import zoo

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "spiece.model", "added_tokens.json")


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
    """A loaded T5 encoder: ``cfg`` (``T5EncoderConfig``), float ``params``, the
    transformers ``tokenizer`` and a ``fingerprint`` (hex) of weights and tokenizer files."""

    cfg: Any
    params: Any
    tokenizer: Any
    fingerprint: str
    where: str

    @property
    def width(self) -> int:
        """Channels of each caption token (``d_model``): a PixArt's ``caption_channels``."""
        return int(self.cfg.d_model)

    def encode(self, prompts: Sequence[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """``(emb float32 [P, max_tokens, width], mask int32 [P, max_tokens])``: prompts padded
        to ``max_tokens`` (longer ones truncated, end token kept, with a ``UserWarning`` naming
        each; ``convert_t5.tokenize``), encoded in float32."""
        from trdq_jax.models.convert_t5 import tokenize
        from trdq_jax.models.t5 import encode
        ids, mask, _ = tokenize(None, prompts, max_tokens, cfg=self.cfg, tokenizer=self.tokenizer)
        emb = np.asarray(encode(self.params, self.cfg, ids, mask), np.float32)
        return emb, mask


def shard_encoder(encoder: TextEncoder, mesh) -> TextEncoder:
    """``encoder`` with its parameters split over ``mesh``'s ``"model"`` axis (each weight's
    widest divisible dimension; ``trdq_jax.sampling.offline.param_sharding``): T5-XXL's 4.7B
    parameters over M devices hold 1/M of the bytes each. ``encode`` then runs on the mesh
    (jit follows the parameters' placement) and gives the unsharded results."""
    import jax

    from trdq_jax.sampling.offline import param_sharding
    params = jax.device_put(encoder.params, param_sharding(mesh, encoder.params))
    return dataclasses.replace(encoder, params=params)


def resolve(name_or_path: str | pathlib.Path) -> pathlib.Path:
    """A bundled text encoder's name (``zoo.TEXT_ENCODERS``) or a directory."""
    if isinstance(name_or_path, str) and name_or_path in zoo.TEXT_ENCODERS:
        return zoo.ASSETS / name_or_path
    return pathlib.Path(name_or_path)


def load_text_encoder(directory: str | pathlib.Path,
                      tokenizer_dir: str | pathlib.Path | None = None) -> TextEncoder:
    """Load a T5 encoder (``convert_t5.load_t5_encoder``) and its tokenizer (``tokenizer_dir``,
    default the same directory), checking that the vocabulary fits the embedding."""
    from trdq_jax.models.convert_t5 import check_tokenizer, load_t5_encoder, load_tokenizer
    directory = resolve(directory)
    tokenizer_dir = directory if tokenizer_dir is None else pathlib.Path(tokenizer_dir)
    cfg, params = load_t5_encoder(directory)
    tokenizer = load_tokenizer(tokenizer_dir)
    try:
        check_tokenizer(tokenizer, cfg)
    except ValueError as e:
        raise ValueError(f"tokenizer_dir: {str(tokenizer_dir)!r}: {e}") from None
    return TextEncoder(cfg, params, tokenizer, fingerprint(directory, tokenizer_dir),
                       str(directory))


def fingerprint(directory: pathlib.Path, tokenizer_dir: pathlib.Path) -> str:
    """sha256 over the encoder's ``config.json`` and weight files and the tokenizer's files
    (names and bytes): another encoder or tokenizer gives another fingerprint."""
    digest = hashlib.sha256()
    weights = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".json")
                     and p.name not in TOKENIZER_FILES)
    tokens = sorted(tokenizer_dir / n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file())
    for path in weights + tokens:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
