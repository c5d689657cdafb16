"""Write the tiny random-weight T5 v1.1 encoder parity fixture of ``tests/models/test_t5.py``.

Needs PyTorch, transformers, tokenizers and safetensors, which trdq_jax itself does not; run it
by hand in a separate virtualenv (the project's tests never import torch)::

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /tmp/torchenv/bin/pip install transformers tokenizers safetensors numpy
    /tmp/torchenv/bin/python scripts/make_t5_fixture.py

(any CPU torch wheel does: where that index is out of reach, install a local
``torch-*+cpu-*.whl`` by path instead.) Written with torch 2.13.0+cpu, transformers 5.25.0 and
tokenizers 0.23.3; rerunning with those versions reproduces the committed files byte for byte.

It writes, under ``tests/models/fixtures/`` (about 0.2 MB in all):

* ``tiny_t5/``: a ``T5EncoderModel`` (``feed_forward_proj="gated-gelu"``, i.e. T5 v1.1:
  d_model 32, d_kv 8, 4 heads, d_ff 48, 2 layers, vocab 100, 8 relative-position buckets, max
  distance 16) saved by ``save_pretrained`` (``config.json`` + ``model.safetensors``), and next
  to it a tiny word-level tokenizer built here with the ``tokenizers`` library (a real T5
  tokenizer is a SentencePiece Unigram model that nothing here could download): lower-cases,
  splits on whitespace and punctuation, appends ``</s>`` like T5; ``<pad>`` = 0, ``</s>`` = 1,
  ``<unk>`` = 2 as in T5. Saved by ``PreTrainedTokenizerFast.save_pretrained`` (``tokenizer.json``
  + ``tokenizer_config.json``, whose ``tokenizer_class`` is set to ``PreTrainedTokenizerFast``,
  a name transformers 4 and 5 both resolve) and a ``special_tokens_map.json``, so
  ``AutoTokenizer.from_pretrained(dir, local_files_only=True)`` loads it as a fast tokenizer.
  Every weight is drawn at random and non-zero: linear weights uniform with variance 1 / fan_in,
  the token embedding uniform in +-1, the relative attention bias uniform in +-1 (so the
  position bias visibly changes the attention), RMSNorm weights in [0.6, 1.4].
* ``tiny_t5_sharded/``: the same model saved with a tiny ``max_shard_size``
  (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``) and its config.
* ``tiny_t5_io.npz``: ``prompts`` (unicode), ``input_ids`` and ``attention_mask`` int32
  [3, 20] (the three prompts tokenized with padding to 20 tokens: one fills all 20, so relative
  distances reach past max_distance; one holds a word outside the vocabulary), and
  ``last_hidden_state`` float32 [3, 20, 32] from the model run in float64 (eager attention) on
  the stored float32 weights, so that the test's tolerance measures the JAX float32 error alone.
  Padded positions hold what the model computes there (the pad token's embedding attending to
  the real tokens); they are not masked out of the output.

The draw is seeded (``--seed``, default 0), but the exact numbers depend on the torch version;
the test reads whatever the files hold, so regenerating with another version is fine.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast, T5Config, T5EncoderModel

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "models" / "fixtures"
MAX_LENGTH = 20
CONFIG = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=16,
              feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
              is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1)
WORDS = ("a the an of with and in on is one two three four five six seven eight nine zero "
         "number digit handwritten thin thick bold stroke strokes written drawn small large tiny "
         "big picture photo image of cat dog bird red green blue black white yellow sky sea tree "
         "house car road sun moon star night day under over near far left right top bottom "
         "center old new bright dark soft sharp round square line curve , . !").split()
PROMPTS = ["a handwritten seven",
           "the number 7 , thin strokes",  # '7' is not in the vocabulary: <unk>
           "a big red cat under a blue sky near an old house with a tree on the left ."]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    assert len(vocab) <= CONFIG["vocab_size"], len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=MAX_LENGTH)


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Give every parameter random non-zero values that keep activations O(1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # an RMSNorm weight
                values = torch.rand(p.shape, generator=gen) * 0.8 + 0.6
            elif name.endswith("relative_attention_bias.weight") or name == "shared.weight":
                values = torch.rand(p.shape, generator=gen) * 2 - 1
            else:  # linear [out, in]: variance 1 / fan_in
                bound = math.sqrt(3.0 / p.shape[1])
                values = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
            values[values == 0] = 0.01  # never exactly zero
            p.copy_(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=FIXTURES)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    config = T5Config(**CONFIG)
    model = T5EncoderModel(config).eval()
    randomize(model, gen)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    directory, sharded = out / "tiny_t5", out / "tiny_t5_sharded"
    for d in (directory, sharded):
        if d.exists():
            shutil.rmtree(d)
    model.save_pretrained(directory, safe_serialization=True)
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="30KB")
    build_tokenizer().save_pretrained(directory)
    # name the class transformers 4 and 5 both know (5 writes its own "TokenizersBackend")
    tok_config = json.loads((directory / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2) + "\n")

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    enc = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                    return_tensors="pt")
    lengths = enc["attention_mask"].sum(1).tolist()
    assert MAX_LENGTH in lengths and len(set(lengths)) == len(PROMPTS), lengths
    assert (enc["input_ids"] == 2).any(), "one prompt should hold an unknown word"

    ref = T5EncoderModel.from_pretrained(str(directory), attn_implementation="eager",
                                         dtype=torch.float64).eval()
    with torch.no_grad():
        hidden = ref(input_ids=enc["input_ids"],
                     attention_mask=enc["attention_mask"]).last_hidden_state
    np.savez(out / "tiny_t5_io.npz", prompts=np.array(PROMPTS),
             input_ids=enc["input_ids"].numpy().astype(np.int32),
             attention_mask=enc["attention_mask"].numpy().astype(np.int32),
             last_hidden_state=hidden.numpy().astype(np.float32))
    import transformers
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    print(f"wrote {directory} ({len(model.state_dict())} tensors, transformers "
          f"{transformers.__version__}, tokenizer of {len(tokenizer)} tokens), {sharded} "
          f"({len(shards)} shards), {out / 'tiny_t5_io.npz'}")
    print(f"token counts {lengths}; hidden range [{hidden.min():.3g}, {hidden.max():.3g}]")
    print(json.dumps(json.loads((directory / "config.json").read_text()), sort_keys=True))


if __name__ == "__main__":
    main()
