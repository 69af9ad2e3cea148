"""Sliding-window inference with Gaussian importance weighting and batched mirror TTA.

    probs = sliding_window_predict(model, image, window=(128, 128, 128), overlap=0.5, tta=True)
    # image (C, X, Y, Z) -> probs (K, X, Y, Z) float32

How it works (as in nnU-Net):

- The volume is zero-padded (centred) to at least the window in every axis; the padding is
  removed from the result.
- Window starts along each axis are evenly spaced, the first at 0 and the last flush with the end,
  with the fewest windows whose step is at most ``floor(window * (1 - overlap))`` voxels.
- Each window's probabilities are multiplied by a Gaussian importance map (centre weight 1,
  sigma = ``sigma_scale * window``, never 0) and accumulated in float32 together with the sum of the
  weights; the result is the ratio, so overlapping windows blend without seams.
- ``sw_batch_size`` windows go through the model in one forward pass; with ``tta=True`` that same
  pass also holds the 8 axis-flip combinations of each window (a batch of ``8 * sw_batch_size``),
  whose outputs are flipped back and averaged.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.distributed import PRECISIONS, autocast_dtype
from core.task import logits_to_probabilities

log = logging.getLogger(__name__)

# spatial dims of a (B, C, X, Y, Z) batch flipped by each of the 8 mirror TTA combinations
FLIP_DIMS: tuple[tuple[int, ...], ...] = tuple(
    dims for n in range(4) for dims in itertools.combinations((2, 3, 4), n))
ACTIVATION_MODES = ("labels", "regions", None)
# accumulate on the GPU only while the accumulators take less than this share of its free memory
_DEVICE_ACCUMULATOR_SHARE = 0.5


def compute_steps(size: int, window: int, overlap: float) -> list[int]:
    """Window start offsets along one axis of length ``size`` (``size >= window``).

    The fewest evenly spaced starts with a step of at most ``floor(window * (1 - overlap))``
    (and at least 1): the first start is 0, the last ``size - window``. E.g.
    ``compute_steps(11, 4, 0.5) == [0, 2, 4, 5, 7]``.
    """
    if window < 1 or size < window:
        raise ValueError(f"need 1 <= window <= size, got window={window}, size={size}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    max_step = max(1, int(window * (1.0 - overlap)))
    span = size - window
    count = math.ceil(span / max_step) + 1
    if count == 1:
        return [0]
    step = span / (count - 1)
    return [int(np.round(step * i)) for i in range(count)]


def window_starts(shape: Sequence[int], window: Sequence[int], overlap: float) -> list[tuple[int, int, int]]:
    """All window corners ``(x, y, z)`` covering a volume of ``shape`` (each axis >= window)."""
    per_axis = [compute_steps(s, w, overlap) for s, w in zip(shape, window)]
    return list(itertools.product(*per_axis))


@functools.lru_cache(maxsize=16)
def gaussian_importance_map(window: tuple[int, int, int], sigma_scale: float = 0.125,
                            device: torch.device | str = "cpu",
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian weights ``(X, Y, Z)`` of a window, centred, with maximum 1 and no zeros.

    ``sigma = sigma_scale * window`` per axis. Values that underflow to 0 are raised to the
    smallest nonzero value, so every voxel of the window keeps some weight. Cached per
    ``(window, sigma_scale, device, dtype)``; treat the result as read-only.
    """
    if len(window) != 3 or any(int(w) < 1 for w in window):
        raise ValueError(f"window must be 3 positive sizes, got {window}")
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    profiles = []
    for w in window:
        offsets = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
        profiles.append(np.exp(-0.5 * (offsets / (sigma_scale * w)) ** 2))
    weights = np.einsum("i,j,k->ijk", *profiles)
    weights = torch.from_numpy(weights / weights.max()).to(dtype)
    if (weights == 0).any():
        weights[weights == 0] = weights[weights > 0].min()
    return weights.to(device)


