"""``--prompt`` / ``--prompts`` / ``--text-encoder`` / ``--prompt-cache``: the text side of the
sampling commands for a text-conditioned (PixArt) model."""
from __future__ import annotations

import pathlib

import numpy as np

from trdq_jax.cli._common import blame


def add_prompt_args(p) -> None:
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a prompt for a text-conditioned model (repeat for several; default: "
                        "for the bundled digits-pixart, one per digit)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="a text file of prompts, one per line (blank lines skipped) "
                        "(default: none)")
    p.add_argument("--text-encoder", default=None, metavar="DIR",
                   help="the T5 encoder directory (config.json, weights and tokenizer files) "
                        "(default: the one the model was trained with, for bundled models)")
    p.add_argument("--prompt-cache", default=None, metavar="DIR",
                   help="reuse and store prompt embeddings there (default: none, encode every "
                        "run)")


def is_text_model(cfg) -> bool:
    return getattr(cfg.model, "family", None) == "pixart"


def check_prompt_flags(args, cfg) -> None:
    """Refuse prompt flags for a model without text, and --labels for one with text."""
    given = [f for f, v in (("--prompt", args.prompt), ("--prompts", args.prompts),
                            ("--text-encoder", args.text_encoder),
                            ("--prompt-cache", args.prompt_cache)) if v is not None]
    if not is_text_model(cfg):
        if given:
            raise ValueError(f"{given[0]}: the model ({cfg.model.family}) is not conditioned "
                             "on text; it takes --labels")
        return
    if args.labels is not None:
        raise ValueError("--labels: the model is conditioned on text; give --prompt or --prompts")


def prompt_list(args, cfg) -> list[str]:
    """The prompts of ``--prompt`` and ``--prompts`` (in that order); for the bundled text
    model without either, one held-out phrasing per digit."""
    prompts = list(args.prompt or [])
    if args.prompts is not None:
        path = pathlib.Path(args.prompts).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--prompts: no such file {str(path)!r}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"--prompts: {str(path)!r} is not UTF-8 text") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise ValueError(f"--prompts: {str(path)!r} holds no prompt (every line is blank)")
        prompts += from_file
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        raise ValueError("--prompt: empty prompt; the empty prompt is the guidance's null "
                         "branch, give a text")
    if prompts:
        return prompts
    if cfg.train.dataset == "captioned_digits":
        from trdq_jax.data.captions import HELDOUT_TEMPLATES, caption
        return [caption(d, HELDOUT_TEMPLATES[1]) for d in range(10)]
    raise ValueError("--prompt: a text-conditioned model needs prompts: --prompt TEXT "
                     "(repeatable) or --prompts FILE")


def prompt_conditioning(args, cfg, prompts: list[str], per_sample: np.ndarray):
    """``(cond, null_cond, info)`` for samples whose prompt indices are ``per_sample``
    (ints ``[N]``): T5 embeddings (cached with --prompt-cache) and the empty-prompt null."""
    from trdq_jax.sampling.prompts import (caption_conditioning, encode_prompts,
                                           null_conditioning)
    encoder = args.text_encoder or cfg.train.text_encoder
    if not encoder:
        raise ValueError("--text-encoder: the model's checkpoint names no text encoder; give "
                         "the T5 directory (config.json, weights and tokenizer files)")
    with blame(None, text_encoder="--text-encoder", cache_dir="--prompt-cache",
               prompts="--prompts", tokenizer_dir="--text-encoder"):
        emb, mask, info = encode_prompts(prompts + [""], encoder, cfg.model.max_tokens,
                                         cache_dir=args.prompt_cache)
    if emb.shape[-1] != cfg.model.caption_channels:
        raise ValueError(f"--text-encoder: gives {emb.shape[-1]} channels per token, the model "
                         f"takes caption_channels={cfg.model.caption_channels} (another "
                         "encoder than the model's?)")
    cond = caption_conditioning(emb[:-1][per_sample], mask[:-1][per_sample])
    null = null_conditioning(cond, "empty_prompt", empty=(emb[-1], mask[-1]))
    return cond, null, {"prompts": prompts, "null_branch": "empty_prompt",
                        "prompt_cache": {k: info[k] for k in ("cached", "encoded")}}
