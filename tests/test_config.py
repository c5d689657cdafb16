"""Config validation, overrides and config files."""
import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from trdq_jax.config import (ConfigError, DiTConfig, ExperimentConfig, SamplerConfig, TrainConfig,
                             UNetConfig, VideoDiTConfig, apply_overrides, check_cfg_scale,
                             experiment_from_dict, load_config_file, to_dict)


@pytest.mark.parametrize("kwargs, field", [
    (dict(hidden_size=0), "hidden_size"),
    (dict(input_size=9, patch_size=2), "input_size"),
    (dict(hidden_size=100, num_heads=16), "hidden_size"),
    (dict(dtype="float8"), "dtype"),
    (dict(class_dropout_prob=1.5), "class_dropout_prob"),
    (dict(depth=True), "depth"),
])
def test_dit_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^DiTConfig\.{field}: expected"):
        DiTConfig(**kwargs)


def test_other_configs_validate():
    with pytest.raises(ConfigError, match=r"SamplerConfig\.solver"):
        SamplerConfig(solver="euler_a")
    with pytest.raises(ConfigError, match=r"SamplerConfig\.num_segments"):
        SamplerConfig(num_steps=10, num_segments=11)
    with pytest.raises(ConfigError, match=r"UNetConfig\.num_groups"):
        UNetConfig(base_channels=24, num_groups=16)
    with pytest.raises(ConfigError, match=r"SamplerConfig\.prediction: expected"):
        SamplerConfig(prediction="x0")
    with pytest.raises(ConfigError, match=r"SamplerConfig\.prediction: expected 'epsilon'"):
        SamplerConfig(solver="flow_euler", prediction="v")
    with pytest.raises(ConfigError, match=r"VideoDiTConfig\.temporal_attention: expected"):
        VideoDiTConfig(temporal_attention="space")


def test_overrides_parse_by_declared_type():
    cfg = ExperimentConfig(name="x", model=DiTConfig(input_size=8, in_channels=1, hidden_size=48,
                                                     depth=2, num_heads=4, num_classes=10))
    new = apply_overrides(cfg, ["model.depth=3", "model.learn_sigma=false", "sampler.cfg_scale=2.5",
                                "model.mlp_ratio=2", "name=y"])
    assert (new.model.depth, new.model.learn_sigma, new.sampler.cfg_scale, new.model.mlp_ratio,
            new.name) == (3, False, 2.5, 2.0, "y")
    assert isinstance(new.model.mlp_ratio, float)
    unet = ExperimentConfig(name="u", model=UNetConfig())
    assert apply_overrides(unet, ["model.channel_mult=1,2,2"]).model.channel_mult == (1, 2, 2)


@pytest.mark.parametrize("override, pattern", [
    ("model.depthh=3", "has no field 'depthh'"),
    ("model.depth=three", "cannot parse 'three' as int"),
    ("model.depth=0", r"DiTConfig\.depth: expected a positive int"),
    ("model=3", "is a section"),
    ("model.depth", "expected section.field=value"),
    ("model.learn_sigma=maybe", "cannot parse"),
])
def test_bad_overrides(override, pattern):
    cfg = ExperimentConfig(name="x", model=DiTConfig())
    with pytest.raises(ConfigError, match=pattern):
        apply_overrides(cfg, [override])


def test_dict_round_trip_and_unknown_fields():
    cfg = ExperimentConfig(name="u", model=UNetConfig(channel_mult=(1, 2, 2)))
    assert experiment_from_dict(to_dict(cfg)) == cfg
    d = to_dict(cfg)
    d["model"]["wings"] = 2
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['wings'\]"):
        experiment_from_dict(d)


