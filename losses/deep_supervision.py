"""Deep supervision: one loss per decoder output, weights halving per scale, summing to 1.

The network returns ``[full, 1/2, 1/4, ...]`` (full resolution first) during training. Output
``i`` gets weight ``2**-i / sum_j 2**-j`` and a target downsampled to its spatial shape:

- ``"labels"`` mode (softmax): nearest-neighbour sampling of the class map (``nearest-exact``),
  as nnU-Net does. Max-pooling one-hot maps is not used here because it would put one voxel in
  several classes, which a softmax cross-entropy target cannot express.
- ``"regions"`` mode (sigmoid over the task's training regions): max-pooling of the region maps,
  so a coarse voxel is in a region when any fine voxel under it is. Max-pooling keeps nesting
  (WT >= TC >= ET) and does not drop small ET islands at coarse scales.

A plain tensor prediction (no deep supervision) goes straight to the base loss.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.task import OUTPUT_MODES, Task


def deep_supervision_weights(n: int) -> list[float]:
    """``[1, 1/2, 1/4, ...]`` for ``n`` outputs, normalized to sum to 1."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    raw = [0.5 ** i for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def downsample_classes(target: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Classes ``(B, X, Y, Z)`` -> ``(B, *shape)`` by nearest-neighbour sampling (int64)."""
    if tuple(target.shape[1:]) == tuple(shape):
        return target.long()
    resized = F.interpolate(target[:, None].float(), size=tuple(shape), mode="nearest-exact")
    return resized[:, 0].long()


def downsample_regions(regions: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Region maps ``(B, R, X, Y, Z)`` -> ``(B, R, *shape)`` by (adaptive) max-pooling."""
    if tuple(regions.shape[2:]) == tuple(shape):
        return regions
    return F.adaptive_max_pool3d(regions, tuple(shape))


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``base`` over a list of outputs ``[full, 1/2, 1/4, ...]``.

    ``forward(prediction, target)``: ``prediction`` is logits ``(B, K, X, Y, Z)`` or a list of
    them (full resolution first); ``target`` is classes ``(B, X, Y, Z)`` int64 at full
    resolution. Returns a float32 scalar.
    """

    def __init__(self, base: nn.Module, mode: str, task: Task):
        super().__init__()
        if mode not in OUTPUT_MODES:
            raise ValueError(f"mode must be one of {', '.join(OUTPUT_MODES)}, got {mode!r}")
        self.base = base
        self.mode = mode
        self.task = task

    def forward(self, prediction: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 5 and target.shape[1] == 1:
            target = target[:, 0]
        if isinstance(prediction, torch.Tensor):
            return self.base(prediction, target)
        outputs = list(prediction)
        if not outputs:
            raise ValueError("empty list of deep-supervision outputs")
        if tuple(outputs[0].shape[2:]) != tuple(target.shape[1:]):
            raise ValueError(f"the first output {tuple(outputs[0].shape)} must have the target's "
                             f"spatial shape {tuple(target.shape[1:])} (full resolution first)")
        full = self.task.training_targets(target) if self.mode == "regions" else target
        loss = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, output in zip(deep_supervision_weights(len(outputs)), outputs):
            shape = output.shape[2:]
            scaled = downsample_regions(full, shape) if self.mode == "regions" else downsample_classes(full, shape)
            loss = loss + weight * self.base(output, scaled)
        return loss
