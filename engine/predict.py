"""Checkpoints -> models -> probabilities of one case. Shared by ``infer.py`` and training validation.

    models, spec = load_models(["runs/a/best.pt", "runs/b/best.pt"], "cpu")
    cfg = override_infer_config(spec.cfg, ["infer.tta=true", "infer.overlap=0.5"], spec.task)
    probs = predict_case(models, images, cfg.infer, cfg.data.patch_size, spec.mode, device)
    # images (C, x, y, z) preprocessed (cropped, z-scored) -> probs (K, x, y, z) float32

``spec.task`` is the task the models were trained on (labels, regions, how outputs decode);
``spec.mode`` is "labels" (softmax over the task's classes) or "regions" (sigmoid over its
training regions); ``spec.modalities`` the input channels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from engine.checkpoint import load_checkpoint, stored_task
from engine.config import Config, ConfigError, InferConfig, from_dict, parse_override, to_dict
from engine.errors import UserError
from engine import distributed
from engine.postprocess import check_postprocess
from engine.sliding_window import sliding_window_predict
from engine.task import Task, TaskError
from losses import output_mode
from models import build_model

# config sections that may be overridden at inference (the others shaped the trained model)
OVERRIDABLE_SECTIONS = ("infer", "metrics")


def resolve_device(name: str) -> torch.device:
    """``infer.device`` -> a torch device (see ``engine.distributed.resolve_device``)."""
    return distributed.resolve_device(name, key="infer.device")


@dataclass
class ModelSpec:
    """What a checkpoint says about its model: the resolved config, the task it was trained on,
    the output mode, the input channels (canonical modality names, in order) and the voxel spacing
    it was trained at (mm, canonical axes; ``None``: cases were not resampled)."""

    cfg: Config
    task: Task
    mode: str
    modalities: tuple[str, ...]
    spacing: tuple[float, float, float] | None = None


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild one checkpoint's model from its stored config: ``(model in eval mode, spec)``.
    ``UserError`` naming ``path`` for anything wrong with the checkpoint."""
    state = load_checkpoint(path, map_location="cpu")
    try:
        cfg = from_dict(state["config"])
    except ConfigError as err:
        raise UserError(f"{path}: stored config is invalid ({err})") from None
    task = stored_task(state, path)
    try:
        mode = state.get("output_mode") or output_mode(cfg.loss)
        modalities = tuple(state.get("modalities") or task.select_modalities(cfg.data.modalities))
        model = build_model(cfg.model, len(modalities), task.output_channels(mode), patch_size=cfg.data.patch_size)
    except (ValueError, TaskError) as err:
        raise UserError(f"{path}: cannot build the model from its stored config ({err})") from None
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        first = " ".join(str(err).split())[:200]
        raise UserError(f"{path}: weights do not fit the model built from its config ({first})") from None
    spacing = tuple(float(s) for s in state["spacing"]) if state.get("spacing") else None
    return model.to(device).eval(), ModelSpec(cfg, task, mode, modalities, spacing)


def load_models(checkpoint_paths: Sequence[str | Path], device: torch.device | str = "cpu"
                ) -> tuple[list[nn.Module], ModelSpec]:
    """Load an ensemble: ``(models, spec of the first)``.

    Every member must agree with the first on input modalities, output mode, task (classes and
    regions) and window (``data.patch_size``); otherwise a ``UserError`` names the checkpoint that
    differs.
    """
    if not checkpoint_paths:
        raise UserError("no checkpoint given")
    models, keys = [], []
    for path in checkpoint_paths:
        model, spec = load_model(path, device)
        models.append(model)
        keys.append((path, spec, _ensemble_key(spec)))
    first_path, spec, first_key = keys[0]
    for path, _, key in keys[1:]:
        for what, value in key.items():
            if value != first_key[what]:
                shown = value if what != "task classes and regions" else f"{value[0]}"
                raise UserError(f"{path}: {what} {shown} differs from {first_path}; ensemble members must agree")
    return models, spec


def _ensemble_key(spec: ModelSpec) -> dict:
    return {"modalities": list(spec.modalities), "output mode": spec.mode,
            "task classes and regions": (spec.task.name, spec.task.signature()), "voxel spacing": spec.spacing,
            "patch size (window)": list(spec.cfg.data.patch_size)}


def override_infer_config(cfg: Config, overrides: Sequence[str], task: Task) -> Config:
    """A copy of ``cfg`` with ``key=value`` overrides applied; only ``infer.*`` (and
    ``metrics.*``) keys may change: the rest shaped the trained model. ``UserError`` otherwise,
    and for values out of range or not fitting ``task``."""
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
    check_infer_config(cfg.infer, task)
    return cfg


def check_infer_config(infer_cfg: InferConfig, task: Task) -> None:
    """``ConfigError`` naming the ``infer.*`` key whose value is out of range or does not fit ``task``."""
    problems = {
        "overlap": (not 0.0 <= infer_cfg.overlap < 1.0, "must be in [0, 1)"),
        "sw_batch_size": (infer_cfg.sw_batch_size < 1, "must be >= 1"),
        "gaussian_sigma": (infer_cfg.gaussian_sigma <= 0, "must be > 0"),
        "region_threshold": (not 0.0 < infer_cfg.region_threshold < 1.0, "must be in (0, 1)"),
    }
    for key, (bad, rule) in problems.items():
        if bad:
            raise ConfigError(f"infer.{key}: {getattr(infer_cfg, key)!r} {rule}")
    try:
        check_postprocess(task, infer_cfg.min_component_size, infer_cfg.et_min_volume)
    except ValueError as err:
        raise ConfigError(str(err)) from None


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