def test_config_file_loading(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("from trdq_jax.config import ExperimentConfig, DiTConfig\n"
                    "def get_config():\n    return ExperimentConfig(name='g', model=DiTConfig())\n")
    assert load_config_file(good).name == "g"
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        load_config_file(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config_file(tmp_path / "missing.py")


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DiTConfig().depth = 3


def test_image_batch_size_is_checked_and_needs_a_video_model():
    for bad in (-1, 2.0, True):
        with pytest.raises(ConfigError, match=r"^TrainConfig\.image_batch_size: expected a non"):
            TrainConfig(image_batch_size=bad)
    with pytest.raises(ConfigError, match=r"train\.image_batch_size: .*needs a video_dit model, "
                                          r"got family 'dit'"):
        ExperimentConfig(name="x", model=DiTConfig(), train=TrainConfig(image_batch_size=4))
    video = VideoDiTConfig(num_frames=2, input_size=8, hidden_size=16, depth=1, num_heads=2)
    cfg = ExperimentConfig(name="x", model=video, train=TrainConfig(image_batch_size=4))
    assert experiment_from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("cls", [DiTConfig, VideoDiTConfig])
def test_mlp_ratio_must_give_a_whole_mlp_width(cls):
    assert 192 * 0.3 != int(192 * 0.3)  # 57.6: int() would silently build a 57-wide MLP
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}\.mlp_ratio: expected hidden_size "
                                          r"\* mlp_ratio to be a whole MLP width \(hidden_size="
                                          r"192 gives 57\.6\), got 0\.3$"):
        cls(hidden_size=192, num_heads=4, mlp_ratio=0.3)
    assert cls(hidden_size=192, num_heads=4, mlp_ratio=2.5).mlp_hidden_size == 480
    assert cls(hidden_size=192, num_heads=4).mlp_hidden_size == 768


def test_mlp_width_is_the_exact_integer_not_a_truncation():
    # 61 / 112 * 112 is 60.99999999999999 in binary floating point; int() would give 60.
    assert int(112 * (61 / 112)) == 60
    for cls in (DiTConfig, VideoDiTConfig):
        assert cls(hidden_size=112, num_heads=4, mlp_ratio=61 / 112).mlp_hidden_size == 61


@pytest.mark.parametrize("value, want", [
    (0, 0.0), (4, 4.0), (7.5, 7.5), (100, 100.0), (np.float32(2.5), 2.5), (np.int64(3), 3.0),
    (np.array(1.25), 1.25), (jnp.float32(6.0), 6.0), (np.array(1.5, ml_dtypes.bfloat16), 1.5),
])
def test_check_cfg_scale_accepts_real_numbers_in_range(value, want):
    got = check_cfg_scale(value)
    assert type(got) is float and got == want


@pytest.mark.parametrize("value, shown", [
    (-2, "-2.0"), (-2.0, "-2.0"), (100.5, "100.5"), (float("nan"), "nan"), (float("inf"), "inf"),
    (-float("inf"), "-inf"), (True, "True"), (np.bool_(False), "np.False_"), ("4", "'4'"),
    (None, "None"), (np.array([1.0]), r"array\(\[1\.\]\)"), (1 + 0j, r"\(1\+0j\)"),
    (np.array(-0.5), "-0.5"),
])
def test_check_cfg_scale_refuses_everything_else_naming_the_argument(value, shown):
    with pytest.raises(ConfigError, match=rf"^cfg_scale: expected a number in \[0, 100\], "
                                          rf"got {shown}$"):
        check_cfg_scale(value)
    with pytest.raises(ValueError, match=r"^--cfg-scale: expected a number in \[0, 100\]"):
        check_cfg_scale(value, "--cfg-scale")


def test_sampler_config_uses_the_cfg_scale_policy():
    for bad in (-2, 101.0, float("nan"), True):
        with pytest.raises(ConfigError, match=r"^SamplerConfig\.cfg_scale: expected a number in "
                                              r"\[0, 100\], got "):
            SamplerConfig(cfg_scale=bad)
    assert SamplerConfig(cfg_scale=0).cfg_scale == 0 and SamplerConfig(cfg_scale=100.0)


def test_a_field_added_later_keeps_old_digests_while_at_its_implied_value():
    """DiTConfig.pos_embed came after configs were stored: at "sincos" it is left out, so
    fingerprints of plans, generation runs and training workdirs made before stay valid."""
    import hashlib
    import json as _json

    from trdq_jax.config import DiTConfig, experiment_from_dict, to_dict
    from trdq_jax.sampling.cfg_plan import model_fingerprint
    old = {"family": "dit", "input_size": 32, "in_channels": 4, "patch_size": 2,
           "hidden_size": 1152, "depth": 28, "num_heads": 16, "mlp_ratio": 4.0,
           "num_classes": 1000, "class_dropout_prob": 0.1, "learn_sigma": True}
    digest = hashlib.sha256(_json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    assert model_fingerprint(DiTConfig()) == f"DiTConfig:{digest}"
    assert "pos_embed" not in to_dict(DiTConfig())
    assert to_dict(DiTConfig(pos_embed="stored"))["pos_embed"] == "stored"
    assert model_fingerprint(DiTConfig(pos_embed="stored")) != model_fingerprint(DiTConfig())
    stored = {"name": "x", "model": to_dict(DiTConfig(pos_embed="stored"))}
    assert experiment_from_dict(stored).model.pos_embed == "stored"
