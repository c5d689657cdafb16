"""``trdq calibrate | quantize | sample --quantized``: round trip, exactness, named errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trdq_jax.quant as Q
from trdq_jax import checkpoint
from trdq_jax.cli import build_parser, main
from trdq_jax.config import DiTConfig, ExperimentConfig, GenerationConfig, SamplerConfig
from trdq_jax.models import build_model, init_params
from trdq_jax.quant.calib_io import load_calibration
from trdq_jax.sampling import Sampler, denoise_fn_for, sample

TINY = ExperimentConfig(
    name="tiny-dit",
    model=DiTConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=48, depth=1,
                    num_heads=2, num_classes=3, learn_sigma=False),
    sampler=SamplerConfig(solver="ddim", num_steps=6, cfg_scale=2.0),
    generation=GenerationConfig(batch_size=64))


def tiny_params(seed: int = 0):
    """Init params perturbed so that the zero-initialised adaLN/final layers do something."""
    params = init_params(TINY.model, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny"
    checkpoint.save(path, tiny_params(), TINY)
    return path


@pytest.mark.parametrize("command", ["calibrate", "quantize", "plot-ranges", "sample"])
def test_help_for_quant_commands(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: trdq {command}" in out and "--out" in out


def test_calibrate_quantize_sample_round_trip_is_exact(tmp_path, tiny_ckpt, capsys):
    calib_dir, qdir, sdir = tmp_path / "calib", tmp_path / "q", tmp_path / "s"
    assert main(["calibrate", "--checkpoint", str(tiny_ckpt), "--recipe", "trdq", "--w-bits", "4",
                 "--a-bits", "8", "--segments", "2", "--per-class", "2", "--out",
                 str(calib_dir)]) == 0
    assert main(["quantize", "--calib", str(calib_dir), "--no-choose", "--out", str(qdir)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["sample", "--quantized", str(qdir), "--per-class", "2", "--out", str(sdir)]) == 0
    got = np.load(sdir / "samples.npz")
    assert (sdir / "grid.png").stat().st_size > 0

    # the same pipeline in process, from the public library API
    params, cfg = checkpoint.restore(tiny_ckpt)
    model = build_model(cfg.model)
    recipe = Q.get_recipe("trdq", 4, 8, num_segments=2)
    sampler = Sampler.from_config(cfg.sampler)
    calib_labels = np.repeat(np.arange(3), 2)
    calib = Q.calibrate(model, params, recipe, sampler, labels=calib_labels, null_label=3,
                        shape=(6, 8, 8, 1), seed=1000, rows_per_step=64)
    stored, stored_recipe, stored_cfg, _ = load_calibration(calib_dir)
    assert stored_recipe == recipe and stored_cfg == cfg
    np.testing.assert_array_equal(stored.segment_of_step, calib.segment_of_step)
    for path, stats in calib.stats.items():
        np.testing.assert_array_equal(stored.stats[path].rows, stats.rows)
        np.testing.assert_array_equal(stored.stats[path].absmax, stats.absmax)
    qparams = Q.quantize(params, calib, recipe)
    labels = np.repeat(np.arange(3), 2)
    want = sample(Q.QuantizedDenoiser(model, "xla"), qparams,
                  sampler.with_segments(calib.segment_of_step, 2), labels, seed=0,
                  cfg_scale=None, null_label=3, shape=(6, 8, 8, 1))
    np.testing.assert_array_equal(got["labels"], labels)
    np.testing.assert_array_equal(got["samples"], np.asarray(want))

    # it really is quantized: restored without float kernels, close to but not the float model
    restored, _, _, _ = Q.load_quantized(qdir)
    assert "qkv" not in restored["float"]["blocks_0"]["attn"]
    assert restored["layers"]["blocks_0"]["attn"]["qkv"].w_q.dtype == np.uint8  # packed int4
    ref = np.asarray(sample(denoise_fn_for(model), params, sampler, labels, seed=0, cfg_scale=None,
                            null_label=3, shape=(6, 8, 8, 1)))
    err = np.sqrt(np.mean((got["samples"] - ref) ** 2)) / np.sqrt(np.mean(ref ** 2))
    assert 0 < err < 0.2, err
    bf16 = sum(2 * np.size(leaf) for p in Q.quantized_layer_paths(restored)
               for leaf in jax.tree.leaves(_node(params, p)))
    assert printed["bf16_bytes"] == bf16 and printed["ratio_to_bf16"] < 0.6


def _node(tree, path):
    for name in path.split("/"):
        tree = tree[name]
    return tree


def test_quantize_on_the_fly_and_changed_weights(tmp_path, tiny_ckpt, capsys):
    assert main(["quantize", "--checkpoint", str(tiny_ckpt), "--recipe", "minmax",
                 "--per-class", "1", "--out", str(tmp_path / "q")]) == 0
    _, _, recipe, table = Q.load_quantized(tmp_path / "q")
    assert (recipe.name, recipe.w_bits, recipe.a_bits) == ("minmax", 8, 8)
    np.testing.assert_array_equal(table, np.zeros(6, np.int32))
    # a calibration refuses float weights that changed after it was made
    ck = tmp_path / "ck"
    checkpoint.save(ck, tiny_params(0), TINY)
    assert main(["calibrate", "--checkpoint", str(ck), "--recipe", "minmax", "--per-class", "1",
                 "--out", str(tmp_path / "c")]) == 0
    checkpoint.save(ck, tiny_params(5), TINY, overwrite=True)
    capsys.readouterr()
    assert main(["quantize", "--calib", str(tmp_path / "c"), "--out", str(tmp_path / "q2")]) == 2
    assert "--calib: " in (err := capsys.readouterr().err) and "float weights" in err and \
        "changed since this calibration" in err


@pytest.mark.parametrize("argv, message", [
    (["calibrate", "--recipe", "nope"], "argument --recipe: invalid choice: 'nope'"),
    (["calibrate", "--w-bits", "9"], "argument --w-bits: expected bits in 2..8 (or 16 = float), "
                                     "got '9'"),
    (["calibrate", "--a-bits", "1"], "argument --a-bits: expected bits in 2..8"),
    (["calibrate", "--segments", "7"], "--segments: 7 segments but the sampler has only 6 steps"),
    (["quantize", "--calib", "{tmp}/missing"], "--calib: '{tmp}/missing': no calibration directory"),
    (["quantize"], "--calib: give either --calib DIR or --model NAME"),
    (["sample", "--quantized", "{tmp}/missing"], "--quantized: '{tmp}/missing': no checkpoint "
                                                  "directory there"),
    (["sample", "--quantized", "{ck}", "--backend", "gpu"], "argument --backend: invalid choice"),
    (["sample", "--quantized", "{ck}"], "holds a 'float' checkpoint, expected a quantized one"),
    (["calibrate", "--checkpoint", "{tmp}/missing"], "--checkpoint: '{tmp}/missing': no "
                                                     "checkpoint directory there"),
    (["quantize", "--checkpoint", "{ck}", "--w-bits", "4", "--fp8"],
     "--fp8: float8 e4m3 codes are 8 bits: needs w_bits = 8 and a_bits = 8"),
    (["quantize", "--checkpoint", "{ck}", "--group-size", "1"],
     "--group-size: expected 0 (per output channel) or an int >= 2"),
    (["quantize", "--checkpoint", "{ck}", "--recipe", "trdq_static", "--group-size", "16"],
     "--group-size: group-wise activation scales need dynamic integer activations"),
])
def test_errors_name_the_argument_on_one_line(argv, message, tmp_path, tiny_ckpt, capsys):
    argv = [a.format(tmp=tmp_path, ck=tiny_ckpt) for a in argv]
    message = message.format(tmp=tmp_path, ck=tiny_ckpt)
    if argv[0] == "calibrate" and "--checkpoint" not in argv:
        argv += ["--checkpoint", str(tiny_ckpt)]
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_rank_or_group_that_does_not_fit_is_refused_before_quantizing(tmp_path, tiny_ckpt, capsys):
    assert main(["calibrate", "--checkpoint", str(tiny_ckpt), "--recipe", "minmax",
                 "--per-class", "1", "--rows-per-step", "8", "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert main(["quantize", "--calib", str(tmp_path / "c"), "--low-rank", "49", "--out",
                 str(tmp_path / "q")]) == 2
    assert capsys.readouterr().err == (
        "trdq quantize: error: --low-rank: rank 49 exceeds min(K, N) = 48 of layer "
        "blocks_0/attn/qkv (kernel [48, 144]); choose a rank <= 48\n")
    assert not (tmp_path / "q").exists()
    assert main(["quantize", "--calib", str(tmp_path / "c"), "--recipe", "quarot",
                 "--group-size", "32", "--out", str(tmp_path / "q")]) == 2
    assert capsys.readouterr().err == (
        "trdq quantize: error: --group-size: 32 does not divide K = 48 of layer "
        "blocks_0/attn/qkv (kernel [48, 144]); choose a divisor or 0\n")
    assert not (tmp_path / "q").exists()
    # the stored recipe (minmax) does not choose: a --choose-* flag is refused, nothing written
    assert main(["quantize", "--calib", str(tmp_path / "c"), "--choose-samples", "3", "--out",
                 str(tmp_path / "q")]) == 2
    assert capsys.readouterr().err == (
        "trdq quantize: error: --choose-samples: sets how the components are chosen, and the "
        "recipe 'minmax' quantizes as named (only trdq and trdq_lowrank choose by default); "
        "give --choose too\n")
    assert not (tmp_path / "q").exists()


def test_quantize_with_a_low_rank_branch_and_fp8_codes(tmp_path, tiny_ckpt):
    assert main(["quantize", "--checkpoint", str(tiny_ckpt), "--recipe", "quarot", "--low-rank",
                 "4", "--fp8", "--per-class", "1", "--out", str(tmp_path / "q")]) == 0
    qparams, _, recipe, _ = Q.load_quantized(tmp_path / "q")
    assert (recipe.name, recipe.low_rank, recipe.fp8) == ("quarot", 4, True)
    qkv = qparams["layers"]["blocks_0"]["attn"]["qkv"]
    assert qkv.rank == 4 and qkv.w_q.dtype == jnp.float8_e4m3fn


def test_quantize_group_wise(tmp_path, tiny_ckpt):
    assert main(["quantize", "--checkpoint", str(tiny_ckpt), "--recipe", "svdquant", "--w-bits",
                 "4", "--a-bits", "4", "--group-size", "16", "--low-rank", "2", "--per-class",
                 "1", "--out", str(tmp_path / "q")]) == 0
    qparams, _, recipe, _ = Q.load_quantized(tmp_path / "q")
    assert (recipe.w_group_size, recipe.a_group_size, recipe.low_rank) == (16, 16, 2)
    qkv = qparams["layers"]["blocks_0"]["attn"]["qkv"]
    assert (qkv.w_group_size, qkv.a_group_size, qkv.w_scale.shape) == (16, 16, (1, 3, 144))


def test_quantize_choose_reports_each_candidate(tmp_path, tiny_ckpt, capsys, monkeypatch):
    assert main(["calibrate", "--checkpoint", str(tiny_ckpt), "--recipe", "trdq", "--w-bits", "4",
                 "--a-bits", "4", "--segments", "2", "--per-class", "1", "--rows-per-step", "8",
                 "--seed", "7", "--out", str(tmp_path / "c")]) == 0
    from trdq_jax.quant import choose
    held_out_seeds = []
    drawn = choose.float_trajectories
    monkeypatch.setattr(choose, "float_trajectories", lambda *a, seed, **k: (
        held_out_seeds.append(seed), drawn(*a, seed=seed, **k))[1])
    capsys.readouterr()
    assert main(["quantize", "--calib", str(tmp_path / "c"), "--seed", "8", "--out",
                 str(tmp_path / "q")]) == 2
    assert "--seed: with --calib the calibration's seed (7) is used" in capsys.readouterr().err
    for flags, message in (
            (["--no-choose", "--choose-samples", "3"], "--choose-samples: sets how the "
             "components are chosen, and --no-choose quantizes the recipe as given; drop one"),
            (["--recipe", "minmax", "--confirm-samples", "3"], "--confirm-samples: sets how the "
             "components are chosen, and the recipe 'minmax' quantizes as named (only trdq and "
             "trdq_lowrank choose by default); give --choose too")):
        assert main(["quantize", "--calib", str(tmp_path / "c"), *flags, "--out",
                     str(tmp_path / "q")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "q").exists()
    # trdq chooses by default; margin 0.1 dB alone (no SE): some change wins on the 4 held-out
    # samples and is confirmed
    assert main(["quantize", "--calib", str(tmp_path / "c"), "--choose-samples", "4",
                 "--choose-margin-se", "0", "--confirm-samples", "3", "--out",
                 str(tmp_path / "q")]) == 0
    out, err = capsys.readouterr()
    assert "choosing trdq's components by the error of 4 held-out samples (+3 to confirm" in err
    assert held_out_seeds == [8, 9]  # the calibration's seed + 1 and + 2: never its samples
    summary = json.loads(out)
    confirmed = summary["confirmed_gain_db"]  # each change that won on the 4 held-out samples
    assert confirmed and set(confirmed) <= set(summary["trajectory_errors"]) - {"base"}
    if summary["chosen"] != "base":  # the choice's last change passed its confirmation
        assert confirmed[summary["chosen"]]["taken"] is True
    for name, entry in confirmed.items():  # pooled over 4 + 3 samples: the margin decides
        assert entry["taken"] == (entry["gain"] > 0.1) and entry["se"] > 0
    errors = summary["trajectory_errors"]
    assert list(errors)[0] == "base" and len(errors) >= 4
    gains = summary["held_out_gain_db"]  # 4 samples: the standard error is defined
    assert set(gains) == set(errors) - {"base"}
    for name, gain in gains.items():  # the mean per-sample gain is the geometric-mean ratio
        assert gain["gain"] == pytest.approx(10 * np.log10(errors["base"] / errors[name]),
                                             abs=2e-3)
        assert gain["se"] >= 0
    assert summary["chosen"] in errors
    _, _, recipe, _ = Q.load_quantized(tmp_path / "q")
    assert recipe.name == "trdq" and (recipe.w_bits, recipe.a_bits) == (4, 4)
    # a change must win by 1e6 standard errors too: none does, the recipe is kept as it is
    assert main(["quantize", "--calib", str(tmp_path / "c"), "--choose", "--choose-samples", "3",
                 "--choose-margin-se", "1e6", "--confirm-samples", "0", "--out",
                 str(tmp_path / "q2")]) == 0
    kept = json.loads(capsys.readouterr().out)
    assert kept["chosen"] == "base" and kept["confirmed_gain_db"] == {}
    q2, _, recipe, _ = Q.load_quantized(tmp_path / "q2")
    assert (recipe.name, recipe.num_segments, recipe.w_bits, recipe.a_bits) == ("trdq", 2, 4, 4)
    # --no-choose: the recipe as calibrated, nothing judged; the same layers as the kept base
    assert main(["quantize", "--calib", str(tmp_path / "c"), "--no-choose", "--out",
                 str(tmp_path / "q3")]) == 0
    out, err = capsys.readouterr()
    assert "chosen" not in json.loads(out) and "choosing" not in err
    q3, _, recipe3, _ = Q.load_quantized(tmp_path / "q3")
    assert recipe3 == recipe
    for a, b in zip(jax.tree.leaves(q2), jax.tree.leaves(q3)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_argparse_errors_are_one_line(capsys):
    assert main(["calibrate", "--w-bits", "four", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err == ("trdq calibrate: error: argument --w-bits: expected bits in 2..8 (or 16 = "
                   "float), got 'four' (see --help)\n")
    assert main(["quantize", "--calib", "c", "--choose", "--choose-samples", "0", "--out",
                 "q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trdq quantize: error: argument --choose-samples: expected a positive "
                          "int") and err.count("\n") == 1
    assert main(["quantize", "--calib", "c", "--choose", "--confirm-samples", "-1", "--out",
                 "q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trdq quantize: error: argument --confirm-samples: expected an int >= "
                          "0") and err.count("\n") == 1
    assert main(["quantize", "--calib", "c", "--choose", "--choose-margin-se", "-1", "--out",
                 "q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trdq quantize: error: argument --choose-margin-se: expected a finite "
                          "number >= 0") and err.count("\n") == 1


def test_a_named_recipe_keeps_its_own_segment_count_from_another_calibration(tmp_path,
                                                                           tiny_ckpt, capsys):
    """A 2-segment trdq calibration quantized as quarot gives QuaRot as published (one
    segment, its calibration derived from the same statistics), never a 2-segment QuaRot."""
    calib_dir = tmp_path / "calib"
    assert main(["calibrate", "--checkpoint", str(tiny_ckpt), "--recipe", "trdq", "--segments",
                 "2", "--per-class", "1", "--rows-per-step", "8", "--out", str(calib_dir)]) == 0
    for extra, name, segments in (([], "trdq", 2), (["--recipe", "quarot"], "quarot", 1)):
        out = tmp_path / name
        assert main(["quantize", "--calib", str(calib_dir), *extra, "--no-choose", "--out",
                     str(out)]) == 0
        _, _, recipe, table = Q.load_quantized(out)
        assert (recipe.name, recipe.num_segments) == (name, segments)
        assert sorted(set(np.asarray(table).tolist())) == list(range(segments))
    capsys.readouterr()


def test_summary_gains_are_json_numbers_or_null():
    """A candidate with a NaN sample has no defined gain: null in the JSON summary, not NaN."""
    from trdq_jax.cli.quantization import _rounded
    assert [_rounded(v) for v in (1.23456, -0.0004, float("nan"), float("inf"))] == [
        1.235, -0.0, None, None]
    assert json.loads(json.dumps({"gain": _rounded(float("nan"))})) == {"gain": None}


def test_which_recipes_choose_by_default(capsys):
    """trdq and trdq_lowrank choose on a class- or text-conditional model unless --no-choose;
    baselines and ablations quantize as named; an unconditional model cannot draw held-out
    samples by class or prompt, so its trdq is quantized as given, with a note."""
    from types import SimpleNamespace
    from trdq_jax.cli.quantization import _chooses
    classes = SimpleNamespace(model=SimpleNamespace(num_classes=10, family="dit"))
    text = SimpleNamespace(model=SimpleNamespace(family="pixart"))
    unconditional = SimpleNamespace(model=SimpleNamespace(num_classes=0, family="dit"))

    def args(choose=None, **flags):
        given = {"choose_samples": None, "confirm_samples": None, "choose_margin_se": None}
        return SimpleNamespace(choose=choose, **{**given, **flags})

    for name, expected in (("trdq", True), ("trdq_lowrank", True), ("quarot", False),
                           ("trdq_static", False), ("trdq_no_segments", False)):
        recipe = Q.get_recipe(name, 4, 8)
        assert _chooses(args(), recipe, classes) is expected, name
        assert _chooses(args(), recipe, text) is expected, name
        assert _chooses(args(choose=False), recipe, classes) is False
        assert _chooses(args(choose=True), recipe, classes) is True
    capsys.readouterr()
    assert _chooses(args(), Q.get_recipe("trdq", 8, 8), unconditional) is False
    assert "the model is unconditional, so trdq's components are not chosen" in (
        capsys.readouterr().err)
    assert _chooses(args(choose=False), Q.get_recipe("trdq", 8, 8), unconditional) is False
    # asked for (--choose, or a --choose-* flag): an error naming what asked
    for flags, name in (({"choose": True}, "--choose"), ({"choose_samples": 5},
                                                          "--choose-samples")):
        with pytest.raises(ValueError, match=f"^{name}: the model is unconditional"):
            _chooses(args(**flags), Q.get_recipe("trdq", 8, 8), unconditional)
    with pytest.raises(ValueError, match="^--choose-margin-se: sets how the components are "
                                         "chosen, and the recipe 'quarot' quantizes as named"):
        _chooses(args(choose_margin_se=1.0), Q.get_recipe("quarot", 8, 8), classes)
