"""Offline generation: 1 vs 4 devices, kill and resume, refused runs, bad input."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.test_quant_cli import TINY, tiny_params
from tests.test_files import _mount_tmpfs, mounts, tree_hash  # noqa: F401 (a fixture)
from trdq_jax import checkpoint, files
from trdq_jax.models import build_model
from trdq_jax.sampling import Sampler
from trdq_jax.sampling.generate import generate
from trdq_jax.sampling.offline import finished_batches, generate_to_dir, load_generated

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, numpy as np, jax, pytest
from tests.sampling.test_offline import quantized_tiny
from tests.test_quant_cli import TINY, tiny_params
from trdq_jax.models import build_model
from trdq_jax.sampling.offline import generate_to_dir
out, model = sys.argv[1], build_model(TINY.model)
kw = dict(num_samples=10, seed=5, source="tiny")
generate_to_dir(f"{out}/float", model, tiny_params(), TINY, batch_per_device=2, **kw)
got = generate_to_dir(f"{out}/float_model2", model, tiny_params(), TINY, batch_size=4,
                      model_parallel=2, **kw)
assert got["mesh"] == {"data": 2, "model": 2}, got
qparams, fn = quantized_tiny(model)
generate_to_dir(f"{out}/w8a8", model, qparams, TINY, batch_per_device=2, apply_fn=fn, **kw)
with pytest.raises(ValueError, match="batch_size: expected a multiple of the data axis size 4"):
    generate_to_dir(f"{out}/bad", model, tiny_params(), TINY, batch_size=6, **kw)
print(len(jax.devices()))
"""


def quantized_tiny(model):
    """The tiny DiT at W8A8 (minmax) and its denoiser: the same in every process."""
    import trdq_jax.quant as Q
    from trdq_jax.models import input_shape
    from trdq_jax.sampling import Sampler
    recipe = Q.get_recipe("minmax", 8, 8)
    calib = Q.calibrate(model, tiny_params(), recipe, Sampler.from_config(TINY.sampler),
                        labels=np.arange(3), null_label=3, shape=input_shape(TINY.model, 3),
                        rows_per_step=16)
    return Q.quantize(tiny_params(), calib, recipe), Q.QuantizedDenoiser(model, "xla")


