"""ONNX Runtime as the network of the sliding window: an exported model (``export.py``) and its contract.

    model, spec = load_onnx_model("model.onnx", "cpu")   # what inference.predict.load_model returns for a .pt
    logits = model(batch)                                 # (B, C, *window) float32 tensor -> (B, K, *window)

``OnnxModel`` is a callable ``nn.Module`` without parameters, so ``predict_case``,
``sliding_window_predict`` and ``infer.py`` run it exactly like a PyTorch network (``eval()``,
``train()``, ``to(device)``: the device picks the execution providers). Only ``onnxruntime``,
numpy and torch (the shared sliding-window code and these tensors) are imported here: no training
code, not the ``onnx`` package.

**The contract** (ONNX ``metadata_props``: every value JSON but the format's; ``export.py``
writes it, ``spec_from_metadata`` reads it back into the ``ModelSpec`` a checkpoint gives):

=================================  =====================================================================
``brats_seg.format``               ``brats-seg-onnx/<version>`` (``FORMAT``); a newer version is refused
``brats_seg.config``               the checkpoint's resolved config (``core.config.to_dict``)
``brats_seg.task``                 the task schema (``Task.to_dict``): labels, values, regions, rules
``brats_seg.modalities``           input channels in order (canonical names: t1, t1ce, t2, flair, ...)
``brats_seg.normalisation``        the preprocessing the input must have had (``NORMALISATION``)
``brats_seg.spacing``              voxel spacing of the model grid (mm, canonical axes) or null
``brats_seg.output_mode``          ``labels`` (softmax over classes) or ``regions`` (sigmoid per region)
``brats_seg.decoding``             how outputs become labels (``decoding``): activation, channels, rule
``brats_seg.window``               the window ``[X, Y, Z]`` the graph takes (batch dimension dynamic)
``brats_seg.postprocessing``       post-processing tuned at training time, when the checkpoint has it
``brats_seg.model``, ``.source``   network name and parameters; checkpoint name and SHA-256, exporter
=================================  =====================================================================

Input ``image``: float32 ``(batch, C, X, Y, Z)``; output ``logits``: float32 ``(batch, K, X, Y, Z)``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from core.config import ConfigError, from_dict, migrate_keys, to_dict
from core.errors import UserError
from core.task import OUTPUT_MODES, Task
from inference.predict import ModelSpec

log = logging.getLogger(__name__)

FORMAT_NAME = "brats-seg-onnx"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
PREFIX = "brats_seg."
INPUT_NAME, OUTPUT_NAME = "image", "logits"
INSTALL_HINT = "pip install onnxruntime"
# what infer.py does to a case before the network sees it (datasets/preprocess.py); "scheme" is checked on load
NORMALISATION = {
    "scheme": "brats-seg/zscore-foreground/1",
    "orientation": "voxel axes permuted and flipped (no interpolation) to the canonical L-P-S order",
    "foreground": "voxels nonzero in any channel when >= 10% of voxels are exactly 0 (skull-stripped), "
                  "else the head (Otsu on the log channel mean, largest component, holes filled)",
    "crop": "bounding box of the foreground",
    "intensity": "each channel z-scored over the foreground voxels (std 1 when constant), exactly 0 outside",
    "resampling": "to 'spacing' when it differs: trilinear (thick-slice axes: cubic in-plane, linear across)",
    "sliding_window": "Gaussian-weighted windows (sigma infer.gaussian_sigma x window), infer.overlap",
}
REQUIRED = ("config", "task", "modalities", "normalisation", "spacing", "output_mode", "window")


# ----------------------------------------------------------------------------------------------
# Metadata: ModelSpec <-> metadata_props
# ----------------------------------------------------------------------------------------------
def decoding(task: Task, mode: str, threshold: float = 0.5) -> dict[str, Any]:
    """How the output channels become labels, in words and names (for readers outside this repository)."""
    values = dict(zip(task.class_names, task.label_values))
    if mode == "labels":
        return {"activation": "softmax over channels", "channels": list(task.class_names),
                "rule": "class = argmax over channels (ties: lowest channel); label value of each class in 'labels'",
                "labels": values}
    return {"activation": "sigmoid per channel", "channels": list(task.training_region_names),
            "rule": "start from background; each channel in order paints its class where its probability "
                    "> threshold (later channels win)",
            "paints": [task.class_names[r.paint] for r in task.training_regions], "threshold": threshold,
            "labels": values}


def spec_metadata(spec: ModelSpec, window: Sequence[int], extra: dict[str, Any] | None = None) -> dict[str, str]:
    """``metadata_props`` of a network of ``spec`` exported for ``window`` (``extra``: more keys, e.g.
    ``model`` and ``source``). Everything infer.py reads from a checkpoint, plus the decoding in words."""
    meta: dict[str, Any] = {
        "config": to_dict(spec.cfg), "task": spec.task.to_dict(), "modalities": list(spec.modalities),
        "normalisation": NORMALISATION, "spacing": None if spec.spacing is None else list(spec.spacing),
        "output_mode": spec.mode, "decoding": decoding(spec.task, spec.mode, spec.cfg.infer.region_threshold),
        "window": [int(w) for w in window],
    }
    if spec.postprocessing is not None:
        meta["postprocessing"] = spec.postprocessing
    meta.update(extra or {})
    out = {PREFIX + "format": FORMAT}
    out.update({PREFIX + key: json.dumps(value) for key, value in meta.items()})
    return out


def spec_from_metadata(meta: dict[str, str], where: str | Path) -> ModelSpec:
    """The ``ModelSpec`` of an exported model's ``metadata_props``; ``UserError`` naming ``where`` and
    the first missing or invalid entry, or a format newer than this version reads."""
    key = PREFIX + "format"
    if key not in meta:
        raise UserError(f"{where}: ONNX model without brats-seg metadata (missing '{key}'); export checkpoints "
                        "with: python export.py --checkpoint CKPT -o MODEL.onnx")
    name, _, version = meta[key].partition("/")
    if name != FORMAT_NAME or not version.isdigit():
        raise UserError(f"{where}: metadata '{key}' is {meta[key]!r}, not {FORMAT_NAME}/<version>")
    if int(version) > FORMAT_VERSION:
        raise UserError(f"{where}: exported in format {meta[key]}, newer than this version of brats-seg reads "
                        f"({FORMAT}); update brats-seg or export it again with this version's export.py")
    missing = [PREFIX + k for k in REQUIRED if PREFIX + k not in meta]
    if missing:
        more = f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise UserError(f"{where}: brats-seg metadata is missing '{missing[0]}'{more}")
    values = {}
    for k in REQUIRED + ("postprocessing",):
        if PREFIX + k in meta:
            try:
                values[k] = json.loads(meta[PREFIX + k])
            except ValueError as err:
                raise UserError(f"{where}: metadata '{PREFIX + k}' is not valid JSON ({err})") from None

    def invalid(k: str, rule: str) -> UserError:
        return UserError(f"{where}: metadata '{PREFIX + k}' {rule}, got {meta[PREFIX + k][:80]}")

    if not isinstance(values["config"], dict):
        raise invalid("config", "must be a config mapping")
    try:
        migrate_keys(values["config"])
        cfg = from_dict(values["config"])
    except ConfigError as err:
        raise UserError(f"{where}: metadata '{PREFIX}config' is invalid ({err})") from None
    task = Task.from_dict(values["task"], where=f"{where}: metadata '{PREFIX}task'")
    mode = values["output_mode"]
    if mode not in OUTPUT_MODES:
        raise invalid("output_mode", f"must be one of {', '.join(OUTPUT_MODES)}")
    modalities = values["modalities"]
    if not (isinstance(modalities, list) and modalities and all(isinstance(m, str) for m in modalities)):
        raise invalid("modalities", "must be a list of modality names")
    scheme = values["normalisation"].get("scheme") if isinstance(values["normalisation"], dict) else None
    if scheme != NORMALISATION["scheme"]:
        raise invalid("normalisation", f"must have scheme {NORMALISATION['scheme']!r} (the preprocessing of "
                                       "this version)")
    spacing = values["spacing"]
    if spacing is not None and not (isinstance(spacing, list) and len(spacing) == 3
                                    and all(isinstance(s, (int, float)) and s > 0 for s in spacing)):
        raise invalid("spacing", "must be null or 3 positive numbers (mm)")
    window = values["window"]
    if not (isinstance(window, list) and len(window) == 3
            and all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in window)):
        raise invalid("window", "must be 3 positive integers")
    cfg.data.patch_size = list(window)  # the window infer.py slides: the one the graph takes
    return ModelSpec(cfg, task, mode, tuple(modalities), None if spacing is None else tuple(map(float, spacing)),
                     values.get("postprocessing"))


# ----------------------------------------------------------------------------------------------
# The runtime
# ----------------------------------------------------------------------------------------------
def import_onnxruntime(where: str | Path):
    """The ``onnxruntime`` module; ``UserError`` (one line with the install command) when missing."""
    try:
        import onnxruntime  # noqa: PLC0415 (optional: only the ONNX path needs it)
    except ImportError:
        raise UserError(f"{where}: running an ONNX model needs onnxruntime, which is not installed; install it "
                        f"with: {INSTALL_HINT}  (or onnxruntime-gpu for CUDA/TensorRT)") from None
    return onnxruntime


def execution_providers(device: torch.device, available: Sequence[str]) -> list:
    """ONNX Runtime providers for ``device``: the CPU provider on the CPU; on ``cuda:N`` TensorRT and
    CUDA (those installed, in that order) on GPU N, the CPU provider last (nodes they lack)."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    index = device.index if device.index is not None else (torch.cuda.current_device() if torch.cuda.is_available()
                                                           else 0)
    gpu = [(name, {"device_id": index}) for name in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
           if name in available]
    return gpu + ["CPUExecutionProvider"]


