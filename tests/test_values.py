"""Values are checked, not only digests: an output whose values were edited AND whose manifest
was recomputed to match (``_forge``) is refused on load naming the layer and field; every
``Recipe`` field is range-checked; a sample directory's arrays are checked against its manifest."""
import dataclasses
import json
import math
import pathlib
import re
import shutil

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

import trdq_jax.quant as Q
from trdq_jax import checkpoint, manifest
from trdq_jax.config import ConfigError
from trdq_jax.manifest import tree_digest
from trdq_jax.models import build_model
from trdq_jax.quant import capture
from trdq_jax.quant.calib_io import CalibrationError, load_calibration, save_calibration
from trdq_jax.quant.io import recipe_from_dict
from trdq_jax.quant.pipeline import run_calibration
from trdq_jax.quant.recipe import ABLATIONS, RECIPES
from trdq_jax.sampling.sample_dir import load_sample_dir, save_sample_dir
from tests.test_quant_cli import TINY, tiny_params

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

LAYER = "blocks_0/attn/qkv"
QKV = "['layers']['blocks_0']['attn']['qkv']"
STATS = ("absmax", "tensor_min", "tensor_max", "rows", "weight_absmax")
# static activations (a_scale, a_zero), smoothing, DuQuant (r1, perm, r2), 8-bit codes
DUQUANT = Q.Recipe("dq", smoothing=True, rotation="duquant", rotation_block=16, a_mode="static",
                   a_clip_search=False, num_segments=2)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """One valid directory of every kind, written by the library: {name: path}."""
    root = tmp_path_factory.mktemp("values")
    params = tiny_params()
    hadamard = Q.get_recipe("quarot_rtn", 4, 8, num_segments=2)  # signs, a_clip, int4 codes
    calib = run_calibration(build_model(TINY.model), params, TINY, hadamard, per_class=1,
                            rows_per_step=16)
    table = calib.segment_of_step
    bf16 = jax.tree.map(lambda p: np.asarray(p).astype(ml_dtypes.bfloat16), params)
    return {
        "calibration": save_calibration(root / "calibration", calib, hadamard, TINY,
                                        source={"model": "x"}, params_sha256=tree_digest(params),
                                        per_class=1, seed=1000, rows_per_step=16),
        "hadamard": Q.save_quantized(root / "hadamard", Q.quantize(params, calib, hadamard),
                                     TINY, hadamard, table),
        "duquant": Q.save_quantized(root / "duquant", Q.quantize(params, calib, DUQUANT), TINY,
                                    DUQUANT, table),
        "float": checkpoint.save(root / "float", params, TINY),
        "bf16": checkpoint.save(root / "bf16", bf16, TINY)}


def _load(path: pathlib.Path):
    if (path / "stats.npz").is_file():
        return load_calibration(path)
    if json.loads((path / "metadata.json").read_text())["kind"] == "quantized":
        return Q.load_quantized(path)
    return checkpoint.restore(path)


def _rewrite_tree(path: pathlib.Path, edits: dict) -> dict:
    """Apply ``edits`` ({keystr: fn}) to a checkpoint's orbax tree and write it back."""
    tree, _ = checkpoint.restore(path)
    assert set(edits) <= set(manifest.flat_arrays(tree)), sorted(manifest.flat_arrays(tree))
    tree = jax.tree_util.tree_map_with_path(
        lambda k, v: edits.get(jax.tree_util.keystr(k), lambda a: a)(np.array(v)), tree)
    shutil.rmtree(path / "params")
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    ckptr.save((path / "params").absolute(), args=ocp.args.StandardSave(tree))
    ckptr.close()
    return manifest.flat_arrays(tree)