def sliding_window_predict(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor | np.ndarray,
                           window: Sequence[int], *, overlap: float = 0.5, sw_batch_size: int = 4,
                           mode: str | None = "labels", tta: bool = False,
                           device: torch.device | str | None = None, precision: str = "bf16",
                           sigma_scale: float = 0.125,
                           accumulate_device: torch.device | str | None = None) -> torch.Tensor:
    """Probabilities ``(K, X, Y, Z)`` float32 of ``model`` over the whole of ``image (C, X, Y, Z)``.

    ``model`` is any callable mapping ``(B, C, *window)`` to logits ``(B, K, *window)`` (put an
    ``nn.Module`` in eval mode first). ``mode`` picks the per-window activation: ``"labels"``
    (softmax over K), ``"regions"`` (sigmoid) or ``None`` (none: the raw outputs are blended).
    ``device`` runs the model (default: the image's device); ``precision`` ("bf16", "fp16",
    "fp32") is the autocast dtype on CUDA, while CPU always runs fp32. ``accumulate_device`` holds
    the float32 accumulators and the result; by default the compute device when they fit in half
    of its free memory, else the CPU.

    The options are keyword-only, each with a default, as in MONAI's ``sliding_window_inference``
    (benchmarks and tests set them one by one); code that has a config calls
    ``inference.predict.predict_case(models, images, cfg.infer, ...)``, which fills them from the
    ``infer`` section.
    """
    window = _check_window(window)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if mode not in ACTIVATION_MODES:
        raise ValueError(f"mode must be one of {ACTIVATION_MODES}, got {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    image = torch.as_tensor(image)
    if image.ndim != 4:
        raise ValueError(f"image must be (C, X, Y, Z), got shape {tuple(image.shape)}")
    device = torch.device(device) if device is not None else image.device

    image, crop = _pad_to_window(image.to(device, torch.float32), window)
    starts = window_starts(image.shape[1:], window, overlap)
    weight = gaussian_importance_map(window, float(sigma_scale), device)
    flips = FLIP_DIMS if tta else ((),)

    out = None
    with torch.no_grad():  # the model runs under inference_mode; the result stays an ordinary tensor
        for first in range(0, len(starts), sw_batch_size):
            batch_starts = starts[first:first + sw_batch_size]
            probs = _predict_batch(model, image, batch_starts, window, flips, mode, device, precision, weight)
            if out is None:  # channel count known after the first forward pass
                target = _accumulator_device(accumulate_device, device, probs.shape[1], image.shape[1:])
                out = torch.zeros((probs.shape[1],) + tuple(image.shape[1:]), dtype=torch.float32, device=target)
            probs = probs.to(out.device)
            for j, start in enumerate(batch_starts):
                out[(slice(None),) + _window_slices(start, window)] += probs[j]
        weight = weight.to(out.device)
        weight_sum = torch.zeros(out.shape[1:], dtype=torch.float32, device=out.device)
        for start in starts:
            weight_sum[_window_slices(start, window)] += weight
        out /= weight_sum
    return out[(slice(None),) + crop].contiguous() if crop is not None else out


@torch.inference_mode()
def _predict_batch(model, image: torch.Tensor, starts, window, flips, mode, device: torch.device,
                   precision: str, weight: torch.Tensor) -> torch.Tensor:
    """Activated outputs ``(b, K, *window)`` float32 of the ``b`` windows at ``starts``, averaged
    over ``flips`` (all flips of all windows in one forward pass on GPU; one pass per flip on CPU),
    times ``weight``."""
    windows = torch.stack([image[(slice(None),) + _window_slices(s, window)] for s in starts])
    b = windows.shape[0]
    inputs = torch.cat([windows.flip(dims) if dims else windows for dims in flips]) if len(flips) > 1 else windows
    with _autocast(device, precision):
        if device.type == "cpu" and len(flips) > 1:
            # CPU: a batch of windows x 8 flips runs ~1.5x slower per window than the windows
            # alone (measured, bench/inference.py), so run one flip group at a time there
            logits = _forward_in_groups(model, inputs, b)
        else:
            logits = _forward_or_split(model, inputs, b)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(logits).__name__}, expected a tensor "
                        "(call model.eval() to disable deep-supervision outputs)")
    if logits.shape[0] != inputs.shape[0] or tuple(logits.shape[2:]) != tuple(inputs.shape[2:]):
        raise ValueError(f"model output {tuple(logits.shape)} does not match its input "
                         f"{tuple(inputs.shape)} in batch and spatial size")
    probs = logits.float() if mode is None else logits_to_probabilities(logits, mode)
    if len(flips) == 1:
        return probs.mul_(weight)  # probs is a new tensor: the model's input was a fresh stack
    total = probs[:b].clone()
    for i, dims in enumerate(flips[1:], start=1):
        part = probs[i * b:(i + 1) * b]
        total += part.flip(dims) if dims else part
    return total.mul_(weight / len(flips))


