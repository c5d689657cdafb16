"""``trdq_jax.files``: atomic writes, what ``overwrite`` may replace, crashes, full and read-only
file systems."""
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from trdq_jax import files

FILES_PY = pathlib.Path(files.__file__)


def tree_hash(root: pathlib.Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file (``<dir>`` for directories, ``-> target`` for
    symbolic links) under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "<dir>"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = (f"-> {os.readlink(p)}" if os.path.islink(p) else
                                             hashlib.sha256(open(p, "rb").read()).hexdigest())
    return out


def writer(kind: str, payload: str, extra_files: int = 1):
    def write(tmp: pathlib.Path) -> None:
        for i in range(extra_files):
            (tmp / f"part{i}.txt").write_text(payload)
        files.write_json(tmp / files.METADATA_FILE,
                         {"format": f"trdq_jax.{kind}/1", "kind": kind, "payload": payload})
    return write


def test_new_directory_then_replacement(tmp_path):
    out = files.write_dir(tmp_path / "a" / "b", writer("samples", "one"), kind="samples")
    assert out == (tmp_path / "a" / "b").resolve() and (out / "part0.txt").read_text() == "one"
    assert files.dir_kind(out) == "samples"
    with pytest.raises(files.OutputError, match="exists .*sample directory.*overwrite"):
        files.write_dir(out, writer("samples", "two"), kind="samples")
    assert (out / "part0.txt").read_text() == "one"
    files.write_dir(out, writer("samples", "two", extra_files=2), kind="samples", overwrite=True)
    assert sorted(os.listdir(out)) == ["metadata.json", "part0.txt", "part1.txt"]
    assert (out / "part1.txt").read_text() == "two"
    assert os.listdir(tmp_path / "a") == ["b"]  # no temporaries, no old copy left


def test_empty_directory_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    files.write_dir(tmp_path / "empty", writer("demo", "x"), kind="demo")
    assert files.dir_kind(tmp_path / "empty") == "demo"


@pytest.mark.parametrize("setup, message", [
    ("foreign", "not written by trdq_jax, not a trdq_jax sample directory"),
    ("other-kind", "is a trdq_jax calibration directory, not a trdq_jax sample directory"),
    ("file", "is a file, expected a directory"),
    ("bad-json", "not written by trdq_jax"),
])
def test_overwrite_refuses_what_the_project_did_not_write(tmp_path, setup, message):
    target = tmp_path / "t"
    if setup == "file":
        target.write_text("user data")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("user data")
        if setup == "other-kind":
            files.write_json(target / "metadata.json",
                             {"format": "trdq_jax.calibration/2", "kind": "calibration"})
        if setup == "bad-json":
            (target / "metadata.json").write_text("{broken")
    before = tree_hash(tmp_path)
    with pytest.raises(files.OutputError, match=message):
        files.write_dir(target, writer("samples", "new"), kind="samples", overwrite=True)
    assert tree_hash(tmp_path) == before


def test_protected_places_are_refused_even_with_overwrite(tmp_path, monkeypatch):
    work = tmp_path / "home" / "user" / "work"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    before = tree_hash(tmp_path)
    for target, why in ((".", "the current directory"), ("..", "a parent of the current"),
                        (str(tmp_path / "home"), "a parent of the current"),
                        ("~", "the home directory"),
                        ("/", "the file-system root")):
        with pytest.raises(files.OutputError, match=why):
            files.write_dir(target, writer("samples", "x"), kind="samples", overwrite=True)
    assert tree_hash(tmp_path) == before


def test_a_failing_writer_leaves_nothing(tmp_path):
    files.write_dir(tmp_path / "out", writer("samples", "old"), kind="samples")
    before = tree_hash(tmp_path)

    def broken(tmp):
        (tmp / "half.txt").write_text("partial")
        raise ValueError("boom")
    with pytest.raises(ValueError, match="boom"):
        files.write_dir(tmp_path / "out", broken, kind="samples", overwrite=True)
    with pytest.raises(ValueError, match="boom"):  # new parents are removed again
        files.write_dir(tmp_path / "x" / "y" / "z", broken, kind="samples")
    with pytest.raises(RuntimeError, match="no metadata.json of kind 'samples'"):
        files.write_dir(tmp_path / "out", writer("demo", "wrong"), kind="samples",
                        overwrite=True)
    assert tree_hash(tmp_path) == before


def test_files_are_recognised_by_their_marker(tmp_path):
    from PIL import Image
    png, js = tmp_path / "f.png", tmp_path / "r.json"

    def save_png(tmp):
        from PIL.PngImagePlugin import PngInfo
        info = PngInfo()
        for k, v in files.png_marker("figure").items():
            info.add_text(k, v)
        Image.new("RGB", (4, 4)).save(tmp, pnginfo=info)
    files.write_file(png, save_png, kind="figure")
    files.write_file(js, lambda t: files.write_json(t, {"format": "trdq_jax.eval/1",
                                                        "kind": "report"}), kind="report")
    assert files.file_kind(png) == "figure" and files.file_kind(js) == "report"
    files.write_file(png, save_png, kind="figure", overwrite=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "foreign.png")
    (tmp_path / "foreign.json").write_text(json.dumps({"kind": "report"}))
    before = tree_hash(tmp_path)
    for name, kind in (("foreign.png", "figure"), ("foreign.json", "report"), ("r.json", "figure")):
        with pytest.raises(files.OutputError, match="refusing to touch it"):
            files.write_file(tmp_path / name, save_png, kind=kind, overwrite=True)
    with pytest.raises(files.OutputError, match="is a directory, expected a file"):
        files.write_file(tmp_path, save_png, kind="figure", overwrite=True)
    assert tree_hash(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["f.png", "foreign.json", "foreign.png", "r.json"]


# ----------------------------------------------------------------------------- crashes

_SCRIPT = """
import importlib.util, pathlib, sys
spec = importlib.util.spec_from_file_location("files", {files_py!r})
files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files)
if {no_exchange}:
    files._exchange = lambda a, b: False
PAYLOAD = {payload}
def write(tmp):
    (tmp / "part0.txt").write_text(PAYLOAD)
    files.crash_point("arrays-written")
    files.write_json(tmp / files.METADATA_FILE,
                     {{"format": "trdq_jax.samples/1", "kind": "samples", "payload": PAYLOAD[:10]}})
files.write_dir({target!r}, write, kind="samples", overwrite=True)
"""


def _run_writer(target, payload, crash_at=None, no_exchange=False):
    script = _SCRIPT.format(files_py=str(FILES_PY), target=str(target), payload=repr(payload),
                            no_exchange=no_exchange)
    env = {**os.environ, "TRDQ_CRASH_AT": crash_at or ""}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)


@pytest.mark.parametrize("point, no_exchange", [
    ("tmp-created", False), ("arrays-written", False), ("written", False), ("exchanged", False),
    ("between-renames", True)])
def test_sigkill_at_every_point_leaves_old_or_new(tmp_path, point, no_exchange):
    target = tmp_path / "out"
    assert _run_writer(target, "old").returncode == 0
    proc = _run_writer(target, "new", crash_at=point, no_exchange=no_exchange)
    assert proc.returncode == -signal.SIGKILL
    if point == "between-renames":  # the one window where the target is briefly missing...
        assert not target.exists()
        files.recover(target)  # ...which the next write (or recover) repairs
    content = (target / "part0.txt").read_text()
    assert content == ("new" if point == "exchanged" else "old")
    assert json.loads((target / "metadata.json").read_text())["payload"] == content
    assert _run_writer(target, "next", no_exchange=no_exchange).returncode == 0
    assert (target / "part0.txt").read_text() == "next"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # stale temporaries were cleaned


def test_sigkill_at_a_random_moment_of_a_long_write(tmp_path):
    """No hook: kill as soon as the temporary appears, mid-write."""
    target = tmp_path / "out"
    assert _run_writer(target, "old").returncode == 0
    script = _SCRIPT.format(files_py=str(FILES_PY), target=str(target), payload="'x' * 50_000_000",
                            no_exchange=False)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 30
    while not any(".trdq-tmp." in p for p in os.listdir(tmp_path)) and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (target / "part0.txt").read_text() == "old"
    files.recover(target)
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ----------------------------------------------------------------------------- file systems


def _mount_tmpfs(path: pathlib.Path, options: str) -> None:
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'}); "
                    "the full / read-only file-system cases need one")