def _forge(source: pathlib.Path, path: pathlib.Path, arrays=None, meta=None) -> pathlib.Path:
    """A copy of ``source`` edited as a forger would: ``arrays`` ({manifest name: fn(array) ->
    array}) and ``meta`` (fn(metadata without the manifest), in place), then every digest
    recomputed so that the manifest matches what is stored."""
    shutil.copytree(source, path)
    body = json.loads((path / "metadata.json").read_text())
    record = body.pop("manifest")
    if meta:
        meta(body)
    if arrays and (path / "stats.npz").is_file():
        with np.load(path / "stats.npz") as data:
            stored = dict(data)
        assert set(arrays) <= set(stored)
        stored.update({k: fn(stored[k].copy()) for k, fn in arrays.items()})
        np.savez(path / "stats.npz", **stored)
        record["arrays"] = manifest.array_entries(stored)
    elif arrays:
        record["arrays"] = manifest.array_entries(_rewrite_tree(path, arrays))
    record["fields"] = manifest.field_digests(body)
    (path / "metadata.json").write_text(json.dumps({**body, "manifest": record}))
    return path


def _set(index, value):
    """An edit setting ``array[index] = value``."""
    def edit(a):
        a[index] = value
        return a
    return edit


@pytest.mark.parametrize("kind, edits", [
    # consistent: a whole layer (magnitudes x2, so its Gram matrix x4)
    ("calibration", {**{f"0.{f}": lambda a: a * 2 for f in STATS}, "0.gram": lambda a: a * 4}),
    ("hadamard", {f"{QKV}['w_scale']": lambda a: a * 1.001}),
    ("duquant", {f"{QKV}['smooth']": lambda a: a * 1.001}),
    ("float", {"['blocks_0']['attn']['qkv']['kernel']": lambda a: a * 1.001})],
    ids=["calibration", "hadamard", "duquant", "float"])
def test_forged_but_valid_values_are_accepted(outputs, tmp_path, kind, edits):
    """What the tests below refuse is the values, not the forger's helper: valid edits with
    recomputed digests load."""
    path = _forge(outputs[kind], tmp_path / kind, edits)
    digests = [json.loads((p / "metadata.json").read_text())["manifest"]["arrays"]
               for p in (outputs[kind], path)]
    assert digests[0] != digests[1]
    _load(path)


# ----------------------------------------------------------------------------- calibration


def _outside(s, step=4):
    """Rows edit: a value within its channel's absmax but beyond the step's tensor range."""
    c = int(np.argmax(s["absmax"][step]))
    peak = s["absmax"][step, c]
    return {"rows": _set((step, 0, c), -peak if s["tensor_max"][step] > -s["tensor_min"][step]
                         else peak)}


CALIB_CASES = [  # (field, edits of LAYER's stats {field: fn} from its stats, message)
    ("absmax", lambda s: {"absmax": _set((2, slice(0, 3)), np.nan)},
     r"3 NaN values \(step 2\)"),
    ("absmax", lambda s: {"absmax": _set((1, 0), np.inf)}, r"1 infinite values \(step 1\)"),
    ("tensor_min", lambda s: {"tensor_min": _set(4, np.nan)}, r"1 NaN values \(step 4\)"),
    ("tensor_max", lambda s: {"tensor_max": _set(0, np.inf)}, r"1 infinite values \(step 0\)"),
    ("rows", lambda s: {"rows": _set((5, 0, 0), -np.inf)}, r"1 infinite values \(step 5\)"),
    ("weight_absmax", lambda s: {"weight_absmax": _set(7, np.nan)}, "1 NaN values$"),
    ("absmax", lambda s: {"absmax": _set((1, 3), -1.0)}, r"1 negative values .*\(step 1\)"),
    ("weight_absmax", lambda s: {"weight_absmax": lambda a: -a}, "48 negative values"),
    ("tensor_min", lambda s: {"tensor_min": _set(3, s["tensor_max"][3]),
                              "tensor_max": _set(3, s["tensor_min"][3])},
     r".* > tensor_max .* \(step 3\)"),
    ("absmax", lambda s: {"absmax": _set(2, s["absmax"][2] * 0.5)},
     r"largest value .* is not max\(-tensor_min, tensor_max\) = .* \(step 2\)"),
    ("absmax", lambda s: {"absmax": _set(0, s["absmax"][0] * 2)},
     r"largest value .* \(step 0\)"),
    ("rows", lambda s: {"rows": _set((1, 2, 5), s["absmax"][1, 5] * 1.5)},
     r"1 values exceed their channel's absmax \(step 1\)"),
    ("rows", _outside, r"1 values outside \[tensor_min, tensor_max\] \(step 4\)"),
]


