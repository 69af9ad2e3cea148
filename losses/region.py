"""Region loss for sigmoid outputs over a task's training regions (e.g. WT, TC, ET, and RC).

The network outputs one logit per training region (channel order ``task.training_regions``);
targets are built by ``task.training_targets``, the one place that knows which classes make up
each region. Regions may be nested (TC inside WT) or not (RC outside WT). Every region channel
enters the Dice term (there is no background channel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.task import Task
from losses.dice import check_weights, soft_dice_loss


class RegionDiceBCELoss(nn.Module):
    """``dice_weight * (1 - soft Dice) + ce_weight * BCE-with-logits`` over the task's training regions.

    ``forward(logits (B, R, X, Y, Z), target)`` -> float32 scalar, where ``target`` is either
    training classes ``(B, X, Y, Z)`` (integer; converted to regions here) or region maps
    ``(B, R, X, Y, Z)`` (floating point, values in [0, 1]; what deep supervision passes after
    max-pooling). Soft Dice as in ``losses.dice`` on the sigmoid probabilities.
    """

    def __init__(self, task: Task, dice_weight: float = 1.0, ce_weight: float = 1.0, batch_dice: bool = False,
                 smooth: float = 1e-5):
        super().__init__()
        check_weights(dice_weight, ce_weight, smooth)
        self.task = task
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.batch_dice = batch_dice
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        names = self.task.training_region_names
        if logits.shape[1] != len(names):
            raise ValueError(f"logits have {logits.shape[1]} channels, expected {len(names)} ({', '.join(names)})")
        regions = target_regions(target, self.task)
        if regions.shape != logits.shape:
            raise ValueError(f"target regions {tuple(regions.shape)} do not match logits {tuple(logits.shape)}")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            loss = logits.new_zeros(())
            if self.dice_weight:
                probs = torch.sigmoid(logits)
                loss = loss + self.dice_weight * soft_dice_loss(probs, regions, self.batch_dice, self.smooth)
            if self.ce_weight:
                loss = loss + self.ce_weight * F.binary_cross_entropy_with_logits(logits, regions)
        return loss


def target_regions(target: torch.Tensor, task: Task) -> torch.Tensor:
    """Classes ``(B, X, Y, Z)`` (or ``(B, 1, X, Y, Z)``) -> float32 regions ``(B, R, X, Y, Z)``;
    floating-point region maps ``(B, R, X, Y, Z)`` pass through as float32."""
    count = len(task.training_regions)
    if target.is_floating_point():
        if target.ndim != 5 or target.shape[1] != count:
            raise ValueError(f"floating-point targets must be region maps (B, {count}, X, Y, Z), "
                             f"got {tuple(target.shape)}")
        return target.float()
    return task.training_targets(target)
