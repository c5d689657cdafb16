"""export_npz / trdq export-npz / trdq generate --export-npz: the npz FID tools read (arr_0
uint8 NHWC from the PNGs, arr_1 int64 labels), missing and damaged samples, per-class
selection, ownership of the target, a kill mid-write."""
import hashlib
import io
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from trdq_jax import checkpoint, files
from trdq_jax.cli import main
from trdq_jax.sampling import export
from trdq_jax.sampling import generation_dir as gd
from trdq_jax.sampling.export import ExportError, export_npz, ranges

ROOT = pathlib.Path(__file__).resolve().parents[2]


def make_dir(out, n=20, shard=4, labels="mod3", rgb=False, images=True, skip=(), seed=0):
    """A generation directory written through the library (no model): "latent" float shards
    and random uint8 PNGs of 6 x 5 pixels (gray or RGB); shards starting at ``skip`` left
    unwritten (an unfinished run)."""
    out = pathlib.Path(out)
    run = {"source": "test", "num_samples": n, "seed": seed}
    if isinstance(labels, str):
        labels = np.arange(n) % 3
    cond = gd.RunCond.of(labels=labels) if labels is not None else gd.RunCond()
    meta = gd.new_metadata(run, shard, cond, images, "test")
    files.write_dir(out, lambda tmp: gd.write_new(tmp, meta, cond), kind=gd.KIND)
    meta, cond = gd.read_metadata(out, "out")
    rng = np.random.default_rng(seed)
    for start, idx in gd.shard_grid(meta).items():
        samples = rng.uniform(-1, 1, (len(idx), 2, 3, 3, 1) if not images else
                              (len(idx), 3, 3, 4)).astype(np.float32)
        pixels = rng.integers(0, 256, (len(idx), 6, 5, 3 if rgb else 1), dtype=np.uint8)
        if start in skip:
            continue
        entry = gd.write_shard(out, start, samples, cond, seed, images, 0,
                               pixels=pixels if images else None)
        gd.append_entry(out / gd.manifest_name(0), entry)
    return out


def finish(out):
    """Write the shards ``make_dir(skip=...)`` left out (the same content as an unskipped run)."""
    meta, cond = gd.read_metadata(out, "out")
    found = gd.verify(out, meta, cond)
    rng = np.random.default_rng(meta["run"]["seed"])
    for start, idx in gd.shard_grid(meta).items():
        samples = rng.uniform(-1, 1, (len(idx), 3, 3, 4)).astype(np.float32)
        pixels = rng.integers(0, 256, (len(idx), 6, 5, 1), dtype=np.uint8)
        if start not in found.done:
            entry = gd.write_shard(out, start, samples, cond, meta["run"]["seed"], True, 0,
                                   pixels=pixels)
            gd.append_entry(out / gd.manifest_name(0), entry)


def pngs(out, indices) -> np.ndarray:
    return np.stack([np.asarray(Image.open(out / gd.image_name(int(i))).convert("RGB"))
                     for i in indices])


def adm_read_arr_0(path) -> np.ndarray:
    """arr_0 the way guided-diffusion's evaluations/evaluator.py reads it: the zip member
    arr_0.npy alone, its npy header, then the raw bytes streamed."""
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        version = np.lib.format.read_magic(f)
        assert version in ((1, 0), (2, 0))
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(f))
        assert not fortran and not dtype.hasobject
        data = f.read()
    return np.frombuffer(data, dtype).reshape(shape)


