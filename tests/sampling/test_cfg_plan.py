"""CFG sharing plans: phases, JSON, bad plans, the sampler against a float64 reference loop
with cached / dropped uncond steps, per-layer sharing exactness, and the compiled FLOPs."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.sampling import _reference as ref
from tests.sampling.test_sample_api import LABELS, NULL, PARAMS, _class_model, _eps_np, _noise
from trdq_jax.config import DiTConfig, SamplerConfig, VideoDiTConfig
from trdq_jax.models import build_model, init_params, input_shape
from trdq_jax.models.layers import Attention
from trdq_jax.sampling import CFGPlan, Sampler, denoise_fn_for, preset_plan, rules_plan, sample
from trdq_jax.sampling import cfg_plan as C
from trdq_jax.sampling.scan_sampler import _phases, _sample_scan

DIT = DiTConfig(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=3, num_heads=2,
                num_classes=5, class_dropout_prob=0.1)
VIDEO = VideoDiTConfig(num_frames=3, input_size=8, in_channels=2, patch_size=2, hidden_size=32,
                       depth=2, num_heads=2, mlp_ratio=2.0, num_classes=4, class_dropout_prob=0.1)
LAYERS = ("a/attn", "b/attn", "c/attn")


def _plan(share_rows, uncond, layers=LAYERS):
    return CFGPlan(layers, tuple(tuple(bool(int(c)) for c in row) for row in share_rows),
                   tuple(uncond))


def _expand(phases):
    out = []
    for p in phases:
        assert (p.stop - p.start) % len(p.pattern) == 0
        out += list(p.pattern) * ((p.stop - p.start) // len(p.pattern))
    return out


def test_phases_fold_constant_runs_and_repeating_patterns():
    const = _plan(["110"] * 6, ["full"] * 6)
    assert len(const.phases()) == 1 and const.phases()[0].pattern[0].share == {"a/attn", "b/attn"}
    assert [s.share for s in _plan(["000", "111"], ["full"] * 2).steps()] == [False, True]
    alternating = _plan(["000"] * 8, ["full", "cached"] * 4)
    (phase,) = alternating.phases()
    assert [s.uncond for s in phase.pattern] == ["full", "cached"] and phase.stop == 8
    mixed = _plan(["100", "100", "000", "000", "000", "000", "010"],
                  ["full", "full", "full", "cached", "full", "cached", "full"])
    assert [(p.start, p.stop, len(p.pattern)) for p in mixed.phases()] == [
        (0, 2, 1), (2, 6, 2), (6, 7, 1)]
    once = _plan(["000"] * 3, ["full", "cached", "full"])  # a pattern seen once is not folded
    assert [(p.start, p.stop) for p in once.phases()] == [(0, 1), (1, 2), (2, 3)]


def test_phases_expand_back_to_every_step_of_random_plans():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(1, 13))
        uncond = ["full"] + list(rng.choice(["full", "cached", "none"], n - 1))
        rows = ["".join(rng.choice(["0", "1"], 3)) if u == "full" else "000" for u in uncond]
        plan = _plan(rows, uncond)
        assert _expand(plan.phases()) == list(plan.steps())
        assert len(plan.phases()) <= n


def test_json_round_trip_and_field_errors():
    plan = _plan(["101", "000"], ["full", "none"])
    assert C.loads(plan.dumps()) == plan
    data = plan.to_json()
    for field, value, pattern in [
            ("share", ["101"], r"share: expected a list of 2"),
            ("share", ["1x1", "000"], r"share\[0\]: expected a string of 3"),
            ("uncond", ["full", "sometimes"], r"uncond\[1\]: expected one of"),
            ("num_steps", 0, "num_steps: expected a positive int"),
            ("kind", "other", "kind: expected"),
            ("layers", "a/attn", "layers: expected a list")]:
        with pytest.raises(ValueError, match=f"^cfg plan {pattern}"):
            CFGPlan.from_json({**data, field: value})
    with pytest.raises(ValueError, match="^cfg plan file: not valid JSON"):
        C.loads("{")
    with pytest.raises(ValueError, match=r"^cfg plan uncond\[0\]: expected 'full'"):
        _plan(["000", "000"], ["cached", "full"])
    with pytest.raises(ValueError, match=r"^cfg plan share\[1\]: expected no sharing"):
        _plan(["000", "100"], ["full", "none"])


def test_plans_for_another_model_or_step_count_are_refused():
    sampler = Sampler.from_config(SamplerConfig(solver="ddim", num_steps=4))
    model = build_model(DIT)
    params = init_params(DIT, jax.random.key(0))
    kw = dict(seed=0, cfg_scale=2.0, null_label=5, shape=input_shape(DIT, 2))
    other = DiTConfig(**{**DIT.__dict__, "depth": 2})
    with pytest.raises(ValueError, match="^cfg plan model: made for model DiTConfig:"):
        sample(denoise_fn_for(model), params, sampler, [0, 1],
               share_cfg=preset_plan("all", other, 4), **kw)
    with pytest.raises(ValueError, match="^cfg plan num_steps: made for 5 sampling steps, the "
                                         "sampler has 4"):
        sample(denoise_fn_for(model), params, sampler, [0, 1],
               share_cfg=preset_plan("all", DIT, 5), **kw)
    edited = CFGPlan(("blocks_0/attn", "blocks_9/attn", "blocks_2/attn"), ((True,) * 3,) * 4,
                     ("full",) * 4)
    with pytest.raises(ValueError, match=r"^cfg plan layers: .*unknown \['blocks_9/attn'\]"):
        sample(denoise_fn_for(model), params, sampler, [0, 1], share_cfg=edited, **kw)
    with pytest.raises(ValueError, match=r"^cfg plan share\[0\].layers: 'blocks_7/attn' matches "
                                         "no attention layer"):
        rules_plan(DIT, 4, share=[{"layers": ["blocks_7/attn"]}])
    with pytest.raises(ValueError, match=r"^cfg plan share\[0\].steps: expected \[start, stop\)"):
        rules_plan(DIT, 4, share=[{"layers": ["blocks_0/attn"], "steps": [2, 9]}])
    with pytest.raises(ValueError, match="^cfg plan preset: expected one of"):
        preset_plan("most", DIT, 4)
    with pytest.raises(ValueError, match="^share_cfg: expected a bool or a CFGPlan"):
        sample(denoise_fn_for(model), params, sampler, [0, 1], share_cfg="all", **kw)


def test_release_preset_takes_first_8_and_last_6_of_28_spatial_blocks():
    layers = [f"blocks_{i}/attn" for i in range(28)]
    assert C._release_layers(layers) == layers[:8] + layers[22:]
    video = [f"{kind}_blocks_{i}/attn" for i in range(28) for kind in ("spatial", "temporal")]
    chosen = C._release_layers(video)
    assert len(chosen) == 14 and all(p.startswith("spatial_") for p in chosen)


@pytest.mark.parametrize("uncond", [
    ["full"] * 8,
    ["full", "cached"] * 4,
    ["full", "full", "cached", "cached", "full", "none", "none", "none"],
])
def test_cached_and_dropped_uncond_steps_match_a_float64_reference_loop(uncond):
    n, w, seed = 8, 3.0, 4
    plan = CFGPlan(("x/attn",), ((False,),) * n, tuple(uncond))
    sampler = Sampler.from_config(SamplerConfig(solver="ddim", num_steps=n))
    got, xs = sample(_class_model(), PARAMS, sampler, LABELS, seed=seed, cfg_scale=w,
                     null_label=NULL, shape=(len(LABELS), 3), share_cfg=plan,
                     return_trajectory=True)
    delta = {}

    def guided(x, t, i):
        cond = _eps_np(x, t, LABELS)
        if uncond[i] == "full":
            delta["d"] = cond - _eps_np(x, t, NULL)
            return cond - delta["d"] + w * delta["d"]
        if uncond[i] == "cached":
            return cond - delta["d"] + w * delta["d"]
        return cond

    x_t = _noise(seed, np.arange(len(LABELS)))
    want = ref.ddim_loop("linear", n, 0.0, x_t, guided, [0.0] * n)
    np.testing.assert_allclose(np.asarray(got), want[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(xs[1:]), np.stack(want[:-1]), rtol=1e-4, atol=1e-4)


def _attention_io(model, params, x, t, y, share_cfg):
    """{attention path: (input, output)} of one forward."""
    seen = {}

    def spy(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, Attention) and context.method_name == "__call__":
            seen["/".join(context.module.path)] = (np.asarray(args[0]), np.asarray(out))
        return out

    with nn.intercept_methods(spy):
        model.apply({"params": params}, x, t, y, share_cfg=share_cfg)
    return seen


def _numpy_attention(p, x, heads, shared):
    """float64 attention of ``x [2B, L, D]``; ``shared``: the uncond half uses P_cond."""
    w, b = (np.asarray(p["qkv"][k], np.float64) for k in ("kernel", "bias"))
    wo, bo = (np.asarray(p["proj"][k], np.float64) for k in ("kernel", "bias"))
    n, length, dim = x.shape
    qkv = (x.astype(np.float64) @ w + b).reshape(n, length, 3, heads, dim // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim // heads)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if shared:
        probs = np.concatenate([probs[:n // 2]] * 2)
    return np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(n, length, dim) @ wo + bo


def test_a_shared_layer_gives_p_cond_v_uncond_and_the_others_plain_attention():
    model = build_model(DIT)
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape),
                          init_params(DIT, jax.random.key(1)))  # adaLN-zero gates non-zero
    x = jax.random.normal(jax.random.key(2), input_shape(DIT, 4))
    t, y = jnp.array([500.0] * 4), jnp.array([1, 2, 5, 5])
    plain = _attention_io(model, params, x, t, y, False)
    mixed = _attention_io(model, params, x, t, y, frozenset({"blocks_1/attn"}))
    # before the shared layer nothing changed: bit for bit
    np.testing.assert_array_equal(mixed["blocks_0/attn"][1], plain["blocks_0/attn"][1])
    for path, shared in (("blocks_1/attn", True), ("blocks_2/attn", False)):
        x_in, out = mixed[path]
        block = params[path.split("/")[0]]["attn"]
        want = _numpy_attention(block, x_in, DIT.num_heads, shared)
        np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-5)
        other = _numpy_attention(block, x_in, DIT.num_heads, not shared)
        assert np.abs(out - other).max() > 1e-3  # the two references differ: the test can fail
    # a layer the plan leaves alone is plain attention of its input, bit for bit
    x_in, out = mixed["blocks_2/attn"]
    alone = Attention(DIT.hidden_size, DIT.num_heads).apply({"params": params["blocks_2"]["attn"]},
                                                            jnp.asarray(x_in))
    np.testing.assert_array_equal(out, np.asarray(alone))
    # the uncond half of the shared layer computes no queries or keys: only `value` runs there
    calls = []

    def spy(next_fun, args, kwargs, context):
        if context.module.path == ("blocks_1", "attn", "qkv"):
            calls.append((context.method_name, args[0].shape[0]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        model.apply({"params": params}, x, t, y, share_cfg=frozenset({"blocks_1/attn"}))
    assert calls == [("__call__", 2), ("value", 2)]


def _sampler_flops(cfg, share):
    model, params = build_model(cfg), init_params(cfg, jax.random.key(0))
    sampler = Sampler.from_config(SamplerConfig(solver="ddim", num_steps=4))
    fn = denoise_fn_for(model)
    lowered = _sample_scan.lower(
        fn, params, sampler, jnp.arange(2, dtype=jnp.int32), jnp.uint32(0), jnp.float32(3.0),
        jnp.int32(cfg.num_classes), jnp.arange(2, dtype=jnp.int32), None,
        shape=input_shape(cfg, 2),
        phases=_phases(share, fn, sampler), report=None, unroll=True)
    return lowered.compile().cost_analysis()["flops"], model, params


def _sequences(cfg, path, batch):
    """(sequences, length) of one attention's input for ``batch`` samples."""
    tokens = (cfg.input_size // cfg.patch_size) ** 2
    if path.startswith("temporal_"):
        return batch * tokens, cfg.num_frames
    frames = getattr(cfg, "num_frames", 1)
    return batch * frames, tokens


def _expected_saving(cfg, path, batch):
    """FLOPs the uncond half (``batch`` samples) skips at one shared layer and step: the q and
    k projections (+ bias), Q K^T, and the softmax (about 4 operations per probability)."""
    seqs, length = _sequences(cfg, path, batch)
    d = cfg.hidden_size
    rows = seqs * length
    return (2 * rows * d * 2 * d + rows * 2 * d + 2 * seqs * length * length * d
            + 4 * seqs * cfg.num_heads * length * length)


@pytest.mark.parametrize("cfg", [DIT, VIDEO], ids=["dit", "video_dit"])
def test_compiled_sampler_flops_drop_by_what_the_plan_skips(cfg):
    base, model, params = _sampler_flops(cfg, False)
    layers = C.attention_layers(cfg)
    shared_layers, steps = [layers[0], layers[-1]], [1, 3]
    plan = rules_plan(cfg, 4, share=[{"layers": shared_layers, "steps": steps}],
                      uncond=[{"mode": "cached", "steps": [3, 4]}])
    got, _, _ = _sampler_flops(cfg, plan)
    # 2 layers x 2 steps share; step 3 runs no uncond branch: one model forward of 2 samples
    forward = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y)).lower(
        params, jnp.zeros(input_shape(cfg, 2)), jnp.zeros((2,)), jnp.zeros((2,), jnp.int32))
    expected = (2 * sum(_expected_saving(cfg, p, 2) for p in shared_layers)
                + forward.compile().cost_analysis()["flops"])
    assert abs((base - got) - expected) <= 0.05 * expected, (base - got, expected)


