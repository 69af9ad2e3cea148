"""Typed configuration: every key, its type and its default live here, each with a comment.

A YAML file in ``configs/`` overrides the defaults; dotted ``key=value`` pairs on the command
line override the YAML (values parsed as YAML scalars/lists). Unknown keys and wrong types are
a ``ConfigError`` that names the key and suggests the closest valid one.

    cfg = load_config("configs/unet3d.yaml", ["data.root=/data/brats", "train.epochs=5"])
    cfg.train.epochs  # -> 5
    to_dict(cfg)      # -> plain dict, what is saved with runs and checkpoints
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from core.atomic import atomic_write_text
from core.errors import UserError


class ConfigError(UserError):
    """An unknown key, a wrong type or an invalid value in a config file or override."""


# ----------------------------------------------------------------------------------------------
# Sections. Keep each key on one line with a comment; these are the documented defaults.
# ----------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    root: str = "data/brats"  # BraTS folder: one sub-folder per case, or an MSD folder with imagesTr/
    task: str = "auto"  # auto = detected from case names, layout and label values; or a built-in task name (configs/tasks/) or a task YAML path
    modalities: list[str] = field(default_factory=list)  # input channel order (t1 = t1n, t1ce = t1c, t2 = t2w, flair = t2f); empty = all of the task's
    cache_dir: str = "cache"  # preprocessed .npy cache; a sub-folder per hash of the preprocessing settings
    cache_dtype: Literal["float16", "float32"] = "float32"  # dtype of cached images
    cache_workers: int = 2  # processes used to build the cache
    spacing: Literal["auto"] | list[float] | None = "auto"  # target voxel spacing (mm, canonical axes); auto = median of the training cases (thick-slice axis: 10th percentile); null = no resampling
    patch_size: list[int] = field(default_factory=lambda: [128, 128, 128])  # training patch (X, Y, Z) in voxels of the target spacing
    batch_size: int = 2  # patches per step per process (per GPU under torchrun)
    num_workers: int = 4  # DataLoader worker processes (0 = load in the main process)
    foreground_fraction: float = 0.33  # fraction of patches forced to contain tumour
    split_file: str = ""  # JSON {"train": [ids], "val": [ids]}; empty = k-fold split below
    folds: int = 5  # k of the k-fold split (cases shuffled with data.seed)
    fold: int = 0  # which fold is the validation set
    seed: int = 12345  # seed of the k-fold shuffle
    synthetic_cases: int = 0  # if > 0 and root is missing, generate this many synthetic cases there
    synthetic_shape: list[int] = field(default_factory=lambda: [240, 240, 155])  # shape of generated cases
    synthetic_task: str = "auto"  # task (naming, labels) of generated cases; auto = data.task if it is a built-in task, else brats-gli-2021


@dataclass
class AugmentConfig:
    device: Literal["loader", "train"] = "loader"  # loader = in DataLoader workers (CPU); train = on the training device, per batch
    flip_prob: float = 0.5  # probability of flipping each axis independently
    rotate_prob: float = 0.2  # probability of a random rotation
    rotate_range: float = 30.0  # max rotation per axis, degrees
    scale_prob: float = 0.2  # probability of a random isotropic scaling
    scale_range: list[float] = field(default_factory=lambda: [0.7, 1.4])  # zoom factor range
    elastic_prob: float = 0.0  # probability of elastic deformation (off by default: slow)
    elastic_sigma: float = 8.0  # smoothness of the displacement field, voxels
    elastic_magnitude: float = 4.0  # max displacement, voxels
    intensity_scale_prob: float = 0.15  # probability of multiplying intensities
    intensity_scale_range: list[float] = field(default_factory=lambda: [0.75, 1.25])  # multiplier range
    intensity_shift_prob: float = 0.15  # probability of adding an offset (z-score units)
    intensity_shift_range: float = 0.1  # max absolute offset
    gamma_prob: float = 0.3  # probability of a gamma transform
    gamma_range: list[float] = field(default_factory=lambda: [0.7, 1.5])  # gamma range
    gamma_retain_stats: bool = True  # restore each channel's mean and std after gamma (nnU-Net)
    noise_prob: float = 0.1  # probability of additive Gaussian noise
    noise_std: float = 0.1  # max noise standard deviation
    blur_prob: float = 0.1  # probability of Gaussian blur
    blur_sigma: list[float] = field(default_factory=lambda: [0.5, 1.0])  # blur sigma range, voxels


@dataclass
class UNet3DConfig:
    features: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 320, 320])  # channels per encoder stage
    strides: list[int | list[int]] = field(default_factory=lambda: [1, 2, 2, 2, 2, 2])  # downsampling stride entering each stage (first = 1), or [x, y, z] per axis (thick slices); patch sizes must be multiples of their product per axis
    blocks_per_stage: list[int] = field(default_factory=lambda: [1, 1, 1, 1, 1, 1])  # blocks (two 3x3x3 convs each) per encoder stage
    decoder_blocks: int = 1  # blocks (two 3x3x3 convs each) per decoder stage
    residual: bool = False  # residual encoder blocks (nnU-Net ResEnc)
    deep_supervision: bool = True  # auxiliary outputs at decoder stages during training


@dataclass
class SwinUNETRConfig:
    feature_size: int = 48  # channels after patch embedding (multiple of 12)
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # Swin blocks per stage
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])  # attention heads per stage
    window_size: int = 7  # attention window edge, tokens (clipped to smaller feature maps, larger ones padded)
    patch_size: int = 2  # patch embedding edge, voxels; data.patch_size must be a multiple of patch_size * 2**len(depths)
    drop_path: float = 0.0  # stochastic depth rate
    deep_supervision: bool = False  # auxiliary outputs at decoder stages during training


@dataclass
class ModelConfig:
    name: Literal["unet3d", "swin_unetr"] = "unet3d"  # network to build (models/registry.py)
    checkpointing: bool = False  # gradient checkpointing: less memory, ~30% slower
    unet3d: UNet3DConfig = field(default_factory=UNet3DConfig)  # used when name = unet3d
    swin_unetr: SwinUNETRConfig = field(default_factory=SwinUNETRConfig)  # used when name = swin_unetr


@dataclass
class LossConfig:
    name: Literal["dice_ce", "region_dice_bce"] = "dice_ce"  # dice_ce = softmax over labels; region_dice_bce = sigmoid over WT/TC/ET
    dice_weight: float = 1.0  # weight of the soft Dice term
    ce_weight: float = 1.0  # weight of the cross-entropy / BCE term
    include_background: bool = False  # include class 0 in the Dice term (dice_ce only)
    batch_dice: bool = False  # sum over the batch before the Dice ratio
    smooth: float = 1e-5  # smoothing added to Dice numerator and denominator


@dataclass
class TrainConfig:
    epochs: int = 100  # number of epochs
    iters_per_epoch: int = 250  # optimizer steps per epoch
    optimizer: Literal["sgd", "adamw"] = "sgd"  # sgd = SGD with Nesterov momentum
    lr: float = 0.01  # peak learning rate
    weight_decay: float = 3e-5  # weight decay
    momentum: float = 0.99  # SGD momentum
    schedule: Literal["poly", "cosine"] = "poly"  # poly = (1 - t)^0.9; cosine = warmup + cosine
    warmup_epochs: int = 0  # linear warmup epochs (both schedules)
    grad_clip: float = 12.0  # max gradient norm (0 = off)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # autocast dtype on CUDA (CPU runs fp32 unless bf16; fp16 before Ampere)
    channels_last: bool = True  # channels_last_3d memory format (faster convolutions on CUDA and CPU)
    compile: bool = False  # torch.compile the model (CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # global seed (each DDP rank / worker derives its own)
    deterministic: bool = False  # deterministic algorithms (slower)
    val_every: int = 1  # validate every N epochs
    val_hd95: bool = False  # also compute HD95 during validation (slower)
    skip_nonfinite: bool = False  # skip steps with a non-finite loss instead of stopping
    time_limit: float = 0.0  # minutes; stop cleanly after this (0 = no limit)
    checkpoint_every: int = 0  # iterations between saves of last.pt (bounds the work a preemption loses); 0 = at the end of every epoch
    log_every: int = 10  # iterations between TensorBoard scalar writes
    tune_postprocessing: bool = True  # at each validation choose post-processing on the validation cases (inference/tuning.py); best.pt on the post-processed score
    cpu_threads: int = 0  # intra-op threads when training on the CPU (0 = torch default, one per core)


@dataclass
class InferConfig:
    overlap: float = 0.5  # sliding-window overlap fraction in [0, 1)
    sw_batch_size: int = 4  # windows per forward pass (x8 inputs with tta: each window's 8 flips share the pass)
    tta: bool = False  # mirror test-time augmentation over all 8 axis flips
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # autocast dtype on CUDA (fp16 before Ampere)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"  # runtime of a .pt network: onnxruntime = exported in memory when infer.py starts; auto = onnxruntime on the CPU from 8 network passes over cases (cases x 8 with TTA) when the ONNX packages are installed, else torch; .onnx models always run in ONNX Runtime
    gaussian_sigma: float = 0.125  # Gaussian importance sigma as a fraction of the window
    region_threshold: float = 0.5  # sigmoid threshold for region outputs
    min_component_size: list[float] = field(default_factory=list)  # drop components smaller than this (infer.postprocess_unit), one size per training region of the task (e.g. WT, TC, ET); empty or 0 = off. Setting any post-processing key replaces the checkpoint's tuned rules
    et_min_volume: float = 0.0  # relabel all of the task's enhancing label (ET) as its core label when its volume is below this (infer.postprocess_unit); 0 = off
    postprocess_unit: Literal["voxels", "mm3"] = "voxels"  # unit of min_component_size and et_min_volume
    largest_component: bool = False  # keep only the largest component of the outermost training region (WT)
    output_task: str = "auto"  # task whose label values are written; auto = each input case's (from its names and labels), else the checkpoint's


@dataclass
class MetricsConfig:
    convention: Literal["legacy", "lesionwise"] = "legacy"  # empty-mask and lesion rules (metrics/); the lesion parameters are the task's


@dataclass
class Config:
    out_dir: str = ""  # run folder; empty = runs/<config file name>
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


# ----------------------------------------------------------------------------------------------
# Loading, overrides, validation.
# ----------------------------------------------------------------------------------------------
# keys renamed or removed since configs and checkpoints were first written: old -> new (None = removed)
RENAMED_KEYS = {
    "data.label_convention": "data.task",  # "2021" -> brats-gli-2021, "2023" -> brats-gli-2023
    "data.synthetic_convention": "data.synthetic_task",
    "infer.output_convention": "infer.output_task",
    "metrics.lesion_dilation": None,  # lesion-wise parameters are the task's (configs/tasks/)
    "metrics.lesion_min_volume": None,
}
_CONVENTION_TASKS = {"2021": "brats-gli-2021", "2023": "brats-gli-2023", "auto": "auto"}


def migrate_keys(raw: dict[str, Any]) -> list[str]:
    """Rewrite the old keys of ``RENAMED_KEYS`` in a nested config dict (in place); returns one
    note per key changed. Old label conventions become the glioma tasks of that convention."""
    notes = []
    for old, new in RENAMED_KEYS.items():
        section, key = old.split(".")
        node = raw.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        value = node.pop(key)
        if new is None:
            notes.append(f"{old} is no longer a config key (the task defines it); ignored")
            continue
        if key.endswith("convention"):
            value = _CONVENTION_TASKS.get(str(value), value)
        node.setdefault(new.split(".")[1], value)
        notes.append(f"{old} is now {new} ({value})")
    return notes


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file (if given) <- dotted ``key=value`` overrides, validated. Old keys
    (``RENAMED_KEYS``) in the file are migrated with a warning."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for note in migrate_keys(raw):
            logging.getLogger(__name__).warning("%s: %s", path, note)
    cfg = from_dict(apply_overrides(raw, overrides))
    if not cfg.out_dir and path is not None:
        cfg.out_dir = str(Path("runs") / path.stem)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """``'train.lr=1e-3'`` -> ``('train.lr', 0.001)``; the value is parsed as a YAML scalar/list."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: value is not valid YAML") from None
    return key.strip(), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted ``key=value`` of ``overrides`` in the nested dict ``raw`` (in place)."""
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return raw


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated ``Config`` from a (possibly partial) nested dict: types while building,
    then every value range (``validate``). Every entry point loads its config through here."""
    return validate(_build(Config, raw, prefix=""))


