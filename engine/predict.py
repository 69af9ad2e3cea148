"""Checkpoints -> models -> probabilities of one case. Shared by ``infer.py`` and training validation.

    models, cfg, convention, mode = load_models(["runs/a/best.pt", "runs/b/best.pt"], "cpu")
    cfg = override_infer_config(cfg, ["infer.tta=true", "infer.overlap=0.5"])
    probs = predict_case(models, images, cfg.infer, cfg.data.patch_size, mode, device)
    # images (C, x, y, z) preprocessed (cropped, z-scored) -> probs (K, x, y, z) float32

``convention`` is the label convention of the training data ("2021": ET=4, "2023": ET=3);
``mode`` is "labels" (softmax over 4 classes) or "regions" (sigmoid over WT, TC, ET).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from datasets.io import canonical_modality
from datasets.labels import REGIONS, output_channels
from engine.checkpoint import load_checkpoint
from engine.config import Config, ConfigError, InferConfig, from_dict, parse_override, to_dict
from engine.errors import UserError
from engine import distributed
from engine.sliding_window import sliding_window_predict
from losses import output_mode
from models import build_model

# config sections that may be overridden at inference (the others shaped the trained model)
OVERRIDABLE_SECTIONS = ("infer", "metrics")


def resolve_device(name: str) -> torch.device:
    """``infer.device`` -> a torch device (see ``engine.distributed.resolve_device``)."""
    return distributed.resolve_device(name, key="infer.device")


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Config, str, str]:
    """Rebuild one checkpoint's model from its stored config: ``(model in eval mode, cfg,
    convention, mode)``. ``UserError`` naming ``path`` for anything wrong with the checkpoint."""
    state = load_checkpoint(path, map_location="cpu")
    try:
        cfg = from_dict(state["config"])
    except ConfigError as err:
        raise UserError(f"{path}: stored config is invalid ({err})") from None
    convention = str(state["convention"])
    if convention not in ("2021", "2023"):
        raise UserError(f"{path}: unknown label convention {convention!r} (expected 2021 or 2023)")
    try:
        mode = output_mode(cfg.loss)
        model = build_model(cfg.model, len(cfg.data.modalities), output_channels(mode),
                            patch_size=cfg.data.patch_size)
    except ValueError as err:
        raise UserError(f"{path}: cannot build the model from its stored config ({err})") from None
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        first = " ".join(str(err).split())[:200]
        raise UserError(f"{path}: weights do not fit the model built from its config ({first})") from None
    return model.to(device).eval(), cfg, convention, mode


def load_models(checkpoint_paths: Sequence[str | Path], device: torch.device | str = "cpu"
                ) -> tuple[list[nn.Module], Config, str, str]:
    """Load an ensemble: ``(models, cfg of the first, convention, mode)``.

    Every member must agree with the first on input modalities, output mode, label convention
    and window (``data.patch_size``); otherwise a ``UserError`` names the checkpoint that differs.
    """
    if not checkpoint_paths:
        raise UserError("no checkpoint given")
    models, keys = [], []
    for path in checkpoint_paths:
        model, cfg, convention, mode = load_model(path, device)
        models.append(model)
        keys.append((path, cfg, convention, mode, _ensemble_key(cfg, convention, mode)))
    first_path, cfg, convention, mode, first_key = keys[0]
    for path, *_, key in keys[1:]:
        for what, value in key.items():
            if value != first_key[what]:
                raise UserError(f"{path}: {what} {value} differs from {first_key[what]} of {first_path}; "
                                "ensemble members must agree")
    return models, cfg, convention, mode


def _ensemble_key(cfg: Config, convention: str, mode: str) -> dict:
    return {"modalities": [canonical_modality(m) for m in cfg.data.modalities], "output mode": mode,
            "label convention": convention, "patch size (window)": list(cfg.data.patch_size)}


def override_infer_config(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of ``cfg`` with ``key=value`` overrides applied; only ``infer.*`` (and
    ``metrics.*``) keys may change: the rest shaped the trained model. ``UserError`` otherwise."""
    raw = to_dict(cfg)
    for item in overrides:
        key, value = parse_override(item)
        section, _, name = key.partition(".")
        if section not in OVERRIDABLE_SECTIONS or not name:
            raise UserError(f"override '{key}': only {', '.join(s + '.*' for s in OVERRIDABLE_SECTIONS)} keys "
                            "can be changed at inference (the others are fixed by the checkpoint)")
        if "." in name:
            raise ConfigError(f"unknown config key '{key}'")
        raw[section][name] = value
    cfg = from_dict(raw)
    check_infer_config(cfg.infer)
    return cfg


def check_infer_config(infer_cfg: InferConfig) -> None:
    """``ConfigError`` naming the ``infer.*`` key whose value is out of range."""
    problems = {
        "overlap": (not 0.0 <= infer_cfg.overlap < 1.0, "must be in [0, 1)"),
        "sw_batch_size": (infer_cfg.sw_batch_size < 1, "must be >= 1"),
        "gaussian_sigma": (infer_cfg.gaussian_sigma <= 0, "must be > 0"),
        "region_threshold": (not 0.0 < infer_cfg.region_threshold < 1.0, "must be in (0, 1)"),
        "min_component_size": (len(infer_cfg.min_component_size) != len(REGIONS)
                               or min(infer_cfg.min_component_size, default=0) < 0,
                               "must be 3 sizes >= 0 (WT, TC, ET)"),
        "et_min_volume": (infer_cfg.et_min_volume < 0, "must be >= 0"),
    }
    for key, (bad, rule) in problems.items():
        if bad:
            raise ConfigError(f"infer.{key}: {getattr(infer_cfg, key)!r} {rule}")


def predict_case(models: Sequence[nn.Module], images: np.ndarray | torch.Tensor, infer_cfg: InferConfig,
                 window: Sequence[int], mode: str, device: torch.device | str) -> torch.Tensor:
    """Probabilities ``(K, x, y, z)`` float32 of preprocessed ``images (C, x, y, z)``, averaged
    over ``models`` (an ensemble; one model = no averaging).

    Sliding window with ``infer_cfg``'s overlap, sw_batch_size, tta, precision and
    gaussian_sigma. Each model runs in eval mode and gets its previous mode back afterwards. The
    result lives on ``device`` when the accumulators fit there (see ``sliding_window_predict``).
    """
    if not models:
        raise ValueError("predict_case needs at least one model")
    device = torch.device(device)
    image = torch.as_tensor(images, dtype=torch.float32).to(device)
    total = None
    for model in models:
        was_training = model.training
        model.eval()
        try:
            probs = sliding_window_predict(
                model, image, window, overlap=infer_cfg.overlap, sw_batch_size=infer_cfg.sw_batch_size,
                mode=mode, tta=infer_cfg.tta, device=device, precision=infer_cfg.precision,
                sigma_scale=infer_cfg.gaussian_sigma)
        finally:
            model.train(was_training)
        total = probs if total is None else total.add_(probs.to(total.device))
    return total / len(models) if len(models) > 1 else total
