"""Segmentation losses, built from ``cfg.loss``.

    loss_fn = build_loss(cfg.loss, task)         # nn.Module
    mode = output_mode(cfg.loss)                 # "labels" (softmax over classes) or "regions" (sigmoid)
    out_channels = task.output_channels(mode)    # e.g. GLI 2024: 5 classes, or 4 regions WT/TC/ET/RC
    loss = loss_fn(logits_or_list, classes)      # float32 scalar

``logits_or_list`` is ``(B, K, X, Y, Z)`` or a deep-supervision list ``[full, 1/2, 1/4, ...]``;
``classes`` is ``(B, X, Y, Z)`` int64 training classes of the task (0 background, 1..K).

Losses: ``dice_ce`` (softmax soft Dice + cross-entropy over the task's classes, ``losses/dice.py``)
and ``region_dice_bce`` (sigmoid soft Dice + BCE over the task's training regions, ``losses/region.py``).
"""
from __future__ import annotations

from torch import nn

from core.task import output_mode  # the task schema says how outputs decode
from losses.deep_supervision import DeepSupervisionLoss, deep_supervision_weights
from losses.dice import DiceCELoss, soft_dice, soft_dice_loss
from losses.region import RegionDiceBCELoss

__all__ = ["build_loss", "output_mode", "DiceCELoss", "RegionDiceBCELoss",
           "DeepSupervisionLoss", "deep_supervision_weights", "soft_dice", "soft_dice_loss"]


def build_loss(loss_cfg, task) -> nn.Module:
    """The loss named by ``loss_cfg.name`` for ``task`` (an ``core.task.Task``), wrapped for deep
    supervision (a plain tensor prediction passes straight through)."""
    mode = output_mode(loss_cfg)
    if loss_cfg.name == "dice_ce":
        base = DiceCELoss(loss_cfg.dice_weight, loss_cfg.ce_weight, loss_cfg.include_background,
                          loss_cfg.batch_dice, loss_cfg.smooth)
    else:
        base = RegionDiceBCELoss(task, loss_cfg.dice_weight, loss_cfg.ce_weight, loss_cfg.batch_dice,
                                 loss_cfg.smooth)
    return DeepSupervisionLoss(base, mode, task)
