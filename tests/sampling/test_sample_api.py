"""The scan sampler's contract: guidance, labels, noise derivation, segments, compile cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.sampling import _reference as ref
from trdq_jax.config import DiTConfig, ExperimentConfig, SamplerConfig
from trdq_jax.sampling import Sampler, initial_noise, sample
from trdq_jax.sampling import scan_sampler

ABAR = ref.alphas_cumprod(ref.betas("linear", 1000))
CLASS_MU = np.array([[1.0, -1.0, 0.5], [-2.0, 0.0, 1.0], [0.0, 2.0, -1.0], [0.0, 0.0, 0.0]])
STD = np.array([0.7, 1.2, 0.5])
V_OF_LABEL = np.array([0.3, -0.5, 0.8, -0.9])  # learned-sigma value per label (null = 3)
PARAMS = {"mu": jnp.asarray(CLASS_MU, jnp.float32), "std": jnp.asarray(STD, jnp.float32)}
NULL = 3


def _eps_np(x, t, y):
    abar, mu = ABAR[int(t)], CLASS_MU[y]
    return np.sqrt(1 - abar) * (x - np.sqrt(abar) * mu) / (abar * STD ** 2 + 1 - abar)


def _velocity_np(x, t, y):
    s, mu = t / 1000, CLASS_MU[y]
    return -mu + (s - (1 - s) * STD ** 2) * (x - (1 - s) * mu) / ((1 - s) ** 2 * STD ** 2 + s ** 2)


def _class_model(learned_sigma=False, velocity=False, trace_log=None, expect_share=False):
    """Per-class Gaussian denoiser in the apply_fn interface (x: [2N, 3])."""
    abar_table = jnp.asarray(ABAR, jnp.float32)

    def apply_fn(params, x, t, y, segment, share_cfg):
        if trace_log is not None:
            trace_log.append(1)
        assert share_cfg is expect_share and segment.shape == () and segment.dtype == jnp.int32
        mu, var = params["mu"][y], params["std"] ** 2
        if velocity:
            s = (t / 1000.0)[:, None]
            return -mu + (s - (1 - s) * var) * (x - (1 - s) * mu) / ((1 - s) ** 2 * var + s ** 2)
        abar = abar_table[t.astype(jnp.int32)][:, None]
        eps = jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * mu) / (abar * var + 1 - abar)
        if learned_sigma:
            v = jnp.broadcast_to(jnp.asarray(V_OF_LABEL, jnp.float32)[y][:, None], eps.shape)
            return jnp.concatenate([eps, v], -1)
        return eps
    return apply_fn


def _noise(seed, indices, step=None):
    """The documented derivation: k_i = fold_in(key(seed), i); initial normal(k_i), step s
    normal(fold_in(k_i, s))."""
    out = []
    for i in indices:
        k = jax.random.fold_in(jax.random.key(seed), int(i))
        out.append(jax.random.normal(k if step is None else jax.random.fold_in(k, step), (3,)))
    return np.asarray(out, np.float64)


def _guided(fn, w, labels):
    return lambda x, t, i: fn(x, t, NULL) + w * (fn(x, t, labels) - fn(x, t, NULL))


LABELS = np.array([0, 1, 2, 3, 2, 0])


@pytest.mark.parametrize("solver", ["ddim", "dpm_solver_pp_2m", "flow_euler", "ddpm", "ddim_eta"])
def test_guided_sampling_matches_float64_reference(solver):
    n, w, seed, offset = 12, 3.0, 7, 5
    eta = 0.6 if solver == "ddim_eta" else 0.0
    cfg = SamplerConfig(solver="ddim" if solver == "ddim_eta" else solver, num_steps=n, eta=eta)
    learned = solver == "ddpm"
    apply_fn = _class_model(learned_sigma=learned, velocity=solver == "flow_euler",
                            expect_share=True)
    got = sample(apply_fn, PARAMS, Sampler.from_config(cfg), LABELS, seed=seed, cfg_scale=w,
                 null_label=NULL, shape=(len(LABELS), 3), share_cfg=True, sample_offset=offset)
    idx = offset + np.arange(len(LABELS))
    x_t = _noise(seed, idx)
    zs = [_noise(seed, idx, step) for step in range(n)]
    if solver == "flow_euler":
        want = ref.flow_euler_loop(n, x_t, _guided(_velocity_np, w, LABELS))[-1]
    elif solver == "dpm_solver_pp_2m":
        want = ref.dpm_pp_2m_loop("linear", n, x_t, _guided(_eps_np, w, LABELS))[-1]
    elif solver == "ddpm":  # guidance on eps only; the variance value is the conditional branch's
        guided = _guided(_eps_np, w, LABELS)
        model = lambda x, t, i: (guided(x, t, i), V_OF_LABEL[LABELS][:, None])  # noqa: E731
        want = ref.ddpm_loop("linear", n, x_t, model, zs, learned=True)[-1]
    else:
        want = ref.ddim_loop("linear", n, eta, x_t, _guided(_eps_np, w, LABELS), zs)[-1]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_sample_does_not_depend_on_its_batch():
    sampler = Sampler.from_config(SamplerConfig(solver="ddpm", num_steps=15))
    apply_fn = _class_model(learned_sigma=True)
    labels = np.array([2, 0, 1, 3])
    run = lambda lab, offset: np.asarray(sample(  # noqa: E731
        apply_fn, PARAMS, sampler, lab, seed=11, cfg_scale=2.5, null_label=NULL,
        shape=(len(lab), 3), sample_offset=offset))
    whole = run(labels, 0)
    halves = np.concatenate([run(labels[:2], 0), run(labels[2:], 2)])
    np.testing.assert_allclose(halves, whole, rtol=0, atol=1e-6)
    assert np.abs(run(labels, 1)[:3] - whole[1:]).max() > 1e-2  # labels differ -> samples differ
    other_seed = np.asarray(sample(apply_fn, PARAMS, sampler, labels, seed=12, cfg_scale=2.5,
                                   null_label=NULL, shape=(4, 3)))
    assert np.abs(other_seed - whole).min() > 1e-4
    picked = np.array([3, 0, 2])  # any subset, in any order, in one batch (stochastic solver)
    subset = np.asarray(sample(apply_fn, PARAMS, sampler, labels[picked], seed=11,
                               cfg_scale=2.5, null_label=NULL, shape=(3, 3),
                               sample_indices=picked))
    np.testing.assert_allclose(subset, whole[picked], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(initial_noise(11, (3, 3), sample_indices=picked)),
                                  np.asarray(initial_noise(11, (4, 3)))[picked])


def test_cfg_scale_and_other_traced_inputs_do_not_recompile():
    traces = []
    apply_fn = _class_model(trace_log=traces)
    sampler = Sampler.from_config(SamplerConfig(solver="ddim", num_steps=8, num_segments=2))
    kwargs = dict(null_label=NULL, shape=(4, 3))
    # counted from an empty cache: what earlier tests compiled (or evicted, the cache is
    # bounded) does not change the count
    scan_sampler._sample_scan.clear_cache()
    before = scan_sampler._sample_scan._cache_size()
    outs = [np.asarray(sample(apply_fn, PARAMS, sampler, np.array([0, 1, 2, 0]), seed=0,
                              cfg_scale=w, **kw))
            for w, kw in [(1.0, kwargs), (4.0, kwargs), (7.5, kwargs)]]
    sample(apply_fn, PARAMS, sampler, np.array([2, 2, 1, 3]), seed=5, cfg_scale=2.0,
           sample_offset=9, **kwargs)
    sample(apply_fn, PARAMS, sampler.with_segments(np.array([1] * 3 + [0] * 5), 2),
           np.array([0, 1, 2, 0]), seed=0, cfg_scale=None, **kwargs)  # new table values, same S
    assert len(traces) == 1
    assert scan_sampler._sample_scan._cache_size() == before + 1
    assert np.abs(outs[1] - outs[0]).max() > 0.1 and np.abs(outs[2] - outs[1]).max() > 0.1


def test_segment_index_is_looked_up_per_step():
    """velocity = params['v'][segment]: Euler gives x_T - (1/N) sum_i v[segment_of_step[i]]."""
    n, num_segments = 10, 3
    table = np.array([2, 2, 2, 1, 1, 0, 0, 0, 0, 0])
    sampler = Sampler.from_config(SamplerConfig(solver="flow_euler", num_steps=n,
                                                num_segments=num_segments), segment_of_step=table)
    v = np.array([[1.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 100.0]])

    def apply_fn(params, x, t, y, segment, share_cfg):
        return jnp.broadcast_to(params["v"][segment], x.shape)

    got = sample(apply_fn, {"v": jnp.asarray(v, jnp.float32)}, sampler, np.array([0, 1]), seed=3,
                 cfg_scale=2.0, null_label=5, shape=(2, 3))
    want = _noise(3, [0, 1]) - v[table].sum(0) / n
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    uniform = Sampler.from_config(SamplerConfig(solver="flow_euler", num_steps=n, num_segments=3))
    got = sample(apply_fn, {"v": jnp.asarray(v, jnp.float32)}, uniform, np.array([0, 1]), seed=3,
                 cfg_scale=2.0, null_label=5, shape=(2, 3))
    # t = 1.0 .. 0.1 -> training steps 999, 900, ..., 100 -> 2 - min(t * 3 // 1000, 2):
    # segment 0 is the noisiest third, visited first
    uniform_table = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_allclose(np.asarray(got), _noise(3, [0, 1]) - v[uniform_table].sum(0) / n,
                               rtol=1e-5, atol=1e-5)


def test_progress_reporting_only_when_asked():
    seen = []
    sampler = Sampler.from_config(SamplerConfig(solver="ddim", num_steps=5))
    x = sample(_class_model(), PARAMS, sampler, np.array([0, 1]), seed=0, cfg_scale=1.0,
               null_label=NULL, shape=(2, 3), progress=lambda s, n: seen.append((int(s), int(n))))
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert sorted(seen) == [(i, 5) for i in range(1, 6)]
    seen.clear()
    jax.block_until_ready(sample(_class_model(), PARAMS, sampler, np.array([0, 1]), seed=0,
                                 cfg_scale=1.0, null_label=NULL, shape=(2, 3)))
    assert seen == []


@pytest.mark.parametrize("change,match", [
    (dict(labels=np.array([0.0, 1.0])), "labels"),
    (dict(labels=np.array([0, 4])), "labels"),
    (dict(labels=np.array([-1, 0])), "labels"),
    (dict(labels=np.zeros((2, 1), np.int32)), "labels"),
    (dict(shape=(3, 3)), "shape"),
    (dict(shape=[2, 0]), "shape"),
    (dict(shape=(2,)), "shape"),
    (dict(cfg_scale=float("nan")), "cfg_scale"),
    (dict(cfg_scale=float("inf")), "cfg_scale"),
    (dict(cfg_scale="big"), "cfg_scale"),
    (dict(cfg_scale=-2), r"^cfg_scale: expected a number in \[0, 100\], got -2\.0$"),
    (dict(cfg_scale=100.5), r"^cfg_scale: expected a number in \[0, 100\], got 100\.5$"),
    (dict(cfg_scale=True), r"^cfg_scale: expected a number in \[0, 100\], got True$"),
    (dict(cfg_scale=np.array([1.0, 2.0])), r"^cfg_scale: expected a number"),
    (dict(cfg_scale=None, sampler=Sampler.from_config(SamplerConfig(num_steps=2)).replace(
        cfg_scale=jnp.float32(-1.0))), r"^sampler\.cfg_scale: expected a number in \[0, 100\]"),
    (dict(x_T=np.zeros((3, 3), np.float32)), r"^x_T: expected an array of shape \(2, 3\) "
                                             r"\(= shape\), got shape \(3, 3\)$"),
    (dict(x_T=np.zeros((2, 3, 1), np.float32)), r"^x_T: expected an array of shape \(2, 3\)"),
    (dict(x_T=np.zeros((2, 3), np.int32)), r"^x_T: expected a floating dtype, got int32$"),
    (dict(x_T=np.array([[0.0, np.nan, 1.0], [np.inf, 0, 0]])),
     r"^x_T: expected finite values, got 1 NaN and 1 infinite of 6$"),
    (dict(x_T=jnp.zeros((2, 3)).at[0, 0].set(jnp.nan)), r"^x_T: expected finite values, got 1 NaN"),
    (dict(x_T="noise"), r"^x_T: expected an array of shape \(2, 3\)"),
    (dict(x_T=np.full((2, 3), 1e30, np.float32)),
     r"^x_T: expected noise-scale values \(\|x\| <= 10000; .*got max \|x\| = 1e\+30: the model "
     "would overflow to NaN$"),
    (dict(sample_indices=[0, 1], sample_offset=3), "^sample_indices: give sample_indices or"),
    (dict(sample_indices=[0, -1]), r"^sample_indices: expected 2 ints in \[0, 2147483647\]"),
    (dict(sample_indices=[0, 1, 2]), r"^sample_indices: expected 2 ints"),
    (dict(params={}), "params"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(sample_offset=-2), "sample_offset"),
    (dict(null_label=-1), "null_label"),
    (dict(share_cfg=1), "share_cfg"),
    (dict(sampler=SamplerConfig()), "sampler"),
])
def test_bad_arguments_raise_value_errors_naming_them(change, match):
    args = dict(apply_fn=_class_model(), params=PARAMS,
                sampler=Sampler.from_config(SamplerConfig(num_steps=2)), labels=np.array([0, 1]),
                seed=0, cfg_scale=1.0, null_label=NULL, shape=(2, 3))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        sample(args.pop("apply_fn"), args.pop("params"), args.pop("sampler"), args.pop("labels"),
               **args)


def test_model_output_shape_is_checked():
    sampler = Sampler.from_config(SamplerConfig(num_steps=2))
    with pytest.raises(ValueError, match="apply_fn"):
        sample(lambda p, x, t, y, s, c: x[..., :2], PARAMS, sampler, np.array([0, 1]), seed=0,
               cfg_scale=1.0, null_label=NULL, shape=(2, 3))


def test_sample_inside_a_user_jit_equals_the_eager_call():
    sampler = Sampler.from_config(SamplerConfig(solver="ddpm", num_steps=6))
    apply_fn = _class_model(learned_sigma=True)
    labels = np.array([2, 0, 1, 3])
    eager = np.asarray(sample(apply_fn, PARAMS, sampler, labels, seed=4, cfg_scale=2.5,
                              null_label=NULL, shape=(4, 3), sample_offset=3))

    @jax.jit
    def research_code(params, labels, w, seed, offset):
        return sample(apply_fn, params, sampler, labels, seed=seed, cfg_scale=w,
                      null_label=NULL, shape=(4, 3), sample_offset=offset)

    for seed in (jnp.uint32(4), jnp.int32(4)):
        traced = research_code(PARAMS, jnp.asarray(labels), jnp.float32(2.5), seed, jnp.int32(3))
        np.testing.assert_allclose(np.asarray(traced), eager, rtol=0, atol=1e-6)
    # Concrete JAX scalars are accepted outside jit too, and checked by value there.
    concrete = sample(apply_fn, PARAMS, sampler, labels, seed=jnp.uint32(4), cfg_scale=2.5,
                      null_label=NULL, shape=(4, 3), sample_offset=jnp.int32(3))
    np.testing.assert_allclose(np.asarray(concrete), eager, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="^seed: expected an int"):
        sample(apply_fn, PARAMS, sampler, labels, seed=jnp.int32(-1), cfg_scale=2.5,
               null_label=NULL, shape=(4, 3))
    # Shapes and dtypes are still checked on tracers.
    for bad, match in [(dict(labels=jnp.zeros((4,), jnp.float32)), "^labels: .*traced"),
                       (dict(w=jnp.zeros((2,))), "^cfg_scale: expected a scalar number"),
                       (dict(seed=jnp.float32(1.0)), "^seed: expected a scalar integer"),
                       (dict(offset=jnp.float32(3.0)), "^sample_offset: expected a scalar int")]:
        args = dict(params=PARAMS, labels=jnp.asarray(labels), w=jnp.float32(2.5),
                    seed=jnp.uint32(4), offset=jnp.int32(3))
        args.update(bad)
        with pytest.raises(ValueError, match=match):
            research_code(**args)


# ----------------------------------------------------------------------------- initial noise x_T


def test_initial_noise_is_the_documented_derivation():
    got = initial_noise(7, (6, 3), sample_offset=5)
    assert got.shape == (6, 3) and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got, np.float64), _noise(7, 5 + np.arange(6)))
    for bad, match in [(dict(seed=-1), "^seed"), (dict(shape=(0, 3)), "^shape"),
                       (dict(shape=(3,)), "^shape"), (dict(sample_offset=-1), "^sample_offset")]:
        args = dict(seed=0, shape=(2, 3), sample_offset=0)
        args.update(bad)
        with pytest.raises(ValueError, match=match):
            initial_noise(**args)


@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
def test_default_noise_passed_as_x_T_gives_bit_identical_samples(solver):
    sampler = Sampler.from_config(SamplerConfig(solver=solver, num_steps=6))
    apply_fn = _class_model(learned_sigma=solver == "ddpm")
    kw = dict(seed=9, cfg_scale=2.0, null_label=NULL, shape=(len(LABELS), 3), sample_offset=4)
    default = np.asarray(sample(apply_fn, PARAMS, sampler, LABELS, **kw))
    x_T = initial_noise(9, (len(LABELS), 3), sample_offset=4)
    explicit = np.asarray(sample(apply_fn, PARAMS, sampler, LABELS, x_T=x_T, **kw))
    np.testing.assert_array_equal(explicit, default)
    other = np.asarray(sample(apply_fn, PARAMS, sampler, LABELS, x_T=x_T.at[2].add(3.0), **kw))
    assert np.abs(other[2] - default[2]).max() > 1e-3
    np.testing.assert_array_equal(np.delete(other, 2, 0), np.delete(default, 2, 0))  # per sample


def test_x_T_is_the_start_of_the_trajectory_and_of_a_reference_ddim_loop():
    n, w = 5, 1.5
    sampler = Sampler.from_config(SamplerConfig(solver="ddim", num_steps=n))
    x_T = np.random.default_rng(0).standard_normal((len(LABELS), 3)).astype(np.float32) * 2.0
    x, xs = sample(_class_model(), PARAMS, sampler, LABELS, seed=0, cfg_scale=w, null_label=NULL,
                   shape=(len(LABELS), 3), x_T=x_T, return_trajectory=True)
    assert xs.shape == (n, len(LABELS), 3)
    np.testing.assert_array_equal(np.asarray(xs[0]), x_T)
    zs = [np.zeros((len(LABELS), 3))] * n
    want = ref.ddim_loop("linear", n, 0.0, x_T.astype(np.float64), _guided(_eps_np, w, LABELS), zs)
    np.testing.assert_allclose(np.asarray(x), want[-1], rtol=1e-4, atol=1e-4)


def test_x_T_may_be_traced_inside_a_user_jit():
    sampler = Sampler.from_config(SamplerConfig(solver="ddpm", num_steps=3))
    apply_fn = _class_model(learned_sigma=True)
    x_T = initial_noise(1, (4, 3)) * 0.5
    kw = dict(seed=1, cfg_scale=2.0, null_label=NULL, shape=(4, 3))
    eager = np.asarray(sample(apply_fn, PARAMS, sampler, LABELS[:4], x_T=x_T, **kw))
    traced = jax.jit(lambda x: sample(apply_fn, PARAMS, sampler, LABELS[:4], x_T=x, **kw))(x_T)
    np.testing.assert_allclose(np.asarray(traced), eager, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"^x_T: expected an array of shape \(4, 3\) \(= shape\), "
                                         r"got traced shape \(4, 2\)"):
        jax.jit(lambda x: sample(apply_fn, PARAMS, sampler, LABELS[:4], x_T=x, **kw))(x_T[:, :2])


# ----------------------------------------------------------------------------- params of a model

TINY_DIT = DiTConfig(input_size=2, in_channels=1, patch_size=1, hidden_size=8, depth=1,
                     num_heads=2, num_classes=3, learn_sigma=False)


def test_denoiser_params_of_another_config_fail_before_tracing():
    from trdq_jax.models import abstract_params, build_model
    from trdq_jax.sampling import denoise_fn_for
    apply_fn = denoise_fn_for(build_model(TINY_DIT))
    wrong = abstract_params(DiTConfig(**{**TINY_DIT.__dict__, "hidden_size": 16}))
    sampler = Sampler.from_config(SamplerConfig(num_steps=2))
    kw = dict(seed=0, cfg_scale=1.0, null_label=3, shape=(2, 2, 2, 1))
    before = scan_sampler._sample_scan._cache_size()
    with pytest.raises(ValueError, match=r"^params: expected the parameters of DiTConfig\(.*\n"
                                         r"  mis-shaped \(\d+\): blocks_0/adaLN_modulation_1/bias: "
                                         r"expected \(48,\), got \(96,\)"):
        sample(apply_fn, wrong, sampler, np.array([0, 1]), **kw)
    with pytest.raises(ValueError, match="^params: expected the parameters"):  # tracers too
        jax.jit(lambda p: sample(apply_fn, p, sampler, np.array([0, 1]), **kw))(
            jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), wrong))
    assert scan_sampler._sample_scan._cache_size() == before


# ----------------------------------------------------------------------------- generate


def _image_eps(params, x, t, y, segment, share_cfg):
    """Per-class Gaussian eps over [2N, 2, 2, 1] images (the same per pixel)."""
    abar = jnp.asarray(ABAR, jnp.float32)[t.astype(jnp.int32)][:, None, None, None]
    mu, var = params["mu"][y][:, :1, None, None], params["std"][0] ** 2
    return jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * mu) / (abar * var + 1 - abar)


def test_generate_with_x_T_is_independent_of_batching():
    from trdq_jax.sampling.generate import generate
    cfg = ExperimentConfig(name="tiny", model=TINY_DIT,
                           sampler=SamplerConfig(solver="ddpm", num_steps=4, cfg_scale=2.0))
    labels = np.array([0, 2, 1, 3])
    default_noise = np.asarray(initial_noise(3, (4, 2, 2, 1)))
    x_T = default_noise + 0.25

    def run(**kw):
        return generate(None, PARAMS, cfg, labels, seed=3, apply_fn=_image_eps, **kw)

    whole = run(batch_size=4, x_T=x_T)
    # batches of 2 and of 4 are different programs: equal up to float32 rounding
    np.testing.assert_allclose(run(batch_size=2, x_T=x_T), whole, rtol=0, atol=1e-6)
    # the default noise, sliced per batch, is what generate draws itself
    np.testing.assert_array_equal(run(batch_size=2, x_T=default_noise), run(batch_size=2))
    assert np.abs(whole - run(batch_size=4)).min() > 1e-4
    with pytest.raises(ValueError, match=r"^x_T: expected shape \(4, 2, 2, 1\) \(len\(labels\) = 4 "
                                         r"samples of the model's input\), got \(2, 2, 2, 1\)"):
        run(batch_size=2, x_T=x_T[:2])
