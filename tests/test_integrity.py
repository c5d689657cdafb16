"""Integrity of what the project writes: edited metadata, corrupted arrays and inconsistent
layers are refused on restore, naming the field."""
import dataclasses
import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

import trdq_jax.quant as Q
from trdq_jax import checkpoint, manifest
from trdq_jax.config import DiTConfig
from trdq_jax.models import build_model, load_checkpoint
from trdq_jax.quant import verify
from trdq_jax.quant.calib_io import (CalibrationError, check_calibration_model, load_calibration,
                                     save_calibration)
from trdq_jax.manifest import tree_digest
from trdq_jax.quant.pipeline import run_calibration
from trdq_jax.sampling.sample_dir import load_sample_dir, save_sample_dir
from tests.test_quant_cli import TINY, tiny_params

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def tiny():
    params = tiny_params()
    model = build_model(TINY.model)
    recipe = Q.get_recipe("quarot", 4, 8, num_segments=2)  # Hadamard rotation, no searches: fast
    calib = run_calibration(model, params, TINY, recipe, per_class=1, rows_per_step=16)
    return {"params": params, "model": model, "recipe": recipe, "calib": calib,
            "w4": Q.quantize(params, calib, recipe),
            "w8": Q.quantize(params, calib, recipe.with_bits(8, 8))}


def _edit(path: pathlib.Path, change) -> None:
    meta_file = path / "metadata.json"
    meta = json.loads(meta_file.read_text())
    change(meta)
    meta_file.write_text(json.dumps(meta))


def _layer0(meta):
    return meta["extra"]["layers"]["blocks_0/attn/qkv"]


# ----------------------------------------------------------------------------- manifests


def test_manifest_names_missing_changed_and_corrupted_arrays():
    a = {"x": np.arange(4, dtype=np.int8), "y": np.ones((2, 3), np.float32)}
    record = manifest.array_entries(a)
    manifest.check_arrays(record, a, "here")
    with pytest.raises(manifest.IntegrityError, match="missing array y"):
        manifest.check_arrays(record, {"x": a["x"]}, "here")
    with pytest.raises(manifest.IntegrityError, match=r"y: stored float64\[2, 3\]"):
        manifest.check_arrays(record, {**a, "y": a["y"].astype(np.float64)}, "here")
    flipped = a["x"].copy()
    flipped[2] ^= 1
    with pytest.raises(manifest.IntegrityError, match="x: checksum differs"):
        manifest.check_arrays(record, {**a, "x": flipped}, "here")
    meta = {"config": {"model": {"num_heads": 6}}, "seed": 1}
    digests = manifest.field_digests(meta)
    assert set(digests) == {"config.model.num_heads", "seed"}
    with pytest.raises(manifest.IntegrityError, match="changed config.model.num_heads"):
        manifest.check_fields({"config": {"model": {"num_heads": 12}}, "seed": 1}, digests, "m")


