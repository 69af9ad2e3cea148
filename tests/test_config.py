"""Config loading: defaults, YAML, dotted overrides, type checks, suggestions."""
from pathlib import Path

import pytest
import yaml

from core.config import Config, ConfigError, from_dict, load_config, parse_override, save_config, to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def write_yaml(tmp_path, data, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.data.modalities == [] and cfg.data.task == "auto"  # every modality of the detected task


def test_yaml_then_overrides(tmp_path):
    path = write_yaml(tmp_path, {"data": {"root": "/a"}, "train": {"epochs": 3, "lr": 0.5}})
    cfg = load_config(path, ["data.root=/data/brats", "train.epochs=5", "data.patch_size=[64, 64, 32]"])
    assert cfg.data.root == "/data/brats"
    assert cfg.train.epochs == 5
    assert cfg.train.lr == 0.5  # from the file
    assert cfg.data.patch_size == [64, 64, 32]
    assert cfg.out_dir == "runs/exp"  # default derived from the file name


@pytest.mark.parametrize("item, expected", [
    ("train.lr=1.0e-3", ("train.lr", 0.001)),
    ("train.compile=true", ("train.compile", True)),
    ("data.root=", ("data.root", "")),
    ("data.modalities=[t1, t2]", ("data.modalities", ["t1", "t2"])),
    ("model.name=swin_unetr", ("model.name", "swin_unetr")),
])
def test_parse_override(item, expected):
    assert parse_override(item) == expected


@pytest.mark.parametrize("raw, message", [
    ({"trian": {}}, "did you mean 'train'"),
    ({"train": {"epoch": 3}}, "did you mean 'train.epochs'"),
    ({"model": {"unet3d": {"feature": [1]}}}, "did you mean 'model.unet3d.features'"),
    ({"train": {"epochs": "ten"}}, "train.epochs: expected an integer"),
    ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer"),
    ({"train": {"compile": 1}}, "train.compile: expected true/false"),
    ({"train": {"lr": "fast"}}, "train.lr: expected a number"),
    ({"train": {"optimizer": "adam"}}, "train.optimizer: 'adam' is not one of sgd, adamw"),
    ({"data": {"patch_size": 128}}, "data.patch_size: expected a list"),
    ({"data": {"patch_size": [128, "x", 128]}}, "data.patch_size[1]: expected an integer"),
    ({"data": 5}, "data: expected a mapping"),
])
def test_invalid_raises_naming_key(raw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        from_dict(raw)


@pytest.mark.parametrize("key, value, rule", [
    ("data.spacing", [1.0, 0.0, 1.0], "must be auto, null or 3 positive numbers"),
    ("data.patch_size", [16, 16], "must be 3 positive sizes"),
    ("data.patch_size", [16, 0, 16], "must be 3 positive sizes"),
    ("data.batch_size", 0, "must be >= 1"),
    ("data.num_workers", -1, "must be >= 0"),
    ("data.cache_workers", -1, "must be >= 0"),
    ("data.foreground_fraction", 1.5, "must be in [0, 1]"),
    ("data.folds", 1, "must be >= 2 for a k-fold split"),
    ("data.fold", 5, "must be in 0..4"),
    ("data.synthetic_cases", -2, "must be >= 0"),
    ("data.synthetic_shape", [64, 64], "must be 3 positive sizes"),
    ("augment.flip_prob", 1.5, "is not a probability in [0, 1]"),
    ("augment.rotate_range", 270.0, "must be at most 180 degrees"),
    ("augment.scale_range", [1.4, 0.7], "is inverted"),
    ("augment.blur_sigma", [-1.0, 0.5], "must be >= 0"),
    ("train.epochs", 0, "must be >= 1"),
    ("train.iters_per_epoch", 0, "must be >= 1"),
    ("train.warmup_epochs", 200, "must be in [0, train.epochs=100]"),
    ("train.lr", 0.0, "must be > 0"),
    ("train.weight_decay", -1.0, "must be >= 0"),
    ("train.momentum", 1.0, "must be in [0, 1)"),
    ("train.grad_clip", -1.0, "must be >= 0"),
    ("train.val_every", 0, "must be >= 1"),
    ("train.log_every", 0, "must be >= 1"),
    ("train.cpu_threads", -1, "must be >= 0"),
    ("train.time_limit", -1.0, "must be >= 0"),
    ("train.checkpoint_every", -5, "must be >= 0"),
    ("infer.overlap", 1.5, "must be in [0, 1)"),
    ("infer.overlap", -0.1, "must be in [0, 1)"),
    ("infer.sw_batch_size", 0, "must be >= 1"),
    ("infer.gaussian_sigma", 0.0, "must be > 0"),
    ("infer.region_threshold", 1.0, "must be in (0, 1)"),
    ("infer.min_component_size", [10.0, -1.0, 5.0], "must be sizes >= 0"),
    ("infer.et_min_volume", -3.0, "must be >= 0"),
])
def test_every_range_is_checked_when_the_config_is_loaded(tmp_path, key, value, rule):
    """One place (core.config.validate), on every entry point: a YAML file, an override, a stored config."""
    section, name = key.split(".")
    pattern = f"{key}: {value!r} {rule}".replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ConfigError, match=pattern):
        from_dict({section: {name: value}})
    with pytest.raises(ConfigError, match=pattern):
        load_config(write_yaml(tmp_path, {section: {name: value}}))
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [f"{key}={value}"])


def test_int_accepted_for_float_and_literal_as_int():
    cfg = from_dict({"train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 0.001  # YAML 1.1 reads 1e-3 as a string


def test_old_keys_in_a_yaml_file_are_migrated_with_a_warning(tmp_path, caplog):
    path = write_yaml(tmp_path, {"data": {"label_convention": 2023, "synthetic_convention": "2021"},
                                 "infer": {"output_convention": "auto"},
                                 "metrics": {"lesion_dilation": 1, "lesion_min_volume": 2.0}})
    cfg = load_config(path)
    assert cfg.data.task == "brats-gli-2023" and cfg.data.synthetic_task == "brats-gli-2021"  # as written
    assert cfg.infer.output_task == "auto"
    assert "data.label_convention is now data.task (brats-gli-2023)" in caplog.text
    assert "metrics.lesion_dilation is no longer a config key" in caplog.text
    # the new key wins when both are given
    path = write_yaml(tmp_path, {"data": {"label_convention": "2021", "task": "brats-ped"}})
    assert load_config(path).data.task == "brats-ped"
    # overrides are not migrated: an old key there is an unknown key
    with pytest.raises(ConfigError, match="unknown config key 'data.label_convention'"):
        load_config(None, ["data.label_convention=2021"])


@pytest.mark.parametrize("bad", ["train.epochs", "nosuch.key=1", "train.nosuch=1"])
def test_bad_overrides(bad):
    with pytest.raises(ConfigError):
        load_config(None, [bad])


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_save_round_trip(tmp_path):
    cfg = load_config(None, ["train.epochs=7", "model.name=swin_unetr"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") .train.epochs == 7
    assert from_dict(to_dict(cfg)) == cfg
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.out_dir == f"runs/{path.stem}"
