"""Optimizer and learning-rate schedule, both built from ``cfg.train``.

The learning rate is a pure function of the iteration number (``lr_factor``), so a resumed run
continues the schedule exactly: the checkpoint stores the iteration and nothing else is needed.

    optimizer = build_optimizer(model, cfg.train, device_type="cuda")
    schedule = LRSchedule(optimizer, cfg.train.schedule, total_iters, warmup_iters, cfg.train.lr)
    for it in range(start, total_iters):
        lr = schedule.set(it)        # LR of the step about to be taken
        ...; optimizer.step()
"""
from __future__ import annotations

import math
from typing import Any

import torch

SCHEDULES = ("poly", "cosine")
POLY_EXPONENT = 0.9  # nnU-Net's (1 - t)^0.9


def lr_factor(iteration: int, total_iters: int, warmup_iters: int, schedule: str,
              exponent: float = POLY_EXPONENT) -> float:
    """Multiplier of the peak LR for the (0-based) ``iteration`` about to be taken.

    Warmup: ``(iteration + 1) / warmup_iters`` for the first ``warmup_iters`` steps (never 0).
    Then with ``t = (iteration - warmup_iters) / (total_iters - warmup_iters)`` in ``[0, 1]``:
    ``poly`` = ``(1 - t) ** exponent``; ``cosine`` = ``0.5 * (1 + cos(pi * t))``.
    Iterations past ``total_iters`` keep the final value (0).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if total_iters < 1:
        raise ValueError(f"total_iters must be >= 1, got {total_iters}")
    if not 0 <= warmup_iters <= total_iters:
        raise ValueError(f"warmup_iters must be in [0, total_iters={total_iters}], got {warmup_iters}")
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if iteration < warmup_iters:
        return (iteration + 1) / warmup_iters
    if total_iters == warmup_iters:
        return 1.0
    t = min(1.0, (iteration - warmup_iters) / (total_iters - warmup_iters))
    if schedule == "poly":
        return (1.0 - t) ** exponent
    return 0.5 * (1.0 + math.cos(math.pi * t))


class LRSchedule:
    """Sets every param group's LR to ``base_lr * lr_factor(iteration, ...)``.

    Stateless apart from its settings: ``set(iteration)`` before each optimizer step. Raising
    ``total_iters`` on resume (more epochs) stretches the remaining schedule from that point on.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: str, total_iters: int,
                 warmup_iters: int, base_lr: float):
        if base_lr <= 0:
            raise ValueError(f"base_lr must be > 0, got {base_lr}")
        lr_factor(0, total_iters, warmup_iters, schedule)  # validates the settings
        self.optimizer = optimizer
        self.schedule = schedule
        self.total_iters = total_iters
        self.warmup_iters = warmup_iters
        self.base_lr = base_lr
        self.iteration = 0

    def lr_at(self, iteration: int) -> float:
        return self.base_lr * lr_factor(iteration, self.total_iters, self.warmup_iters, self.schedule)

    def set(self, iteration: int) -> float:
        """Write the LR of ``iteration`` into the optimizer and return it."""
        lr = self.lr_at(iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.iteration = iteration
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "total_iters": self.total_iters,
                "warmup_iters": self.warmup_iters, "base_lr": self.base_lr, "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the iteration (the settings come from the current config)."""
        self.set(int(state["iteration"]))


def build_optimizer(model: torch.nn.Module, train_cfg: Any, device_type: str = "cpu") -> torch.optim.Optimizer:
    """SGD with Nesterov momentum or AdamW (fused on CUDA) over the trainable parameters.

    Weight decay applies to weights with >= 2 dims (convolutions, linear layers, embeddings);
    biases and normalization scales (1-D) are not decayed.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": train_cfg.weight_decay, "decay": True},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "decay": False},
    ]
    groups = [g for g in groups if g["params"]]
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=train_cfg.momentum,
                               nesterov=train_cfg.momentum > 0)
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train_cfg.lr, fused=device_type == "cuda")
    raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {train_cfg.optimizer!r}")


def apply_hyperparameters(optimizer: torch.optim.Optimizer, train_cfg: Any) -> None:
    """Write ``train.weight_decay`` (and SGD's ``train.momentum``) into the param groups.

    ``optimizer.load_state_dict`` restores the hyperparameters saved in a checkpoint; call this
    after it so that values overridden on resume take effect (the LR comes from ``LRSchedule``).
    """
    for group in optimizer.param_groups:
        group["weight_decay"] = train_cfg.weight_decay if group.get("decay", True) else 0.0
        if isinstance(optimizer, torch.optim.SGD):
            group["momentum"] = train_cfg.momentum
            group["nesterov"] = train_cfg.momentum > 0