def _forward_or_split(model, inputs: torch.Tensor, group: int) -> torch.Tensor:
    """``model(inputs)``; if that runs out of GPU memory (windows x 8 flips in one pass), again one
    group of ``group`` inputs at a time (a warning says so)."""
    try:
        return model(inputs)
    except torch.cuda.OutOfMemoryError:  # the name every torch >= 2.4 has
        if inputs.shape[0] <= group:
            raise
    torch.cuda.empty_cache()
    log.warning("out of GPU memory with %d windows in one pass: running %d at a time (lower "
                "infer.sw_batch_size to avoid the retry)", inputs.shape[0], group)
    return _forward_in_groups(model, inputs, group)


def _forward_in_groups(model, inputs: torch.Tensor, group: int) -> torch.Tensor:
    """``model`` over ``inputs`` ``group`` at a time, outputs concatenated."""
    return torch.cat([model(part) for part in inputs.split(group)])


def _autocast(device: torch.device, precision: str):
    dtype = autocast_dtype(precision, device)  # bf16 -> fp16 before Ampere
    if device.type == "cuda" and dtype is not None:
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def _accumulator_device(requested, device: torch.device, channels: int, shape) -> torch.device:
    """``requested`` if given; else the compute device if the accumulators fit there, else CPU."""
    if requested is not None:
        return torch.device(requested)
    if device.type != "cuda":
        return device
    needed = 4 * (channels + 1) * math.prod(shape)  # float32 probabilities + weight sum
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return device if needed < _DEVICE_ACCUMULATOR_SHARE * (free + cached) else torch.device("cpu")


def _check_window(window: Sequence[int]) -> tuple[int, int, int]:
    window = tuple(int(w) for w in window)
    if len(window) != 3 or any(w < 1 for w in window):
        raise ValueError(f"window must be 3 positive sizes (X, Y, Z), got {window}")
    return window


def _window_slices(start: Sequence[int], window: Sequence[int]) -> tuple[slice, slice, slice]:
    return tuple(slice(s, s + w) for s, w in zip(start, window))


def _pad_to_window(image: torch.Tensor, window: tuple[int, int, int]):
    """Zero-pad ``(C, X, Y, Z)`` (centred) to at least ``window``; returns the spatial crop that
    undoes it (``None`` when nothing was padded)."""
    shape = image.shape[1:]
    if all(s >= w for s, w in zip(shape, window)):
        return image, None
    before = [max(w - s, 0) // 2 for s, w in zip(shape, window)]
    after = [max(w - s, 0) - b for s, w, b in zip(shape, window, before)]
    pad = []
    for b, a in zip(reversed(before), reversed(after)):  # F.pad lists the last dim first
        pad += [b, a]
    crop = tuple(slice(b, b + s) for b, s in zip(before, shape))
    return F.pad(image, pad), crop
