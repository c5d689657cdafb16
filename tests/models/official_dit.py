"""An independent numpy model of the official facebookresearch/DiT, for tests.

Written from the official module layout (PyTorch conventions: NCHW images, Linear weight
``[out, in]``), without importing anything from trdq_jax, so that converting its state dict and
running the Flax model is checked against a second implementation.
"""
import math

import numpy as np


def official_keys(depth, hidden, in_ch, patch, num_classes, mlp_hidden, out_ch, n_tokens,
                  class_dropout=True, freq=256):
    """Every key of the official DiT state dict with its PyTorch shape."""
    keys = {
        "pos_embed": (1, n_tokens, hidden),
        "x_embedder.proj.weight": (hidden, in_ch, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, freq), "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden), "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + int(class_dropout), hidden),
        "final_layer.linear.weight": (patch * patch * out_ch, hidden),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({
            b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (mlp_hidden, hidden), b + "mlp.fc1.bias": (mlp_hidden,),
            b + "mlp.fc2.weight": (hidden, mlp_hidden), b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden),
            b + "adaLN_modulation.1.bias": (6 * hidden,),
        })
    return keys


def pos_embed(hidden, grid):
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    return np.concatenate([one_d(hidden // 2, gw), one_d(hidden // 2, gh)], axis=1)


def random_state_dict(rng, **dims):
    """Random weights (non-zero everywhere, unlike adaLN-Zero init) + the true pos_embed."""
    sd = {k: (rng.standard_normal(s) * 0.2).astype(np.float32)
          for k, s in official_keys(**dims).items()}
    grid = int(round(dims["n_tokens"] ** 0.5))
    sd["pos_embed"] = pos_embed(dims["hidden"], grid)[None].astype(np.float32)
    return sd


def _linear(sd, name, x):
    return x @ sd[name + ".weight"].astype(np.float64).T + sd[name + ".bias"]


def _layer_norm(x, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


def _silu(x):
    return x / (1 + np.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def forward(sd, x_nchw, t, y, num_heads, patch, out_ch):
    """Official ``DiT.forward`` in float64. x ``[N, C, H, W]`` -> ``[N, out_ch, H, W]``."""
    n, c, h, w = x_nchw.shape
    gh, gw = h // patch, w // patch
    # PatchEmbed: conv with stride=patch == per-patch linear over (C, p, p)
    patches = x_nchw.reshape(n, c, gh, patch, gw, patch).transpose(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(n, gh * gw, c * patch * patch)
    wconv = sd["x_embedder.proj.weight"].astype(np.float64).reshape(-1, c * patch * patch)
    tok = patches @ wconv.T + sd["x_embedder.proj.bias"] + sd["pos_embed"][0]
    half = 128
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = np.asarray(t, np.float64)[:, None] * freqs[None]
    temb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    temb = _linear(sd, "t_embedder.mlp.2", _silu(_linear(sd, "t_embedder.mlp.0", temb)))
    cond = temb + sd["y_embedder.embedding_table.weight"][y]
    hidden = tok.shape[-1]
    head_dim = hidden // num_heads
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        mod = _linear(sd, b + "adaLN_modulation.1", _silu(cond))
        sh1, sc1, g1, sh2, sc2, g2 = np.split(mod, 6, axis=1)
        hmod = _layer_norm(tok) * (1 + sc1[:, None]) + sh1[:, None]
        qkv = _linear(sd, b + "attn.qkv", hmod).reshape(n, -1, 3, num_heads, head_dim)
        q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
        logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        att = (p @ v).transpose(0, 2, 1, 3).reshape(n, -1, hidden)
        tok = tok + g1[:, None] * _linear(sd, b + "attn.proj", att)
        hmod = _layer_norm(tok) * (1 + sc2[:, None]) + sh2[:, None]
        mlp = _linear(sd, b + "mlp.fc2", _gelu_tanh(_linear(sd, b + "mlp.fc1", hmod)))
        tok = tok + g2[:, None] * mlp
    sh, sc = np.split(_linear(sd, "final_layer.adaLN_modulation.1", _silu(cond)), 2, axis=1)
    out = _linear(sd, "final_layer.linear", _layer_norm(tok) * (1 + sc[:, None]) + sh[:, None])
    # unpatchify: "nhwpqc->nchpwq"
    out = out.reshape(n, gh, gw, patch, patch, out_ch)
    return np.einsum("nhwpqc->nchpwq", out).reshape(n, out_ch, gh * patch, gw * patch)