class OnnxModel(nn.Module):
    """An ONNX graph run by ONNX Runtime, called like the network it was exported from.

    ``source``: the path of an ``.onnx`` file or its bytes (an in-memory export). Threads: as many
    intra-op threads as torch uses (``torch.get_num_threads()``), so both backends get the same CPU.
    ``to(device)`` switches execution providers (``execution_providers``); inputs and outputs are
    torch tensors on the caller's device.
    """

    def __init__(self, source: str | Path | bytes, device: torch.device | str = "cpu", where: str | None = None):
        super().__init__()
        self.where = where or (str(source) if not isinstance(source, bytes) else "in-memory ONNX model")
        self.ort = import_onnxruntime(self.where)
        self.source = str(source) if isinstance(source, Path) else source
        self.device = torch.device("cpu")
        self.session = self._new_session(self.device)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise UserError(f"{self.where}: expected one input and one output, the graph has {len(inputs)} "
                            f"input(s) and {len(outputs)} output(s)")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.input_shape, self.output_shape = list(inputs[0].shape), list(outputs[0].shape)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.to(device)

    def _new_session(self, device: torch.device):
        options = self.ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: no provider chatter on stderr
        providers = execution_providers(device, self.ort.get_available_providers())
        if device.type == "cuda" and len(providers) == 1:
            log.warning("onnxruntime has no CUDA provider (install onnxruntime-gpu): the ONNX model runs on the CPU")
        try:
            return self.ort.InferenceSession(self.source, sess_options=options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
            first = " ".join(str(err).split())[:200]
            raise UserError(f"{self.where}: not a usable ONNX model ({first})") from None

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def to(self, *args, **kwargs) -> "OnnxModel":
        """``to(device)``: run on ``device`` from now on (a new session with its providers); dtypes
        other than float32 are refused (the graph is float32)."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype != torch.float32:
            raise TypeError(f"an ONNX model runs in float32, not {dtype}")
        if device is not None and torch.device(device) != self.device:
            self.device = torch.device(device)
            self.session = self._new_session(self.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        (out,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(out).to(x.device)

    def extra_repr(self) -> str:
        return f"{self.where}, providers={self.providers}"


def load_onnx_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[OnnxModel, ModelSpec]:
    """An exported model (``export.py``) and its ``ModelSpec`` from its metadata: what
    ``inference.predict.load_model`` returns for a checkpoint. ``UserError`` (one line naming ``path``)
    for a missing file, onnxruntime not installed, a file that is not ONNX, missing or newer
    metadata, or a graph whose input/output shape does not fit the metadata."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {'is a folder, not an ONNX model' if path.is_dir() else 'checkpoint not found'}")
    model = OnnxModel(path, device)
    spec = spec_from_metadata(model.metadata, path)
    expected_in = [len(spec.modalities), *spec.cfg.data.patch_size]
    expected_out = [spec.task.output_channels(spec.mode), *spec.cfg.data.patch_size]
    for what, shape, expected in (("input", model.input_shape, expected_in), ("output", model.output_shape,
                                                                              expected_out)):
        fixed = [(got, want) for got, want in zip(shape[1:], expected) if isinstance(got, int)]
        if len(shape) != 5 or any(got != want for got, want in fixed):
            raise UserError(f"{path}: the graph's {what} shape {shape} does not fit its metadata "
                            f"(batch, {', '.join(map(str, expected))})")
    return model.eval(), spec
