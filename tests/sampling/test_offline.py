"""Offline generation: exact resume (other batch sizes, device and process counts, every kill
point, damaged files and edited manifest lines), 1 vs 4 devices, refused runs, bad input."""
import dataclasses
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.test_quant_cli import TINY, tiny_params
from tests.test_files import _mount_tmpfs, mounts, tree_hash  # noqa: F401 (a fixture)
from trdq_jax import checkpoint, files
from trdq_jax.models import build_model
from trdq_jax.sampling import Sampler
from trdq_jax.sampling import generation_dir as gd
from trdq_jax.sampling.generate import generate
from trdq_jax.sampling.offline import (NonFiniteSamplesError, finished_shards, generate_to_dir,
                                       load_generated)

ROOT = pathlib.Path(__file__).resolve().parents[2]
KW = dict(num_samples=7, seed=5, shard_size=2, source="tiny")  # shards 0-1, 2-3, 4-5, 6


class Interrupt(Exception):
    pass


def interrupted(out, after: int, **kw):
    """Run ``generate_to_dir`` and stop it once ``after`` batches have been computed and
    written (the interrupt comes when the next batch starts)."""
    import trdq_jax.sampling as sampling
    calls, real = [], sampling.sample

    def counting(*args, **kwargs):
        if len(calls) == after:
            raise Interrupt
        calls.append(1)
        return real(*args, **kwargs)
    sampling.sample = counting
    try:
        generate_to_dir(out, build_model(TINY.model), tiny_params(), TINY, **kw)
    except Interrupt:
        return True
    finally:
        sampling.sample = real
    return False


def listing(out: pathlib.Path) -> dict:
    """What a finished run holds, file for file (manifests aside: their lines carry the
    writing process): npz arrays, PNG pixels, other files' bytes."""
    got = {}
    for p in sorted(out.rglob("*")):
        name = str(p.relative_to(out))
        if p.is_dir() or name.startswith("manifest-"):
            continue
        if p.suffix == ".npz":
            with np.load(p) as data:
                got[name] = {k: data[k] for k in data.files}
        elif p.suffix == ".png":
            got[name] = np.asarray(Image.open(io.BytesIO(p.read_bytes())), np.int16)
        else:
            got[name] = p.read_bytes()
    return got


def assert_same_files(got: dict, want: dict, exact: bool) -> None:
    """File for file: the same names; shards' labels and indices equal and samples within
    1e-4 (bitwise when ``exact``: the same batch geometry); PNG pixels within one level."""
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        if name.endswith(".npz"):
            for key in ("labels", "indices"):
                assert np.array_equal(got[name][key], value[key]), name
            tol = 0 if exact else 1e-4
            np.testing.assert_allclose(got[name]["samples"], value["samples"], rtol=tol,
                                       atol=tol, err_msg=name)
        elif name.endswith(".png"):
            assert np.abs(got[name] - value).max() <= (0 if exact else 1), name
        else:
            assert got[name] == value, name


