"""Optimizer construction and the per-iteration LR schedules (hand-computed values)."""
import math
from types import SimpleNamespace

import pytest
import torch

from core.optim import LRSchedule, apply_hyperparameters, build_optimizer, lr_factor


@pytest.mark.parametrize("iteration,total,warmup,schedule,expected", [
    # poly: (1 - t)^0.9
    (0, 100, 0, "poly", 1.0),
    (50, 100, 0, "poly", 0.5 ** 0.9),          # 0.53589
    (99, 100, 0, "poly", 0.01 ** 0.9),         # 0.015849
    (100, 100, 0, "poly", 0.0),                # past the end: stays at 0
    (250, 100, 0, "poly", 0.0),
    # linear warmup, never 0 on the first step
    (0, 110, 10, "poly", 0.1),
    (4, 110, 10, "poly", 0.5),
    (9, 110, 10, "poly", 1.0),
    (10, 110, 10, "poly", 1.0),
    (60, 110, 10, "poly", 0.5 ** 0.9),         # t = 50 / 100
    # cosine: 0.5 * (1 + cos(pi t))
    (0, 100, 0, "cosine", 1.0),
    (50, 100, 0, "cosine", 0.5),
    (25, 100, 0, "cosine", 0.5 * (1 + math.sqrt(0.5))),  # 0.85355
    (100, 100, 0, "cosine", 0.0),
    (2, 110, 10, "cosine", 0.3),
    (35, 110, 10, "cosine", 0.5 * (1 + math.cos(math.pi / 4))),  # t = 25 / 100
    (60, 110, 10, "cosine", 0.5),
    (10, 10, 10, "cosine", 1.0),               # warmup covers the whole run
])
def test_lr_factor_hand_computed(iteration, total, warmup, schedule, expected):
    assert lr_factor(iteration, total, warmup, schedule) == pytest.approx(expected, abs=1e-12)


def test_poly_hand_numbers():
    # the same values written out as decimals, in case the formula above hides a mistake
    assert lr_factor(50, 100, 0, "poly") == pytest.approx(0.535887, abs=1e-6)
    assert lr_factor(99, 100, 0, "poly") == pytest.approx(0.0158489, abs=1e-6)
    assert lr_factor(35, 110, 10, "cosine") == pytest.approx(0.853553, abs=1e-6)


@pytest.mark.parametrize("kwargs", [
    dict(iteration=0, total_iters=10, warmup_iters=0, schedule="step"),
    dict(iteration=0, total_iters=0, warmup_iters=0, schedule="poly"),
    dict(iteration=0, total_iters=10, warmup_iters=11, schedule="poly"),
    dict(iteration=0, total_iters=10, warmup_iters=-1, schedule="cosine"),
    dict(iteration=-1, total_iters=10, warmup_iters=0, schedule="poly"),
])
def test_lr_factor_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        lr_factor(**kwargs)


def _net():
    return torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.InstanceNorm3d(4, affine=True),
                               torch.nn.Conv3d(4, 3, 1))


def _train_cfg(**kw):
    base = dict(optimizer="sgd", lr=0.01, weight_decay=3e-5, momentum=0.99)
    base.update(kw)
    return SimpleNamespace(**base)


def test_schedule_sets_lr_and_resumes_exactly():
    opt = build_optimizer(_net(), _train_cfg(lr=0.02))
    sched = LRSchedule(opt, "cosine", total_iters=110, warmup_iters=10, base_lr=0.02)
    assert sched.set(60) == pytest.approx(0.01)
    assert all(g["lr"] == pytest.approx(0.01) for g in opt.param_groups)
    state = sched.state_dict()
    opt2 = build_optimizer(_net(), _train_cfg(lr=0.02))
    sched2 = LRSchedule(opt2, "cosine", total_iters=110, warmup_iters=10, base_lr=0.02)
    sched2.load_state_dict(state)
    assert sched2.iteration == 60
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01)
    # more epochs on resume: the remaining schedule is stretched, not restarted
    longer = LRSchedule(opt2, "poly", total_iters=200, warmup_iters=0, base_lr=0.02)
    longer.load_state_dict({"iteration": 100})
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.02 * 0.5 ** 0.9)


def test_schedule_rejects_bad_lr():
    opt = build_optimizer(_net(), _train_cfg())
    with pytest.raises(ValueError, match="base_lr"):
        LRSchedule(opt, "poly", 10, 0, base_lr=0.0)


def test_sgd_nesterov_and_weight_decay_groups():
    net = _net()
    opt = build_optimizer(net, _train_cfg(weight_decay=1e-3, momentum=0.9))
    assert isinstance(opt, torch.optim.SGD)
    decay, no_decay = opt.param_groups
    assert decay["nesterov"] and decay["momentum"] == 0.9
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    # conv weights (5-D) decay; biases and norm scales (1-D) do not
    assert {p.ndim for p in decay["params"]} == {5}
    assert {p.ndim for p in no_decay["params"]} == {1}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


def test_sgd_step_uses_scheduled_lr():
    # first Nesterov step without weight decay: p -= lr * (1 + momentum) * grad
    bias = torch.nn.Parameter(torch.zeros(3))
    module = torch.nn.Module()
    module.bias = bias
    opt = build_optimizer(module, _train_cfg(momentum=0.9, lr=1.0))
    LRSchedule(opt, "poly", total_iters=100, warmup_iters=0, base_lr=1.0).set(50)
    bias.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    lr = 0.5 ** 0.9
    assert torch.allclose(bias.detach(), -lr * 1.9 * torch.tensor([1.0, -2.0, 0.5]))


def test_adamw_and_frozen_parameters():
    net = _net()
    net[0].weight.requires_grad_(False)
    opt = build_optimizer(net, _train_cfg(optimizer="adamw", lr=1e-4, weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(p is not net[0].weight for p in params)
    assert opt.param_groups[0]["weight_decay"] == 0.05


def test_build_optimizer_rejects_an_unknown_optimizer():
    with pytest.raises(ValueError, match="train.optimizer"):  # the ranges of train.* are the config's (test_config)
        build_optimizer(_net(), _train_cfg(optimizer="lamb"))


def test_hyperparameters_overridden_on_resume_take_effect():
    net = _net()
    saved = build_optimizer(net, _train_cfg(weight_decay=1e-3, momentum=0.9)).state_dict()
    opt = build_optimizer(net, _train_cfg(weight_decay=5e-2, momentum=0.5))
    opt.load_state_dict(saved)  # restores the checkpoint's hyperparameters...
    assert opt.param_groups[0]["weight_decay"] == 1e-3 and opt.param_groups[0]["momentum"] == 0.9
    apply_hyperparameters(opt, _train_cfg(weight_decay=5e-2, momentum=0.5))  # ...the config wins
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-2 and no_decay["weight_decay"] == 0.0
    assert decay["momentum"] == 0.5 and decay["nesterov"]
