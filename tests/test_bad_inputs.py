"""Bad inputs over the CLI and the API, as a new user would try them.

Every case runs against one workspace holding outputs of every kind plus a user's own files.
Each asserts the error names the cause (for the CLI: one line ``trdq CMD: error: ...`` and exit
status 2), that nothing already on disk changed (hashes before and after) and that no partial
output appeared.
"""
import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest

from trdq_jax import checkpoint, files
from trdq_jax.cli import main
from tests.models import official_dit
from tests.test_files import tree_hash
from tests.test_quant_cli import TINY, tiny_params

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

DIMS = dict(depth=1, hidden=32, in_ch=4, patch=2, num_classes=3, mlp_hidden=128, out_ch=8,
            n_tokens=16)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace: every kind of output this project writes, and things it did not write."""
    root = tmp_path_factory.mktemp("ws")
    ck = root / "ck"
    checkpoint.save(ck, tiny_params(), TINY)
    assert main(["calibrate", "--checkpoint", str(ck), "--recipe", "minmax", "--per-class", "1",
                 "--rows-per-step", "8", "--out", str(root / "calib")]) == 0
    assert main(["quantize", "--calib", str(root / "calib"), "--out", str(root / "q")]) == 0
    assert main(["sample", "--checkpoint", str(ck), "--per-class", "1",
                 "--out", str(root / "samples")]) == 0
    assert main(["generate", "--checkpoint", str(ck), "--num-samples", "2",
                 "--out", str(root / "gen")]) == 0
    import shutil
    shutil.copytree(root / "gen", root / "gen_corrupt")
    (root / "gen_corrupt" / "metadata.json").write_text('{"format": "trdq_jax.generation/2", ')
    foreign = root / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    for place in ("cwd", "home"):  # the tests' working and home directories
        (root / place).mkdir()
        (root / place / "work.txt").write_text("the user's")
    (root / "notes.txt").write_text("a user's file")
    (root / "user.png").write_bytes(b"\x89PNG not really")
    (root / "user.json").write_text('{"mine": true}')
    sd = official_dit.random_state_dict(np.random.default_rng(0), **DIMS)
    np.savez(root / "dit.npz", **sd)
    nan = dict(sd)
    nan["blocks.0.mlp.fc1.weight"] = nan["blocks.0.mlp.fc1.weight"].copy()
    nan["blocks.0.mlp.fc1.weight"][0, 0] = np.nan
    np.savez(root / "nan.npz", **nan)
    np.savez(root / "missing_key.npz", **{k: v for k, v in sd.items() if "fc2" not in k})
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(root / "dit.safetensors"))
    raw = (root / "dit.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (root / "empty.safetensors").write_bytes(b"")
    (root / "garbage.npz").write_bytes(os.urandom(256))
    (root / "dit.pt").write_bytes(b"not a torch file")
    (root / "dit.txt").write_text("weights?")
    flat = dict(sd)
    flat["x_embedder.proj.weight"] = flat["x_embedder.proj.weight"].reshape(32, -1)
    np.savez(root / "flat.npz", **flat)
    os.symlink(root / "loop", root / "loop")
    # a checkpoint whose metadata was edited, and one that is not a checkpoint's json
    checkpoint.save(root / "edited", tiny_params(), TINY)
    meta = json.loads((root / "edited" / "metadata.json").read_text())
    meta["config"]["model"]["num_heads"] = 4
    (root / "edited" / "metadata.json").write_text(json.dumps(meta))
    (root / "badjson").mkdir()
    (root / "badjson" / "metadata.json").write_text("{nope")
    # params of another model: a depth-1 tree under a depth-2 config
    deeper = dataclasses.replace(TINY, model=dataclasses.replace(TINY.model, depth=2))
    checkpoint.save(root / "wrongtree", tiny_params(), deeper)
    # a calibration whose segment table was edited, one with truncated stats
    for name in ("calib_edited", "calib_truncated"):
        assert main(["calibrate", "--checkpoint", str(ck), "--recipe", "minmax",
                     "--per-class", "1", "--rows-per-step", "8",
                     "--out", str(root / name)]) == 0
    meta = json.loads((root / "calib_edited" / "metadata.json").read_text())
    meta["segment_of_step"][0] = 1
    (root / "calib_edited" / "metadata.json").write_text(json.dumps(meta))
    stats = root / "calib_truncated" / "stats.npz"
    stats.write_bytes(stats.read_bytes()[:200])
    # a calibration made from weights that have changed since
    ck2 = root / "ck2"
    checkpoint.save(ck2, tiny_params(), TINY)
    assert main(["calibrate", "--checkpoint", str(ck2), "--recipe", "minmax", "--per-class",
                 "1", "--rows-per-step", "8", "--out", str(root / "calib_stale")]) == 0
    checkpoint.save(ck2, tiny_params(7), TINY, overwrite=True)
    cfgfile = root / "cfg.py"
    cfgfile.write_text("from trdq_jax.config import *\ndef get_config():\n"
                       "    return ExperimentConfig(name='c', model=DiTConfig(input_size=8, "
                       "in_channels=1, patch_size=2, hidden_size=48, depth=1, num_heads=2, "
                       "num_classes=3))\n")
    from trdq_jax.sampling.cfg_plan import preset_plan, save_plan
    save_plan(root / "plan_steps.json", preset_plan("all", TINY.model, 5))
    save_plan(root / "plan_model.json", preset_plan("all", deeper.model, 6))
    save_plan(root / "plan_edited.json", preset_plan("all", TINY.model, 6))
    plan = json.loads((root / "plan_edited.json").read_text())
    plan["layers"][0] = "blocks_9/attn"
    (root / "plan_edited.json").write_text(json.dumps(plan))
    return root


# (case id, argv with {ws}, substring of the one-line error)
CLI_CASES = [
    # convert
    ("convert-missing-input", "convert --input {ws}/none.npz --out {ws}/new", "no checkpoint file"),
    ("convert-empty-safetensors", "convert --input {ws}/empty.safetensors --out {ws}/new",
     "empty.safetensors"),
    ("convert-truncated-safetensors", "convert --input {ws}/truncated.safetensors --out {ws}/new",
     "truncated.safetensors"),
    ("convert-garbage-npz", "convert --input {ws}/garbage.npz --out {ws}/new", "garbage.npz"),
    ("convert-pt-without-torch", "convert --input {ws}/dit.pt --out {ws}/new",
     "pip install 'trdq_jax[torch]'"),
    ("convert-unknown-suffix", "convert --input {ws}/dit.txt --out {ws}/new",
     "expected a .safetensors"),
    ("convert-nan-weights", "convert --input {ws}/nan.npz --num-heads 2 --out {ws}/new",
     "blocks.0.mlp.fc1.weight"),
    ("convert-missing-key", "convert --input {ws}/missing_key.npz --num-heads 2 --out {ws}/new",
     "missing keys"),
    ("convert-out-cwd", "convert --input {ws}/dit.npz --num-heads 2 --out . --overwrite",
     "it is the current directory"),
    ("convert-out-foreign", "convert --input {ws}/dit.npz --num-heads 2 --out {ws}/mine "
     "--overwrite", "not written by trdq_jax"),
    ("convert-out-file", "convert --input {ws}/dit.npz --num-heads 2 --out {ws}/notes.txt "
     "--overwrite", "is a file, expected a directory"),
    ("convert-out-exists", "convert --input {ws}/dit.npz --num-heads 2 --out {ws}/ck",
     "exists (a trdq_jax float checkpoint); pass --overwrite"),
    ("convert-out-other-kind", "convert --input {ws}/dit.npz --num-heads 2 --out {ws}/calib "
     "--overwrite", "is a trdq_jax calibration directory, not a trdq_jax float checkpoint"),
    ("convert-num-heads-0", "convert --input {ws}/dit.npz --num-heads 0 --out {ws}/new",
     "argument --num-heads: expected a positive int"),
    ("convert-out-below-file", "convert --input {ws}/dit.npz --num-heads 2 --out "
     "{ws}/notes.txt/ck", "is a file, not a directory to write into"),
    # sample
    ("sample-unknown-model", "sample --model nope --out {ws}/new", "unknown bundled model 'nope'"),
    ("sample-classifier", "sample --model digits-classifier --out {ws}/new",
     "is a classifier, not a diffusion model"),
    ("sample-missing-checkpoint", "sample --checkpoint {ws}/none --out {ws}/new",
     "--checkpoint: '{ws}/none': no checkpoint directory there"),
    ("sample-quantized-as-float", "sample --checkpoint {ws}/q --out {ws}/new",
     "holds a 'quantized' checkpoint, expected a float one"),
    ("sample-float-as-quantized", "sample --quantized {ws}/ck --out {ws}/new",
     "holds a 'float' checkpoint, expected a quantized one"),
    ("sample-calib-as-quantized", "sample --quantized {ws}/calib --out {ws}/new",
     "not a checkpoint directory (a trdq_jax calibration directory)"),
    ("sample-foreign-checkpoint", "sample --checkpoint {ws}/mine --out {ws}/new",
     "not a checkpoint directory (not written by trdq_jax: no metadata.json)"),
    ("sample-corrupt-metadata", "sample --checkpoint {ws}/badjson --out {ws}/new",
     "corrupt metadata"),
    ("sample-edited-checkpoint", "sample --checkpoint {ws}/edited --out {ws}/new",
     "edited after it was written (changed config.model.num_heads)"),
    ("sample-wrong-tree", "sample --checkpoint {ws}/wrongtree --out {ws}/new",
     "params: expected the parameters of DiTConfig("),
    ("sample-negative-cfg", "sample --checkpoint {ws}/ck --cfg-scale -2 --out {ws}/new",
     "argument --cfg-scale: expected a finite number in [0, 100], got '-2'"),
    ("sample-nan-cfg", "sample --checkpoint {ws}/ck --cfg-scale nan --out {ws}/new",
     "argument --cfg-scale: expected a finite number"),
    ("sample-per-class-0", "sample --checkpoint {ws}/ck --per-class 0 --out {ws}/new",
     "argument --per-class: expected a positive int, got '0'"),
    ("sample-negative-seed", "sample --checkpoint {ws}/ck --seed -1 --out {ws}/new",
     "argument --seed: expected an int in [0, 2**32 - 1]"),
    ("sample-bad-backend", "sample --quantized {ws}/q --backend gpu --out {ws}/new",
     "argument --backend: invalid choice: 'gpu'"),
    ("sample-backend-float", "sample --checkpoint {ws}/ck --backend fake --out {ws}/new",
     "--backend: only applies to --quantized"),
    ("sample-set-model", "sample --checkpoint {ws}/ck --set model.depth=3 --out {ws}/new",
     "model.* fields are fixed by the checkpoint"),
    ("sample-set-steps-quantized", "sample --quantized {ws}/q --set sampler.num_steps=7 "
     "--out {ws}/new", "--set sampler.num_steps: fixed by the quantized checkpoint"),
    ("sample-set-solver-quantized", "sample --quantized {ws}/q --set sampler.solver=ddpm "
     "--out {ws}/new", "--set sampler.solver: fixed by the quantized checkpoint"),
    ("sample-set-bad-value", "sample --checkpoint {ws}/ck --set sampler.num_steps=abc "
     "--out {ws}/new", "--set sampler.num_steps: cannot parse 'abc' as int"),
    ("sample-out-symlink-loop", "sample --checkpoint {ws}/ck --out {ws}/loop",
     "cannot resolve"),
    ("sample-out-inside-output", "sample --checkpoint {ws}/ck --out {ws}/samples/more",
     "is inside '{ws}/samples', a trdq_jax sample directory; outputs do not nest"),
    ("train-export-cwd", "train --config {ws}/cfg.py --workdir {ws}/new --export .",
     "--export: refusing to write over"),
    ("convert-2d-proj", "convert --input {ws}/flat.npz --num-heads 2 --out {ws}/new",
     "--input: state_dict: cannot infer a DiT config: expected x_embedder.proj.weight"),
    ("sample-set-malformed", "sample --checkpoint {ws}/ck --set nope --out {ws}/new",
     "expected section.field=value"),
    ("sample-set-unknown", "sample --checkpoint {ws}/ck --set sampler.nope=1 --out {ws}/new",
     "SamplerConfig has no field 'nope'"),
    ("sample-out-foreign", "sample --checkpoint {ws}/ck --out {ws}/mine --overwrite",
     "not written by trdq_jax"),
    ("sample-out-exists", "sample --checkpoint {ws}/ck --out {ws}/samples",
     "exists (a trdq_jax sample directory); pass --overwrite"),
    ("sample-out-parent", "sample --checkpoint {ws}/ck --out .. --overwrite",
     "a parent of the current directory"),
    ("sample-out-other-kind", "sample --checkpoint {ws}/ck --out {ws}/q --overwrite",
     "is a trdq_jax quantized checkpoint, not a trdq_jax sample directory"),
    # calibrate
    ("calibrate-recipe", "calibrate --checkpoint {ws}/ck --recipe nope --out {ws}/new",
     "argument --recipe: invalid choice: 'nope'"),
    ("calibrate-w-bits", "calibrate --checkpoint {ws}/ck --w-bits 9 --out {ws}/new",
     "argument --w-bits: expected bits in 2..8 (or 16 = float), got '9'"),
    ("calibrate-segments-0", "calibrate --checkpoint {ws}/ck --segments 0 --out {ws}/new",
     "argument --segments: expected a positive int"),
    ("calibrate-segments-too-many", "calibrate --checkpoint {ws}/ck --segments 7 --out {ws}/new",
     "--segments: 7 segments but the sampler has only 6 steps"),
    ("calibrate-rows-0", "calibrate --checkpoint {ws}/ck --rows-per-step 0 --out {ws}/new",
     "argument --rows-per-step: expected a positive int"),
    ("calibrate-out-quantized", "calibrate --checkpoint {ws}/ck --out {ws}/q --overwrite",
     "is a trdq_jax quantized checkpoint, not a trdq_jax calibration directory"),
    ("calibrate-wrong-tree", "calibrate --checkpoint {ws}/wrongtree --out {ws}/new",
     "got a tree that differs: missing (10): blocks_1/"),
    # quantize
    ("quantize-no-source", "quantize --out {ws}/new", "give either --calib DIR or --model"),
    ("quantize-two-sources", "quantize --calib {ws}/calib --model digits-dit --out {ws}/new",
     "give either --calib DIR or --model"),
    ("quantize-missing-calib", "quantize --calib {ws}/none --out {ws}/new",
     "--calib: '{ws}/none': no calibration directory there"),
    ("quantize-foreign-calib", "quantize --calib {ws}/mine --out {ws}/new",
     "not a calibration directory (not written by trdq_jax: no metadata.json)"),
    ("quantize-checkpoint-as-calib", "quantize --calib {ws}/ck --out {ws}/new",
     "not a calibration directory (a trdq_jax float checkpoint)"),
    ("quantize-edited-calib", "quantize --calib {ws}/calib_edited --out {ws}/new",
     "edited after it was written (changed segment_of_step)"),
    ("quantize-truncated-stats", "quantize --calib {ws}/calib_truncated --out {ws}/new",
     "stats.npz' is truncated: the zip archive stops after 200 bytes"),
    ("quantize-calib-segments", "quantize --calib {ws}/calib --segments 2 --out {ws}/new",
     "--segments: fixed by the calibration"),
    ("quantize-calib-set", "quantize --calib {ws}/calib --set sampler.cfg_scale=1 --out {ws}/new",
     "--set: with --calib the config is the calibration's"),
    ("quantize-stale-calib", "quantize --calib {ws}/calib_stale --out {ws}/new",
     "changed since this calibration was made"),
    ("quantize-calib-bits", "quantize --calib {ws}/calib --a-bits 1 --out {ws}/new",
     "argument --a-bits: expected bits in 2..8"),
    ("quantize-out-float", "quantize --calib {ws}/calib --out {ws}/ck --overwrite",
     "is a trdq_jax float checkpoint, not a trdq_jax quantized checkpoint"),
    ("quantize-out-home", "quantize --calib {ws}/calib --out ~ --overwrite", "home directory"),
    # plot-ranges
    ("plot-not-png", "plot-ranges --checkpoint {ws}/ck --out {ws}/ranges.jpg",
     "--out: expected a .png file name"),
    ("plot-foreign-png", "plot-ranges --checkpoint {ws}/ck --out {ws}/user.png --overwrite",
     "not written by trdq_jax, not a trdq_jax figure"),
    ("plot-bad-regex", "plot-ranges --checkpoint {ws}/ck --layers [ --out {ws}/new.png",
     "--layers: invalid regex '['"),
    # eval
    ("eval-unknown-model", "eval --model nope", "unknown bundled model 'nope'"),
    ("eval-not-json", "eval --model digits-classifier --out {ws}/r.txt",
     "--out: expected a .json file name"),
    ("eval-foreign-json", "eval --model digits-classifier --out {ws}/user.json --overwrite",
     "not written by trdq_jax, not a trdq_jax report"),
    ("eval-per-class-0", "eval --per-class 0", "argument --per-class: expected a positive int"),
    # train
    ("train-missing-config", "train --config {ws}/none.py --workdir {ws}/new",
     "--config: no such file"),
    ("train-unknown-field", "train --config {ws}/cfg.py --set model.nope=1 --workdir {ws}/new",
     "DiTConfig has no field 'nope'"),
    ("train-foreign-workdir", "train --config {ws}/cfg.py --workdir {ws}/mine",
     "is not empty and holds no trdq_jax run"),
    ("train-foreign-export", "train --config {ws}/cfg.py --workdir {ws}/new --export {ws}/mine",
     "not written by trdq_jax, not a trdq_jax float checkpoint"),
    ("train-workdir-file", "train --config {ws}/cfg.py --workdir {ws}/notes.txt",
     "exists and is not a directory"),
    # CFG sharing plans
    ("sample-plan-unknown", "sample --checkpoint {ws}/ck --cfg-plan most --out {ws}/new",
     "--cfg-plan: expected a preset ('none', 'all', 'trdq_release') or a plan .json file"),
    ("sample-plan-foreign", "sample --checkpoint {ws}/ck --cfg-plan {ws}/user.json --out {ws}/new",
     "cfg plan kind: expected 'cfg_plan'"),
    ("sample-plan-missing", "sample --checkpoint {ws}/ck --cfg-plan {ws}/none.json --out {ws}/new",
     "cfg plan file: cannot read"),
    ("sample-plan-and-share",
     "sample --checkpoint {ws}/ck --share-cfg --cfg-plan all --out {ws}/new",
     "--cfg-plan: give either --share-cfg"),
    ("sample-plan-steps",
     "sample --checkpoint {ws}/ck --cfg-plan {ws}/plan_steps.json --out {ws}/new",
     "cfg plan num_steps: made for 5 sampling steps, the sampler has 6"),
    ("sample-plan-model",
     "sample --checkpoint {ws}/ck --cfg-plan {ws}/plan_model.json --out {ws}/new",
     "cfg plan model: made for model DiTConfig:"),
    ("sample-plan-edited",
     "sample --checkpoint {ws}/ck --cfg-plan {ws}/plan_edited.json --out {ws}/new",
     "cfg plan layers: expected this model's attention layers; unknown ['blocks_9/attn']"),
    ("quantize-plan-steps",
     "quantize --calib {ws}/calib --cfg-plan {ws}/plan_steps.json --out {ws}/new",
     "cfg plan num_steps: made for 5 sampling steps"),
    ("cfg-analysis-thresholds",
     "cfg-analysis --checkpoint {ws}/ck --thresholds x --out {ws}/new",
     "--thresholds: expected comma-separated share errors"),
    ("cfg-analysis-out-foreign", "cfg-analysis --checkpoint {ws}/ck --out {ws}/mine --overwrite",
     "not written by trdq_jax"),
    ("demo-plan-unknown", "demo --cfg-plan most --out {ws}/new",
     "--cfg-plan: expected a preset ('none', 'all', 'trdq_release') or a plan .json file"),
    # generate
    ("generate-num-samples-0", "generate --checkpoint {ws}/ck --num-samples 0 --out {ws}/new",
     "argument --num-samples: expected a positive int, got '0'"),
    ("generate-labels-range", "generate --checkpoint {ws}/ck --num-samples 4 --labels 0,7 "
     "--out {ws}/new", "--labels: expected values in [0, 3] (3 = unconditional), got [0, 7]"),
    ("generate-labels-words", "generate --checkpoint {ws}/ck --num-samples 4 --labels a,b "
     "--out {ws}/new", "--labels: expected comma-separated class ints, got 'a,b'"),
    ("generate-out-file", "generate --checkpoint {ws}/ck --num-samples 4 --out {ws}/notes.txt",
     "is a file, expected a directory for the generation directory"),
    ("generate-out-below-file", "generate --checkpoint {ws}/ck --num-samples 4 "
     "--out {ws}/notes.txt/g", "is a file, not a directory to write into"),
    ("generate-out-foreign", "generate --checkpoint {ws}/ck --num-samples 4 --out {ws}/mine",
     "not written by trdq_jax"),
    ("generate-out-other-kind", "generate --checkpoint {ws}/ck --num-samples 4 "
     "--out {ws}/samples", "is a trdq_jax sample directory, not a generation directory; refusing to touch it"),
    ("generate-out-inside-output", "generate --checkpoint {ws}/ck --num-samples 4 "
     "--out {ws}/gen/more", "outputs do not nest"),
    ("generate-other-seed", "generate --checkpoint {ws}/ck --num-samples 2 --seed 3 "
     "--out {ws}/gen", "holds another run (differs in seed); use a new directory"),
    ("generate-other-weights", "generate --quantized {ws}/q --num-samples 2 --out {ws}/gen",
     "holds another run (differs in "),
    ("generate-model-parallel", "generate --checkpoint {ws}/ck --num-samples 4 "
     "--model-parallel 3 --out {ws}/new",
     "--model-parallel: expected a divisor of the 1 local devices, got 3"),
    ("generate-two-batch-flags", "generate --checkpoint {ws}/ck --num-samples 4 "
     "--batch-per-device 2 --batch-size 4 --out {ws}/new",
     "argument --batch-size: not allowed with argument --batch-per-device"),
    ("generate-plan-steps", "generate --checkpoint {ws}/ck --num-samples 4 "
     "--share-plan {ws}/plan_steps.json --out {ws}/new",
     "cfg plan num_steps: made for 5 sampling steps"),
    ("generate-backend-float", "generate --checkpoint {ws}/ck --num-samples 4 --backend fake "
     "--out {ws}/new", "--backend: only applies to --quantized"),
    ("generate-coordinator-alone", "generate --checkpoint {ws}/ck --num-samples 4 "
     "--coordinator 127.0.0.1:1 --out {ws}/new", "--coordinator: needs all of"),
    ("generate-process-id-range", "generate --checkpoint {ws}/ck --num-samples 4 "
     "--coordinator 127.0.0.1:1 --num-processes 2 --process-id 2 --out {ws}/new",
     "--process-id: expected 0 .. 1 (--num-processes 2), got 2"),
    ("generate-coordinator-port", "generate --checkpoint {ws}/ck --num-samples 4 "
     "--coordinator somehost --num-processes 2 --process-id 0 --out {ws}/new",
     "--coordinator: expected HOST:PORT, got 'somehost'"),
    ("generate-shrink", "generate --checkpoint {ws}/ck --num-samples 1 --out {ws}/gen",
     "--num-samples: '{ws}/gen' holds a run of 2 samples; 1 would drop samples 1..1, and "
     "shrinking is refused"),
    ("generate-shard-size-0", "generate --checkpoint {ws}/ck --num-samples 4 --shard-size 0 "
     "--out {ws}/new", "argument --shard-size: expected a positive int, got '0'"),
    ("generate-shard-size-other", "generate --checkpoint {ws}/ck --num-samples 2 --shard-size 2 "
     "--out {ws}/gen", "--shard-size: '{ws}/gen' was made with shard_size 64, got 2"),
    ("generate-num-samples-int32", "generate --checkpoint {ws}/ck --num-samples 3000000000 "
     "--out {ws}/new", "--num-samples: expected at most 2**31 = 2147483648 (sample indices are "
     "int32)"),
    ("generate-num-samples-resources", "generate --checkpoint {ws}/ck --num-samples 2147483648 "
     "--out {ws}/new", "2147483648 samples"),  # the host memory, or the disk, it would need
    ("generate-corrupt-metadata", "generate --checkpoint {ws}/ck --num-samples 2 "
     "--out {ws}/gen_corrupt", "metadata.json': corrupt metadata"),
    ("generate-distributed-no-cluster", "generate --checkpoint {ws}/ck --num-samples 2 "
     "--distributed --out {ws}/new", "--distributed: found no cluster to join"),
    # demo
    ("demo-unknown-model", "demo --model nope --out {ws}/new", "unknown bundled model 'nope'"),
    ("demo-out-foreign", "demo --out {ws}/mine --overwrite", "not written by trdq_jax"),
    ("demo-per-class-0", "demo --per-class 0 --out {ws}/new",
     "argument --per-class: expected a positive int"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(ws, argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ws / "cwd")  # '.', '..' and '~' are the user's directories
    monkeypatch.setenv("HOME", str(ws / "home"))
    before = tree_hash(ws)
    code = main([a.format(ws=ws) for a in argv.split()])
    err = capsys.readouterr().err
    command = argv.split()[0]
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("trdq ")]
    assert len(errors) == 1 and err.endswith(errors[0] + "\n"), err  # progress bars may precede
    assert errors[0].startswith(f"trdq {command}: error: "), err
    assert message.format(ws=ws) in err, err
    if command == "generate":  # generate has no --overwrite: its messages never hint at it
        assert "--overwrite" not in err, err
    assert tree_hash(ws) == before  # nothing changed, nothing partial left (hidden files too)


def test_there_are_at_least_60_distinct_cases():
    assert len({c[0] for c in CLI_CASES}) == len(CLI_CASES) >= 60
    assert len({c[1] for c in CLI_CASES}) == len(CLI_CASES)


# ----------------------------------------------------------------------------- library


def _api_cases(ws):
    import trdq_jax.quant as Q
    from trdq_jax.config import ConfigError, DiTConfig, SamplerConfig
    from trdq_jax.models import zoo
    from trdq_jax.models.zoo import load_float_model
    from trdq_jax.quant.pipeline import calibration_labels, named_recipe
    from trdq_jax.sampling.sample_dir import save_sample_dir

    params = tiny_params()
    return [
        ("save-empty-tree", lambda: checkpoint.save(ws / "new", {}, TINY), ValueError,
         "params: the tree holds no arrays"),
        ("save-non-array-leaf", lambda: checkpoint.save(ws / "new", {"a": "text"}, TINY),
         ValueError, "params: expected a pytree of arrays"),
        ("save-bad-kind", lambda: checkpoint.save(ws / "new", params, TINY, kind="mine"),
         ValueError, "kind: expected one of ('float', 'quantized')"),
        ("save-extra-not-json", lambda: checkpoint.save(ws / "new", params, TINY,
                                                       extra={"x": object()}),
         TypeError, "extra: expected JSON-serialisable"),
        ("save-not-a-config", lambda: checkpoint.save(ws / "new", params, {"depth": 1}),
         TypeError, "cfg: expected an ExperimentConfig"),
        ("save-over-foreign", lambda: checkpoint.save(ws / "mine", params, TINY, overwrite=True),
         files.OutputError, "not written by trdq_jax"),
        ("restore-missing", lambda: checkpoint.restore(ws / "none"), checkpoint.CheckpointError,
         "no checkpoint directory there"),
        ("restore-other-config", lambda: checkpoint.restore(
            ws / "ck", dataclasses.replace(TINY.model, depth=3)), checkpoint.CheckpointError,
         "depth: stored 1, expected 3"),
        ("load-quantized-float", lambda: Q.load_quantized(ws / "ck"),
         checkpoint.CheckpointError, "expected a quantized one"),
        ("load-calibration-quantized", lambda: Q.load_calibration(ws / "q"),
         Q.CalibrationError, "not a calibration directory (a trdq_jax quantized checkpoint)"),
        ("load-both-sources", lambda: load_float_model("digits-dit", ws / "ck"), ValueError,
         "model_name, checkpoint_dir: give one, not both"),
        ("zoo-unknown", lambda: zoo.path_of("nope"), ValueError, "unknown bundled model"),
        ("recipe-unknown", lambda: named_recipe("nope"), ValueError, "recipe: unknown 'nope'"),
        ("recipe-bits", lambda: named_recipe("trdq", 9), ValueError, "w_bits: expected bits"),
        ("calib-labels-0", lambda: calibration_labels(3, 0), ValueError,
         "per_class: expected a positive int"),
        ("sample-dir-labels", lambda: save_sample_dir(
            ws / "new", np.zeros((2, 8, 8, 1)), np.zeros(3), cfg=TINY, source="x", grid_rows=[],
            row_labels=[], title="t"), ValueError, "labels: expected shape (2,)"),
        ("sample-dir-nonfinite", lambda: save_sample_dir(
            ws / "new", np.where(np.arange(4)[:, None, None, None] == 2, np.nan,
                                 np.zeros((4, 8, 8, 1))), np.zeros(4, int), cfg=TINY,
            source="x", grid_rows=[], row_labels=[], title="t"), ValueError,
         "samples: 1 of 4 samples are NaN or infinite (indices 2); nothing was written"),
        ("write-dir-cwd", lambda: files.write_dir(".", lambda t: None, kind="samples",
                                                  overwrite=True),
         files.OutputError, "it is the current directory"),
        ("sampler-negative-cfg", lambda: SamplerConfig(cfg_scale=-2.0), ConfigError,
         "cfg_scale"),
        ("dit-mlp-ratio", lambda: DiTConfig(hidden_size=192, num_heads=6, mlp_ratio=0.3),
         ConfigError, "mlp_ratio"),
        ("quantized-model-backend", lambda: Q.load_quantized_model(ws / "q", backend="gpu"),
         ValueError, "backend: expected one of"),
    ]


API_IDS = ["save-empty-tree", "save-non-array-leaf", "save-bad-kind", "save-extra-not-json",
           "save-not-a-config", "save-over-foreign", "restore-missing", "restore-other-config",
           "load-quantized-float", "load-calibration-quantized", "load-both-sources",
           "zoo-unknown", "recipe-unknown", "recipe-bits", "calib-labels-0", "sample-dir-labels",
           "sample-dir-nonfinite",
           "write-dir-cwd", "sampler-negative-cfg", "dit-mlp-ratio", "quantized-model-backend"]


@pytest.mark.parametrize("case", API_IDS)
def test_api_bad_input(ws, case, monkeypatch):
    monkeypatch.chdir(ws / "cwd")
    cases = {c[0]: c[1:] for c in _api_cases(ws)}
    assert set(cases) == set(API_IDS)
    call, error, message = cases[case]
    before = tree_hash(ws)
    with pytest.raises(error) as e:
        call()
    assert message in str(e.value), str(e.value)
    assert tree_hash(ws) == before


def test_workspace_outputs_are_intact_after_everything(ws):
    """The suite's own fixtures still load: no case damaged them."""
    import trdq_jax.quant as Q
    from trdq_jax.sampling.sample_dir import load_sample_dir
    checkpoint.restore(ws / "ck")
    Q.load_calibration(ws / "calib")
    Q.load_quantized(ws / "q")
    samples, labels, _ = load_sample_dir(ws / "samples")
    assert samples.shape == (3, 8, 8, 1) and pathlib.Path(ws / "samples" / "grid.png").is_file()
