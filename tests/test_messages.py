"""Messages that name the cause in the project's words (issue #20, item 4).

A truncated or foreign weight file says "truncated", "not a safetensors file" / "not a .npz
file" or "a pickle, refused", naming the path, instead of quoting a reader's text ("header too
large", "File is not a zip file", numpy's "pickled data"); a config file with a syntax error or
an exception in ``get_config()`` is a one-line ``ConfigError`` naming the file and line (exit 2,
not "internal error"). Each case: the library exception, and over the CLI one line, exit status
2 and nothing written.
"""
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save_file

from trdq_jax import manifest
from trdq_jax.cli import main
from trdq_jax.config import ConfigError, load_config_file
from trdq_jax.models import weight_files
from trdq_jax.models.convert import ConversionError, load_state_dict
from tests.models import official_dit
from tests.test_files import tree_hash

DIMS = dict(depth=1, hidden=32, in_ch=4, patch=2, num_classes=3, mlp_hidden=128, out_ch=8,
            n_tokens=16)
PICKLE = "is a pickle, refused: trdq_jax never unpickles"


def _files(root):
    """{name: (bytes, expected message after the quoted path)}."""
    sd = official_dit.random_state_dict(np.random.default_rng(0), **DIMS)
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(root / "dit.safetensors"))
    raw = (root / "dit.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    np.savez(root / "dit.npz", **sd)
    rawz = (root / "dit.npz").read_bytes()
    with zipfile.ZipFile(root / "torch.zip", "w") as z:  # torch.save's layout
        z.writestr("archive/data.pkl", pickle.dumps({"w": [1.0]}, protocol=2))
        z.writestr("archive/data/0", b"\0" * 64)
    header_cut = raw[:8 + n // 2]
    data_cut = raw[:-1000]
    return {
        "header_cut.safetensors": (header_cut, f"is truncated: holds {len(header_cut):,} of "
                                               f"{8 + n:,} bytes"),
        "data_cut.safetensors": (data_cut, f"is truncated: holds {len(data_cut):,} of "
                                           f"{len(raw):,} bytes"),
        "text.safetensors": (b"<html><body>404 Not Found</body></html>\n",
                             "is not a safetensors file: it holds text ('<html><body>404 Not "
                             "Found</body></html>'), e.g. an error page"),
        "absurd.safetensors": (struct.pack("<Q", 1 << 50) + b'{"w": {}}' + b"\0" * 64,
                               "is not a safetensors file: it starts with the bytes 00 00 00 00 "
                               "00 00 04 00 (a header length of 1,125,899,906,842,624 bytes"),
        "pickle.safetensors": (pickle.dumps({"w": [1.0]}, protocol=4), PICKLE),
        "empty.safetensors": (b"", "is empty (0 bytes); expected a .safetensors checkpoint: "
                                   "truncated"),
        "truncated.npz": (rawz[:len(rawz) // 2], f"is truncated: the zip archive stops after "
                                                 f"{len(rawz) // 2:,} bytes, before its closing "
                                                 "directory record"),
        "random.npz": (bytes(np.random.default_rng(1).integers(0, 256, 512, np.uint8)),
                       "is not a .npz file: not a zip archive, it starts with the bytes"),
        "pickle.npz": (pickle.dumps({"w": np.zeros(3)}, protocol=2), PICKLE),
        "torch.npz": ((root / "torch.zip").read_bytes(),
                      "is a pickle, refused (a PyTorch zip checkpoint: its data.pkl is a "
                      "pickle): trdq_jax never unpickles"),
        "empty.npz": (b"", "is empty (0 bytes); expected a .npz checkpoint: truncated"),
    }


CASES = ["header_cut.safetensors", "data_cut.safetensors", "text.safetensors",
         "absurd.safetensors", "pickle.safetensors", "empty.safetensors", "truncated.npz",
         "random.npz", "pickle.npz", "torch.npz", "empty.npz"]

CONFIGS = {
    "syntax.py": ("from trdq_jax.config import *\n\ndef get_config(:\n    return None\n",
                  "line 3: syntax error: ", "'def get_config(:'"),
    "raises.py": ("from trdq_jax.config import *\n\n\ndef get_config():\n"
                  "    scale = {'base': 1}\n    return scale['large']\n",
                  "line 6: get_config() raised KeyError: 'large'", None),
    "top_level.py": ("import math\nWIDTH = math.sqrt(-1)\n",
                     "line 2: running the file raised ValueError: math domain error", None),
    "bad_value.py": ("from trdq_jax.config import *\n\ndef get_config():\n"
                     "    return ExperimentConfig(name='c', model=DiTConfig(input_size=8,\n"
                     "        in_channels=1, patch_size=2, hidden_size=-4, depth=1, num_heads=2,"
                     "\n        num_classes=3))\n",
                     "line 4: DiTConfig.hidden_size: expected a positive int, got -4", None),
}


_EXPECTED: dict = {}  # file name -> the message after its quoted path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("msg")
    for name, (data, expected) in _files(root).items():
        (root / name).write_bytes(data)
        _EXPECTED[name] = expected
    for name, (text, _, _) in CONFIGS.items():
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("name", CASES)
def test_weight_file_library_message(ws, name):
    path = ws / name
    expected = _EXPECTED[name]
    with pytest.raises(ConversionError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"path: {str(path)!r} {expected}"), message
    assert "\n" not in message
    assert info.value.__cause__ is None  # no reader traceback chained to it
    assert info.value.__context__ is None or info.value.__suppress_context__
    for library_words in ("header too large", "BadZipFile", "not a zip file", "pickled data",
                          "allow_pickle", "Error while deserializing"):
        assert library_words not in message, message


@pytest.mark.parametrize("name", CASES)
def test_weight_file_cli_message(ws, name, capsys):
    before = tree_hash(ws)
    code = main(["convert", "--input", str(ws / name), "--num-heads", "2",
                 "--out", str(ws / "new")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1, err
    assert err.startswith(f"trdq convert: error: --input: {str(ws / name)!r} "
                          f"{_EXPECTED[name]}"), err
    assert tree_hash(ws) == before


def test_the_checks_accept_whole_files(ws):
    assert "blocks.0.mlp.fc1.weight" in weight_files.check_safetensors(ws / "dit.safetensors")
    weight_files.check_npz(ws / "dit.npz")
    assert len(load_state_dict(ws / "dit.npz")) == len(load_state_dict(ws / "dit.safetensors"))


@pytest.mark.parametrize("name", ["truncated.npz", "random.npz", "pickle.npz", "empty.npz"])
def test_calibration_and_sample_npz_use_the_same_words(ws, tmp_path, name):
    from trdq_jax.quant.calib_io import CalibrationError, _read_stats
    from trdq_jax.sampling.sample_dir import load_sample_dir, save_sample_dir
    from tests.test_quant_cli import TINY
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "stats.npz").write_bytes((ws / name).read_bytes())
    with pytest.raises(CalibrationError) as info:
        _read_stats(tmp_path / "calib")
    expected = _EXPECTED[name].replace(".npz checkpoint", ".npz file")
    assert str(info.value).startswith(f"{str(tmp_path / 'calib' / 'stats.npz')!r} {expected}")
    samples = np.zeros((2, 8, 8, 1), np.float32)
    out = save_sample_dir(tmp_path / "s", samples, np.arange(2), cfg=TINY, source="test",
                          grid_rows=[samples], row_labels=["r"], title="t")
    (out / "samples.npz").write_bytes((ws / name).read_bytes())
    with pytest.raises(manifest.IntegrityError) as info:
        load_sample_dir(out)
    assert str(info.value).startswith(f"{str(out / 'samples.npz')!r} {expected}"), info.value


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_file_errors_name_the_file_and_line(ws, name, capsys):
    _, where, shown = CONFIGS[name]
    path = ws / name
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    message = str(info.value)
    assert message.startswith(f"path: {str(path)!r}, {where}"), message  # the Python argument
    assert shown is None or shown in message, message
    assert "\n" not in message
    before = tree_hash(ws)
    code = main(["train", "--config", str(path), "--workdir", str(ws / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == f"trdq train: error: --config{message.removeprefix('path')}\n", err
    assert "internal error" not in err
    assert tree_hash(ws) == before


def test_config_error_line_with_a_relative_path(ws, monkeypatch):
    monkeypatch.chdir(ws)
    with pytest.raises(ConfigError, match=r"^path: 'raises.py', line 6: get_config\(\) "
                                          "raised KeyError"):
        load_config_file("raises.py")


@pytest.mark.parametrize("name, data, expected", [
    ("short.safetensors", b"\x88\x01\x00", "is truncated: holds 3 of 8 bytes"),
    ("word.safetensors", b"hello", "is not a safetensors file: it holds text ('hello')"),
    ("nonjson.safetensors", struct.pack("<Q", 12) + b"{not json at all",
     "is not a safetensors file: its 12-byte header is not JSON"),
    ("offsets.safetensors", struct.pack("<Q", 20) + b'{"w": {"dtype": 1}} ',
     "is not a safetensors file: header entry 'w' has no valid data_offsets"),
    ("zip.safetensors", b"PK\x03\x04" + bytes(60),
     "is not a safetensors file: it is a zip archive (an .npz?)"),
    ("array.npz", b"\x93NUMPY\x01\x00" + bytes(40), "is not a .npz file: it holds a single .npy"),
])
def test_more_foreign_files(tmp_path, name, data, expected):
    (tmp_path / name).write_bytes(data)
    check = (weight_files.check_safetensors if name.endswith(".safetensors")
             else weight_files.check_npz)
    with pytest.raises(weight_files.WeightFileError) as info:
        check(tmp_path / name)
    assert str(info.value).startswith(f"{str(tmp_path / name)!r} {expected}"), info.value