@pytest.mark.parametrize("field, edit, message", CALIB_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CALIB_CASES)])
def test_calibration_values_are_checked(outputs, tmp_path, field, edit, message):
    source = outputs["calibration"]
    i = json.loads((source / "metadata.json").read_text())["layers"].index(LAYER)
    with np.load(source / "stats.npz") as data:
        stats = {f: data[f"{i}.{f}"] for f in STATS}
    path = _forge(source, tmp_path / "c", {f"{i}.{f}": fn for f, fn in edit(stats).items()})
    with pytest.raises(CalibrationError,
                       match=f"stats.npz: layer '{LAYER}' {field}: {message}") as error:
        load_calibration(path)
    assert "\n" not in str(error.value)


def test_conv_patches_load_with_their_padding_zeros(outputs, tmp_path):
    """A conv's rows are im2col patches ``[S, R, taps * K]`` holding zeros where they cover the
    padding: they load although every input is positive (zero lies outside the tensor range),
    and are checked against their channel's absmax like a Dense layer's rows."""
    calib, recipe, cfg, _ = load_calibration(outputs["calibration"])
    x = jax.random.uniform(jax.random.key(0), (6, 2, 4, 4, 8), minval=0.5)  # [S, B, H, W, K]
    geometry = ((3, 3), (1, 1), ((1, 1), (1, 1)))  # kernel, strides, pads
    steps = [capture._input_statistics(x[s], "conv", 16, jax.random.key(s), geometry)
             for s in range(6)]
    stats = capture.LayerStats(weight_absmax=np.ones(8, np.float32), **{
        n: np.stack([np.asarray(step[n]) for step in steps]) for n in STATS[:4]})
    assert (stats.rows == 0).any() and stats.tensor_min.min() > 0
    path = save_calibration(tmp_path / "conv", dataclasses.replace(
        calib, stats={**calib.stats, "conv": stats}), recipe, cfg, source={"model": "x"},
        params_sha256="0" * 64, per_class=1, seed=0, rows_per_step=16)
    assert load_calibration(path)[0].stats["conv"].rows.shape == (6, 16, 9 * 8)
    forged = _forge(path, tmp_path / "forged", {f"{len(calib.stats)}.rows": _set((2, 0, 70), 1.5)})
    with pytest.raises(CalibrationError, match=r"layer 'conv' rows: 1 values exceed their "
                                               r"channel's absmax \(step 2\)"):
        load_calibration(forged)


# ----------------------------------------------------------------------------- checkpoints


def _verify(field, what):
    """The message of a value refused by ``verify.check_qlinear`` for LAYER."""
    return "inconsistent quantized checkpoint: .*" + re.escape(f": layer {LAYER}.{field}: {what}")


def _non_finite(name, what):
    """The message of a non-finite array refused by ``checkpoint.restore``."""
    return re.escape(f"': array {name} holds {what} values; parameters must be finite")


