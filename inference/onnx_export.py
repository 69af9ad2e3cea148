"""A PyTorch network of a checkpoint -> an ONNX graph with the brats-seg contract (``export.py``, and
``infer.backend`` running a ``.pt`` in ONNX Runtime).

    data, report = export_network(model, spec, window=(128, 128, 128))   # serialized ONNX model (bytes)
    model = to_onnxruntime(torch_model, spec)                             # an OnnxModel exported in memory

One sliding window per call: the spatial size is fixed (``window``), the batch dimension is dynamic
(windows and their flips are batched). ``torch.onnx.export`` (the ``torch.export``-based exporter,
opset ``DEFAULT_OPSET``), then ``onnx.checker``; the metadata is ``inference.onnx_model.spec_metadata``.
``verify`` runs a random window through PyTorch and ONNX Runtime and refuses an export whose
probabilities differ by more than ``VERIFY_TOLERANCE``.

Two functions are traced by their definition instead of torch's kernels (``_EXPORTED_AS``; the
networks' code is unchanged, the result checked like any export):

- ``F.scaled_dot_product_attention`` (Swin UNETR) as softmax(q k^T / sqrt(d) + mask) v with the same
  mask: torch 2.13's exporter cannot decompose the fused CPU attention kernel followed by the heads'
  reshape ("Cannot view a tensor ...");
- ``F.instance_norm`` with its means taken one spatial axis at a time, because ONNX Runtime's own
  InstanceNormalization (and a ReduceMean over a whole window) loses precision over a 128^3 window
  (``_accurate_instance_norm``).

Needs ``onnx`` and ``onnxscript`` (the exporter), and ``onnxruntime`` to verify; all imported lazily.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from core.task import logits_to_probabilities
from inference.onnx_model import INPUT_NAME, OUTPUT_NAME, OnnxModel, spec_metadata
from inference.predict import ModelSpec

DEFAULT_OPSET = 20  # torch 2.13's default (its newest is 23); onnxruntime >= 1.17 runs it
VERIFY_TOLERANCE = 1e-3  # max abs difference of probabilities, PyTorch vs ONNX Runtime, on a random window
EXPORTER_PACKAGES = "pip install onnx onnxscript onnxruntime"


def exporter_available() -> bool:
    """Whether ``onnx``, ``onnxscript`` and ``onnxruntime`` can be imported (without importing them)."""
    import importlib.util  # noqa: PLC0415
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript", "onnxruntime"))


def _explicit_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False):
    """``F.scaled_dot_product_attention`` by its definition (inference: no dropout, no causal mask)."""
    if dropout_p or is_causal or enable_gqa:
        raise NotImplementedError("only plain attention with an optional additive mask is exported")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query * scale) @ key.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores + attn_mask if attn_mask.dtype != torch.bool else scores.masked_fill(~attn_mask, -math.inf)
    return torch.softmax(scores, dim=-1) @ value


def _staged_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the spatial axes (2, 3, ...), one axis at a time (keepdim): every sum adds at most
    one axis' length of float32 values."""
    for dim in range(x.ndim - 1, 1, -1):
        x = x.mean(dim=dim, keepdim=True)
    return x


def _accurate_instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                            use_input_stats=True, momentum=0.1, eps=1e-5):
    """``F.instance_norm`` (input statistics, biased variance) with means taken axis by axis.

    ONNX Runtime's InstanceNormalization and its ReduceMean over a whole 128^3 window add 2 M float32
    values in one running sum: normalised outputs were off by 2e-4 (PyTorch: 1e-6), which compounds
    through a U-Net's 14 norms to logits off by up to 0.2 (probabilities by 0.04) on a full case.
    Reduced one axis at a time the error is 1e-5, at the same speed (measured on 8 x 128^3)."""
    if not use_input_stats or running_mean is not None:
        return _FUNCTIONS["instance_norm"](input, running_mean, running_var, weight, bias, use_input_stats,
                                           momentum, eps)
    mean = _staged_mean(input)
    centred = input - mean
    out = centred * torch.rsqrt(_staged_mean(centred * centred) + eps)
    shape = (1, -1) + (1,) * (input.ndim - 2)
    if weight is not None:
        out = out * weight.reshape(shape)
    return out + bias.reshape(shape) if bias is not None else out


_FUNCTIONS = {"scaled_dot_product_attention": F.scaled_dot_product_attention, "instance_norm": F.instance_norm}
_EXPORTED_AS = {"scaled_dot_product_attention": _explicit_attention, "instance_norm": _accurate_instance_norm}


