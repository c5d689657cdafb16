"""A user's own Flax denoiser (names unlike the bundled models'), conditioned on a dict of two
arrays or on nothing, through sample, calibrate, quantize, CFG plans and offline generation."""
import json
import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trdq_jax.quant as Q
from trdq_jax.config import ExperimentConfig, ExternalModelConfig, SamplerConfig
from trdq_jax.sampling import CFGPlan, Sampler, denoise_fn_for, sample
from trdq_jax.sampling.generate import generate
from trdq_jax.sampling.offline import finished_shards, generate_to_dir, load_generated

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = ("inp", "temb", "cproj", "fc0a", "fc0b", "fc1a", "fc1b", "out")
RENAMED = ("stem", "time_mlp", "caption", "m0_up", "m0_down", "m1_up", "m1_down", "head")
SHAPE = (8, 8, 1)
CFG = ExperimentConfig(name="own", model=ExternalModelConfig("own-denoiser", SHAPE),
                       sampler=SamplerConfig(solver="ddim", num_steps=5, cfg_scale=2.0))
SAMPLER = Sampler.from_config(CFG.sampler)


class OwnDenoiser(nn.Module):
    """Pixels in 2x2 patches -> residual MLP blocks -> pixels; the time and the caption
    (embeddings pooled under a mask) shift the hidden state. No attention, no share_cfg."""

    names: tuple = NAMES
    conditional: bool = True
    width: int = 32

    @nn.compact
    def __call__(self, x, t, cond=None):
        n_inp, n_temb, n_cproj, *blocks, n_out = self.names
        b, h, w, c = x.shape
        tokens = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
        hidden = nn.Dense(self.width, name=n_inp)(tokens.reshape(b, -1, 4 * c))
        freqs = jnp.exp(-jnp.arange(8) / 8 * jnp.log(1000.0))
        emb = nn.Dense(self.width, name=n_temb)(
            jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1))
        if self.conditional:
            mask = cond["mask"][..., None].astype(jnp.float32)
            pooled = (cond["emb"] * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
            emb = emb + nn.Dense(self.width, name=n_cproj)(pooled)
        hidden = hidden + nn.silu(emb)[:, None]
        for up, down in zip(blocks[::2], blocks[1::2]):
            hidden = hidden + nn.Dense(self.width, name=down)(
                nn.gelu(nn.Dense(2 * self.width, name=up)(nn.LayerNorm()(hidden))))
        out = nn.Dense(4 * c, name=n_out)(hidden).reshape(b, h // 2, w // 2, 2, 2, c)
        # eps near a scaled x keeps DDIM's samples bounded with random weights
        return 0.8 * x + 0.2 * out.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def captions(n: int, seed: int = 0) -> dict:
    """A conditioning of two arrays: caption embeddings [n, 3, 5] and their mask [n, 3]."""
    rng = np.random.default_rng(seed)
    mask = rng.random((n, 3)) < 0.7
    mask[:, 0] = True
    return {"emb": rng.standard_normal((n, 3, 5)).astype(np.float32), "mask": mask}


NULL = {"emb": np.zeros((3, 5), np.float32), "mask": np.zeros(3, bool)}


def own_params(model: OwnDenoiser, seed: int = 0):
    x = jnp.zeros((2, *SHAPE))
    args = (x, jnp.zeros(2)) + ((captions(2),) if model.conditional else ())
    return model.init(jax.random.key(seed), *args)["params"]


def renamed(params, mapping: dict):
    return {mapping.get(k, k): v for k, v in params.items()}


@pytest.fixture(scope="module")
def own():
    model = OwnDenoiser()
    return model, own_params(model)


def test_roles_come_from_the_data_flow_and_renaming_changes_nothing(own):
    model, params = own
    x = jax.random.normal(jax.random.key(0), (2, *SHAPE))
    example = (x, jnp.full((2,), 300.0), jax.tree.map(jnp.asarray, captions(2)))
    roles = Q.layer_roles(model, params, example)
    assert roles == {"input": ["inp"], "output": ["out"], "conditioning": ["temb", "cproj"]}
    other = OwnDenoiser(names=RENAMED)
    mapping = dict(zip(NAMES, RENAMED))
    moved = Q.layer_roles(other, renamed(params, mapping), example)
    assert moved == {k: [mapping[p] for p in v] for k, v in roles.items()}
    # the whole pipeline: the same layers chosen, the same quantized samples
    recipe = Q.get_recipe("minmax", 8, 8)
    got = {}
    for m, p, names in ((model, params, NAMES), (other, renamed(params, mapping), RENAMED)):
        calib = Q.calibrate(m, p, recipe, SAMPLER, cond=captions(4), null_cond=NULL,
                            shape=(4, *SHAPE), rows_per_step=16)
        assert calib.weight_only == [names[1], names[2]]
        assert sorted(q for ps in calib.keep_float.values() for q in ps) == sorted(
            [names[0], names[-1]])
        qparams = Q.quantize(p, calib, recipe)
        got[names] = np.asarray(sample(Q.QuantizedDenoiser(m, "xla"), qparams, SAMPLER,
                                       captions(4, 1), null_cond=NULL, seed=3, cfg_scale=2.0,
                                       shape=(4, *SHAPE)))
    np.testing.assert_array_equal(got[NAMES], got[RENAMED])


def _psnr(a, b):
    return 10 * np.log10((np.abs(b).max() ** 2) / np.mean((a - b) ** 2))


def test_dict_conditioning_through_sample_calibrate_quantize_and_a_cfg_plan(own):
    model, params = own
    cond = captions(6, 2)
    fn = denoise_fn_for(model)
    whole = np.asarray(sample(fn, params, SAMPLER, cond, null_cond=NULL, seed=1, cfg_scale=2.0,
                              shape=(6, *SHAPE)))
    batched = generate(model, params, CFG, cond, null_cond=NULL, seed=1, batch_size=4)
    np.testing.assert_allclose(batched, whole, rtol=1e-5, atol=1e-5)  # batch independent
    unguided = np.asarray(sample(fn, params, SAMPLER, cond, null_cond=NULL, seed=1,
                                 cfg_scale=1.0, shape=(6, *SHAPE)))
    assert np.abs(unguided - whole).max() > 1e-3  # the null branch matters
    per_sample_null = {k: np.broadcast_to(v, (6, *v.shape)) for k, v in NULL.items()}
    np.testing.assert_allclose(np.asarray(sample(fn, params, SAMPLER, cond,
                                                 null_cond=per_sample_null, seed=1,
                                                 cfg_scale=2.0, shape=(6, *SHAPE))), whole,
                               rtol=1e-6, atol=1e-6)
    recipe = Q.get_recipe("trdq", 8, 8, num_segments=2)
    calib = Q.calibrate(model, params, recipe, SAMPLER, cond=captions(4), null_cond=NULL,
                        shape=(4, *SHAPE), rows_per_step=16)
    qparams = Q.quantize(params, calib, recipe)
    assert sorted(Q.quantized_layer_paths(qparams)) == sorted(NAMES[1:-1])
    assert qparams["layers"]["temb"].a_bits == 16 and qparams["layers"]["fc0a"].a_bits == 8
    qsampler = SAMPLER.with_segments(calib.segment_of_step, calib.num_segments)
    qfn = Q.QuantizedDenoiser(model, "xla")
    quantized = np.asarray(sample(qfn, qparams, qsampler, cond, null_cond=NULL, seed=1,
                                  cfg_scale=2.0, shape=(6, *SHAPE)))
    assert _psnr(quantized, whole) > 30
    plan = CFGPlan(layers=(), share=((),) * 5, uncond=("full", "cached", "full", "cached",
                                                        "none"), name="cache")
    for apply_fn, p, s, ref in ((fn, params, SAMPLER, whole), (qfn, qparams, qsampler, quantized)):
        planned = np.asarray(sample(apply_fn, p, s, cond, null_cond=NULL, seed=1, cfg_scale=2.0,
                                    shape=(6, *SHAPE), share_cfg=plan))
        assert 20 < _psnr(planned, ref) < 200  # close to, and not, the full CFG samples
    with pytest.raises(ValueError, match="share_cfg: OwnDenoiser.__call__ takes no share_cfg"):
        sample(fn, params, SAMPLER, cond, null_cond=NULL, seed=1, cfg_scale=2.0,
               shape=(6, *SHAPE), share_cfg=True)
    for bad, message in ((dict(null_cond=None), "^null_cond: classifier-free guidance needs"),
                         (dict(null_cond={"emb": NULL["emb"]}), "^null_cond: expected the tree "
                                                                "structure of cond"),
                         (dict(null_cond={**NULL, "mask": np.zeros(4, bool)}),
                          r"^null_cond\['mask'\]: expected shape \(3,\)"),
                         (dict(cond={**cond, "mask": cond["mask"][:5]}),
                          "^cond: the leaves disagree on the batch size")):
        kw = {**dict(cond=cond, null_cond=NULL, seed=1, cfg_scale=2.0, shape=(6, *SHAPE)),
              **bad}
        with pytest.raises(ValueError, match=message):
            sample(fn, params, SAMPLER, kw.pop("cond"), **kw)


def test_an_unconditional_model_samples_calibrates_and_quantizes():
    model = OwnDenoiser(conditional=False)
    params = own_params(model)
    fn = denoise_fn_for(model)
    whole = np.asarray(sample(fn, params, SAMPLER, None, seed=4, cfg_scale=None, shape=(5, *SHAPE)))
    again = generate(model, params, CFG, None, num_samples=5, seed=4, batch_size=2)
    np.testing.assert_allclose(again, whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="^share_cfg: an unconditional sampler"):
        sample(fn, params, SAMPLER, None, seed=4, cfg_scale=None, shape=(5, *SHAPE),
               share_cfg=CFGPlan(layers=(), share=((),) * 5, uncond=("full", "cached") * 2 +
                                 ("full",)))
    with pytest.raises(ValueError, match="^null_cond: an unconditional sampler"):
        sample(fn, params, SAMPLER, None, null_cond=NULL, seed=4, cfg_scale=None,
               shape=(5, *SHAPE))
    recipe = Q.get_recipe("quarot", 8, 8)
    calib = Q.calibrate(model, params, recipe, SAMPLER, shape=(3, *SHAPE), rows_per_step=16)
    assert calib.roles == {"input": ["inp"], "output": ["out"], "conditioning": ["temb"]}
    qparams = Q.quantize(params, calib, recipe)
    quantized = np.asarray(sample(Q.QuantizedDenoiser(model, "xla"), qparams, SAMPLER, None,
                                  seed=4, cfg_scale=None, shape=(5, *SHAPE)))
    assert _psnr(quantized, whole) > 30


KILLED = """
import sys
from tests.test_own_model import CFG, NULL, OwnDenoiser, captions, own_params
from trdq_jax.sampling.offline import generate_to_dir
out, conditional = sys.argv[1], sys.argv[2] == "dict"
model = OwnDenoiser(conditional=conditional)
cond = dict(cond=captions(10, 5), null_cond=NULL) if conditional else {}
generate_to_dir(out, model, own_params(model), CFG, num_samples=10, seed=7, shard_size=2,
                batch_per_device=1, source="own", **cond)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dict", "none"])
def test_generation_of_an_own_model_is_killed_on_four_devices_and_resumed_on_one(kind, tmp_path):
    conditional = kind == "dict"
    model = OwnDenoiser(conditional=conditional)
    params = own_params(model)
    cond = dict(cond=captions(10, 5), null_cond=NULL) if conditional else {}
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "TRDQ_CRASH_AT": "generate-4-done",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    killed = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path / "g"), kind], env=env,
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(finished_shards(tmp_path / "g")) == [0, 2, 4]
    resumed = generate_to_dir(tmp_path / "g", model, params, CFG, num_samples=10, seed=7,
                              batch_size=3, source="own", **cond)
    assert (resumed["generated"], resumed["skipped"]) == (4, 6)
    samples, labels = load_generated(tmp_path / "g")
    want = generate(model, params, CFG, cond.get("cond"), null_cond=cond.get("null_cond"),
                    num_samples=10, seed=7)
    assert labels is None and samples.shape == (10, *SHAPE)
    np.testing.assert_allclose(samples, want, rtol=1e-4, atol=1e-4)
    lines = (tmp_path / "g" / "manifest-0.jsonl").read_text().splitlines()
    records = [r for line in lines for r in json.loads(line)["samples"]]
    assert all(("cond" in r) == conditional and "label" not in r for r in records)
    assert (tmp_path / "g" / "cond.npz").is_file() == conditional
    with pytest.raises(ValueError, match=r"holds another run \(differs in cond_sha256"):
        generate_to_dir(tmp_path / "g", model, params, CFG, num_samples=10, seed=7,
                        source="own", cond=captions(10, 6), null_cond=NULL)


def test_the_readme_example_runs():
    """README, "Quantize your own Flax model": its code block runs as written."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quantize your own Flax model\n.*?```python\n(.*?)```", text, re.S)
    assert block, "README section 'Quantize your own Flax model' with a python block"
    scope = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    assert scope["psnr"] > 30


@pytest.mark.parametrize("name", ["digits_dit", "digits_unet", "moving_digits_vdit"])
def test_the_structural_choice_equals_the_bundled_models_named_one(name):
    """On the bundled architectures (random weights, narrower) the data flow picks exactly the
    layers the name regexes Q.DEFAULT_KEEP_FLOAT / Q.DEFAULT_WEIGHT_ONLY picked: the published
    numbers of BENCHMARKS.md stand for the structural default."""
    import dataclasses
    import importlib
    from trdq_jax.models import build_model, init_params, input_shape
    from trdq_jax.quant.capture import layer_paths
    cfg = importlib.import_module(f"configs.{name}").get_config().model
    smaller = {"dit": dict(depth=2, hidden_size=32, num_heads=2),  # same layers, fewer/narrower
               "unet": dict(base_channels=16, num_groups=8, num_heads=2),
               "video_dit": dict(depth=1, hidden_size=32, num_heads=2, num_frames=4)}
    cfg = dataclasses.replace(cfg, **smaller[cfg.family])
    model, params = build_model(cfg), init_params(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), input_shape(cfg, 2))
    example = (x, jnp.full((2,), 500.0), jnp.array([1, cfg.num_classes]))
    roles = Q.layer_roles(model, params, example)
    paths = layer_paths(model, params, example, kinds=("Dense", "Conv"))
    by_structure = Q.select_layers(paths, Q.get_recipe("trdq"), roles)
    by_name = Q.select_layers(paths, Q.get_recipe("trdq", keep_float=Q.DEFAULT_KEEP_FLOAT,
                                                  weight_only=Q.DEFAULT_WEIGHT_ONLY))
    assert by_structure.quantized == by_name.quantized
    assert by_structure.weight_only == by_name.weight_only and by_name.weight_only
    assert sorted(p for ps in by_structure.keep_float.values() for p in ps) == sorted(
        p for ps in by_name.keep_float.values() for p in ps)