def digest(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def hidden(folder) -> list:
    return sorted(p.name for p in pathlib.Path(folder).iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- library


def test_ranges():
    assert ranges([0, 1, 2, 5, 7, 8]) == "0..2, 5, 7..8"
    assert ranges(list(range(64, 128)) + list(range(192, 256))) == "64..127, 192..255"
    assert ranges([]) == "none"


def test_layout_values_and_order(tmp_path):
    gen = make_dir(tmp_path / "g", n=10, shard=4)
    summary = export_npz(gen, tmp_path / "s.npz")
    assert summary["num_exported"] == 10 and summary["shape"] == [10, 6, 5, 3]
    assert summary["missing"] == 0 and summary["unchanged"] is False
    with np.load(tmp_path / "s.npz", allow_pickle=False) as data:
        assert sorted(data.files) == ["arr_0", "arr_1", "indices", "trdq_export"]
        arr_0, arr_1, indices = data["arr_0"], data["arr_1"], data["indices"]
        marker = json.loads(str(data["trdq_export"]))
    assert arr_0.dtype == np.uint8 and arr_0.shape == (10, 6, 5, 3)
    assert arr_1.dtype == np.int64 and np.array_equal(arr_1, np.arange(10) % 3)
    assert np.array_equal(indices, np.arange(10))
    want = pngs(gen, range(10))
    assert np.array_equal(arr_0, want)  # the PNGs exactly, in index order
    assert np.array_equal(arr_0[..., 0], arr_0[..., 2])  # gray repeated to 3 channels
    assert np.array_equal(adm_read_arr_0(tmp_path / "s.npz"), want)
    assert marker["format"] == export.FORMAT and marker["count"] == 10
    assert marker["generation"] == str(gen.resolve())
    assert export.read_marker(tmp_path / "s.npz") == marker
    assert files.file_kind(tmp_path / "s.npz") == "export"  # --overwrite knows it as ours
    assert hidden(tmp_path) == []


def test_rgb_without_labels(tmp_path):
    gen = make_dir(tmp_path / "g", n=6, shard=4, labels=None, rgb=True)
    summary = export_npz(gen, tmp_path / "s.npz")
    assert summary["labels"] is False
    with np.load(tmp_path / "s.npz") as data:
        assert sorted(data.files) == ["arr_0", "indices", "trdq_export"]  # no arr_1
        assert np.array_equal(data["arr_0"], pngs(gen, range(6)))
        assert not np.array_equal(data["arr_0"][..., 0], data["arr_0"][..., 1])
    with pytest.raises(ExportError, match="per_class: .* without class labels"):
        export_npz(gen, tmp_path / "t.npz", per_class=1)


def test_missing_samples_listed_and_allow_missing(tmp_path):
    gen = make_dir(tmp_path / "g", n=20, shard=4, skip=(4, 12))
    with pytest.raises(ExportError) as e:
        export_npz(gen, tmp_path / "s.npz")
    message = str(e.value)
    assert "\n" not in message and message.startswith("generation_dir: ")
    assert "lacks 8 of the 20 samples to export (4..7, 12..15)" in message
    assert "--allow-missing" in message
    assert not (tmp_path / "s.npz").exists() and hidden(tmp_path) == []
    summary = export_npz(gen, tmp_path / "s.npz", allow_missing=True)
    kept = np.r_[0:4, 8:12, 16:20]
    assert summary["num_exported"] == 12 and summary["missing"] == 8
    assert summary["indices"] == "0..3, 8..11, 16..19"
    with np.load(tmp_path / "s.npz") as data:
        assert np.array_equal(data["indices"], kept)
        assert np.array_equal(data["arr_1"], kept % 3)  # aligned with arr_0
        assert np.array_equal(data["arr_0"], pngs(gen, kept))


def test_existing_foreign_files_are_refused_and_left_alone(tmp_path):
    gen = make_dir(tmp_path / "g", n=4, shard=4)
    for name, body in (("notes.npz", b"my notes"), ("mine.png", b"x")):
        (tmp_path / name).write_bytes(body)
    np.savez(tmp_path / "theirs.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8))
    for name in ("notes.npz", "theirs.npz", "mine.png"):
        before = digest(tmp_path / name)
        for overwrite in (False, True):
            with pytest.raises(files.OutputError) as e:
                export_npz(gen, tmp_path / name, overwrite=overwrite)
            assert "\n" not in str(e.value)
            assert str(tmp_path / name) in str(e.value)
            assert "not written by trdq_jax" in str(e.value)
        assert digest(tmp_path / name) == before
    (tmp_path / "adir").mkdir()
    with pytest.raises(files.OutputError, match="is a directory"):
        export_npz(gen, tmp_path / "adir")
    with pytest.raises(files.OutputError, match="outputs do not nest"):
        export_npz(gen, gen / "s.npz")
    assert hidden(tmp_path) == []


def test_reexport_unchanged_and_overwrite_of_our_own(tmp_path):
    gen = make_dir(tmp_path / "g", n=12, shard=4, skip=(4,))
    out = tmp_path / "s.npz"
    export_npz(gen, out, allow_missing=True)
    partial = digest(out)
    again = export_npz(gen, out, allow_missing=True)  # the same export: nothing written
    assert again["unchanged"] is True and digest(out) == partial
    finish(gen)
    with pytest.raises(files.OutputError) as e:  # another export: needs overwrite
        export_npz(gen, out)
    assert "exists (a trdq_jax export of 8 samples" in str(e.value)
    assert "--overwrite / overwrite=True" in str(e.value) and digest(out) == partial
    summary = export_npz(gen, out, overwrite=True)
    assert summary["unchanged"] is False and summary["num_exported"] == 12
    with np.load(out) as data:
        assert np.array_equal(data["arr_0"], pngs(gen, range(12)))
        assert np.array_equal(data["indices"], np.arange(12))
    assert export_npz(gen, out)["unchanged"] is True  # a rerun needs no overwrite
    with open(out, "r+b") as f:  # a damaged export is not "unchanged": rewritten
        f.seek(200)
        f.write(b"\xff\x00\xff")
    with pytest.raises(files.OutputError, match="pass --overwrite"):
        export_npz(gen, out)
    assert export_npz(gen, out, overwrite=True)["unchanged"] is False
    assert export_npz(gen, out)["unchanged"] is True
    assert hidden(tmp_path) == []


def test_damaged_png_is_refused_naming_its_index(tmp_path, monkeypatch):
    gen = make_dir(tmp_path / "g", n=8, shard=4)
    png = gen / gd.image_name(5)
    png.write_bytes(png.read_bytes()[:-7] + b"garbage")
    with pytest.raises(ExportError) as e:
        export_npz(gen, tmp_path / "s.npz")
    assert "sample 5 of" in str(e.value) and "resume the generation" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ExportError, match="sample 5 of"):  # even with allow_missing
        export_npz(gen, tmp_path / "s.npz", allow_missing=True)
    assert not (tmp_path / "s.npz").exists()

    # a PNG that changes after the directory verified: caught as it is decoded
    gen = make_dir(tmp_path / "h", n=8, shard=4)
    real = gd.verify

    def verify_then_damage(*args, **kwargs):
        found = real(*args, **kwargs)
        (gen / gd.image_name(6)).write_bytes(b"\x89PNG not any more")
        return found
    monkeypatch.setattr(gd, "verify", verify_then_damage)
    with pytest.raises(ExportError) as e:
        export_npz(gen, tmp_path / "t.npz")
    assert "sample 6: images/00000006.png differs from its manifest line" in str(e.value)
    assert "resume the generation" in str(e.value)
    assert not (tmp_path / "t.npz").exists() and hidden(tmp_path) == []


def test_videos_and_other_directories_are_refused(tmp_path):
    gen = make_dir(tmp_path / "v", n=4, shard=4, images=False)
    with pytest.raises(ExportError, match="not images .*no PNGs"):
        export_npz(gen, tmp_path / "s.npz")
    with pytest.raises(ExportError, match="does not exist"):
        export_npz(tmp_path / "nowhere", tmp_path / "s.npz")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ExportError, match="not written by trdq_jax, not a generation"):
        export_npz(tmp_path / "plain", tmp_path / "s.npz")
    assert not (tmp_path / "s.npz").exists()


def test_per_class(tmp_path):
    labels = np.array([2, 2, 0, 1, 0, 2, 1, 1, 0, 2, 0, 1])
    gen = make_dir(tmp_path / "g", n=12, shard=4, labels=labels, skip=(4,))
    with pytest.raises(ExportError, match=r"lacks 2 of the 6 samples to export \(4, 6\)"):
        export_npz(gen, tmp_path / "s.npz", per_class=2)  # the first 2 of each class
    finish(gen)
    summary = export_npz(gen, tmp_path / "s.npz", per_class=2)
    with np.load(tmp_path / "s.npz") as data:
        assert np.array_equal(data["indices"], [0, 1, 2, 3, 4, 6])  # index order
        assert np.array_equal(data["arr_1"], labels[[0, 1, 2, 3, 4, 6]])
        assert np.array_equal(data["arr_0"], pngs(gen, [0, 1, 2, 3, 4, 6]))
    assert summary["per_class"] == 2
    with pytest.raises(ExportError, match="per_class: class 0 has only 4 samples in the run"):
        export_npz(gen, tmp_path / "t.npz", per_class=5)
    with pytest.raises(ValueError, match="per_class: expected a positive int"):
        export_npz(gen, tmp_path / "t.npz", per_class=0)

    gen = make_dir(tmp_path / "h", n=12, shard=4, labels=labels, skip=(4,))
    export_npz(gen, tmp_path / "u.npz", per_class=2, allow_missing=True)
    with np.load(tmp_path / "u.npz") as data:  # the first 2 finished ones of each class
        picked = data["indices"]
    want = sorted(sum(([i for i in (0, 1, 2, 3, 8, 9, 10, 11) if labels[i] == c][:2]
                       for c in range(3)), []))
    assert picked.tolist() == want
    with pytest.raises(ExportError, match="per_class: class 1 has only 2 finished samples"):
        export_npz(gen, tmp_path / "v.npz", per_class=3, allow_missing=True)


def _export_in_subprocess(gen, out, crash_at, overwrite=False):
    code = ("import sys; from trdq_jax.sampling.export import export_npz; "
            f"export_npz(sys.argv[1], sys.argv[2], overwrite={overwrite})")
    env = {**os.environ, "TRDQ_CRASH_AT": crash_at, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", code, str(gen), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("point", ["export-half-written", "written", "exchanged"])
def test_kill_mid_write_leaves_no_partial_file(tmp_path, point):
    gen = make_dir(tmp_path / "g", n=8, shard=4)
    out = tmp_path / "s.npz"
    if point != "exchanged":  # a new file: killed before it is in place, nothing there
        done = _export_in_subprocess(gen, out, point)
        assert done.returncode == -9, done.stderr
        assert not out.exists()
        export_npz(gen, out)  # the next export removes the dead writer's temporary
        assert hidden(tmp_path) == []
        assert export.read_marker(out)["count"] == 8
    old = tmp_path / "old.npz"
    other = make_dir(tmp_path / "o", n=4, shard=4, seed=3)
    export_npz(other, old)
    before = digest(old)
    done = _export_in_subprocess(gen, old, point, overwrite=True)
    assert done.returncode == -9, done.stderr
    marker = export.read_marker(old)  # the complete old export or the complete new one
    if point == "exchanged":
        assert marker["count"] == 8
    else:
        assert digest(old) == before and marker["count"] == 4
    with np.load(old) as data:
        assert data["arr_0"].shape == (marker["count"], 6, 5, 3)
    export_npz(gen, old, overwrite=True)
    assert hidden(tmp_path) == []


def test_free_space_is_checked_first(tmp_path, monkeypatch):
    gen = make_dir(tmp_path / "g", n=4, shard=4)
    monkeypatch.setattr(files, "free_bytes", lambda path: (100, tmp_path))
    with pytest.raises(OSError, match="No space left on device: needs about"):
        export_npz(gen, tmp_path / "s.npz")
    assert not (tmp_path / "s.npz").exists() and hidden(tmp_path) == []


# ----------------------------------------------------------------------------- CLI


def _one_error(capsys, command):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("trdq ")]
    assert len(lines) == 1 and err.endswith(lines[0] + "\n"), err
    assert lines[0].startswith(f"trdq {command}: error: "), err
    return lines[0]


def test_cli_export_npz(tmp_path, capsys):
    gen = make_dir(tmp_path / "g", n=8, shard=4, skip=(4,))
    out = tmp_path / "s.npz"
    argv = ["export-npz", "--generation", str(gen), "--out", str(out)]
    assert main(argv) == 2
    line = _one_error(capsys, "export-npz")
    assert line.startswith("trdq export-npz: error: --generation: ") and "lacks 4" in line
    assert "4..7" in line and "--allow-missing" in line and not out.exists()
    assert main(argv + ["--allow-missing"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_exported"] == 4 and summary["indices"] == "0..3"
    finish(gen)
    assert main(argv) == 2
    line = _one_error(capsys, "export-npz")
    assert line.startswith("trdq export-npz: error: --out: ") and "pass --overwrite" in line
    assert main(argv + ["--overwrite"]) == 0
    capsys.readouterr()
    assert main(argv) == 0  # the same export again: unchanged, no --overwrite needed
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["unchanged"] is True
    (tmp_path / "theirs.npz").write_bytes(b"theirs")
    assert main(["export-npz", "--generation", str(gen), "--out", str(tmp_path / "theirs.npz"),
                 "--overwrite"]) == 2
    line = _one_error(capsys, "export-npz")
    assert "--out: " in line and "not written by trdq_jax" in line
    assert (tmp_path / "theirs.npz").read_bytes() == b"theirs"
    assert main(argv + ["--per-class", "9"]) == 2
    assert "--per-class: class 0 has only 3 samples" in _one_error(capsys, "export-npz")
    assert main(argv + ["--per-class", "0"]) == 2
    assert "argument --per-class: expected a positive int" in _one_error(capsys, "export-npz")
    assert main(["export-npz", "--generation", str(tmp_path / "none"), "--out",
                 str(tmp_path / "x.npz")]) == 2
    assert "--generation: " in _one_error(capsys, "export-npz")


def test_cli_help_states_every_default():
    from trdq_jax.cli import build_parser
    parser = build_parser()
    for command in ("generate", "export-npz"):
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                text = (action.help or "").lower()
                assert "default" in text or "required" in text, (command, action.dest)


@pytest.fixture(scope="module")
def tiny_ck(tmp_path_factory):
    from tests.test_quant_cli import TINY, tiny_params
    path = tmp_path_factory.mktemp("export") / "ck"
    checkpoint.save(path, tiny_params(), TINY)
    return path


def test_cli_generate_per_class_and_export(tmp_path, tiny_ck, capsys):
    gen, out = tmp_path / "g", tmp_path / "s.npz"
    argv = ["generate", "--checkpoint", str(tiny_ck), "--set", "sampler.num_steps=2",
            "--per-class", "2", "--shard-size", "4", "--out", str(gen), "--export-npz",
            str(out)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_samples"] == 6 and summary["export"]["num_exported"] == 6
    meta, cond = gd.read_metadata(gen, "out")
    assert np.array_equal(cond.labels, np.arange(6) % 3)  # 2 of each of the 3 classes
    with np.load(out) as data:
        assert data["arr_0"].shape == (6, 8, 8, 3) and data["arr_0"].dtype == np.uint8
        assert np.array_equal(data["arr_0"], pngs(gen, range(6)))
        assert np.array_equal(data["arr_1"], np.arange(6) % 3)
    before = digest(out)
    assert main(argv) == 0  # the rerun generates nothing and leaves the export as it is
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["generated"] == 0 and summary["export"]["unchanged"] is True
    assert digest(out) == before
    assert main(argv + ["--export-per-class", "1"]) == 2  # another export: --overwrite
    line = _one_error(capsys, "generate")
    assert line.startswith("trdq generate: error: --export-npz: ") and "--overwrite" in line
    assert main(argv + ["--export-per-class", "1", "--overwrite"]) == 0
    capsys.readouterr()
    with np.load(out) as data:
        assert np.array_equal(data["indices"], [0, 1, 2])


@pytest.mark.parametrize("extra, message", [
    (["--per-class", "2", "--labels", "0,1"], "--per-class: "),
    (["--num-samples", "2", "--overwrite"], "--overwrite: only applies with --export-npz"),
    (["--num-samples", "2", "--export-per-class", "1"],
     "--export-per-class: only applies with --export-npz"),
    (["--num-samples", "2", "--export-npz", "{tmp}/theirs.npz"],
     "--export-npz: '{tmp}/theirs.npz' exists and was not written by trdq_jax"),
    (["--num-samples", "2", "--export-npz", "{tmp}/g/s.npz"],
     "--export-npz: '{tmp}/g/s.npz' is inside --out"),
])
def test_cli_generate_export_errors(tmp_path, tiny_ck, capsys, extra, message):
    (tmp_path / "theirs.npz").write_bytes(b"theirs")
    argv = ["generate", "--checkpoint", str(tiny_ck), "--out", str(tmp_path / "g"),
            *[a.format(tmp=tmp_path) for a in extra]]
    assert main(argv) == 2
    assert message.format(tmp=tmp_path) in _one_error(capsys, "generate")
    assert (tmp_path / "theirs.npz").read_bytes() == b"theirs"
    assert not (tmp_path / "g").exists()
