"""``trdq eval`` of anything (a float checkpoint, a quantized one, a generation directory, a
bundled model), several seeds and bootstrap intervals; the one label layout shared with the
demo; the headline's quoted numbers; bad input for every flag.

Tiny models (tests/test_quant_cli.py ``TINY``: 8x8x1 digits-shaped, 3 classes, 6 steps), judged
by the real bundled digits classifier."""
import dataclasses
import json
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

from trdq_jax import checkpoint
from trdq_jax.cli import build_parser, main
from trdq_jax.eval import judge as J
from trdq_jax.models import build_model, init_params, zoo
from tests.test_files import tree_hash
from tests.test_quant_cli import TINY, tiny_params

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMINGS = ("sampling_seconds",)


def _printed(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]


def _untimed(result: dict) -> dict:
    """A result without its wall-clock fields (which differ between two runs)."""
    out = {k: v for k, v in result.items() if k not in TIMINGS}
    if "per_seed" in out:
        out["per_seed"] = [_untimed(r) for r in out["per_seed"]]
    return out


@pytest.fixture(autouse=True)
def few_resamples(request, monkeypatch):
    """100 bootstrap resamples instead of 1000 (the slow test keeps the default): the CLI
    and the library read the count when they run, so both use the same."""
    if "slow" not in request.keywords:
        monkeypatch.setattr(J, "BOOTSTRAP_RESAMPLES", 100)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A float checkpoint, a quantized checkpoint (minmax W8A8, the fastest recipe), finished
    and unfinished generation directories, and things trdq did not write."""
    root = tmp_path_factory.mktemp("evalws")
    checkpoint.save(root / "ck", tiny_params(), TINY)
    assert main(["quantize", "--checkpoint", str(root / "ck"), "--recipe", "minmax",
                 "--per-class", "1", "--out", str(root / "q")]) == 0
    assert main(["generate", "--checkpoint", str(root / "ck"), "--num-samples", "6",
                 "--out", str(root / "gen")]) == 0
    # a run stopped before its shard was recorded: no finished shard in its manifest
    shutil.copytree(root / "gen", root / "gen_unfinished")
    for line_file in (root / "gen_unfinished").glob("manifest-*.jsonl"):
        line_file.write_text("")
    for name, model in (("big", dataclasses.replace(TINY.model, input_size=16)),
                        ("rgb", dataclasses.replace(TINY.model, in_channels=3)),
                        ("classes12", dataclasses.replace(TINY.model, num_classes=12))):
        cfg = dataclasses.replace(TINY, model=model)
        checkpoint.save(root / name, init_params(model, jax.random.key(0)), cfg)
    (root / "dir.json").mkdir()
    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("years of work")
    (root / "notes.txt").write_text("a user's file")
    (root / "user.json").write_text('{"mine": true}')
    return root


# ----------------------------------------------------------------------------- the library


def test_eval_labels_is_the_one_layout():
    from trdq_jax.sampling.offline import default_labels
    labels = J.eval_labels(10, 3)
    np.testing.assert_array_equal(labels, np.arange(30) % 10)
    np.testing.assert_array_equal(labels, default_labels(30, 10))  # trdq generate's default
    assert labels.dtype == np.int32
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="per_class: expected a positive int"):
            J.eval_labels(10, bad)


def test_demo_and_eval_share_the_layout_in_code():
    # the demo, eval, and no np.repeat/np.tile layouts of their own
    for path in ("trdq_jax/demo.py", "trdq_jax/eval/judge.py", "trdq_jax/cli/evaluation.py"):
        text = (ROOT / path).read_text()
        assert "np.repeat(np.arange" not in text and "np.tile(np.arange" not in text, path
    assert "eval_labels(num_classes, per_class)" in (ROOT / "trdq_jax/demo.py").read_text()


def test_judge_refuses_what_the_digits_classifiers_cannot_judge():
    assert J.check_judgeable((8, 8, 1), 10) == "digits-classifier"
    assert J.check_judgeable((5, 12, 12, 1), 10) == "moving-digits-classifier"
    with pytest.raises(ValueError, match=r"cannot judge samples of shape \(16, 16, 1\): .*"
                                         r"digits-classifier, which takes 8x8x1 images"):
        J.check_judgeable((16, 16, 1), 10)
    with pytest.raises(ValueError, match=r"takes 12x12x1 frames of digits, not 8x8x1 videos"):
        J.check_judgeable((5, 8, 8, 1), 10)
    with pytest.raises(ValueError, match="cannot judge a model of 12 classes"):
        J.check_judgeable((8, 8, 1), 12)


def test_judge_matches_its_parts_and_intervals_are_fixed():
    from trdq_jax.data import load_digits
    from trdq_jax.eval import class_match_accuracy, digits_fid
    images, labels = load_digits("test")
    x, y = images[:40], labels[:40].astype(np.int32)
    _, classify, features = J._judge_fns("digits-classifier")
    got = J.judge(x, y, images, resamples=100)
    assert got["class_match"] == class_match_accuracy(x, y, classify)
    assert got["digits_fid"] == digits_fid(x, images, features)
    lo, hi = got["digits_fid_ci95"]
    assert lo < got["digits_fid"] < hi
    assert got["bootstrap"]["resamples"] == 100 and got["bootstrap"]["seed"] == J.BOOTSTRAP_SEED
    assert J.judge(x, y, images, resamples=100) == got  # a fixed bootstrap seed
    assert "digits_fid_ci95" not in J.judge(x, y, images, resamples=0)


# ----------------------------------------------------------------------------- the command


def test_eval_help_names_every_flag_and_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--model", "--checkpoint", "--quantized", "--generation", "--backend",
                 "--per-class", "--seed", "--num-seeds", "--seeds", "--cfg-scale", "--out",
                 "--overwrite"):
        assert flag in text, flag
    for default in ("default: every bundled model present", "default: xla", "default: 30",
                    "default: 0)", "default: 1)", "default: the model's config",
                    "1000 resamples", "bootstrap seed 0", "i % num_classes"):
        assert default in text, default


def test_eval_checkpoint_prints_what_the_library_returns(ws, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(ws / "ck"), "--per-class", "2", "--seeds", "0,1",
                 "--out", str(out)]) == 0
    [printed] = _printed(capsys)
    lib = J.evaluate_checkpoint(ws / "ck", per_class=2, seeds=[0, 1], progress=False)
    assert _untimed(printed) == _untimed(json.loads(json.dumps(lib)))
    assert json.loads(out.read_text())["results"] == [printed]
    assert printed["num_samples"] == 12 and printed["seeds"] == [0, 1]
    assert [r["seed"] for r in printed["per_seed"]] == [0, 1]
    lo, hi = printed["class_match_ci95"]["accuracy"]
    assert 0 <= lo <= printed["class_match"]["accuracy"] <= hi <= 1
    assert printed["digits_fid_ci95"][0] < printed["digits_fid_ci95"][1]
    # --seed S --num-seeds K is --seeds S..S+K-1
    assert main(["eval", "--checkpoint", str(ws / "ck"), "--per-class", "2",
                 "--num-seeds", "2"]) == 0
    assert _untimed(_printed(capsys)[0]) == _untimed(printed)


def test_eval_quantized_samples_with_its_segments(ws, capsys):
    assert main(["eval", "--quantized", str(ws / "q"), "--per-class", "1"]) == 0
    [printed] = _printed(capsys)
    lib = J.evaluate_quantized(ws / "q", per_class=1, progress=False)
    assert _untimed(printed) == _untimed(json.loads(json.dumps(lib)))
    assert "minmax W8A8" in printed["source"] and printed["seeds"] == [0]
    # the samples judged are those of `trdq sample --quantized` (its stored sampler and table)
    from trdq_jax.quant.io import load_quantized_model
    from trdq_jax.sampling.generate import generate
    model, qparams, cfg, _, sampler, apply_fn = load_quantized_model(ws / "q")
    labels = J.eval_labels(3, 1)
    samples = generate(model, qparams, cfg, labels, seed=0, sampler=sampler, apply_fn=apply_fn)
    direct = J.judge(samples, labels, J.reference_for((8, 8, 1)))
    assert printed["digits_fid"] == direct["digits_fid"]


def test_eval_generation_scores_the_samples_there(ws, capsys):
    assert main(["eval", "--generation", str(ws / "gen")]) == 0
    [printed] = _printed(capsys)
    assert _untimed(printed) == _untimed(json.loads(json.dumps(
        J.evaluate_generation(ws / "gen"))))
    assert printed["num_samples"] == 6 and printed["per_class"] == 2
    assert printed["seeds"] == [0]
    # generate's default labels are eval's layout: the same samples as eval of the checkpoint
    # (to float rounding: another program draws them)
    same = J.evaluate_checkpoint(ws / "ck", per_class=2, progress=False)
    assert printed["class_match"] == same["class_match"]
    np.testing.assert_allclose(printed["digits_fid"], same["digits_fid"], rtol=1e-3)


def test_eval_of_a_bundled_classifier(capsys):
    assert main(["eval", "--model", "digits-classifier"]) == 0
    [printed] = _printed(capsys)
    assert printed == json.loads(json.dumps(J.evaluate_classifier("digits-classifier")))
    lo, hi = printed["heldout_ci95"]["accuracy"]
    assert lo <= printed["heldout"]["accuracy"] <= hi


def test_demo_reports_what_eval_computes(ws, tmp_path, monkeypatch):
    """The demo's float numbers are ``evaluate_generator``'s at the same settings (a tiny model
    in the bundled model's place; the real one: the slow test below)."""
    from trdq_jax import demo
    tiny = (build_model(TINY.model), tiny_params(), TINY)
    real_load, real_available = zoo.load, zoo.available
    monkeypatch.setattr(zoo, "available", lambda: ["tiny-dit", *real_available()])
    monkeypatch.setattr(zoo, "load", lambda n: tiny if n == "tiny-dit" else real_load(n))
    monkeypatch.setattr(demo, "quantized_comparison", _no_quantization)
    report = demo.run_demo(tmp_path / "demo", "tiny-dit", per_class=2, seed=3)
    ours = J.evaluate_model(*tiny, source="bundled:tiny-dit", per_class=2, seeds=[3],
                            progress=False)
    for key in ("class_match", "digits_fid", "class_match_ci95", "digits_fid_ci95", "bootstrap",
                "num_samples", "label_layout"):
        assert report[key] == ours[key], key
    assert report["headline"]["measured"] == []
    md = (tmp_path / "demo" / "report.md").read_text()
    assert f"{report['digits_fid']:.3f} [" in md and "95% percentile bootstrap" in md


def _no_quantization(model, params, cfg, labels, float_samples, seed, reference=None, *,
                     share_cfg=False):
    grid = {"float": [float_samples[labels == c] for c in range(cfg.model.num_classes)]}
    return ({"recipe": "trdq", "backend": "xla", "seed": seed, "num_samples": len(labels),
             "calibration": {"per_class": 0, "seed": 0, "seconds": 0, "segment_of_step": []},
             "settings": {}}, {"labels": labels, "float": float_samples}, grid)


@pytest.mark.slow
def test_demo_and_eval_agree_on_the_bundled_dit(tmp_path, monkeypatch):
    """The bundled digits-dit, 10 samples: the demo's report equals ``evaluate_generator``."""
    from trdq_jax import demo
    monkeypatch.setattr(demo, "quantized_comparison", _no_quantization)
    report = demo.run_demo(tmp_path / "demo", "digits-dit", per_class=1, seed=0)
    ours = J.evaluate_generator("digits-dit", per_class=1, seed=0, progress=False)
    for key in ("class_match", "digits_fid", "class_match_ci95", "digits_fid_ci95"):
        assert report[key] == ours[key], key


# ----------------------------------------------------------------------------- the headline


def test_headline_says_where_trdq_is_quarot():
    from trdq_jax.demo import headline
    section = {"settings": {
        "W8A8": {"activation_clipping": {"layers": 24, "segments": 4, "layers_clipped": 0,
                                         "smallest_ratio": 1.0}},
        "W4A4": {"activation_clipping": {"layers": 24, "segments": 4, "layers_clipped": 3,
                                         "smallest_ratio": 0.8}}}}
    got = headline(section)
    assert "W8A8: the per-segment clipping search picked no clipping in any of the 24" in \
        got["measured"][0] and "`quarot`'s layers" in got["measured"][0]
    assert "clipped activations in 3 of 24 layers (smallest ratio 0.80)" in got["measured"][1]


def test_clipping_summary_reads_the_quantized_layers(ws):
    import trdq_jax.quant as Q
    from trdq_jax.demo import clipping_summary
    qparams, _, recipe, _ = Q.load_quantized(ws / "q")  # minmax: static, no dynamic clips
    assert clipping_summary(qparams)["layers"] == 0
    layer = Q.QLinear(w_q=np.zeros((1, 2, 2), np.int8), w_scale=np.ones((1, 2), np.float32),
                      w_colsum=np.zeros((1, 2), np.int32),
                      a_clip=np.array([1.0, 0.9, 1.0], np.float32))
    same = dataclasses.replace(layer, a_clip=np.ones(3, np.float32))
    got = clipping_summary({"layers": {"a": layer, "b": {"c": same}}})
    assert got == {"layers": 2, "segments": 3, "layers_clipped": 1,
                   "smallest_ratio": pytest.approx(0.9)}


def test_quoted_numbers_are_in_benchmarks_md():
    """Every dB figure the demo's headline and the README's headline quote is in BENCHMARKS.md."""
    from trdq_jax.demo import BENCHMARK_EVIDENCE
    bench = (ROOT / "BENCHMARKS.md").read_text()
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## What TR-DQ adds"):]
    section = section[:section.index("\n## ", 4)]
    for text in [*BENCHMARK_EVIDENCE, section]:
        for number in re.findall(r"\d+\.\d\d(?= dB| /)", text):
            assert number in bench, number


# ----------------------------------------------------------------------------- bad input

BAD = [
    ("two-sources", "eval --checkpoint {ws}/ck --quantized {ws}/q",
     "argument --quantized: not allowed with argument --checkpoint"),
    ("model-and-generation", "eval --model digits-dit --generation {ws}/gen",
     "argument --generation: not allowed with argument --model"),
    ("checkpoint-missing", "eval --checkpoint {ws}/none", "--checkpoint: no such directory"),
    ("checkpoint-file", "eval --checkpoint {ws}/notes.txt", "--checkpoint: '"),
    ("checkpoint-foreign", "eval --checkpoint {ws}/mine", "--checkpoint: "),
    ("checkpoint-quantized", "eval --checkpoint {ws}/q", "--checkpoint: "),
    ("checkpoint-not-digits", "eval --checkpoint {ws}/big",
     "--checkpoint: cannot judge samples of shape (16, 16, 1)"),
    ("checkpoint-rgb", "eval --checkpoint {ws}/rgb",
     "--checkpoint: cannot judge samples of shape (8, 8, 3)"),
    ("checkpoint-12-classes", "eval --checkpoint {ws}/classes12",
     "--checkpoint: cannot judge a model of 12 classes"),
    ("quantized-missing", "eval --quantized {ws}/none", "--quantized: no such directory"),
    ("quantized-foreign", "eval --quantized {ws}/mine", "--quantized: "),
    ("quantized-float", "eval --quantized {ws}/ck", "--quantized: "),
    ("quantized-generation", "eval --quantized {ws}/gen", "--quantized: "),
    ("generation-missing", "eval --generation {ws}/none", "--generation: no such directory"),
    ("generation-foreign", "eval --generation {ws}/mine", "--generation: "),
    ("generation-float", "eval --generation {ws}/ck", "--generation: "),
    ("generation-unfinished", "eval --generation {ws}/gen_unfinished",
     "--generation: '{ws}/gen_unfinished' lacks samples 0..5"),
    ("generation-seeds", "eval --generation {ws}/gen --seeds 0,1",
     "--seeds: --generation scores the samples already in the directory"),
    ("generation-per-class", "eval --generation {ws}/gen --per-class 2",
     "--per-class: --generation scores"),
    ("generation-cfg-scale", "eval --generation {ws}/gen --cfg-scale 2", "--cfg-scale: "
     "--generation scores"),
    ("backend-without-quantized", "eval --checkpoint {ws}/ck --backend fake",
     "--backend: only applies to --quantized"),
    ("backend-unknown", "eval --quantized {ws}/q --backend gpu", "argument --backend: invalid "
     "choice: 'gpu'"),
    ("seeds-malformed", "eval --checkpoint {ws}/ck --seeds 0,x",
     "argument --seeds: expected comma-separated ints in [0, 2**32 - 1], got '0,x'"),
    ("seeds-empty", "eval --checkpoint {ws}/ck --seeds ,", "argument --seeds: expected"),
    ("seeds-negative", "eval --checkpoint {ws}/ck --seeds 0,-1",
     "argument --seeds: seed -1 is outside [0, 2**32 - 1]"),
    ("seeds-too-big", "eval --checkpoint {ws}/ck --seeds 4294967296",
     "argument --seeds: seed 4294967296 is outside"),
    ("seeds-twice", "eval --checkpoint {ws}/ck --seeds 1,2,1",
     "argument --seeds: seed 1 is given twice"),
    ("seeds-and-seed", "eval --checkpoint {ws}/ck --seeds 0,1 --seed 3",
     "--seeds: give either --seeds LIST or --seed/--num-seeds"),
    ("num-seeds-0", "eval --checkpoint {ws}/ck --num-seeds 0",
     "argument --num-seeds: expected a positive int"),
    ("num-seeds-past-range", "eval --checkpoint {ws}/ck --seed 4294967295 --num-seeds 2",
     "--num-seeds: seeds 4294967295 .. 4294967296 run past 2**32 - 1"),
    ("seed-negative", "eval --checkpoint {ws}/ck --seed -3", "argument --seed: expected an int"),
    ("per-class-0", "eval --checkpoint {ws}/ck --per-class 0",
     "argument --per-class: expected a positive int"),
    ("out-not-json", "eval --checkpoint {ws}/ck --out {ws}/r.txt",
     "--out: expected a .json file name"),
    ("out-foreign", "eval --checkpoint {ws}/ck --out {ws}/user.json --overwrite",
     "not written by trdq_jax, not a trdq_jax report"),
    ("out-directory", "eval --checkpoint {ws}/ck --out {ws}/dir.json",
     "is a directory, expected a file for the report"),
    ("out-inside-checkpoint", "eval --checkpoint {ws}/ck --out {ws}/ck/r.json",
     "outputs do not nest"),
    ("model-unknown", "eval --model nope --seeds 0,1", "--model: unknown bundled model 'nope'"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_eval_bad_input(ws, argv, message, capsys):
    before = tree_hash(ws)
    code = main([a.format(ws=ws) for a in argv.split()])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("trdq ")]
    assert len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    assert errors[0].startswith("trdq eval: error: "), err
    assert message.format(ws=ws) in errors[0], err
    assert tree_hash(ws) == before


def test_the_readme_table_is_rebuilt_from_an_eval_report():
    """scripts/bundled_table.py: the quality column from ``trdq eval --out`` results, the
    descriptions kept; the README's own table holds every bundled model with intervals."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bundled_table",
                                                  ROOT / "scripts" / "bundled_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    readme = ("intro\n<!-- bundled:begin -->\n| model | what | quality |\n|---|---|---|\n"
              "| `a` | a DiT | old |\n| `c` | a CNN | old too |\n<!-- bundled:end -->\nrest\n")
    results = [{"model": "a", "class_match": {"accuracy": 0.98}, "digits_fid": 3.396,
                "class_match_ci95": {"accuracy": [0.9667, 0.9967]},
                "digits_fid_ci95": [2.359, 4.986], "num_samples": 300,
                "sampler": "ddim 50 steps", "cfg_scale": 5.0},
               {"model": "c", "heldout": {"accuracy": 0.987},
                "heldout_ci95": {"accuracy": [0.973, 1.0]}}]
    out = table.rewrite(readme, results)
    assert out.startswith("intro\n<!-- bundled:begin -->\n") and out.endswith("end -->\nrest\n")
    assert ("| `a` | a DiT | class match 98.0% [96.7%, 99.7%], digits-FID 3.40 [2.36, 4.99] "
            "(300 samples, DDIM 50, CFG 5) |") in out
    assert "| `c` | a CNN | held-out accuracy 98.7% [97.3%, 100.0%] |" in out
    with pytest.raises(ValueError, match=r"\['b'\] have no row in the README table"):
        table.rewrite(readme, results + [{"model": "b"}])
    ours = (ROOT / "README.md").read_text().split("<!-- bundled:begin -->")[1].split(
        "<!-- bundled:end -->")[0]
    for name in zoo.available():
        row = next(line for line in ours.splitlines() if line.startswith(f"| `{name}` |"))
        assert re.search(r"\d%\]", row), f"{name}: no interval in the README row {row!r}"
