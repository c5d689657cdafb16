"""SIGKILL ``trdq calibrate``, ``trdq quantize`` and ``trdq sample`` during their writes: the
target is afterwards the complete old output or the complete new one, and the next run works.

Each command first writes an "old" output, then reruns with other settings (the "new" output)
and ``--overwrite``, killed at a named point of the write (``TRDQ_CRASH_AT``, the hook in
``trdq_jax.files.crash_point``): after the arrays are written, after the whole temporary is
written, and after the swap into place. Read-only and full file systems are covered too.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import trdq_jax.quant as Q
from trdq_jax import checkpoint
from trdq_jax.cli import main as _main
from trdq_jax.sampling.sample_dir import load_sample_dir
from tests.test_files import _mount_tmpfs, mounts  # noqa: F401 (fixture)
from tests.test_quant_cli import TINY, tiny_params

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

POINTS = ("arrays-written", "written", "exchanged")


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    path = tmp_path_factory.mktemp("crash") / "ck"
    checkpoint.save(path, tiny_params(), TINY)
    return path


def main(argv):
    return _main([str(a) for a in argv])


def _cli(argv, crash_at=None):
    env = {**os.environ, "TRDQ_CRASH_AT": crash_at or "", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "trdq_jax.cli", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=600)


def _calibrate_argv(ck, out, seed):
    return ["calibrate", "--checkpoint", ck, "--recipe", "minmax", "--per-class", "1",
            "--rows-per-step", "8", "--seed", seed, "--out", out]


def _state(kind, out):
    """What identifies the output: restorable as a whole, and which run wrote it."""
    if kind == "calibrate":
        _, _, _, meta = Q.load_calibration(out)
        return meta["seed"]
    if kind == "quantize":
        _, _, recipe, _ = Q.load_quantized(out)
        return recipe.w_bits
    _, _, meta = load_sample_dir(out)
    return meta["seed"]


def _argv(kind, ck, calib, out, new: bool):
    if kind == "calibrate":
        return _calibrate_argv(ck, out, 2000 if new else 1000)
    if kind == "quantize":
        return ["quantize", "--calib", calib, "--w-bits", 4 if new else 8, "--out", out]
    return ["sample", "--checkpoint", ck, "--per-class", "1", "--seed", 5 if new else 0,
            "--out", out]


@pytest.mark.parametrize("kind", ["calibrate", "quantize", "sample"])
def test_sigkill_during_the_write(kind, ck, tmp_path, capsys):
    calib, out = tmp_path / "calib", tmp_path / "out"
    if kind == "quantize":
        assert main(_calibrate_argv(ck, calib, 1000)) == 0
    assert main(_argv(kind, ck, calib, out, new=False)) == 0  # the old output, in process
    old, new = _state(kind, out), None
    for point in POINTS:
        proc = _cli(_argv(kind, ck, calib, out, new=True) + ["--overwrite"], crash_at=point)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        state = _state(kind, out)  # complete (its manifest checks) ...
        new = state if point == "exchanged" else new
        assert state == (new if point == "exchanged" else old)  # ... and old until the swap
        assert state != old or point != "exchanged"
    proc = _cli(_argv(kind, ck, calib, out, new=False) + ["--overwrite"])  # the next run works
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _state(kind, out) == old
    leftovers = sorted(p for p in os.listdir(tmp_path) if p not in ("calib", "out"))
    assert leftovers == []  # stale temporaries of the killed runs were cleaned
    capsys.readouterr()


def test_sigkill_at_a_random_moment_of_sample(ck, tmp_path):
    """No hook: kill ``trdq sample`` as soon as its temporary directory appears."""
    out = tmp_path / "out"
    assert main(_argv("sample", ck, None, out, new=False)) == 0
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "trdq_jax.cli",
                             *map(str, _argv("sample", ck, None, out, new=True)), "--overwrite"],
                            env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(".trdq-tmp." in p for p in os.listdir(tmp_path)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    proc.wait()
    assert _state("sample", out) in (0, 5)
    assert main(_argv("sample", ck, None, out, new=True) + ["--overwrite"]) == 0
    assert _state("sample", out) == 5 and sorted(os.listdir(tmp_path)) == ["out"]


def test_read_only_target_fails_within_seconds(ck, tmp_path, mounts, capsys):  # noqa: F811
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "ro,size=1m")
    mounts.append(ro)
    for argv in (["quantize", "--checkpoint", ck, "--recipe", "minmax", "--out", ro / "q"],
                 ["sample", "--checkpoint", ck, "--per-class", "1", "--out", ro / "s"],
                 ["calibrate", "--checkpoint", ck, "--out", ro / "c"]):
        t0 = time.perf_counter()
        assert main(argv) == 2
        assert time.perf_counter() - t0 < 5  # refused before any calibration or sampling
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not writable (read-only file system" in err, err
    assert os.listdir(ro) == []


def test_full_disk_leaves_the_old_output(ck, tmp_path, mounts, capsys):  # noqa: F811
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=160k")
    mounts.append(disk)
    out = disk / "s"
    assert main(_argv("sample", ck, None, out, new=False)) == 0
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    # 40 samples per class do not fit beside the old output
    assert main(["sample", "--checkpoint", str(ck), "--per-class", "200", "--out", str(out),
                 "--overwrite"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "No space left on device (nothing was changed)" in err, err
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
    assert sorted(os.listdir(disk)) == ["s"]
    _, labels, meta = load_sample_dir(out)
    assert meta["seed"] == 0 and np.array_equal(labels, np.arange(3))
    json.loads((out / "metadata.json").read_text())
