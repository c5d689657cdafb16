"""A write that fails leaves nothing behind and says so in one line (issue #20, item 2).

orbax writes through tensorstore, whose pending writes go on for a moment after the first one
failed and re-create missing directories, so one ``rmtree`` of the temporary was not enough: a
hidden ``.NAME.trdq-tmp.PID.RAND`` could reappear after the error said "nothing was changed".
Here: a free-space preflight refuses what cannot fit before anything is written, a write that
fails midway on a real full disk (the disk fills after the preflight) leaves nothing, 20 times
in a row, and the CLI prints one line.
"""
import asyncio
import errno
import logging
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from trdq_jax import checkpoint, files
from tests.test_files import _mount_tmpfs, mounts, tree_hash, writer  # noqa: F401 (a fixture)
from tests.test_quant_cli import TINY

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

MiB = 1 << 20


def _many_leaves(n: int = 300) -> dict:
    """~6.8 MB in ``n`` arrays: orbax has many writes pending when the disk fills."""
    rng = np.random.default_rng(0)
    return {f"l{i}": {"kernel": rng.standard_normal((64, 64 + i % 50)).astype(np.float32)}
            for i in range(n)}


def _fill_after_preflight(monkeypatch, leave: int):
    """Let the real preflight pass, then fill the disk up to ``leave`` free bytes, as another
    writer would: the write itself then fails midway. Returns the filler files' list."""
    real, fillers = files.check_free_space, []

    def check_then_fill(target, needed_bytes, arg="path"):
        real(target, needed_bytes, arg)
        free, where = files.free_bytes(target)
        filler = where / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * max(free - leave, 0))
        fillers.append(filler)
    monkeypatch.setattr(files, "check_free_space", check_then_fill)
    return fillers


def _assert_one_line_unchanged(e: OSError, target: pathlib.Path, arg: str = "path"):
    message = str(e)
    assert e.errno == errno.ENOSPC, repr(e)
    assert "\n" not in message and "[Errno" not in message, message
    assert message.startswith(f"{arg}: cannot write {str(target)!r}: No space left on device")
    assert message.endswith("(nothing was changed)"), message


def test_check_free_space_names_the_bytes(tmp_path, mounts):  # noqa: F811
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=1m")
    mounts.append(disk)
    files.check_free_space(disk / "a" / "b", 512 << 10, "--out")  # fits: nothing happens
    with pytest.raises(OSError) as info:
        files.check_free_space(disk / "a" / "b", 4_300_000, "--out")
    _assert_one_line_unchanged(info.value, disk / "a" / "b", "--out")
    assert f"needs about 4.3 MB, 1.0 MB free on {str(disk)!r}" in str(info.value)
    assert os.listdir(disk) == []


def test_preflight_refuses_before_writing(tmp_path, mounts):  # noqa: F811
    """checkpoint.save and save_calibration compare their bytes with the free space first."""
    import trdq_jax.quant as Q
    from trdq_jax.quant.calib_io import save_calibration
    from trdq_jax.quant.calibrate import Calibration
    from trdq_jax.quant.capture import LayerStats
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=1m")
    mounts.append(disk)
    files.write_dir(disk / "old", writer("samples", "kept"), kind="samples")
    before = tree_hash(disk)
    t0 = time.perf_counter()
    with pytest.raises(OSError) as info:
        checkpoint.save(disk / "ck", _many_leaves(), TINY, arg="--out")
    _assert_one_line_unchanged(info.value, disk / "ck", "--out")
    assert "needs about 7." in str(info.value) and " free on " in str(info.value)
    k, steps = 256, TINY.sampler.num_steps
    stats = LayerStats(absmax=np.ones((steps, k), np.float32),
                       tensor_min=-np.ones(steps, np.float32),
                       tensor_max=np.ones(steps, np.float32),
                       rows=np.zeros((steps, 256, k), np.float32),
                       weight_absmax=np.ones(k, np.float32))
    calib = Calibration(stats={"blocks_0/mlp/fc1": stats},
                        segment_of_step=np.zeros(steps, np.int32), num_segments=1,
                        keep_float={})
    with pytest.raises(OSError) as info:
        save_calibration(disk / "calib", calib, Q.get_recipe("minmax"), TINY,
                         source={"model": "x"}, params_sha256="0", per_class=1, seed=0,
                         rows_per_step=256, arg="--out")
    _assert_one_line_unchanged(info.value, disk / "calib", "--out")
    # rows [steps, 256, 256] float32 (1.6 MB) + the packed Gram (256 * 257 / 2 float32, 0.13 MB)
    assert "needs about 1.7 MB" in str(info.value)
    assert time.perf_counter() - t0 < 5  # refused up front, not after a long write
    assert tree_hash(disk) == before


