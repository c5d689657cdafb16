"""Prompts as conditioning: cached T5 embeddings, the caption conditioning pytree and the
classifier-free-guidance null branch of a text-conditioned (PixArt) model.

::

    emb, mask, info = encode_prompts(["a handwritten seven"], "digits-t5", max_tokens=24,
                                     cache_dir="prompt-cache")
    cond = caption_conditioning(emb, mask)                      # {"caption", "mask"} [P, ...]
    null = null_conditioning(cond, "empty_prompt", empty=encode_prompts([""], ...)[:2])

**Cache.** ``cache_dir`` holds one npz per (prompt, encoder, token count): the embedding
float32 ``[L, C]``, the mask int32 ``[L]`` and a marker recording the prompt, the encoder's
fingerprint (sha256 of its weight, config and tokenizer files:
``trdq_jax.models.text_encoder.fingerprint``) and the arrays' digests. The file name is a
digest of those keys, so another encoder, tokenizer or token count never finds an entry; a
file whose recorded keys or digests disagree with its name or contents (copied, edited,
damaged) is refused naming it. Entries are written atomically (``trdq_jax.files``); the
encoder is loaded only when some prompt is missing.

**Null branch.** ``"empty_prompt"`` (diffusers' PixArt pipelines): T5 of ``""`` with its own
mask, one element broadcast over the batch. ``"learned"`` (the original PixArt code): the
checkpoint's null caption ``y_embedding`` ``[max_tokens, C]`` (its first ``L`` rows), attended
with each prompt's own mask, as the original repeats the conditional mask for the uncond half.
Micro-conditions (resolution, aspect ratio) are the prompt's in both.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Sequence

import numpy as np

from trdq_jax import files, manifest

NULL_BRANCHES = ("empty_prompt", "learned")
KIND = "prompt_embedding"
FORMAT = "trdq_jax.prompt_embedding.v1"


class PromptCacheError(ValueError):
    """A cached prompt embedding that does not match its name, its encoder or its contents."""


def caption_conditioning(emb, mask, resolution=None, aspect_ratio=None) -> dict:
    """The PixArt conditioning pytree: ``{"caption": float32 [N, L, C], "mask": int32 [N, L]}``
    plus ``"resolution"`` ``[N, 2]`` and ``"aspect_ratio"`` ``[N, 1]`` when given."""
    emb, mask = np.asarray(emb, np.float32), np.asarray(mask, np.int32)
    if emb.ndim != 3 or mask.shape != emb.shape[:2]:
        raise ValueError(f"emb, mask: expected [N, L, C] and [N, L], got {emb.shape} and "
                         f"{mask.shape}")
    cond = {"caption": emb, "mask": mask}
    if resolution is not None:
        cond["resolution"] = np.asarray(resolution, np.float32).reshape(len(emb), 2)
    if aspect_ratio is not None:
        cond["aspect_ratio"] = np.asarray(aspect_ratio, np.float32).reshape(len(emb), 1)
    return cond


def null_conditioning(cond: dict, branch: str, *, empty=None, learned=None) -> dict:
    """The null conditioning of ``cond`` (``caption_conditioning``) for ``branch``:

    ``"empty_prompt"``: ``empty = (emb [L, C] or [1, L, C], mask [L] or [1, L])``, T5 of "";
    ``"learned"``: ``learned`` = the checkpoint's ``y_embedding`` float ``[T, C]`` with
    ``T >= L`` (the original converter returns it).
    """
    if branch not in NULL_BRANCHES:
        raise ValueError(f"branch: expected one of {NULL_BRANCHES}, got {branch!r}")
    caption = np.asarray(cond["caption"])
    n, length, width = caption.shape
    extra = {k: np.asarray(v) for k, v in cond.items() if k not in ("caption", "mask")}
    if branch == "empty_prompt":
        if empty is None:
            raise ValueError("empty: the 'empty_prompt' null branch needs T5 of the empty "
                             "prompt, (emb [L, C], mask [L]) (encode_prompts([''], ...))")
        emb = np.asarray(empty[0], np.float32).reshape(-1, *np.shape(empty[0])[-2:])[0]
        mask = np.asarray(empty[1], np.int32).reshape(-1, np.shape(empty[1])[-1])[0]
        if emb.shape != (length, width) or mask.shape != (length,):
            raise ValueError(f"empty: expected the empty prompt encoded like the prompts, "
                             f"[{length}, {width}] and [{length}], got {emb.shape} and "
                             f"{mask.shape}")
        return {"caption": emb, "mask": mask, **extra}
    if learned is None:
        raise ValueError("learned: the 'learned' null branch needs the checkpoint's null "
                         "caption y_embedding [max_tokens, C] (load_original_pixart returns "
                         "it; diffusers checkpoints do not carry one: use 'empty_prompt')")
    table = np.asarray(learned, np.float32)
    if table.ndim != 2 or table.shape[1] != width or table.shape[0] < length:
        raise ValueError(f"learned: expected y_embedding [>= {length}, {width}], got "
                         f"{table.shape}")
    return {"caption": table[:length], "mask": np.asarray(cond["mask"], np.int32), **extra}


# ----------------------------------------------------------------------------- the cache


def entry_name(prompt: str, encoder: str, max_tokens: int) -> str:
    key = json.dumps([prompt, encoder, int(max_tokens)]).encode()
    return hashlib.sha256(key).hexdigest()[:32] + ".npz"


def _write_entry(path: pathlib.Path, prompt: str, encoder: str, max_tokens: int, emb, mask):
    arrays = {"emb": np.asarray(emb, np.float32), "mask": np.asarray(mask, np.int32)}
    marker = {"format": FORMAT, "kind": KIND, "prompt": prompt, "encoder": encoder,
              "max_tokens": int(max_tokens), "arrays": manifest.array_entries(arrays)}

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays, **{files.NPZ_MARKER: np.array(json.dumps(marker))})
    files.write_file(path, write, kind=KIND, overwrite=True, arg="cache_dir")


def _read_entry(path: pathlib.Path, prompt: str, encoder: str, max_tokens: int):
    marker = files.npz_marker(path)
    where = repr(str(path))
    if not isinstance(marker, dict) or marker.get("kind") != KIND:
        raise PromptCacheError(f"cache_dir: {where} is not a prompt embedding written by "
                               "trdq_jax; move it out of the cache directory")
    expected = {"prompt": prompt, "encoder": encoder, "max_tokens": int(max_tokens)}
    wrong = [k for k, v in expected.items() if marker.get(k) != v]
    if wrong:
        what = ("another text encoder or tokenizer" if "encoder" in wrong else
                f"another {' and '.join(wrong)}")
        raise PromptCacheError(f"cache_dir: {where} holds the embedding of {what} than its "
                               f"name says ({', '.join(wrong)} differ; copied or renamed?): "
                               "delete it to re-encode")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in ("emb", "mask")}
    except (KeyError, OSError, ValueError) as e:
        raise PromptCacheError(f"cache_dir: {where} is damaged ({' '.join(str(e).split())}): "
                               "delete it to re-encode") from None
    manifest.check_arrays(marker.get("arrays", {}), arrays, f"cache_dir: {where}",
                          error=PromptCacheError)
    return arrays["emb"], arrays["mask"]


def encode_prompts(prompts: Sequence[str], text_encoder, max_tokens: int, *,
                   cache_dir=None, tokenizer_dir=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """T5 embeddings of ``prompts``: ``(emb float32 [P, max_tokens, C], mask int32
    [P, max_tokens], info)``, ``info = {"cached": k, "encoded": m, "encoder": fingerprint}``
    (k + m = the number of distinct prompts).

    text_encoder: a bundled text encoder's name (``"digits-t5"``), a T5 directory, or a loaded
      ``trdq_jax.models.text_encoder.TextEncoder``.
    cache_dir: reuse and store each prompt's embedding there (see the module docstring);
      None encodes every prompt.
    Raises ``ValueError`` naming ``prompts`` for an empty list or a non-string.
    """
    from trdq_jax.models import text_encoder as te
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts: expected a non-empty list of strings, got "
                         f"{prompts!r:.60}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts: expected strings, got {type(prompts[bad[0]]).__name__} at "
                         f"index {bad[0]}")
    loaded = text_encoder if isinstance(text_encoder, te.TextEncoder) else None
    if loaded is None:
        directory = te.resolve(text_encoder)
        if not directory.is_dir():
            raise FileNotFoundError(f"text_encoder: no such directory {str(directory)!r}")
        tok_dir = directory if tokenizer_dir is None else pathlib.Path(tokenizer_dir)
        encoder_fp = te.fingerprint(directory, tok_dir)
    else:
        encoder_fp = loaded.fingerprint
    unique = list(dict.fromkeys(prompts))
    found: dict[str, tuple] = {}
    cache = None if cache_dir is None else pathlib.Path(cache_dir).expanduser()
    if cache is not None:
        if cache.exists() and not cache.is_dir():
            raise ValueError(f"cache_dir: {str(cache)!r} exists and is not a directory")
        for prompt in unique:
            path = cache / entry_name(prompt, encoder_fp, max_tokens)
            if path.is_file():
                found[prompt] = _read_entry(path, prompt, encoder_fp, max_tokens)
    missing = [p for p in unique if p not in found]
    if missing:
        if loaded is None:
            loaded = te.load_text_encoder(directory, tokenizer_dir)
        emb, mask = loaded.encode(missing, max_tokens)
        for i, prompt in enumerate(missing):
            found[prompt] = (emb[i], mask[i])
            if cache is not None:
                cache.mkdir(parents=True, exist_ok=True)
                _write_entry(cache / entry_name(prompt, encoder_fp, max_tokens), prompt,
                             encoder_fp, max_tokens, emb[i], mask[i])
    emb = np.stack([found[p][0] for p in prompts]).astype(np.float32)
    mask = np.stack([found[p][1] for p in prompts]).astype(np.int32)
    return emb, mask, {"cached": len(unique) - len(missing), "encoded": len(missing),
                       "encoder": encoder_fp}


def digit_prompt_conditioning(labels, text_encoder, max_tokens: int, *, templates=None,
                              cache_dir=None) -> tuple[dict, dict, list[str]]:
    """``(cond, null_cond, prompts)`` asking a text-to-digit model for ``labels``: prompts from
    ``templates`` (default the held-out ones, ``trdq_jax.data.captions.prompts_for``), the
    empty-prompt null branch (what the bundled text model is trained with)."""
    from trdq_jax.data.captions import HELDOUT_TEMPLATES, prompts_for
    prompts = prompts_for(labels, HELDOUT_TEMPLATES if templates is None else templates)
    emb, mask, _ = encode_prompts(prompts + [""], text_encoder, max_tokens, cache_dir=cache_dir)
    cond = caption_conditioning(emb[:-1], mask[:-1])
    return cond, null_conditioning(cond, "empty_prompt", empty=(emb[-1], mask[-1])), prompts