def validate(cfg: Config) -> Config:
    """``cfg``, or a ``ConfigError`` naming the first key whose value is out of range. The one
    place for the range of every key; what depends on the task (modalities, one post-processing
    size per training region) is checked where the task is known (``core.task``)."""
    for key, ok, rule in _range_rules(cfg):
        if not ok:
            section, name = key.split(".", 1)
            raise ConfigError(f"{key}: {getattr(getattr(cfg, section), name)!r} {rule}")
    return cfg


_AUGMENT_PROBABILITIES = ("flip_prob", "rotate_prob", "scale_prob", "elastic_prob", "intensity_scale_prob",
                          "intensity_shift_prob", "gamma_prob", "noise_prob", "blur_prob")
_AUGMENT_RANGES = {"scale_range": True, "intensity_scale_range": True, "gamma_range": True,
                   "blur_sigma": False}  # [low, high] keys -> whether low must be > 0 (else >= 0)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sizes(value: Any, count: int = 3) -> bool:
    return isinstance(value, list) and len(value) == count and all(_number(v) and v > 0 for v in value)


def _pair(value: Any, positive: bool) -> tuple[bool, str]:
    if not (isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value)):
        return False, "must be a [low, high] pair of numbers"
    if value[0] > value[1]:
        return False, "is inverted: low must not exceed high"
    return (value[0] > 0 if positive else value[0] >= 0), ("must be > 0" if positive else "must be >= 0")