@contextlib.contextmanager
def _exportable():
    """The functions of ``_EXPORTED_AS`` replace torch's while the model is traced (the model's own
    code is unchanged), the exporter's chatter silenced (torchvision missing, deprecations)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for name, function in _EXPORTED_AS.items():
        setattr(F, name, function)
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, function in _FUNCTIONS.items():
            setattr(F, name, function)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _import_exporter(where: str):
    try:
        import onnx  # noqa: PLC0415
        import onnxscript  # noqa: F401, PLC0415 (torch.onnx.export needs it)
    except ImportError as err:
        raise UserError(f"{where}: exporting to ONNX needs the onnx and onnxscript packages ({err.name} is not "
                        f"installed); install them with: {EXPORTER_PACKAGES}") from None
    return onnx


def export_network(model: nn.Module, spec: ModelSpec, window: Sequence[int] | None = None, *,
                   opset: int = DEFAULT_OPSET, extra: dict[str, Any] | None = None, verify: bool = True,
                   where: str = "model") -> tuple[bytes, dict[str, Any]]:
    """``(serialized ONNX model, report)`` of ``model`` (a network of ``spec``) for one ``window``
    (default: the training patch size), batch dynamic, with the metadata of ``spec``.

    ``report``: ``seconds`` (export), ``opset``, ``max_abs_probability_difference`` (with ``verify``).
    ``UserError`` naming ``where`` for a window the network cannot take, a network the exporter
    cannot convert, or an export that does not reproduce the network (with ``verify``).
    """
    onnx = _import_exporter(where)
    window = [int(w) for w in (window if window is not None else spec.cfg.data.patch_size)]
    model = model.eval()
    check = getattr(model, "check_input_size", None)
    if check is not None:
        try:
            check(window)
        except ValueError as err:
            raise UserError(f"{where}: window {window}: {err}") from None
    example = torch.zeros((2, len(spec.modalities), *window))  # batch 2: the exporter keeps a batch of 1 static
    tick = time.perf_counter()
    try:
        with _exportable(), torch.no_grad():
            program = torch.onnx.export(
                model, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), opset_version=opset, dynamo=True,
                verbose=False)
    except Exception as err:  # the exporter's many error types; one line is what a user can act on
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f"{where}: {spec.cfg.model.name} cannot be exported to ONNX ({first.strip()[:300]})") from None
    proto = program.model_proto
    proto.producer_name, proto.producer_version = "brats-seg export.py", torch.__version__
    proto.doc_string = (f"brats-seg {spec.cfg.model.name}: {INPUT_NAME} float32 (batch, {len(spec.modalities)}, "
                        f"{', '.join(map(str, window))}) -> {OUTPUT_NAME} (batch, "
                        f"{spec.task.output_channels(spec.mode)}, ...); see metadata_props")
    del proto.metadata_props[:]
    for key, value in spec_metadata(spec, window, extra).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as err:
        raise UserError(f"{where}: the exported graph fails onnx.checker ({' '.join(str(err).split())[:300]})") from None
    data = proto.SerializeToString()
    report: dict[str, Any] = {"seconds": round(time.perf_counter() - tick, 2), "opset": opset, "window": window}
    if verify:
        difference = verify_export(model, data, spec, window, where)
        report["max_abs_probability_difference"] = difference
    return data, report


def verify_export(model: nn.Module, data: bytes, spec: ModelSpec, window: Sequence[int], where: str) -> float:
    """Max abs difference of the probabilities (the output mode's activation) of PyTorch and ONNX
    Runtime on one window like a z-scored case: standard-normal noise inside an ellipsoid, 0 around
    it; ``UserError`` above ``VERIFY_TOLERANCE``."""
    generator = torch.Generator().manual_seed(0)
    grid = torch.meshgrid(*[torch.linspace(-1.0, 1.0, w) for w in window], indexing="ij")
    inside = sum((g / r) ** 2 for g, r in zip(grid, (0.9, 0.8, 0.7))) <= 1
    image = torch.randn((1, len(spec.modalities), *window), generator=generator) * inside
    with torch.inference_mode():
        expected = logits_to_probabilities(model(image), spec.mode)
    got = logits_to_probabilities(OnnxModel(data, where=where)(image), spec.mode)
    difference = float((got - expected).abs().max())
    if not difference <= VERIFY_TOLERANCE:
        raise UserError(f"{where}: the ONNX graph does not reproduce the network: probabilities differ by up to "
                        f"{difference:.3g} on a random window (tolerance {VERIFY_TOLERANCE:g}); not written")
    return difference