@pytest.fixture
def mounts():
    mounted = []
    yield mounted
    for m in reversed(mounted):
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def test_full_disk_fails_cleanly(tmp_path, mounts):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=256k")
    mounts.append(disk)
    files.write_dir(disk / "out", writer("samples", "old"), kind="samples")
    before = tree_hash(disk)
    with pytest.raises(OSError, match=r"out': No space left on device \(nothing was changed\)"):
        files.write_dir(disk / "out", writer("samples", "y" * 1_000_000), kind="samples",
                        overwrite=True)
    assert tree_hash(disk) == before


def test_read_only_target_fails_within_seconds(tmp_path, mounts):
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "ro,size=1m")
    mounts.append(ro)
    t0 = time.perf_counter()
    with pytest.raises(files.OutputError, match=r"ro' is not writable \(read-only file system"):
        files.write_dir(ro / "out", writer("samples", "x"), kind="samples")
    with pytest.raises(files.OutputError, match="is not writable"):  # also below a new parent
        files.write_file(ro / "new" / "f.json", lambda t: t.write_text("{}"), kind="report")
    assert time.perf_counter() - t0 < 5
    assert os.listdir(ro) == []


def test_file_size_limit_as_a_full_disk(tmp_path):
    """Portable stand-in for a full disk (no mount needed): RLIMIT_FSIZE makes writes fail with
    EFBIG (CPython ignores SIGXFSZ)."""
    target = tmp_path / "out"
    assert _run_writer(target, "old").returncode == 0
    script = _SCRIPT.format(files_py=str(FILES_PY), target=str(target), payload="'z' * 2_000_000",
                            no_exchange=False)
    wrapped = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    """) + script
    proc = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True)
    assert proc.returncode == 1 and "File too large (nothing was changed)" in proc.stderr
    assert (target / "part0.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ----------------------------------------------------------------------------- races and nesting


def test_a_target_that_appears_while_writing_is_left_alone(tmp_path):
    target = tmp_path / "out"

    def racing(tmp):  # someone else creates the target while we write
        target.mkdir()
        (target / "precious.txt").write_text("theirs")
        writer("samples", "ours")(tmp)
    with pytest.raises(files.OutputError, match="appeared or changed while the output was being"):
        files.write_dir(target, racing, kind="samples")
    assert os.listdir(target) == ["precious.txt"] and sorted(os.listdir(tmp_path)) == ["out"]

    report = tmp_path / "r.json"

    def racing_file(tmp):
        report.write_text('{"theirs": 1}')
        files.write_json(tmp, {"format": "trdq_jax.eval/1", "kind": "report"})
    with pytest.raises(files.OutputError, match="appeared or changed"):
        files.write_file(report, racing_file, kind="report")
    assert report.read_text() == '{"theirs": 1}'


@pytest.mark.parametrize("exchange", [True, False])
def test_a_replaced_target_that_changed_while_writing_is_put_back(tmp_path, monkeypatch,
                                                                  exchange):
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target = files.write_dir(tmp_path / "out", writer("samples", "old"), kind="samples")

    def racing(tmp):  # the old output is replaced by a user's directory meanwhile
        import shutil
        shutil.rmtree(target)
        target.mkdir()
        (target / "precious.txt").write_text("theirs")
        writer("samples", "new")(tmp)
    with pytest.raises(files.OutputError, match="appeared or changed"):
        files.write_dir(target, racing, kind="samples", overwrite=True)
    assert os.listdir(target) == ["precious.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_outputs_do_not_nest(tmp_path):
    outer = files.write_dir(tmp_path / "s", writer("samples", "a"), kind="samples")
    before = tree_hash(tmp_path)
    with pytest.raises(files.OutputError, match="is inside .*a trdq_jax sample directory"):
        files.write_dir(outer / "calib", writer("calibration", "b"), kind="calibration")
    with pytest.raises(files.OutputError, match="is inside"):
        files.write_file(outer / "deep" / "r.json", lambda t: t.write_text("{}"), kind="report")
    assert tree_hash(tmp_path) == before
    # one moved in by hand is not deleted by an overwrite of the outer one
    files.write_dir(tmp_path / "c", writer("calibration", "b"), kind="calibration")
    os.rename(tmp_path / "c", outer / "sub")
    before = tree_hash(tmp_path)
    with pytest.raises(files.OutputError, match="holds another output, .*sub.*calibration"):
        files.write_dir(outer, writer("samples", "new"), kind="samples", overwrite=True)
    assert tree_hash(tmp_path) == before


def test_fallback_puts_the_old_output_back_when_the_second_rename_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target = files.write_dir(tmp_path / "out", writer("samples", "old"), kind="samples")
    real_rename, calls = os.rename, []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the new output onto the target
            raise OSError(28, "No space left on device")
        return real_rename(a, b)
    monkeypatch.setattr(files.os, "rename", flaky)
    with pytest.raises(OSError, match="No space left on device"):
        files.write_dir(target, writer("samples", "new"), kind="samples", overwrite=True)
    monkeypatch.setattr(files.os, "rename", real_rename)
    assert (target / "part0.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_stale_means_unlocked_not_a_dead_pid(tmp_path):
    target = tmp_path / "out"
    stale = tmp_path / ".out.trdq-tmp.1.deadbeef"  # pid 1 is alive; its lock is not held
    stale.mkdir()
    live = tmp_path / ".out.trdq-tmp.999999.cafe0000"  # no such pid, but a writer holds it
    live.mkdir()
    fd = files._lock(live)
    try:
        files.recover(target)
        assert sorted(os.listdir(tmp_path)) == [live.name]
    finally:
        os.close(fd)
    files.recover(target)
    assert os.listdir(tmp_path) == []


def test_parents_made_by_another_writer_meanwhile_are_fine(tmp_path, monkeypatch):
    real_mkdir = pathlib.Path.mkdir

    def racing_mkdir(self, *args, **kwargs):
        if self.name == "runs" and not self.exists():
            real_mkdir(self)  # the other writer wins the race
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, "mkdir", racing_mkdir)
    files.write_dir(tmp_path / "runs" / "a", writer("samples", "x"), kind="samples")
    assert files.dir_kind(tmp_path / "runs" / "a") == "samples"
