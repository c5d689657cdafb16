"""What a new user hit (issue #21 items 4 and 9): the compilation cache, flag help texts and
aliases, progress bars in notebooks, rounded timings, segment numbering, plot cosmetics,
errors naming the right names, empty output directories."""
import argparse
import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as cc

import trdq_jax
from trdq_jax import compile_cache
from trdq_jax.cli import build_parser, cfg as cfg_cli, main, models, quantization, sampling
from trdq_jax.cli._common import Parser

ROOT = pathlib.Path(__file__).resolve().parent.parent
_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
                  "jax_persistent_cache_min_compile_time_secs")


# ----------------------------------------------------------------------------- compilation cache


@pytest.fixture
def no_jax_cache(monkeypatch, tmp_path):
    """A process with no compilation cache configured (as a user's, not the tests'); the
    tests' own cache is put back afterwards."""
    saved = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv(compile_cache.ENV_SWITCH, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    jax.config.update("jax_compilation_cache_dir", None)
    cc.reset_cache()
    yield tmp_path / "xdg" / "trdq_jax" / "xla"
    for name, value in saved.items():
        jax.config.update(name, value)
    cc.reset_cache()


def test_the_cli_turns_the_cache_on_in_the_user_cache_dir(no_jax_cache, capsys):
    assert not no_jax_cache.exists()
    assert main(["info"]) == 0
    assert jax.config.jax_compilation_cache_dir == str(no_jax_cache)
    assert jax.config.jax_enable_compilation_cache and no_jax_cache.is_dir()
    assert f"compilation cache: {no_jax_cache}" in capsys.readouterr().out
    # what is compiled from then on lands there
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.jit(lambda x: x * 3 + 1)(np.arange(7.0))
    assert any(no_jax_cache.iterdir())


def test_home_cache_without_xdg(no_jax_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec ignores relative ones
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_cache_dir() == tmp_path / "home" / ".cache" / "trdq_jax" / "xla"


@pytest.mark.parametrize("switch", [["--no-compile-cache", "info"], ["info", "--no-compile-cache"],
                                    "env"])
def test_the_off_switches(no_jax_cache, monkeypatch, capsys, switch):
    if switch == "env":
        monkeypatch.setenv("TRDQ_COMPILATION_CACHE", "0")
        switch = ["info"]
    assert main(switch) == 0
    assert not jax.config.jax_enable_compilation_cache and not no_jax_cache.exists()
    assert compile_cache.compilation_cache_dir() is None
    assert "compilation cache: off (" in capsys.readouterr().out


def test_a_cache_configured_for_jax_is_kept(no_jax_cache, tmp_path, capsys):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert main(["info"]) == 0
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    assert "(configured for JAX)" in capsys.readouterr().out and not no_jax_cache.exists()


def test_bad_switch_and_unusable_cache_dir(no_jax_cache, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TRDQ_COMPILATION_CACHE", "maybe")
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err == ("trdq info: error: TRDQ_COMPILATION_CACHE: expected 0 or 1 (off/on), got "
                   "'maybe'\n")
    assert not no_jax_cache.exists()
    # a cache directory that cannot be made: a note, and the command runs without the cache
    monkeypatch.setenv("TRDQ_COMPILATION_CACHE", "1")
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    assert main(["info"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("trdq: note: running without the compilation cache: cannot "
                                   f"create the compilation cache directory "
                                   f"'{tmp_path / 'file' / 'trdq_jax' / 'xla'}'")
    assert captured.err.count("\n") == 1 and "compilation cache: off (" in captured.out


def test_library_call_and_its_bad_inputs(no_jax_cache, tmp_path):
    assert trdq_jax.enable_compilation_cache is compile_cache.enable_compilation_cache
    assert trdq_jax.enable_compilation_cache(tmp_path / "a", min_compile_time_s=0) == \
        tmp_path / "a"
    assert compile_cache.compilation_cache_dir() == tmp_path / "a"
    jax.jit(lambda x: x - 5)(np.arange(3.0))
    assert any((tmp_path / "a").iterdir())
    assert trdq_jax.enable_compilation_cache() == no_jax_cache  # moves; a new default place
    for bad, match in [((3,), r"^path: expected a directory path or None, got 3$"),
                       (("",), r"^path: expected"),
                       ((None,), r"^min_compile_time_s: expected a number of seconds >= 0"),
                       ]:
        kwargs = {"min_compile_time_s": -1.0} if bad == (None,) else {}
        with pytest.raises(ValueError, match=match):
            trdq_jax.enable_compilation_cache(*bad, **kwargs)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError, match=r"^path: cannot create the compilation cache directory"):
        trdq_jax.enable_compilation_cache(tmp_path / "f" / "xla")


def test_importing_the_library_leaves_the_cache_off(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    code = ("import jax, trdq_jax, trdq_jax.quant, trdq_jax.sampling, trdq_jax.eval; "
            "print(jax.config.jax_compilation_cache_dir)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None" and not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- flags and help


def _parsers(parser):
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _states_default(action) -> bool:
    text = (action.help or "").lower()
    return "required" in text if action.required else "default" in text


def test_every_flag_states_its_default():
    for prog, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert _states_default(action), (prog, action.option_strings, action.help)
            assert not (action.help or "").startswith("("), (prog, action.option_strings)
        parser.format_help()  # every %(default)s expands


def test_our_commands_state_their_defaults_in_words():
    """The commands of cli/{models,sampling,quantization,cfg}.py say their defaults themselves
    (``state_defaults`` only backs up flags declared elsewhere)."""
    sub = Parser(prog="trdq").add_subparsers(parser_class=Parser)
    for family in (models, sampling, quantization, cfg_cli):
        family.register(sub)
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):
                assert _states_default(action), (name, action.option_strings, action.help)


def test_plot_ranges_bits_default_like_calibrate():
    parse = build_parser().parse_args
    cal = parse(["calibrate", "--out", "d"])
    fig = parse(["plot-ranges", "--out", "f.png"])
    for name in ("recipe", "w_bits", "a_bits", "segments", "seed", "rows_per_step"):
        assert getattr(fig, name) == getattr(cal, name), name


def test_share_plan_is_an_alias_wherever_cfg_plan_is():
    having = []
    for prog, parser in _parsers(build_parser()):
        for action in parser._actions:
            flags = set(action.option_strings)
            if flags & {"--cfg-plan", "--share-plan"}:
                assert {"--cfg-plan", "--share-plan"} <= flags, (prog, flags)
                having.append(prog.split()[-1])
    assert sorted(having) == ["demo", "generate", "quantize", "sample"]
    for command in ("sample", "generate", "quantize", "demo"):
        extra = ["--num-samples", "1"] if command == "generate" else []
        args = build_parser().parse_args([command, "--out", "d", "--share-plan", "all", *extra])
        assert args.cfg_plan == "all"


# ----------------------------------------------------------------------------- library details


def test_no_notebook_widget_progress_bars():
    """tqdm.auto picks the widget bar in a Jupyter kernel and warns "IProgress not found" where
    ipywidgets is missing: the library uses the plain text bar."""
    widget = {"tqdm.auto", "tqdm.notebook", "tqdm.autonotebook"}
    for path in (ROOT / "trdq_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            assert not widget & set(names), path


def test_training_throughput_is_rounded():
    from trdq_jax.training.loop import _summarise
    entry = _summarise([(0, {"loss": np.float32(0.5)})], 1, 0.1, 0.1 + 0.2)
    assert entry["steps_per_sec"] == 0.3 and json.dumps(entry).count("0000") == 0


def test_segments_are_numbered_in_sampling_order():
    from tests.quant.test_segments import _stats
    from trdq_jax.config import SamplerConfig
    from trdq_jax.quant import segments
    from trdq_jax.sampling import Sampler
    for solver in ("ddim", "flow_euler"):
        s = Sampler.from_config(SamplerConfig(solver=solver, num_steps=12, num_segments=3))
        table = np.asarray(s.segment_of_step)
        assert table[0] == 0 and table[-1] == 2 and np.all(np.diff(table) >= 0), table
        assert np.all(np.diff(np.asarray(s.train_timesteps)) < 0)  # step 0 is the noisiest
        np.testing.assert_array_equal(
            segments.uniform_segments(np.asarray(s.train_timesteps), 3, s.num_train_steps), table)
    absmax = np.concatenate([np.full((4, 3), 10.0), np.ones((4, 3)), np.full((4, 3), 0.1)])
    similar = segments.similarity_segments(_stats({"l": absmax}), 3)
    assert similar.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def _repeated_word(text: str):
    return re.search(r"\b(\w+)\b\W+\1\b", text, flags=re.IGNORECASE)


def test_figures_have_integer_step_ticks_and_no_doubled_words():
    from trdq_jax.eval.cfg_analysis import cfg_heatmap_figure
    from trdq_jax.plots import range_figure
    from trdq_jax.quant.ranges import RangeCurves
    steps = 3  # few steps: matplotlib's own ticks would fall on halves
    before = RangeCurves(low=-np.arange(1.0, 4.0), high=np.arange(1.0, 4.0),
                         mean_absmax=np.ones(steps))
    after = RangeCurves(low=before.low / 2, high=before.high / 2, mean_absmax=np.ones(steps))
    figures = [range_figure({"blocks_0/attn/qkv": (before, after)}, [0, 1, 1], title="ranges")]
    for layers in (["blocks_0/attn", "blocks_1/attn"],
                   ["spatial_blocks_0/attn", "temporal_blocks_0/attn"]):
        table = np.full((steps, len(layers)), 0.5).tolist()
        figures.append(cfg_heatmap_figure({"layers": layers, "prob_similarity": table,
                                           "share_error": table}, title="cond vs uncond"))
    for fig in figures:
        titles = [fig._suptitle.get_text()] if fig._suptitle else []
        for ax in fig.axes:
            if ax.get_xlabel().startswith("sampling step"):
                ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
                assert ticks and all(float(t).is_integer() for t in ticks), ticks
            titles.append(ax.get_title())
        for title in titles:
            assert not _repeated_word(title), title
    heatmap_titles = [ax.get_title() for ax in figures[1].axes if ax.get_title()]
    assert heatmap_titles[0].startswith("attention: similarity"), heatmap_titles


# ----------------------------------------------------------------------------- names in errors


def _tree(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("argv, expected", [
    ("demo --model nosuch --out {tmp}/new", "--model: unknown bundled model 'nosuch'"),
    ("demo --cfg-plan bogus --out {tmp}/new", "--cfg-plan: expected a preset"),
    ("sample --cfg-plan bogus --per-class 1 --out {tmp}/new", "--cfg-plan: expected a preset"),
    ("sample --set model.depth=3 --out {tmp}/new", "--set: model.* fields are fixed"),
    ("sample --set sampler.num_steps=abc --out {tmp}/new",
     "--set sampler.num_steps: cannot parse 'abc' as int"),
    ("train --config {tmp}/none.py --workdir {tmp}/new", "--config: no such file"),
    ("train --config {tmp}/notes.txt --workdir {tmp}/new", "--config: '{tmp}/notes.txt' is not "
                                                           "a Python file"),
    ("sample --model nosuch --out {tmp}/new", "--model: unknown bundled model 'nosuch'"),
    ("sample --model digits-classifier --out {tmp}/new",
     "--model: bundled:digits-classifier is a classifier"),
    ("sample --set sampler.num_steps=0 --out {tmp}/new",
     "--set sampler.num_steps: SamplerConfig.num_steps: expected a positive int, got 0"),
])
def test_cli_errors_name_flags(tmp_path, capsys, argv, expected):
    (tmp_path / "notes.txt").write_text("not a config")
    expected = expected.format(tmp=tmp_path)
    before = _tree(tmp_path)
    assert main(argv.format(tmp=tmp_path).split()) == 2
    err = capsys.readouterr().err
    command = argv.split()[0]
    assert err.startswith(f"trdq {command}: error: {expected}"), err
    assert err.count("\n") == 1 and _tree(tmp_path) == before


def test_library_errors_name_python_arguments(tmp_path):
    from trdq_jax.config import ConfigError, DiTConfig, ExperimentConfig, SamplerConfig, \
        apply_overrides, load_config_file
    from trdq_jax.models.zoo import load_float_model
    from trdq_jax.sampling.cfg_plan import resolve_plan
    cfg = ExperimentConfig(name="x", model=DiTConfig(), sampler=SamplerConfig())
    with pytest.raises(ValueError, match=r"^spec: expected a preset"):
        resolve_plan("bogus", cfg.model, 10)
    with pytest.raises(ConfigError, match=r"^path: no such file"):
        load_config_file(tmp_path / "none.py")
    with pytest.raises(ConfigError, match=r"^overrides: model\.nope: DiTConfig has no field"):
        apply_overrides(cfg, ["model.nope=1"])
    with pytest.raises(ValueError, match=r"^overrides: model\.\* fields are fixed"):
        load_float_model("digits-dit", overrides=["model.depth=3"])


# ----------------------------------------------------------------------------- empty directories


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory):
    from tests.models import official_dit
    from tests.test_quant_cli import TINY, tiny_params
    from trdq_jax import checkpoint
    ws = tmp_path_factory.mktemp("empty_ok")
    checkpoint.save(ws / "ck", tiny_params(), TINY)
    dims = dict(depth=1, hidden=32, in_ch=4, patch=2, num_classes=3, mlp_hidden=128, out_ch=8,
                n_tokens=16)
    np.savez(ws / "dit.npz", **official_dit.random_state_dict(np.random.default_rng(0), **dims))
    assert main(["calibrate", "--checkpoint", str(ws / "ck"), "--recipe", "minmax",
                 "--per-class", "1", "--out", str(ws / "calib")]) == 0
    return ws


@pytest.mark.parametrize("argv", [
    "sample --checkpoint {ws}/ck --per-class 1",
    "calibrate --checkpoint {ws}/ck --recipe minmax --per-class 1",
    "quantize --calib {ws}/calib",
    "cfg-analysis --checkpoint {ws}/ck",
    "generate --checkpoint {ws}/ck --num-samples 2",
    "convert --input {ws}/dit.npz --num-heads 2",
])
def test_an_empty_directory_is_a_new_output(tiny_ws, tmp_path, argv, capsys):
    """``mkdir out && trdq CMD --out out``: nothing could be lost, so nothing is refused."""
    out = tmp_path / "out"
    out.mkdir()
    code = main([*argv.format(ws=tiny_ws).split(), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "metadata.json").is_file()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux /proc only")
def test_compiled_programs_are_released_near_the_map_limit(monkeypatch):
    """Each compiled CPU program holds memory maps until JAX's caches drop it; past the given
    fraction of vm.max_map_count they are dropped, and the maps go with them."""
    import jax
    import jax.numpy as jnp
    held, limit = compile_cache.memory_maps()
    assert limit == int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
    assert abs(held - len(pathlib.Path("/proc/self/maps").read_text().splitlines())) < 20
    assert compile_cache.release_programs_near_map_limit(1.0) is False  # far below the limit
    for i in range(40):  # 40 distinct programs
        jax.jit(lambda x, i=i: jnp.tanh(x) * i + (x @ x.T).sum())(
            jnp.ones((4 + i, 3))).block_until_ready()
    before = compile_cache.memory_maps()[0]
    assert compile_cache.release_programs_near_map_limit(0.0) is True
    assert compile_cache.memory_maps()[0] < before - 40  # measured: ~4 maps per program
    monkeypatch.setattr(compile_cache, "memory_maps", lambda: None)  # not Linux: nothing done
    assert compile_cache.release_programs_near_map_limit(0.0) is False