def _synthetic_analysis(cfg, num_steps, seed=0):
    layers = C.attention_layers(cfg)
    err = np.random.default_rng(seed).uniform(0, 0.1, (num_steps, len(layers)))
    return {"kind": "trdq-cfg-analysis", "model": C.model_fingerprint(cfg), "layers": list(layers),
            "num_steps": num_steps, "share_error": err.tolist(), "seed": seed}, err


def test_plans_from_an_analysis_follow_the_threshold_and_the_budget():
    analysis, err = _synthetic_analysis(DIT, 10)
    windows = np.array_split(np.arange(10), 3)
    window_max = np.stack([err[w].max(axis=0) for w in windows])
    plan = C.plan_from_analysis(analysis, DIT, threshold=0.06, max_phases=3)
    table = np.asarray(plan.share)
    for w, steps in enumerate(windows):  # a layer shares in a window iff its worst step there passes
        assert (table[steps] == (window_max[w] <= 0.06)).all()
    budget = C.plan_from_analysis(analysis, DIT, budget=0.5, max_phases=3)
    chosen = np.asarray(budget.share)[[w[0] for w in windows]]
    assert chosen.sum() == round(0.5 * window_max.size)
    assert window_max[chosen].max() <= window_max[~chosen].min()  # lowest errors first
    cached = C.plan_from_analysis(analysis, DIT, threshold=1.0, max_phases=3,
                                  uncond=[{"mode": "cached", "steps": [5, 10]}])
    assert cached.uncond == ("full",) * 5 + ("cached",) * 5 and not any(map(any, cached.share[5:]))
    other = DiTConfig(**{**DIT.__dict__, "depth": 2})
    with pytest.raises(ValueError, match="^analysis model: measured on DiTConfig:"):
        C.plan_from_analysis(analysis, other, threshold=0.05)
    with pytest.raises(ValueError, match="^plan_from_analysis: expected exactly one of"):
        C.plan_from_analysis(analysis, DIT, threshold=0.05, budget=0.5)
    with pytest.raises(ValueError, match=r"^budget: expected a fraction in \(0, 1\]"):
        C.plan_from_analysis(analysis, DIT, budget=1.5)