POSITIVE, SIGNS, CLIP = "not finite and > 0", "not exactly +1 or -1", "not in (0, 1]"
QUANT_CASES = [  # (directory, {array of LAYER: edit}, message)
    ("hadamard", {"w_scale": _set((0, 3), np.nan)},
     _non_finite(f"{QKV}['w_scale']", "1 NaN and 0 infinite")),
    ("hadamard", {"w_scale": _set((0, 3), -0.01)},
     _verify("w_scale", f"1 of 144 values are {POSITIVE} (first: -0.01 at [0, 3])")),
    ("hadamard", {"w_scale": lambda a: a * 0},
     _verify("w_scale", f"144 of 144 values are {POSITIVE}")),
    ("hadamard", {"a_clip": _set(1, 1.5)}, _verify("a_clip", f"1 of 2 values are {CLIP}")),
    ("hadamard", {"a_clip": _set(0, 0.0)}, _verify("a_clip", f"1 of 2 values are {CLIP}")),
    ("hadamard", {"signs": _set(5, 0.0)}, _verify("signs", f"1 of 48 values are {SIGNS}")),
    ("hadamard", {"signs": lambda a: a * 0.5}, _verify("signs", f"48 of 48 values are {SIGNS}")),
    ("hadamard", {"bias": _set(2, np.inf)}, _non_finite(f"{QKV}['bias']", "0 NaN and 1 infinite")),
    ("hadamard", {"w_q": _set((0, 0, 0), 0x88)},  # two int4 codes of -8
     _verify("w_bits", "4-bit symmetric codes lie in [-7, 7], the stored codes span [-8")),
    ("duquant", {"a_scale": _set(0, -1.0)}, _verify("a_scale", f"1 of 2 values are {POSITIVE}")),
    ("duquant", {"a_scale": _set(1, np.inf)},
     _non_finite(f"{QKV}['a_scale']", "0 NaN and 1 infinite")),
    ("duquant", {"a_zero": _set(1, 300)},
     _verify("a_bits", "8-bit zero points lie in [-128, 127]")),
    ("duquant", {"smooth": _set((0, 9), 0.0)}, _verify("smooth", f"1 of 48 values are {POSITIVE}")),
    ("duquant", {"smooth": lambda a: -a}, _verify("smooth", f"48 of 48 values are {POSITIVE}")),
    ("duquant", {"perm": lambda a: _set((0, 0), a[0, 1])(a)},  # a duplicate index
     _verify("perm", "segment(s) [0] not a permutation of 0..47")),
    ("duquant", {"perm": _set((0, 4), 48)}, _verify("perm", "segment(s) [0] not a permutation")),
    ("duquant", {"r1": lambda a: a * 1.1}, _verify("r1", "segment(s) [0] not orthogonal")),
    ("duquant", {"r2": _set((0, 3), 0.0)}, _verify("r2", "segment(s) [0] not orthogonal")),
    ("duquant", {"w_q": _set((0, 0, 0), -128)},
     _verify("w_bits", "8-bit symmetric codes lie in [-127, 127], the stored codes span [-128")),
]


@pytest.mark.parametrize("kind, edits, message", QUANT_CASES,
                         ids=[f"{c[0]}-{[*c[1]][0]}-{i}" for i, c in enumerate(QUANT_CASES)])