def test_float_checkpoint_edits_and_corruption_are_refused(tmp_path):
    params = tiny_params()
    path = checkpoint.save(tmp_path / "ck", params, TINY)
    model, restored, cfg = load_checkpoint(path)
    assert cfg == TINY
    for field, change in (
            ("config.model.num_heads", lambda m: m["config"]["model"].update(num_heads=4)),
            ("config.sampler.num_steps", lambda m: m["config"]["sampler"].update(num_steps=7)),
            ("extra.note", lambda m: m["extra"].update(note="hi"))):
        copy = tmp_path / field
        checkpoint.save(copy, params, TINY)
        _edit(copy, change)
        with pytest.raises(checkpoint.CheckpointError, match=f"edited .*{field}"):
            checkpoint.restore(copy)
    # a flipped byte in an array file: orbax may fail to decode it, else the checksum fails
    data = max((p for p in (path / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="checksum differs|cannot read"):
        checkpoint.restore(path)


def test_params_of_another_model_are_refused(tmp_path):
    checkpoint.save(tmp_path / "ck", tiny_params(), TINY)
    other = dataclasses.replace(TINY, model=dataclasses.replace(TINY.model, depth=2))
    checkpoint.save(tmp_path / "wrong", tiny_params(), other)  # params of depth 1, config depth 2
    with pytest.raises(checkpoint.CheckpointError, match=r"missing \(\d+\): blocks_1/"):
        load_checkpoint(tmp_path / "wrong")
    with pytest.raises(checkpoint.CheckpointError, match="depth: stored 1, expected 2"):
        load_checkpoint(tmp_path / "ck", other)


# ----------------------------------------------------------------------------- quantized


@pytest.mark.parametrize("setting, field, change", [
    ("w4", "a_bits", lambda m: _layer0(m).update(a_bits=4)),
    ("w4", "w_bits", lambda m: _layer0(m).update(w_bits=8)),
    ("w8", "w_bits", lambda m: _layer0(m).update(w_bits=4)),
    ("w4", "rotation", lambda m: _layer0(m).update(rotation="none")),
    ("w4", "num_heads", lambda m: m["config"]["model"].update(num_heads=4)),
    ("w4", "segment_of_step", lambda m: m["extra"].update(segment_of_step=[0] * 6)),
    ("w4", "recipe.a_bits", lambda m: m["extra"]["recipe"].update(a_bits=6)),
])
def test_edited_quantized_metadata_is_refused(tiny, tmp_path, setting, field, change):
    path = Q.save_quantized(tmp_path / "q", tiny[setting], TINY, tiny["recipe"] if setting == "w4"
                            else tiny["recipe"].with_bits(8, 8), tiny["calib"].segment_of_step)
    Q.load_quantized(path)
    _edit(path, change)
    with pytest.raises(checkpoint.CheckpointError, match=f"edited .*{field}"):
        Q.load_quantized(path)


def test_quantized_round_trip_and_kind_errors(tiny, tmp_path):
    path = Q.save_quantized(tmp_path / "q", tiny["w4"], TINY, tiny["recipe"],
                            tiny["calib"].segment_of_step)
    qparams, cfg, recipe, table = Q.load_quantized(path)
    assert cfg == TINY and recipe == tiny["recipe"]
    np.testing.assert_array_equal(table, tiny["calib"].segment_of_step)
    q = qparams["layers"]["blocks_0"]["attn"]["qkv"]
    want = tiny["w4"]["layers"]["blocks_0"]["attn"]["qkv"]
    np.testing.assert_array_equal(np.asarray(q.w_q), np.asarray(want.w_q))
    with pytest.raises(checkpoint.CheckpointError, match="expected a float one"):
        load_checkpoint(path)
    checkpoint.save(tmp_path / "f", tiny["params"], TINY)
    with pytest.raises(checkpoint.CheckpointError, match="expected a quantized one"):
        Q.load_quantized(tmp_path / "f")


def _qkv(tiny, setting="w8"):
    return tiny[setting]["layers"]["blocks_0"]["attn"]["qkv"]


@pytest.mark.parametrize("mutate, message", [
    (lambda q: dataclasses.replace(q, w_bits=4), r"w_bits: 4-bit codes are stored as uint8"),
    (lambda q: dataclasses.replace(q, w_bits=6), r"w_bits: 6-bit symmetric codes lie in \[-31"),
    (lambda q: dataclasses.replace(q, in_features=q.in_features + 1), "w_bits: 8-bit codes"),
    (lambda q: dataclasses.replace(q, rotation="none"), "rotation: 'none' has no 'signs'"),
    (lambda q: dataclasses.replace(q, rotation="duquant"), "rotation: 'duquant' has no 'signs'"),
    (lambda q: dataclasses.replace(q, a_mode="static"), "a_mode: 'static' activations need"),
    (lambda q: dataclasses.replace(q, w_colsum=q.w_colsum + 1), "w_colsum: does not equal"),
    (lambda q: dataclasses.replace(q, bias=q.bias[:-1]), r"bias: expected shape \(144,\)"),
    (lambda q: dataclasses.replace(q, a_bits=1), "a_bits: expected bits in 2..8 or 16"),
])
def test_layer_checks_against_independent_facts(tiny, mutate, message):
    q = _qkv(tiny)
    codes = np.asarray(q.w_q)
    assert codes.dtype == np.int8 and np.abs(codes).max() <= 127  # the facts the checks use
    np.testing.assert_array_equal(np.asarray(q.w_colsum), codes.astype(np.int64).sum(axis=1))
    verify.check_qlinear(q, "qkv", num_segments=2)
    with pytest.raises(verify.QuantizedModelError, match=message):
        verify.check_qlinear(mutate(q), "qkv", num_segments=2)


def test_int4_codes_are_checked_after_unpacking(tiny):
    q = _qkv(tiny, "w4")
    verify.check_qlinear(q, "qkv")
    codes = verify.weight_codes(q)
    assert codes.shape == (1, 48, 144) and -7 <= codes.min() and codes.max() <= 7
    with pytest.raises(verify.QuantizedModelError, match=r"3-bit symmetric codes lie in \[-3, 3\]"):
        verify.check_qlinear(dataclasses.replace(q, w_bits=3), "qkv")
    packed = np.asarray(q.w_q).copy()
    packed[0, 0, 0] = 0x88  # two codes of -8: outside the symmetric 4-bit range
    with pytest.raises(verify.QuantizedModelError, match=r"span \[-8"):
        verify.check_qlinear(dataclasses.replace(q, w_q=jnp.asarray(packed)), "qkv")


def test_segment_table_and_model_checks(tiny):
    assert verify.check_segment_table([0, 0, 1, 1], 2, 4, "t").dtype == np.int32
    for table, steps, message in (([0, 0, 1], 4, "expected 4 entries"),
                                  ([0, 0, 2, 1], 4, r"values in \[0, 2\)"),
                                  ([0, 0, 0, 0], 4, r"segments \[1\] are visited by no step"),
                                  ([0.0, 1.0, 1.0, 1.0], 4, "expected a non-empty 1-D int")):
        with pytest.raises(verify.QuantizedModelError, match=message):
            verify.check_segment_table(table, 2, steps, "t")
    verify.check_against_model(tiny["w8"], TINY.model, "q")
    wider = dataclasses.replace(TINY.model, hidden_size=64)
    with pytest.raises(verify.QuantizedModelError, match=r"has kernel \[48, \d+\], the model config wants \[64, \d+\]"):
        verify.check_against_model(tiny["w8"], wider, "q")
    deeper = dataclasses.replace(TINY.model, depth=2)
    with pytest.raises(verify.QuantizedModelError, match=r"float params .*missing \['blocks_1'\]"):
        verify.check_against_model(tiny["w8"], deeper, "q")


# ----------------------------------------------------------------------------- calibration


def _save_calib(tiny, path):
    return save_calibration(path, tiny["calib"], tiny["recipe"], TINY, source={"model": "x"},
                            params_sha256=tree_digest(tiny["params"]), per_class=1,
                            seed=1000, rows_per_step=16)


@pytest.mark.parametrize("field, change", [
    ("segment_of_step", lambda m: m.update(segment_of_step=[1] * 6)),
    ("num_segments", lambda m: m.update(num_segments=3)),
    ("layers", lambda m: m.update(layers=m["layers"][::-1])),
    ("config.sampler.num_steps", lambda m: m["config"]["sampler"].update(num_steps=5)),
    ("params_sha256", lambda m: m.update(params_sha256="0" * 64)),
])
def test_edited_calibration_is_refused(tiny, tmp_path, field, change):
    path = _save_calib(tiny, tmp_path / "c")
    load_calibration(path)
    _edit(path, change)
    with pytest.raises(CalibrationError, match=f"edited .*{field}"):
        load_calibration(path)


def test_corrupt_calibration_arrays_and_model_mismatch(tiny, tmp_path):
    path = _save_calib(tiny, tmp_path / "c")
    calib, recipe, cfg, meta = load_calibration(path)
    stats = dict(np.load(path / "stats.npz"))
    stats["0.absmax"], stats["1.absmax"] = stats["1.absmax"], stats["0.absmax"]
    np.savez(tmp_path / "swapped.npz", **stats)
    os.replace(tmp_path / "swapped.npz", path / "stats.npz")
    with pytest.raises(manifest.IntegrityError, match="0.absmax: .*(checksum|stored)"):
        load_calibration(path)
    (path / "stats.npz").write_bytes((path / "stats.npz").read_bytes()[:100])
    with pytest.raises(CalibrationError,
                       match="stats.npz' is truncated: the zip archive stops after 100 bytes"):
        load_calibration(path)
    params = tiny["params"]
    check_calibration_model(calib, cfg, meta, params, tree_digest(params), "c")
    with pytest.raises(CalibrationError, match="float weights at .* changed"):
        check_calibration_model(calib, cfg, meta, params, "1" * 64, "c")
    other = dataclasses.replace(cfg, model=DiTConfig(**{**dataclasses.asdict(cfg.model),
                                                        "depth": 2}))
    with pytest.raises(CalibrationError, match="calibrated for model"):
        check_calibration_model(calib, other, meta, params, tree_digest(params), "c")


def test_sample_directory_round_trip_and_corruption(tmp_path):
    samples = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
    labels = np.array([0, 1, 2, 0])
    rows = [samples[labels == c] for c in range(3)]
    path = save_sample_dir(tmp_path / "s", samples, labels, cfg=TINY, source="test",
                           grid_rows=rows, row_labels=["a", "b", "c"], title="t",
                           info={"seed": 3})
    got, got_labels, meta = load_sample_dir(path)
    np.testing.assert_array_equal(got, samples)
    np.testing.assert_array_equal(got_labels, labels)
    assert meta["seed"] == 3 and sorted(os.listdir(path)) == ["grid.png", "metadata.json",
                                                               "samples.npz"]
    _edit(path, lambda m: m.update(seed=4))
    with pytest.raises(manifest.IntegrityError, match="changed seed"):
        load_sample_dir(path)