def _range_rules(cfg: Config) -> list[tuple[str, bool, str]]:
    """``(key, value is valid, rule)`` for every key with a range, in the order of the sections."""
    d, a, t, i = cfg.data, cfg.augment, cfg.train, cfg.infer
    kfold = not d.split_file
    rules = [
        ("data.spacing", d.spacing in ("auto", None) or _sizes(d.spacing), "must be auto, null or 3 positive numbers (mm)"),
        ("data.patch_size", _sizes(d.patch_size), "must be 3 positive sizes"),
        ("data.batch_size", d.batch_size >= 1, "must be >= 1"),
        ("data.num_workers", d.num_workers >= 0, "must be >= 0"),
        ("data.cache_workers", d.cache_workers >= 0, "must be >= 0"),
        ("data.foreground_fraction", 0 <= d.foreground_fraction <= 1, "must be in [0, 1]"),
        ("data.folds", not kfold or d.folds >= 2, "must be >= 2 for a k-fold split (or set data.split_file)"),
        ("data.fold", not kfold or 0 <= d.fold < d.folds, f"must be in 0..{d.folds - 1}"),
        ("data.synthetic_cases", d.synthetic_cases >= 0, "must be >= 0"),
        ("data.synthetic_shape", _sizes(d.synthetic_shape), "must be 3 positive sizes"),
    ]
    rules += [(f"augment.{k}", _number(getattr(a, k)) and 0 <= getattr(a, k) <= 1, "is not a probability in [0, 1]")
              for k in _AUGMENT_PROBABILITIES]
    rules += [(f"augment.{k}", _number(getattr(a, k)) and getattr(a, k) >= 0, "must be a number >= 0")
              for k in ("rotate_range", "elastic_magnitude", "intensity_shift_range", "noise_std")]
    rules += [("augment.rotate_range", a.rotate_range <= 180, "must be at most 180 degrees"),
              ("augment.elastic_sigma", _number(a.elastic_sigma) and a.elastic_sigma > 0, "must be a number > 0")]
    rules += [(f"augment.{k}", *_pair(getattr(a, k), positive)) for k, positive in _AUGMENT_RANGES.items()]
    rules += [
        ("train.epochs", t.epochs >= 1, "must be >= 1"),
        ("train.iters_per_epoch", t.iters_per_epoch >= 1, "must be >= 1"),
        ("train.warmup_epochs", 0 <= t.warmup_epochs <= t.epochs, f"must be in [0, train.epochs={t.epochs}]"),
        ("train.lr", t.lr > 0, "must be > 0"),
        ("train.weight_decay", t.weight_decay >= 0, "must be >= 0"),
        ("train.momentum", 0 <= t.momentum < 1, "must be in [0, 1)"),
        ("train.grad_clip", t.grad_clip >= 0, "must be >= 0 (0 = off)"),
        ("train.val_every", t.val_every >= 1, "must be >= 1"),
        ("train.log_every", t.log_every >= 1, "must be >= 1"),
        ("train.cpu_threads", t.cpu_threads >= 0, "must be >= 0 (0 = torch default)"),
        ("train.time_limit", t.time_limit >= 0, "must be >= 0 (0 = no limit)"),
        ("train.checkpoint_every", t.checkpoint_every >= 0, "must be >= 0 (0 = every epoch)"),
        ("infer.overlap", 0.0 <= i.overlap < 1.0, "must be in [0, 1)"),
        ("infer.sw_batch_size", i.sw_batch_size >= 1, "must be >= 1"),
        ("infer.gaussian_sigma", i.gaussian_sigma > 0, "must be > 0"),
        ("infer.region_threshold", 0.0 < i.region_threshold < 1.0, "must be in (0, 1)"),
        ("infer.min_component_size", all(_number(v) and v >= 0 for v in i.min_component_size),
         "must be sizes >= 0 (0 = off)"),
        ("infer.et_min_volume", _number(i.et_min_volume) and i.et_min_volume >= 0, "must be >= 0 (0 = off)"),
    ]
    return rules


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain dicts/lists/scalars (YAML- and checkpoint-safe)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            values[name] = _build(typ, raw[name] or {}, prefix=f"{prefix}{name}.")
        else:
            values[name] = _check_value(f"{prefix}{name}", typ, raw[name])
    return cls(**values)


def _check_value(key: str, typ: Any, value: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        # YAML reads 2021 as an int; the choices are strings
        if not isinstance(value, bool) and isinstance(value, (int, float)) and str(value) in choices:
            value = str(value)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item_type.__name__}, got {value!r}")
        return [_check_value(f"{key}[{i}]", item_type, v) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):  # e.g. Literal["auto"] | list[float] | None
        members = typing.get_args(typ)
        if value is None:
            if type(None) in members:
                return None
        else:
            for member in (m for m in members if m is not type(None)):
                try:
                    return _check_value(key, member, value)
                except ConfigError:
                    continue
        raise ConfigError(f"{key}: expected {' or '.join(_describe(m) for m in members)}, got {value!r}")
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"{key}: unsupported config type {typ!r}")


def _describe(typ: Any) -> str:
    """A type in words, for error messages: ``list[float]`` -> "a list of float"."""
    origin = typing.get_origin(typ)
    if typ is type(None):
        return "null"
    if origin is Literal:
        return " or ".join(repr(c) for c in typing.get_args(typ))
    if origin is list:
        return f"a list of {_describe(typing.get_args(typ)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(m) for m in typing.get_args(typ))
    return getattr(typ, "__name__", str(typ))