@pytest.mark.slow
def test_full_disk_midway_leaves_nothing_20_times(tmp_path, mounts, monkeypatch):  # noqa: F811
    """The preflight passes, then the disk fills: orbax fails with many writes pending. After
    each failed save the disk holds exactly what it held before (checked at once and again at
    the start of the next round, after the filler is gone)."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=16m")
    mounts.append(disk)
    tree = _many_leaves()
    fillers = _fill_after_preflight(monkeypatch, leave=MiB)
    files.write_dir(disk / "old", writer("samples", "kept"), kind="samples")
    before = tree_hash(disk)
    left = []
    for i in range(20):
        assert tree_hash(disk) == before, f"round {i}: something came back"
        with pytest.raises(OSError) as info:
            checkpoint.save(disk / "ck", tree, TINY, arg="--out")
        _assert_one_line_unchanged(info.value, disk / "ck", "--out")
        assert "needs about" not in str(info.value)  # the write itself failed, not the preflight
        fillers.pop().unlink()
        if tree_hash(disk) != before:
            left.append((i, sorted(set(tree_hash(disk)) - set(before))))
    time.sleep(1.0)  # a late tensorstore write would have re-created it by now
    assert tree_hash(disk) == before
    assert left == [], f"leftovers after {len(left)} of 20 failed saves: {left}"


def test_a_temporary_that_keeps_coming_back_is_named_and_recovered(tmp_path, monkeypatch):
    """When a background writer outlasts the bounded wait, the error names the leftover and
    the next write to the target removes it."""
    monkeypatch.setattr(files, "_SETTLE_LIMIT_S", 0.3)
    stop = threading.Event()

    def stubborn(tmp: pathlib.Path):
        def recreate():
            while not stop.is_set():
                (tmp / "ocdbt.process_0" / "d").mkdir(parents=True, exist_ok=True)
                time.sleep(0.002)
        threading.Thread(target=recreate, daemon=True).start()
        time.sleep(0.01)
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "out"
    try:
        with pytest.raises(OSError) as info:
            files.write_dir(target, stubborn, kind="samples", arg="--out")
    finally:
        stop.set()
    message = str(info.value)
    leftover = [p for p in os.listdir(tmp_path) if ".trdq-tmp." in p]
    assert info.value.errno == errno.ENOSPC and "\n" not in message and "[Errno" not in message
    assert len(leftover) == 1 and str(tmp_path / leftover[0]) in message, (leftover, message)
    assert "nothing was changed" not in message
    assert f"{str(target)!r} was not changed, but the temporary" in message
    assert f"the next write to {str(target)!r} removes it" in message
    time.sleep(0.05)
    files.write_dir(target, writer("samples", "new"), kind="samples")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def _unraisable(exc: BaseException):
    class Args:
        exc_type, exc_value, exc_traceback = type(exc), exc, exc.__traceback__
        err_msg, object = None, None
    return Args


def test_cli_hides_only_late_event_loop_callbacks(monkeypatch):
    from trdq_jax.cli import _hide_late_loop_callbacks
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    _hide_late_loop_callbacks()
    _hide_late_loop_callbacks()  # installed once
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        late = e
    try:
        raise RuntimeError("Event loop is closed")  # same words, not from asyncio: shown
    except RuntimeError as e:
        lookalike = e
    other = ValueError("shown")
    for exc in (late, lookalike, other):
        sys.unraisablehook(_unraisable(exc))
    assert seen == [lookalike, other]


def test_cli_hides_only_unretrieved_failed_writes(caplog):
    """The sibling writes of a failed save, logged by asyncio when their futures are collected,
    are dropped; any other asyncio error (another exception, or a write error logged with
    other words) is still logged."""
    from trdq_jax.cli import _hide_unretrieved_failed_writes
    _hide_unretrieved_failed_writes()
    _hide_unretrieved_failed_writes()  # installed once
    logger = logging.getLogger("asyncio")
    assert sum(type(f).__name__ == "_HideUnretrievedFailedWrites" for f in logger.filters) == 1

    def failure(exc):
        try:
            raise exc
        except Exception:
            return sys.exc_info()
    write = ValueError('RESOURCE_EXHAUSTED: Error writing "a/0" in OCDBT database: No space')
    cases = [("Future exception was never retrieved\nfuture: <F>", write, False),
             ("Task exception was never retrieved\nfuture: <T>", write, False),
             ("Task exception was never retrieved\nfuture: <T>", ValueError("bad shape"), True),
             ("Task exception was never retrieved\nfuture: <T>", OSError("Error writing"), True),
             ("Exception in callback <C>", write, True)]
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for message, exc, shown in cases:
            caplog.clear()
            logger.error(message, exc_info=failure(exc))
            assert bool(caplog.records) == shown, message


_CLI_RACE = textwrap.dedent("""
    import sys
    from trdq_jax import files
    real = files.check_free_space
    def check_then_fill(target, needed_bytes, arg="path"):
        real(target, needed_bytes, arg)
        free, where = files.free_bytes(target)
        with open(where / "filler", "wb") as f:
            f.write(b"\\0" * (free - (1 << 20)))
    files.check_free_space = check_then_fill
    from trdq_jax.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_cli_full_disk_prints_one_line(tmp_path, mounts, capsys):  # noqa: F811
    """``trdq convert`` of a DiT with many arrays onto a disk that fills during the write (a
    fresh process: the late tensorstore callbacks reach the real stderr there), then onto one
    the preflight refuses."""
    from tests.models import official_dit
    from trdq_jax.cli import main
    dims = dict(depth=12, hidden=64, in_ch=4, patch=2, num_classes=3, mlp_hidden=256, out_ch=8,
                n_tokens=16)
    sd = official_dit.random_state_dict(np.random.default_rng(0), **dims)
    np.savez(tmp_path / "dit.npz", **sd)
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=8m")
    mounts.append(disk)
    argv = ["convert", "--input", str(tmp_path / "dit.npz"), "--num-heads", "2",
            "--out", str(disk / "ck")]
    proc = subprocess.run([sys.executable, "-c", _CLI_RACE, *argv], capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr  # no tracebacks after the error
    assert proc.stderr.startswith(f"trdq convert: error: --out: cannot write "
                                  f"{str(disk / 'ck')!r}: No space left on device "
                                  "(nothing was changed)"), proc.stderr
    assert sorted(os.listdir(disk)) == ["filler"]
    os.remove(disk / "filler")
    with open(disk / "filler", "wb") as f:  # now the preflight sees the disk full
        f.write(b"\0" * (7 * MiB))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[Errno" not in err, err
    assert err.startswith("trdq convert: error: --out: cannot write ") and "needs about" in err
    assert sorted(os.listdir(disk)) == ["filler"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A float checkpoint and a calibration of the tiny DiT, off the full disk."""
    from trdq_jax.cli import main
    from tests.test_quant_cli import tiny_params
    root = tmp_path_factory.mktemp("src")
    checkpoint.save(root / "ck", tiny_params(), TINY)
    assert main(["calibrate", "--checkpoint", str(root / "ck"), "--recipe", "minmax",
                 "--per-class", "1", "--rows-per-step", "8", "--out", str(root / "calib")]) == 0
    return root


WRITERS = {  # every command that writes, each onto a full disk ({d}); {s}: the sources
    "calibrate": "calibrate --checkpoint {s}/ck --per-class 1 --rows-per-step 8 --out {d}/c",
    "quantize": "quantize --calib {s}/calib --out {d}/q",
    "sample": "sample --checkpoint {s}/ck --per-class 1 --out {d}/s",
    "generate": "generate --checkpoint {s}/ck --num-samples 64 --out {d}/g",
    "plot-ranges": "plot-ranges --checkpoint {s}/ck --per-class 1 --out {d}/r.png",
    "cfg-analysis": "cfg-analysis --checkpoint {s}/ck --per-class 1 --out {d}/a",
    "eval": "eval --model digits-classifier --out {d}/e.json",
}


@pytest.mark.slow
def test_every_writer_on_a_full_disk_fails_in_one_line_leaving_nothing(tmp_path, mounts,
                                                                     sources, capsys):
    """A tmpfs filled to its last byte: each command exits 2 with one line naming the
    full disk, and the disk holds afterwards exactly what it held before (the filler)."""
    from trdq_jax.cli import main
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=256k")
    mounts.append(disk)
    free, _ = files.free_bytes(disk / "x")
    (disk / "filler").write_bytes(b"\0" * free)
    before = tree_hash(disk)
    for name, argv in WRITERS.items():
        code = main(argv.format(s=sources, d=disk).split())
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("trdq ")]
        assert code == 2 and len(lines) == 1 and err.endswith(lines[0] + "\n"), (name, err)
        assert "No space left on device" in lines[0] and "[Errno" not in lines[0], (name, err)
        assert tree_hash(disk) == before, name  # no output, no temporary, hidden ones included