def no_hidden(out: pathlib.Path) -> list:
    return [str(p) for p in out.rglob(".*")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (batch 4), its listing, and plain batched sampling."""
    out = tmp_path_factory.mktemp("ref") / "g"
    generate_to_dir(out, build_model(TINY.model), tiny_params(), TINY, batch_size=4, **KW)
    return out, listing(out)


def test_resume_with_another_batch_size_after_every_batch_equals_the_uninterrupted_run(
        tmp_path, reference):
    """Batch sizes {1, 3, 4}, interrupted after each batch, resumed with each batch size: the
    finished directory equals the uninterrupted one file for file, every sample once."""
    ref_dir, want = reference
    model, params = build_model(TINY.model), tiny_params()
    cases = 0
    for first in (1, 3, 4):
        for after in range(1, -(-7 // first)):
            for second in (1, 3, 4):
                out = tmp_path / f"b{first}-{after}-b{second}"
                assert interrupted(out, after, batch_size=first, **KW)
                done = sorted(finished_shards(out))
                assert done == [s for s in (0, 2, 4, 6) if min(s + 2, 7) <= first * after]
                summary = generate_to_dir(out, model, params, TINY, batch_size=second, **KW)
                assert summary["generated"] + summary["skipped"] == 7, summary
                assert summary["redone"] == {} and summary["unreadable_lines"] == 0
                assert_same_files(listing(out), want, exact=first == second == 4)
                assert no_hidden(out) == []
                cases += 1
    assert cases == 27
    samples, labels = load_generated(ref_dir)
    np.testing.assert_allclose(samples, generate(model, params, TINY, np.arange(7) % 3, seed=5),
                               rtol=1e-4, atol=1e-4)


FOUR = """
import sys, numpy as np, jax, pytest
from tests.sampling.test_offline import KW, interrupted, quantized_tiny
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
for name in sys.argv[2:]:  # directories interrupted on one device: finished on four
    generate_to_dir(f"{out}/{name}", model, tiny_params(), TINY, batch_per_device=1, **KW)
assert interrupted(f"{out}/four-1", 1, batch_per_device=1, **KW)  # one device finishes it
print(len(jax.devices()))
"""


def quantized_tiny(model):
    """The tiny DiT at W8A8 (minmax) and its denoiser: the same in every process."""
    import trdq_jax.quant as Q
    from trdq_jax.models import input_shape
    recipe = Q.get_recipe("minmax", 8, 8)
    calib = Q.calibrate(model, tiny_params(), recipe, Sampler.from_config(TINY.sampler),
                        labels=np.arange(3), null_label=3, shape=input_shape(TINY.model, 3),
                        rows_per_step=16)
    return Q.quantize(tiny_params(), calib, recipe), Q.QuantizedDenoiser(model, "xla")


@pytest.mark.slow
def test_four_devices_and_one_give_the_same_samples_and_resume_each_other(tmp_path, reference):
    """4 emulated devices (data 4, and data 2 x model 2) in a subprocess vs this process's one
    device, float and W8A8; runs interrupted on one device count are finished on the other
    and equal the uninterrupted run file for file."""
    ref_dir, want = reference
    for first in (1, 3):  # interrupted here after one batch; the subprocess finishes them
        assert interrupted(tmp_path / "four" / f"one-{first}", 1, batch_size=first, **KW)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    done = subprocess.run([sys.executable, "-c", FOUR, str(tmp_path / "four"), "one-1", "one-3"],
                          env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "4"
    model = build_model(TINY.model)
    for name in ("one-1", "one-3", "four-1"):
        if name.startswith("four"):  # the subprocess interrupted it: finish it here
            generate_to_dir(tmp_path / "four" / name, model, tiny_params(), TINY, batch_size=3,
                            **KW)
        assert_same_files(listing(tmp_path / "four" / name), want, exact=False)
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
    want = generate(model, tiny_params(), TINY, np.arange(10) % 3, seed=5)
    np.testing.assert_allclose(one["float"][0], want, rtol=1e-4, atol=1e-4)


def _cli(args, crash=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("TRDQ_CRASH_AT", None)
    if crash:
        env["TRDQ_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "trdq_jax.cli", "generate", *args], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


# every write point of one shard, each at another shard (shard size 2, 14 samples)
KILLS = ("generate-0-shard-partial", "generate-2-shard-written", "generate-4-image-written",
         "generate-6-written", "generate-8-manifest-partial", "generate-10-done")


@pytest.mark.slow
def test_a_kill_at_every_write_point_resumes_to_exactly_the_uninterrupted_output(tmp_path):
    ck = tmp_path / "ck"
    checkpoint.save(ck, tiny_params(), TINY)
    args = ["--checkpoint", str(ck), "--num-samples", "14", "--batch-size", "2",
            "--shard-size", "2"]
    assert _cli([*args, "--out", str(tmp_path / "whole")]).returncode == 0
    out = tmp_path / "resumed"
    for k, crash in enumerate(KILLS):  # each run resumes the last one and is killed in turn
        killed = _cli([*args, "--out", str(out)], crash)
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert sorted(finished_shards(out)) == list(range(0, 2 * k, 2)) + (
            [10] if crash.endswith("done") else [])
        hidden = no_hidden(out)
        assert bool(hidden) == crash.endswith("shard-partial"), hidden  # a dead writer's temporary
    resumed = _cli([*args, "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["generated"] == 2 and summary["skipped"] == 12, summary
    assert no_hidden(out) == []  # the temporaries of the killed writers were removed
    assert_same_files(listing(out), listing(tmp_path / "whole"), exact=True)
    assert tree_hash(out / "images") == tree_hash(tmp_path / "whole" / "images")  # bytes too
    entries = [json.loads(line) for line in (out / "manifest-0.jsonl").read_text().splitlines()
               if line.endswith("}")]
    assert sorted(e["start"] for e in entries) == list(range(0, 14, 2))  # no shard twice


def test_stale_temporaries_are_removed_only_for_dead_writers_of_this_host(tmp_path):
    import fcntl
    shards = tmp_path / gd.SHARDS
    shards.mkdir()
    (tmp_path / gd.IMAGES).mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    names = {"dead": f".00000000.npz.trdq-tmp.{dead}.{gd.host()}",
             "other_host": f".00000002.npz.trdq-tmp.{dead}.elsewhere",
             "live": f".00000004.npz.trdq-tmp.{os.getpid()}.{gd.host()}"}
    for name in names.values():
        (shards / name).write_bytes(b"partial")
    held = os.open(shards / names["live"], os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # a writer at work
    try:
        assert gd.clean_stale_temporaries(tmp_path) == [f"shards/{names['dead']}"]
    finally:
        os.close(held)
    assert sorted(os.listdir(shards)) == sorted([names["other_host"], names["live"]])


@pytest.fixture
def finished(tmp_path, reference):
    """A copy of the reference run to damage."""
    import shutil
    out = tmp_path / "g"
    shutil.copytree(reference[0], out)
    return out


def _edit_line(out, start, change, rehash):
    manifest = out / "manifest-0.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for entry in lines:
        if entry["start"] == start:
            change(entry)
            if rehash:
                entry["entry_sha256"] = gd._entry_digest(entry)
    manifest.write_text("".join(json.dumps(e) + "\n" for e in lines))


def _set_label(entry):
    entry["samples"][0]["label"] = (entry["samples"][0]["label"] + 1) % 3


def _other_shard(out):
    """Shard 2 overwritten by shard 0's bytes, its line's digests updated to match."""
    data = (out / "shards/00000000.npz").read_bytes()
    (out / "shards/00000002.npz").write_bytes(data)
    _edit_line(out, 2, lambda e: e.update(sha256=gd._digest(data), bytes=len(data)), True)


DAMAGE = {  # what is done to the finished run -> the cause "redone" names
    "truncated shard": (lambda out: (out / "shards/00000002.npz").write_bytes(
        (out / "shards/00000002.npz").read_bytes()[:100]), "truncated (100 of"),
    "deleted shard": (lambda out: (out / "shards/00000002.npz").unlink(), "is missing"),
    "truncated png": (lambda out: (out / "images/00000003.png").write_bytes(
        (out / "images/00000003.png").read_bytes()[:40]), "images/00000003.png is truncated"),
    "deleted png": (lambda out: (out / "images/00000003.png").unlink(),
                    "images/00000003.png is missing"),
    "edited png": (lambda out: (out / "images/00000003.png").write_bytes(gd.png_bytes(
        np.zeros((8, 8, 1), np.uint8))), "images/00000003.png"),
    "edited line": (lambda out: _edit_line(out, 2, _set_label, False), "line was edited"),
    "edited line, rehashed": (lambda out: _edit_line(out, 2, _set_label, True),
                              "record of sample 2 does not match the run"),
    "other shard, rehashed": (_other_shard, "holds other indices or labels"),
    "line off the grid, rehashed": (lambda out: _edit_line(
        out, 2, lambda e: e.update(stop=3), True), "names samples 2..2, not the shard's 2..3"),
    "torn line": (lambda out: (out / "manifest-0.jsonl").write_text(
        "\n".join((out / "manifest-0.jsonl").read_text().splitlines()[:1]
                  + [(out / "manifest-0.jsonl").read_text().splitlines()[1][:30]]) + "\n"
        + "\n".join((out / "manifest-0.jsonl").read_text().splitlines()[2:]) + "\n"), None),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_files_and_edited_manifest_lines_are_detected_and_redone(finished, reference,
                                                                         damage):
    make, cause = DAMAGE[damage]
    make(finished)
    with pytest.raises(ValueError, match="lacks samples 2..3.*resume the run to finish it"):
        load_generated(finished)  # an unfinished directory never loads
    summary = generate_to_dir(finished, build_model(TINY.model), tiny_params(), TINY,
                              batch_size=4, **KW)
    assert summary["generated"] == 2 and summary["skipped"] == 5, summary
    if cause is None:  # a torn line names no shard: it is counted
        assert summary["unreadable_lines"] == 1 and summary["redone"] == {}
    else:
        assert list(summary["redone"]) == ["shards/00000002.npz"]
        assert cause in summary["redone"]["shards/00000002.npz"], summary["redone"]
    assert_same_files(listing(finished), reference[1], exact=False)
    load_generated(finished)


def test_nonfinite_samples_stop_the_run_naming_them_or_are_recorded(tmp_path):
    model, params = build_model(TINY.model), tiny_params()
    apply_fn = NanForLabel(model, 1)
    with pytest.raises(NonFiniteSamplesError, match=r"^samples 1 came out NaN or infinite; "
                                                    "their shard shards/00000000.npz was not "
                                                    "written"):
        generate_to_dir(tmp_path / "g", model, params, TINY, apply_fn=apply_fn, batch_size=7,
                        **KW)
    assert finished_shards(tmp_path / "g") == {}
    summary = generate_to_dir(tmp_path / "g", model, params, TINY, apply_fn=apply_fn,
                              batch_size=7, allow_nonfinite=True, **KW)
    assert summary["nonfinite"] == [1, 4] and summary["generated"] == 7
    lines = [json.loads(line) for line in (tmp_path / "g" / "manifest-0.jsonl").read_text()
             .splitlines()]
    assert {e["start"]: e.get("nonfinite") for e in lines} == {0: [1], 2: None, 4: [4],
                                                               6: None}
    samples, _ = load_generated(tmp_path / "g")
    assert np.isnan(samples[[1, 4]]).all() and np.isfinite(np.delete(samples, [1, 4], 0)).all()


@dataclasses.dataclass(frozen=True)
class NanForLabel:
    """A denoiser whose conditional output is NaN for one label (a broken model)."""

    model: object
    label: int

    def __call__(self, params, x, t, y, segment, share_cfg):
        import jax.numpy as jnp
        out = self.model.apply({"params": params}, x, t, y, share_cfg=share_cfg)
        return jnp.where((y == self.label)[:, None, None, None], jnp.nan, out)


def test_other_runs_and_damaged_directories_are_refused_naming_the_cause(tmp_path):
    model, params = build_model(TINY.model), tiny_params()
    out = tmp_path / "g"
    kw = dict(num_samples=4, batch_per_device=2, source="tiny")
    generate_to_dir(out, model, params, TINY, **kw)
    before = tree_hash(out)
    for change, field in ((dict(seed=1), "seed"),  # (more samples grow it: a test below)
                          (dict(labels=[2, 2, 2, 2]), "labels_sha256"),
                          (dict(source="other"), "source"),
                          (dict(params=tiny_params(7)), "params_sha256"),
                          (dict(sampler=Sampler.from_config(dataclasses.replace(
                              TINY.sampler, num_steps=3))), "sampler")):
        args = {**kw, "params": params, **change}
        with pytest.raises(ValueError, match=f"holds another run \\(differs in {field}\\)"):
            generate_to_dir(out, model, cfg=TINY, **args)
    with pytest.raises(ValueError, match="^shard_size: .* was made with shard_size 64, got 2; "
                                         "leave it out"):
        generate_to_dir(out, model, params, TINY, shard_size=2, **kw)
    assert tree_hash(out) == before
    for bad, message in ((dict(num_samples=0), "^num_samples: expected a positive int"),
                         (dict(num_samples=2 ** 31 + 1), r"^num_samples: expected at most 2\*\*31"),
                         (dict(labels=[0, 1, 9, 0]), r"^labels: expected values in \[0, 3\]"),
                         (dict(labels=[0, 1]), "^labels: expected 4 integer labels"),
                         (dict(batch_per_device=0), "^batch_per_device: expected a positive"),
                         (dict(shard_size=0), "^shard_size: expected a positive int")):
        with pytest.raises(ValueError, match=message):
            generate_to_dir(tmp_path / "new", model, params, TINY, **{**kw, **bad})
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="holds files not written by trdq_jax; refusing"):
        generate_to_dir(tmp_path / "mine", model, params, TINY, num_samples=4, source="tiny")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
    (tmp_path / "empty").mkdir()  # an empty directory holds nothing to lose: used
    generate_to_dir(tmp_path / "empty", model, params, TINY, **kw)
    import shutil
    for name, damage, message in (
            ("corrupt", lambda d: (d / "metadata.json").write_text("{nope"),
             "metadata.json' is not valid JSON|corrupt metadata"),
            ("edited", _edit_seed, "edited after it was written \\(changed run.seed\\)"),
            ("labels", lambda d: (d / "labels.npy").write_bytes(b"\x93NUMPY"),
             "labels.npy': missing or truncated"),
            ("old", lambda d: (d / "metadata.json").write_text(json.dumps(
                {"format": "trdq_jax.generation/1", "kind": "generation", "run": {}})),
             "format 'trdq_jax.generation/1', expected 'trdq_jax.generation/2'")):
        damaged = tmp_path / name
        shutil.copytree(out, damaged)
        damage(damaged)
        before = tree_hash(damaged)
        with pytest.raises(files.OutputError, match=f"({message}).*cannot be used: move it "
                                                    "aside and generate into a new one"):
            generate_to_dir(damaged, model, params, TINY, **kw)
        with pytest.raises(ValueError, match=message):
            load_generated(damaged)
        assert tree_hash(damaged) == before


def _edit_seed(directory):
    meta = json.loads((directory / "metadata.json").read_text())
    meta["run"]["seed"] = 3
    (directory / "metadata.json").write_text(json.dumps(meta))


def test_a_full_disk_stops_the_run_resumably(tmp_path, mounts):
    """A real full disk (a tmpfs that another writer fills once the first shard is done): the
    run stops naming the file, keeps what finished, refuses a read-only remount before any
    work, and resumes to the uninterrupted output once there is room."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=1m")
    mounts.append(disk)
    model, params = build_model(TINY.model), tiny_params()
    kw = dict(num_samples=16, batch_per_device=2, seed=2, shard_size=2, source="tiny")

    def fill(entry):  # someone else takes the disk, all but a few blocks
        if entry["start"] == 0:
            stat = os.statvfs(disk)
            (disk / "filler").write_bytes(b"x" * (stat.f_bavail * stat.f_frsize - 20_000))
    with pytest.raises(OSError, match=r"^out: cannot write '.*/g/(shards|images|manifest)[^']*':"
                                      r" No space left on device; the shards finished so far "
                                      "are kept"):
        generate_to_dir(disk / "g", model, params, TINY, on_shard=fill, **kw)
    kept = sorted(finished_shards(disk / "g"))
    assert 0 < len(kept) < 8 and no_hidden(disk / "g") == []  # no temporary left
    (disk / "filler").unlink()
    before = tree_hash(disk)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    with pytest.raises(files.OutputError, match="is not writable"):
        generate_to_dir(disk / "g", model, params, TINY, **kw)
    subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    assert tree_hash(disk) == before
    resumed = generate_to_dir(disk / "g", model, params, TINY, **kw)
    assert resumed["generated"] == 16 - 2 * len(kept) and resumed["skipped"] == 2 * len(kept)
    generate_to_dir(tmp_path / "whole", model, params, TINY, **kw)
    assert_same_files(listing(disk / "g"), listing(tmp_path / "whole"), exact=True)
    entries = [json.loads(line) for line in (disk / "g" / "manifest-0.jsonl").read_text()
               .splitlines() if line.endswith("}")]
    assert sorted(e["start"] for e in entries) == list(range(0, 16, 2))
    assert {(s["index"], s["label"], s["seed"], s["file"]) for e in entries
            for s in e["samples"]} == {(i, i % 3, 2, f"images/{i:08d}.png") for i in range(16)}