@pytest.mark.slow
def test_four_devices_and_one_give_the_same_samples(tmp_path):
    """4 emulated devices (data 4, and data 2 x model 2) in a subprocess vs this process's one
    device, for the float and a W8A8 model."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "four")], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "4"
    model = build_model(TINY.model)
    qparams, fn = quantized_tiny(model)
    kw = dict(num_samples=10, seed=5, batch_per_device=2, source="tiny")
    generate_to_dir(tmp_path / "one" / "float", model, tiny_params(), TINY, **kw)
    generate_to_dir(tmp_path / "one" / "w8a8", model, qparams, TINY, apply_fn=fn, **kw)
    one = {n: load_generated(tmp_path / "one" / n) for n in ("float", "w8a8")}
    for name, ref in (("float", "float"), ("float_model2", "float"), ("w8a8", "w8a8")):
        samples, labels = load_generated(tmp_path / "four" / name)
        assert samples.shape == (10, 8, 8, 1) and (labels == one[ref][1]).all()
        np.testing.assert_allclose(samples, one[ref][0], rtol=1e-4, atol=1e-4, err_msg=name)
    assert np.abs(one["float"][0] - one["w8a8"][0]).max() > 1e-4  # two different models
    # and both equal plain batched sampling of the same labels and seed
    want = generate(model, tiny_params(), TINY, np.arange(10) % 3, seed=5)
    np.testing.assert_allclose(one["float"][0], want, rtol=1e-4, atol=1e-4)


def _cli(args, crash=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("TRDQ_CRASH_AT", None)
    if crash:
        env["TRDQ_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "trdq_jax.cli", "generate", *args], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def _listing(out: pathlib.Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.startswith("manifest")}


@pytest.mark.slow
def test_killed_runs_resume_to_exactly_the_uninterrupted_output(tmp_path):
    ck = tmp_path / "ck"
    checkpoint.save(ck, tiny_params(), TINY)
    args = ["--checkpoint", str(ck), "--num-samples", "7", "--batch-per-device", "2"]
    assert _cli([*args, "--out", str(tmp_path / "whole")]).returncode == 0
    out = tmp_path / "resumed"
    for crash in ("generate-2-done", "generate-4-written"):
        killed = _cli([*args, "--out", str(out)], crash)
        assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(finished_batches(out)) == [0, 2]  # batch 4 was killed before its line
    resumed = _cli([*args, "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["generated"] == 3
    assert _listing(out) == _listing(tmp_path / "whole")  # the same files, byte for byte
    entries = [json.loads(line) for line in (out / "manifest-0.jsonl").read_text().splitlines()]
    assert sorted(e["start"] for e in entries) == [0, 2, 4, 6]  # no batch twice
    assert not [p for p in out.rglob(".*")]  # no temporary left behind


def test_a_torn_manifest_line_is_redone_and_other_runs_are_refused(tmp_path):
    model, params = build_model(TINY.model), tiny_params()
    out = tmp_path / "g"
    first = generate_to_dir(out, model, params, TINY, num_samples=4, batch_per_device=2,
                            source="tiny")
    assert first["generated"] == 4
    manifest = out / "manifest-0.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text(lines[0] + "\n" + lines[1][:20])  # a kill in the middle of an append
    again = generate_to_dir(out, model, params, TINY, num_samples=4, batch_per_device=2,
                            source="tiny")
    assert again["generated"] == 2 and again["skipped"] == 2
    samples, labels = load_generated(out)
    np.testing.assert_allclose(samples, generate(model, params, TINY, labels, seed=0),
                               rtol=1e-4, atol=1e-4)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for change, field in ((dict(seed=1), "seed"), (dict(num_samples=5), "labels_sha256, num_samples"),
                          (dict(labels=[2, 2, 2, 2]), "labels_sha256"),
                          (dict(source="other"), "source"),
                          (dict(params=tiny_params(7)), "params_sha256"),
                          (dict(sampler=Sampler.from_config(dataclasses.replace(
                              TINY.sampler, num_steps=3))), "sampler")):
        kw = {**dict(num_samples=4, batch_per_device=2, source="tiny", params=params), **change}
        with pytest.raises(ValueError, match=f"holds another run \\(differs in {field}\\)"):
            generate_to_dir(out, model, cfg=TINY, **kw)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    for bad, message in ((dict(num_samples=0), "^num_samples: expected a positive int"),
                         (dict(labels=[0, 1, 9, 0]), r"^labels: expected values in \[0, 3\]"),
                         (dict(labels=[0, 1]), "^labels: expected 4 integer labels"),
                         (dict(batch_per_device=0), "^batch_per_device: expected a positive")):
        kw = dict(num_samples=4, batch_per_device=2, source="tiny")
        kw.update(bad)
        with pytest.raises(ValueError, match=message):
            generate_to_dir(tmp_path / "new", model, params, TINY, **kw)
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not written by trdq_jax"):
        generate_to_dir(tmp_path / "mine", model, params, TINY, num_samples=4, source="tiny")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"


def test_an_interrupt_from_on_batch_keeps_the_finished_batches_and_resumes(tmp_path):
    model, params, out = build_model(TINY.model), tiny_params(), tmp_path / "g"
    seen = []

    def interrupt(entry):  # what pressing "interrupt" in a notebook raises between batches
        seen.append(entry["start"])
        if len(seen) == 2:
            raise KeyboardInterrupt
    kw = dict(num_samples=6, batch_per_device=2, seed=3, source="tiny")
    with pytest.raises(KeyboardInterrupt):
        generate_to_dir(out, model, params, TINY, on_batch=interrupt, **kw)
    assert seen == [0, 2] and sorted(finished_batches(out)) == [0, 2]
    again = generate_to_dir(out, model, params, TINY, on_batch=interrupt, **kw)
    assert (again["generated"], again["skipped"], seen) == (2, 4, [0, 2, 4])
    samples, labels = load_generated(out)
    np.testing.assert_allclose(samples, generate(model, params, TINY, labels, seed=3),
                               rtol=1e-4, atol=1e-4)


def test_a_full_disk_stops_the_run_resumably(tmp_path, mounts):
    """A real full disk (a 40 KiB tmpfs): the run stops naming the file, keeps what finished,
    refuses a read-only remount before any work, and resumes to the uninterrupted output."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=40k")
    mounts.append(disk)
    model, params = build_model(TINY.model), tiny_params()
    kw = dict(num_samples=8, batch_per_device=1, seed=2, source="tiny")
    with pytest.raises(OSError, match=r"^out: cannot write '.*/g/(shards|images|manifest)[^']*':"
                                      r" No space left on device; the batches finished so far "
                                      "are kept"):
        generate_to_dir(disk / "g", model, params, TINY, **kw)
    kept = sorted(finished_batches(disk / "g"))
    assert 0 < len(kept) < 8 and not list((disk / "g").rglob(".*"))  # no temporary left
    before = tree_hash(disk)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    with pytest.raises(files.OutputError, match="is not writable"):
        generate_to_dir(disk / "g", model, params, TINY, **kw)
    subprocess.run(["mount", "-o", "remount,rw,size=1m", str(disk)], check=True)
    assert tree_hash(disk) == before
    resumed = generate_to_dir(disk / "g", model, params, TINY, **kw)
    assert resumed["generated"] == 8 - len(kept) and resumed["skipped"] == len(kept)
    generate_to_dir(tmp_path / "whole", model, params, TINY, **kw)
    assert _listing(disk / "g") == _listing(tmp_path / "whole")
    entries = [json.loads(line) for line in (disk / "g" / "manifest-0.jsonl").read_text()
               .splitlines() if line.endswith("}")]
    assert sorted(e["start"] for e in entries) == list(range(8))
    assert [s["index"] for e in entries for s in e["samples"]] == sorted(
        s["index"] for e in entries for s in e["samples"])
    assert {(s["label"], s["seed"], s["file"]) for e in entries for s in e["samples"]} == {
        (i % 3, 2, f"images/{i:08d}.png") for i in range(8)}


