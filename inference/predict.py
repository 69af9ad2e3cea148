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

from core import distributed
from core.checkpoint import load_checkpoint, stored_task
from core.config import Config, ConfigError, InferConfig, from_dict, parse_override, to_dict
from core.errors import UserError
from core.task import Task, TaskError, output_mode
from inference.postprocess import Rules, check_rules
from inference.sliding_window import sliding_window_predict

# config sections that may be overridden at inference (the others shaped the trained model)
OVERRIDABLE_SECTIONS = ("infer", "metrics")


def resolve_device(name: str) -> torch.device:
    """``infer.device`` -> a torch device (see ``core.distributed.resolve_device``)."""
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
    postprocessing: dict | None = None  # {"rules": Rules.to_dict(), "source": "..."} tuned at training time


def build_model(model_cfg, in_channels: int, out_channels: int, patch_size: Sequence[int] | None = None) -> nn.Module:
    """``models.build_model``, imported when first needed: inference from an ONNX model never imports
    the training code (``models``, ``losses``)."""
    from models import build_model as build  # noqa: PLC0415
    return build(model_cfg, in_channels, out_channels, patch_size=patch_size)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild one checkpoint's model from its stored config: ``(model in eval mode, spec)``.
    ``UserError`` naming ``path`` for anything wrong with the checkpoint. An ``.onnx`` file (``export.py``)
    gives an ``inference.onnx_model.OnnxModel`` (ONNX Runtime) and the spec of its metadata."""
    if str(path).lower().endswith(".onnx"):
        from inference.onnx_model import load_onnx_model  # noqa: PLC0415 (needs onnxruntime: only for .onnx)
        return load_onnx_model(path, device)
    state = load_checkpoint(path, map_location="cpu")
    try:
        cfg = from_dict(state["config"])
    except ConfigError as err:
        raise UserError(f"{path}: stored config is invalid ({err})") from None
    task = stored_task(state, path)
    try:
        mode = state.get("output_mode") or output_mode(cfg.loss)  # stored since the task schema; older: from the loss
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
    return model.to(device).eval(), ModelSpec(cfg, task, mode, modalities, spacing, state.get("postprocessing"))


def load_models(checkpoint_paths: Sequence[str | Path], device: torch.device | str = "cpu"
                ) -> tuple[list[nn.Module], ModelSpec]:
    """Load an ensemble: ``(models, spec of the first)``.

    Every member must agree with the first on input modalities, output mode, task (classes and
    regions) and window (``data.patch_size``); otherwise a ``UserError`` names the checkpoint that
    differs. ``.onnx`` members run in ONNX Runtime; ``choose_backend`` decides for ``.pt`` ones.
    """
    if not checkpoint_paths:
        raise UserError("no checkpoint given")
    models, specs = [], []
    for path in checkpoint_paths:
        model, spec = load_model(path, device)
        models.append(model)
        specs.append(spec)
    check_ensemble(checkpoint_paths, specs)
    return models, specs[0]


# infer.backend=auto exports a .pt network in memory and runs it in ONNX Runtime on the CPU when the
# run has at least this many network passes over a case (cases x 8 with TTA). Measured on full-size
# cases (README, Deployment): the export costs 8-10 s; ONNX Runtime saves 1.1 s per pass of the 88 k
# U-Net and 5.5 s per pass of the 31 M U-Net (2 threads), so 8 passes pay for it with either.
AUTO_MIN_PASSES = 8


def auto_backend(paths: Sequence[str | Path], device: torch.device, passes: int) -> tuple[str, str]:
    """``(backend, why)`` for ``infer.backend=auto``: ``onnxruntime`` on the CPU for ``passes`` >=
    ``AUTO_MIN_PASSES`` when the exporter and ONNX Runtime are installed, else ``torch``."""
    from inference.onnx_export import exporter_available  # noqa: PLC0415 (imports no optional package)
    if device.type != "cpu":
        return "torch", f"device {device.type}"
    if all(str(p).lower().endswith(".onnx") for p in paths):
        return "torch", "ONNX models"
    if passes < AUTO_MIN_PASSES:
        return "torch", f"{passes} network pass(es) over cases: fewer than the {AUTO_MIN_PASSES} that pay for an export"
    if not exporter_available():
        return "torch", "onnx, onnxscript or onnxruntime not installed"
    return "onnxruntime", f"{passes} network passes over cases on the CPU"


def choose_backend(models: Sequence[nn.Module], paths: Sequence[str | Path], spec: ModelSpec, backend: str,
                   device: torch.device, passes: int = 1) -> list[nn.Module]:
    """The networks that will run. ``.onnx`` models run in ONNX Runtime whatever ``backend`` says; a
    ``.pt`` network runs in PyTorch (``torch``), or is exported in memory (nothing is written; a line
    says so and what it cost) and runs in ONNX Runtime on ``device`` (``onnxruntime``); ``auto``
    picks by ``auto_backend`` from the run's number of network ``passes`` over cases, and stays in
    PyTorch when the export fails. ``UserError`` when ``onnxruntime`` is asked for and a network
    cannot be exported (a package missing, an unsupported network)."""
    why = f"infer.backend={backend}"
    if backend == "auto":
        backend, reason = auto_backend(paths, device, passes)
        why = f"infer.backend=auto: {reason}"
    if backend == "torch":
        return list(models)
    from inference.onnx_export import export_network  # noqa: PLC0415 (optional packages: only when asked for)
    from inference.onnx_model import OnnxModel  # noqa: PLC0415
    chosen = list(models)
    for i, (model, path) in enumerate(zip(models, paths)):
        if str(path).lower().endswith(".onnx"):
            continue
        try:
            data, report = export_network(model, spec, verify=False, where=str(path))
        except UserError as err:
            if not why.startswith("infer.backend=auto"):
                raise
            print(f"{path}: stays in PyTorch ({why}, but {err})", flush=True)
            continue
        chosen[i] = OnnxModel(data, device, where=f"{path} (exported in memory)").eval()
        size = sum(p.numel() for p in model.parameters())
        print(f"{path}: the network ({size / 1e6:.1f} M parameters) runs in ONNX Runtime "
              f"({', '.join(chosen[i].providers)}; {why}; exported in memory in "
              f"{report['seconds']:.1f} s; export.py once saves that)", flush=True)
    return chosen


def check_ensemble(paths: Sequence[str | Path], specs: Sequence[ModelSpec]) -> None:
    """``UserError`` naming the first member whose modalities, output mode, task, spacing or window
    differ from the first member's."""
    first_key = _ensemble_key(specs[0])
    for path, spec in zip(paths[1:], specs[1:]):
        for what, value in _ensemble_key(spec).items():
            if value != first_key[what]:
                shown = value if what != "task classes and regions" else f"{value[0]}"
                raise UserError(f"{path}: {what} {shown} differs from {paths[0]}; ensemble members must agree")


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
    """``ConfigError`` when the post-processing keys of ``infer_cfg`` do not fit ``task`` (one
    size per training region); the value ranges were validated with the config."""
    try:
        check_rules(task, Rules.from_config(infer_cfg))
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
