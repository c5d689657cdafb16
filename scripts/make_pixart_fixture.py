"""Write the tiny random-weight PixArt parity fixtures of ``tests/models/test_pixart.py``.

Needs PyTorch, diffusers and safetensors, which trdq_jax itself does not; run it by hand in a
separate virtualenv (the project's tests never import torch)::

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install /path/to/torch-*+cpu-*.whl   # or the pytorch.org CPU index
    /tmp/torchenv/bin/pip install diffusers safetensors numpy
    /tmp/torchenv/bin/python scripts/make_pixart_fixture.py

Written with torch 2.13.0+cpu and diffusers 0.42.1.

Two diffusers ``PixArtTransformer2DModel`` are built (sample_size 8, patch 2, 2 layers, 2 heads
x 12 = hidden 24, caption_channels 20, in 4 / out 8 channels, captions of up to 6 tokens):

* ``alpha``: ``use_additional_conditions`` true (the 1024-MS micro-conditions: resolution and
  aspect-ratio embedders) and no ``interpolation_scale`` key (diffusers' default
  ``max(sample_size // 64, 1)``), like the PixArt-α 1024-MS config;
* ``sigma``: ``use_additional_conditions`` false and ``interpolation_scale`` 0.5, like a
  PixArt-Σ config (Σ-256's scale, to exercise a non-unit position scale).

Every parameter is drawn at random and non-zero, each ``scale_shift_table`` included: weights
uniform with variance 1 / fan_in, biases uniform in +-0.2, tables uniform in +-0.5. Written
under ``tests/models/fixtures/`` (about 150 KB in all):

* ``tiny_pixart/{alpha,sigma}/``: ``config.json`` + ``diffusion_pytorch_model.safetensors``
  from ``save_pretrained``;
* ``tiny_pixart_io.npz``, float32, per variant ``V``: ``V_x`` latents NHWC [2, 8, 8, 4],
  ``V_t`` time steps [2], ``V_caption`` [2, 6, 20] (random everywhere, padding included),
  ``V_mask`` int32 [2, 6] (the second caption has 3 real tokens and 3 padding), for alpha
  ``V_resolution`` [2, 2] and ``V_aspect_ratio`` [2, 1], and ``V_out`` NHWC [2, 8, 8, 8] =
  ``transformer(x, encoder_hidden_states=caption, encoder_attention_mask=mask, timestep=t,
  added_cond_kwargs=...)``. The reference is computed in float64 from the stored float32
  weights and inputs (diffusers computes the sinusoidal time and size features in float32 in
  any case), so the test's tolerance measures the JAX float32 error alone.

The draw is seeded (``--seed``, default 0); the exact numbers depend on the torch version, and
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
from diffusers import PixArtTransformer2DModel

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "models" / "fixtures"
COMMON = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8,
              num_layers=2, cross_attention_dim=24, sample_size=8, patch_size=2,
              caption_channels=20, norm_type="ada_norm_single", norm_elementwise_affine=False,
              norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True,
              num_embeds_ada_norm=1000)
VARIANTS = {
    "alpha": dict(COMMON, use_additional_conditions=True),
    "sigma": dict(COMMON, use_additional_conditions=False, interpolation_scale=0.5),
}
TOKENS = 6


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Give every parameter random non-zero values that keep activations O(1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale_shift_table"):
                values = torch.rand(p.shape, generator=gen) - 0.5
            elif name.endswith("bias"):
                values = torch.rand(p.shape, generator=gen) * 0.4 - 0.2
            else:  # conv [out, in, kh, kw] or linear [out, in]: variance 1 / fan_in
                fan_in = math.prod(p.shape[1:])
                values = (torch.rand(p.shape, generator=gen) * 2 - 1) * math.sqrt(3.0 / fan_in)
            values[values == 0] = 0.01  # never exactly zero
            p.copy_(values)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().permute(0, 2, 3, 1).to(torch.float32).numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=FIXTURES)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    root = args.out / "tiny_pixart"
    if root.exists():
        shutil.rmtree(root)
    arrays = {}
    for variant, config in VARIANTS.items():
        model = PixArtTransformer2DModel(**config).eval()
        randomize(model, gen)
        directory = root / variant
        model.save_pretrained(directory, safe_serialization=True)
        n = sum(p.numel() for p in model.parameters())

        # inputs rounded to float32 first: the test feeds the stored float32 values
        x = torch.randn(2, 4, 8, 8, generator=gen).double()
        t = torch.tensor([999.0, 37.5], dtype=torch.float64)
        caption = torch.randn(2, TOKENS, config["caption_channels"], generator=gen).double()
        mask = torch.tensor([[1] * TOKENS, [1] * 3 + [0] * (TOKENS - 3)], dtype=torch.int64)
        added = None
        if config["use_additional_conditions"]:
            added = {"resolution": torch.tensor([[64.0, 64.0], [48.0, 80.0]], dtype=torch.float64),
                     "aspect_ratio": torch.tensor([[1.0], [0.6]], dtype=torch.float32).double()}
        ref = model.to(torch.float64)
        with torch.no_grad():
            out = ref(x, encoder_hidden_states=caption, timestep=t, added_cond_kwargs=added,
                      encoder_attention_mask=mask, return_dict=False)[0]
        arrays.update({f"{variant}_x": nhwc(x), f"{variant}_t": t.float().numpy(),
                       f"{variant}_caption": caption.float().numpy(),
                       f"{variant}_mask": mask.to(torch.int32).numpy(),
                       f"{variant}_out": nhwc(out)})
        if added is not None:
            arrays[f"{variant}_resolution"] = added["resolution"].float().numpy()
            arrays[f"{variant}_aspect_ratio"] = added["aspect_ratio"].float().numpy()
        saved = json.loads((directory / "config.json").read_text())
        print(f"{variant}: {n} parameters, diffusers {saved.get('_diffusers_version')}, output "
              f"range [{out.min():.3g}, {out.max():.3g}], std {out.std():.3g}")
    np.savez(args.out / "tiny_pixart_io.npz", **arrays)
    print(f"wrote {root} and {args.out / 'tiny_pixart_io.npz'}")


if __name__ == "__main__":
    main()
