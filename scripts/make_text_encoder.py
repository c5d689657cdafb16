"""Build the bundled text encoder ``trdq_jax/assets/models/digits-t5``: a small T5 v1.1 encoder
in the Hugging Face layout (``config.json`` + ``model.safetensors``) with a BPE tokenizer
trained here (``tokenizer.json`` + ``tokenizer_config.json``), loaded by the same code as a
user's T5-XXL (``load_t5_encoder``, ``AutoTokenizer`` offline).

The tokenizer learns its merges from the training captions only (``TRAIN_TEMPLATES``); its
alphabet holds every lowercase letter, digit and punctuation mark, so words of the held-out
templates split into known pieces instead of ``<unk>``. Ids follow T5: ``<pad>`` 0, ``</s>`` 1,
``<unk>`` 2, and every sequence ends with ``</s>``.

The encoder is random and frozen (as PixArt's T5 is frozen): training one needs a text
objective and data this project does not have, and a frozen random encoder keeps tokens apart
(distinct embeddings carried through the residual stream, mixed with their context by its
attention), which is all the denoiser's cross-attention needs to read which digit is named.

Usage: ``python scripts/make_text_encoder.py [--out DIR]`` (deterministic: the same files every
run; refuses a non-empty DIR).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import string
import sys

import jax

from trdq_jax.data.captions import TRAIN_TEMPLATES, caption_table
from trdq_jax.models.convert_t5 import save_t5_encoder
from trdq_jax.models.t5 import T5EncoderConfig, init_t5_params

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "trdq_jax" / "assets" / "models" / "digits-t5"
VOCAB_SIZE = 240  # tokenizer entries; the encoder has a few spare embedding rows
CONFIG = T5EncoderConfig(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                         num_heads=4, relative_attention_num_buckets=16,
                         relative_attention_max_distance=32)
MAX_TOKENS = 24


def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=list(string.ascii_lowercase + string.digits + string.punctuation))
    captions = [c for row in caption_table(TRAIN_TEMPLATES) for c in row]
    tokenizer.train_from_iterator(captions, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))])
    return tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                        help=f"output directory (default: {DEFAULT_OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer()
    ids = [tokenizer.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")]
    if ids != [0, 1, 2] or tokenizer.get_vocab_size() > CONFIG.vocab_size:
        print(f"tokenizer: unexpected special ids {ids} or size {tokenizer.get_vocab_size()}",
              file=sys.stderr)
        return 1
    params = init_t5_params(CONFIG, jax.random.key(0))
    out = save_t5_encoder(args.out, jax.device_get(params), CONFIG)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": MAX_TOKENS}, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}: T5 encoder {CONFIG.num_layers} x {CONFIG.d_model}, tokenizer of "
          f"{tokenizer.get_vocab_size()} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
