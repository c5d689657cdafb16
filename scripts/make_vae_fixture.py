"""Write the tiny random-weight ``AutoencoderKL`` parity fixture of ``tests/models/test_vae.py``.

Needs PyTorch, diffusers and safetensors, which trdq_jax itself does not; run it by hand in a
separate virtualenv (the project's tests never import torch)::

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /tmp/torchenv/bin/pip install diffusers safetensors numpy
    /tmp/torchenv/bin/python scripts/make_vae_fixture.py

(any CPU torch wheel does: where that index is out of reach, install a local
``torch-*+cpu-*.whl`` by path instead.) Written with torch 2.13.0+cpu and diffusers 0.42.1;
rerunning with those versions reproduces the committed files byte for byte.

It writes, under ``tests/models/fixtures/`` (about 0.5 MB in all):

* ``tiny_vae/``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` from
  ``AutoencoderKL.save_pretrained`` (block_out_channels (8, 16), layers_per_block 1,
  norm_num_groups 4, latent_channels 4, scaling_factor 0.3, shift_factor 0.1, sample_size 16).
  Every weight is drawn at random and non-zero: conv / linear weights uniform with variance
  1 / fan_in (activations stay O(1)), biases uniform in +-0.2, GroupNorm scales in [0.7, 1.3].
* ``tiny_vae_ldm.safetensors``: the same weights under the original LDM / Stable Diffusion
  checkpoint names (``first_stage_model.encoder.down.0.block.0.conv1.weight``, ...; the
  mid-block attention's q/k/v/proj_out as 1x1 convs ``[C, C, 1, 1]``), renamed here by a table
  written independently of trdq_jax's, plus one unrelated ``model.diffusion_model.*`` key that a
  loader must ignore.
* ``tiny_vae_io.npz`` (NHWC, float32): ``images`` [2, 16, 16, 3] in [-1, 1]; ``mean`` and
  ``logvar`` [2, 8, 8, 4] = ``vae.encode(images).latent_dist``; ``latents`` [2, 8, 8, 4]
  (unscaled, random normal) and ``decoded`` [2, 16, 16, 3] = ``vae.decode(latents).sample``.
  The references are computed in float64 from the stored float32 weights, so that the test's
  tolerance measures the JAX float32 error alone.

The draw is seeded (``--seed``, default 0), but the exact numbers depend on the torch version;
the test reads whatever the files hold, so regenerating with another version is fine.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import shutil

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "models" / "fixtures"
CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
              layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=4,
              sample_size=16, scaling_factor=0.3, shift_factor=0.1)


def randomize(vae: torch.nn.Module, gen: torch.Generator) -> None:
    """Give every parameter random non-zero values that keep activations O(1)."""
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("bias"):
                values = torch.rand(p.shape, generator=gen) * 0.4 - 0.2
            elif p.ndim == 1:  # a GroupNorm scale
                values = torch.rand(p.shape, generator=gen) * 0.6 + 0.7
            else:  # conv [out, in, kh, kw] or linear [out, in]: variance 1 / fan_in
                fan_in = math.prod(p.shape[1:])
                bound = math.sqrt(3.0 / fan_in)
                values = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
            values[values == 0] = 0.01  # never exactly zero
            p.copy_(values)


def ldm_name(key: str, num_levels: int) -> str:
    """A diffusers AutoencoderKL key -> its name in an original LDM/SD checkpoint (without the
    ``first_stage_model.`` prefix)."""
    rules = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.",
         r"encoder.down.\1.downsample.conv."),
        (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
        (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
        (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
        (r"\.mid_block\.attentions\.0\.to_q\.", ".mid.attn_1.q."),
        (r"\.mid_block\.attentions\.0\.to_k\.", ".mid.attn_1.k."),
        (r"\.mid_block\.attentions\.0\.to_v\.", ".mid.attn_1.v."),
        (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$", key)
    if m:  # LDM numbers the decoder's levels from the finest: up_blocks.i is up.{n-1-i}
        level = num_levels - 1 - int(m.group(1))
        if m.group(2) == "resnets":
            key = f"decoder.up.{level}.block.{m.group(3)}.{m.group(4)}"
        else:
            key = f"decoder.up.{level}.upsample.{m.group(4)}"
    return key


def nhwc(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().permute(0, 2, 3, 1).to(torch.float32).numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=FIXTURES)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)

    vae = AutoencoderKL(**CONFIG).eval()
    randomize(vae, gen)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    directory = out / "tiny_vae"
    if directory.exists():
        shutil.rmtree(directory)
    vae.save_pretrained(directory, safe_serialization=True)

    state = {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}
    n = len(CONFIG["block_out_channels"])
    ldm = {}
    for key, value in state.items():
        name = ldm_name(key, n)
        if ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None].contiguous()  # LDM's attention uses 1x1 convs
        ldm["first_stage_model." + name] = value
    assert len(ldm) == len(state), "two diffusers keys renamed to one LDM key"
    ldm["model.diffusion_model.input_blocks.0.0.weight"] = torch.ones(2, 2)  # to be ignored
    save_file(ldm, str(out / "tiny_vae_ldm.safetensors"))

    ref = vae.to(torch.float64)
    images = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1
    latents = torch.randn(2, CONFIG["latent_channels"], 8, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        dist = ref.encode(images).latent_dist
        decoded = ref.decode(latents).sample
    np.savez(out / "tiny_vae_io.npz", images=nhwc(images), mean=nhwc(dist.mean),
             logvar=nhwc(dist.logvar), latents=nhwc(latents), decoded=nhwc(decoded))
    config = json.loads((directory / "config.json").read_text())
    print(f"wrote {directory} ({len(state)} tensors, diffusers {config.get('_diffusers_version')}),"
          f" {out / 'tiny_vae_ldm.safetensors'}, {out / 'tiny_vae_io.npz'}")
    print(f"logvar range [{dist.logvar.min():.3g}, {dist.logvar.max():.3g}], decoded range "
          f"[{decoded.min():.3g}, {decoded.max():.3g}]")


if __name__ == "__main__":
    main()