@pytest.mark.slow
def test_two_processes_write_disjoint_halves_of_the_single_process_output(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    ck, out = tmp_path / "ck", tmp_path / "two"
    checkpoint.save(ck, tiny_params(), TINY)
    procs = [subprocess.Popen([sys.executable, "-m", "trdq_jax.cli", "generate", "--checkpoint",
                               str(ck), "--num-samples", "10", "--seed", "5",
                               "--batch-per-device", "2", "--out", str(out), "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
                               str(p)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in (0, 1)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    summaries = [json.loads(r[0].strip().splitlines()[-1]) for r in results]
    assert [s["generated"] for s in summaries] == [6, 4]  # batches 0, 2, 4 / 1, 3
    assert [s["processes"] for s in summaries] == [2, 2]
    assert "generate" in results[0][1] and "generate" not in results[1][1]  # one progress bar
    starts = [sorted(json.loads(line)["start"] for line in
                     (out / f"manifest-{p}.jsonl").read_text().splitlines()) for p in (0, 1)]
    assert starts == [[0, 4, 8], [2, 6]]
    samples, labels = load_generated(out)
    model = build_model(TINY.model)
    generate_to_dir(tmp_path / "one", model, tiny_params(), TINY, num_samples=10, seed=5,
                    batch_per_device=2, source="tiny")
    one, one_labels = load_generated(tmp_path / "one")
    assert (labels == one_labels).all()
    np.testing.assert_allclose(samples, one, rtol=1e-5, atol=1e-5)