def test_quantized_values_are_checked(outputs, tmp_path, kind, edits, message):
    path = _forge(outputs[kind], tmp_path / kind,
                  {f"{QKV}['{f}']": fn for f, fn in edits.items()})
    with pytest.raises(checkpoint.CheckpointError, match=message) as error:
        Q.load_quantized(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind, name, edit, what", [
    ("float", "['blocks_0']['attn']['qkv']['kernel']", _set((3, 1), np.nan),
     "1 NaN and 0 infinite"),
    ("float", "['final_layer']['linear']['bias']", lambda a: np.full_like(a, np.inf),
     "0 NaN and 4 infinite"),
    ("bf16", "['blocks_0']['mlp']['fc1']['kernel']", _set(0, np.nan), "192 NaN and 0 infinite"),
    ("hadamard", "['float']['y_embedder']['embedding_table']['embedding']", _set(1, -np.inf),
     "0 NaN and 48 infinite"),
])
def test_non_finite_checkpoint_arrays_are_refused(outputs, tmp_path, kind, name, edit, what):
    path = _forge(outputs[kind], tmp_path / kind, {name: edit})
    with pytest.raises(checkpoint.CheckpointError, match=_non_finite(name, what)):
        _load(path)


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("field, value", [
    ("name", ""), ("name", 3), ("w_bits", True), ("w_bits", 9), ("a_bits", 8.0),
    ("w_symmetric", False), ("w_clip_search", 1), ("w_clip_grid", (0.9,)),
    ("w_clip_grid", (1.0, 0.0)), ("w_clip_grid", [1.0]), ("w_clip_grid", (1.0, math.nan)),
    ("a_mode", "Static"), ("a_mode", ["static"]), ("a_symmetric", None), ("a_clip_search", "no"),
    ("smoothing", 0), ("alpha", -0.1), ("alpha", math.nan), ("alpha", True), ("alpha", "0.5"),
    ("alpha_grid", (0.5, 1.5)), ("alpha_grid", [0.5]), ("alpha_grid", (math.inf,)),
    ("rotation", "hadamrd"), ("rotation_block", 0), ("rotation_block", -4),
    ("rotation_block", 1), ("rotation_block", 16.0), ("rotation_block", True),
    ("num_segments", 0), ("num_segments", 2.0), ("num_segments", True),
    ("min_segment_steps", 0), ("min_segment_steps", 2.0), ("min_segment_steps", True),
    ("segment_split", "even"), ("per_segment_weights", 1), ("keep_float", "x_embedder"),
    ("keep_float", (3,)), ("keep_float", ("(",)), ("weight_only", ["adaLN"]), ("gptq", "yes"),
    ("search_weights", "fast"), ("seed", -1), ("seed", 2 ** 32), ("seed", 1.5), ("seed", False),
    ("low_rank", -1), ("low_rank", 1.5), ("low_rank", True), ("low_rank_per_segment", 1),
    ("fp8", "yes"),
])
def test_every_recipe_field_is_range_checked(field, value):
    with pytest.raises(ConfigError, match=rf"^Recipe\.{field}: (expected|invalid regex)") as error:
        Q.Recipe(**{"name": "r", field: value})
    assert "\n" not in str(error.value)


def test_named_recipes_construct_and_round_trip():
    assert {f"trdq_{a}" for a in ABLATIONS} <= set(RECIPES)
    for name in RECIPES:
        for bits in ((4, 8), (8, 8), (16, 16)):
            recipe = Q.get_recipe(name, *bits)
            assert recipe_from_dict(json.loads(json.dumps(dataclasses.asdict(recipe)))) == recipe
    Q.Recipe("edge", alpha=0, alpha_grid=(0, 1), rotation_block=2, seed=2 ** 32 - 1,
             w_clip_grid=(1,), keep_float=(), weight_only=())


@pytest.mark.parametrize("kind, field, value", [
    ("calibration", "rotation_block", -1), ("calibration", "gptq", "yes"),
    ("hadamard", "alpha", 1.5), ("hadamard", "seed", -1), ("duquant", "keep_float", [1]),
])
def test_stored_recipe_out_of_range_is_refused_naming_the_field(outputs, tmp_path, kind, field,
                                                                 value):
    def edit(meta):
        (meta if kind == "calibration" else meta["extra"])["recipe"][field] = value
    path = _forge(outputs[kind], tmp_path / kind, meta=edit)
    error = CalibrationError if kind == "calibration" else checkpoint.CheckpointError
    with pytest.raises(error, match=rf"inconsistent .*: Recipe\.{field}: expected"):
        _load(path)


# ----------------------------------------------------------------------------- samples


def test_sample_directory_arrays_are_checked_against_the_manifest(tmp_path):
    samples = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
    labels = np.array([0, 1, 2, 0])
    path = save_sample_dir(tmp_path / "s", samples, labels, cfg=TINY, source="test",
                           grid_rows=[samples[:2]], row_labels=["a"], title="t")
    load_sample_dir(path)
    edited = samples.copy()
    edited[2, 3, 4, 0] += 1.0
    np.savez(path / "samples.npz", samples=edited, labels=labels)  # the digests left as they were
    with pytest.raises(manifest.IntegrityError, match="samples: checksum differs"):
        load_sample_dir(path)