def test_a_run_larger_than_the_free_disk_is_refused_before_writing(tmp_path, mounts):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=64k")
    mounts.append(disk)
    model, params = build_model(TINY.model), tiny_params()
    with pytest.raises(OSError, match=r"^out: cannot write '.*/g': No space left on device: "
                                      r"1000 samples of shape \[8, 8, 1\] need about .* free "
                                      r"on .* \(nothing was written\)$"):
        generate_to_dir(disk / "g", model, params, TINY, num_samples=1000, source="tiny")
    assert os.listdir(disk) == []


@pytest.mark.slow
def test_processes_resume_what_another_process_count_left(tmp_path):
    """One process killed mid-run, finished by two processes; two processes' run with a lost
    shard and PNG, finished by one: both equal the one-process uninterrupted run."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    ck = tmp_path / "ck"
    checkpoint.save(ck, tiny_params(), TINY)
    args = ["--checkpoint", str(ck), "--num-samples", "10", "--seed", "5",
            "--batch-per-device", "2", "--shard-size", "2"]
    assert _cli([*args, "--out", str(tmp_path / "one")]).returncode == 0
    want = listing(tmp_path / "one")
    assert _cli([*args, "--out", str(tmp_path / "a")], "generate-4-done").returncode == -9

    def two(out):
        procs = [subprocess.Popen([sys.executable, "-m", "trdq_jax.cli", "generate", *args,
                                   "--out", str(out), "--coordinator", f"127.0.0.1:{port}",
                                   "--num-processes", "2", "--process-id", str(p)], env=env,
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for p in (0, 1)]
        results = [p.communicate(timeout=600) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
        return [json.loads(r[0].strip().splitlines()[-1]) for r in results], results
    summaries, results = two(tmp_path / "a")  # shards 0, 4, 8 / 2, 6; 0, 2, 4 were done
    assert [(s["generated"], s["skipped"]) for s in summaries] == [(2, 4), (2, 2)]
    assert "generate" in results[0][1] and "generate" not in results[1][1]  # one progress bar
    assert_same_files(listing(tmp_path / "a"), want, exact=True)
    summaries, _ = two(tmp_path / "b")
    assert [s["generated"] for s in summaries] == [6, 4]
    starts = [sorted(json.loads(line)["start"] for line in (tmp_path / "b" / f"manifest-{p}.jsonl")
                     .read_text().splitlines()) for p in (0, 1)]
    assert starts == [[0, 4, 8], [2, 6]]
    (tmp_path / "b" / "shards" / "00000006.npz").unlink()
    (tmp_path / "b" / "images" / "00000009.png").unlink()
    resumed = _cli([*args, "--out", str(tmp_path / "b")])
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert (summary["generated"], sorted(summary["redone"])) == (
        4, ["shards/00000006.npz", "shards/00000008.npz"])
    assert "redid 2 shard(s)" in resumed.stderr
    assert_same_files(listing(tmp_path / "b"), want, exact=True)


def test_a_run_grows_keeping_its_samples_and_never_shrinks(tmp_path):
    """num_samples may grow on a finished (or unfinished) directory when nothing else changes:
    the files of samples 0..N-1 stay byte for byte, the new ones are added on their own grid;
    shrinking, or growing with other labels for the existing samples, is refused."""
    model, params, out = build_model(TINY.model), tiny_params(), tmp_path / "g"
    kw = dict(seed=5, shard_size=2, batch_size=3, source="tiny")
    generate_to_dir(out, model, params, TINY, num_samples=5, **kw)
    before = tree_hash(out / "shards") | tree_hash(out / "images")
    for bad, message in ((dict(num_samples=3), "^num_samples: .* holds a run of 5 samples; 3 "
                                               r"would drop samples 3..4, and shrinking is "
                                               "refused"),
                         (dict(num_samples=9, labels=[2] * 9), r"holds another run \(the "
                                                               "conditioning of its first 5")):
        with pytest.raises(ValueError, match=message):
            generate_to_dir(out, model, params, TINY, **{**kw, **bad})
    grown = generate_to_dir(out, model, params, TINY, num_samples=9, **kw)
    assert (grown["generated"], grown["skipped"], grown["extents"]) == (4, 5, [5, 9])
    after = tree_hash(out / "shards") | tree_hash(out / "images")
    assert {k: v for k, v in after.items() if k in before} == before  # untouched
    assert sorted(finished_shards(out)) == [0, 2, 4, 5, 7]  # the new extent's own grid
    samples, labels = load_generated(out)
    np.testing.assert_array_equal(labels, np.arange(9) % 3)
    np.testing.assert_allclose(samples, generate(model, params, TINY, labels, seed=5),
                               rtol=1e-4, atol=1e-4)
    assert not (out / "labels.npy").exists() and (out / "labels-9.npy").is_file()
    again = generate_to_dir(out, model, params, TINY, num_samples=9, **kw)  # resumes as usual
    assert (again["generated"], again["skipped"]) == (0, 9)
