"""Soft Dice over one-hot targets, and Dice + cross-entropy for softmax outputs.

Soft Dice of class ``k`` (sums over the spatial axes, and over the batch with ``batch_dice``)::

    dice_k = (2 * sum(p_k * g_k) + smooth) / (sum(p_k) + sum(g_k) + smooth)

``smooth`` is tiny (default 1e-5) and sits in numerator and denominator, so it does not pull the
Dice of small structures towards 1. Empty class (``sum(g_k) = 0``): ``dice_k = smooth /
(sum(p_k) + smooth)``, i.e. ~1 (no loss) when nothing is predicted and ~0 as soon as the
predicted mass exceeds ``smooth``, which pushes false positives down. The loss is
``1 - mean(dice_k)`` over classes (and over samples without ``batch_dice``), in [0, 1].

All losses compute in float32 with autocast disabled, whatever the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice(probs: torch.Tensor, onehot: torch.Tensor, batch_dice: bool = False,
              smooth: float = 1e-5) -> torch.Tensor:
    """Per-class soft Dice of ``probs`` and ``onehot``, both ``(B, K, X, Y, Z)``.

    Returns ``(K,)`` with ``batch_dice`` (sums over batch and space before the ratio), else
    ``(B, K)``.
    """
    if probs.shape != onehot.shape:
        raise ValueError(f"probs shape {tuple(probs.shape)} != target shape {tuple(onehot.shape)}")
    axes = tuple(range(2, probs.ndim))
    if batch_dice:
        axes = (0,) + axes
    intersection = (probs * onehot).sum(axes)
    denominator = probs.sum(axes) + onehot.sum(axes)
    return (2.0 * intersection + smooth) / (denominator + smooth)


def soft_dice_loss(probs: torch.Tensor, onehot: torch.Tensor, batch_dice: bool = False,
                   smooth: float = 1e-5) -> torch.Tensor:
    """``1 - mean soft Dice`` of ``probs`` and ``onehot`` ``(B, K, X, Y, Z)``; a scalar."""
    return 1.0 - soft_dice(probs, onehot, batch_dice, smooth).mean()


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Classes ``(B, X, Y, Z)`` int64 -> float32 one-hot ``(B, K, X, Y, Z)``."""
    out = torch.zeros((target.shape[0], num_classes) + tuple(target.shape[1:]),
                      dtype=torch.float32, device=target.device)
    return out.scatter_(1, target.unsqueeze(1).long(), 1.0)


def check_weights(dice_weight: float, ce_weight: float, smooth: float) -> None:
    """``ValueError`` naming the argument for negative weights/smooth or both weights zero."""
    for name, value in (("dice_weight", dice_weight), ("ce_weight", ce_weight), ("smooth", smooth)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if dice_weight == 0 and ce_weight == 0:
        raise ValueError("dice_weight and ce_weight are both 0: the loss would be constant")


class DiceCELoss(nn.Module):
    """``dice_weight * (1 - soft Dice) + ce_weight * cross-entropy`` for softmax outputs.

    ``forward(logits (B, K, X, Y, Z), target (B, X, Y, Z) int64 classes in [0, K))`` -> float32
    scalar. ``include_background=False`` leaves class 0 out of the Dice term (never out of the
    cross-entropy).
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 include_background: bool = False, batch_dice: bool = False, smooth: float = 1e-5):
        super().__init__()
        check_weights(dice_weight, ce_weight, smooth)
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.include_background = include_background
        self.batch_dice = batch_dice
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == logits.ndim and target.shape[1] == 1:
            target = target[:, 0]
        if target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"target shape {tuple(target.shape)} does not match logits "
                             f"{tuple(logits.shape)} (expected (B, X, Y, Z) classes)")
        target = target.long()
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            loss = logits.new_zeros(())
            if self.dice_weight:
                probs = torch.softmax(logits, dim=1)
                onehot = one_hot(target, logits.shape[1])
                if not self.include_background:
                    probs, onehot = probs[:, 1:], onehot[:, 1:]
                loss = loss + self.dice_weight * soft_dice_loss(probs, onehot, self.batch_dice, self.smooth)
            if self.ce_weight:
                loss = loss + self.ce_weight * F.cross_entropy(logits, target)
        return loss
