"""Losses: hand-computed soft Dice, Dice+CE and region Dice+BCE, deep supervision, dtypes, fitting."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.config import LossConfig
from core.task import builtin_tasks
from losses import (
    DeepSupervisionLoss,
    DiceCELoss,
    RegionDiceBCELoss,
    build_loss,
    deep_supervision_weights,
    output_mode,
    soft_dice,
    soft_dice_loss,
)
from losses.deep_supervision import downsample_classes, downsample_regions

GLI = builtin_tasks()["brats-gli-2023"]  # classes 1 NETC, 2 SNFH, 3 ET; regions WT, TC, ET
GLI_2024 = builtin_tasks()["brats-gli-2024"]  # + class 4 RC, its own region outside WT


def regions_of(classes):
    return GLI.training_targets(classes)


def volume(values):
    """A list of per-voxel values -> a (1, 1, 1, N) spatial tensor."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, -1)


# ----------------------------------------------------------------------------------------------
# soft Dice
# ----------------------------------------------------------------------------------------------
def test_soft_dice_loss_is_one_minus_dice_on_binary_inputs():
    # class 0: pred {0,1}, ref {0}      -> Dice 2*1/(2+1) = 2/3
    # class 1: pred {2,3}, ref {1,2,3}  -> Dice 2*2/(2+3) = 4/5
    probs = torch.stack([volume([1, 1, 0, 0]), volume([0, 0, 1, 1])])[None]
    onehot = torch.stack([volume([1, 0, 0, 0]), volume([0, 1, 1, 1])])[None]
    dice = soft_dice(probs, onehot, smooth=0.0)
    assert dice.shape == (1, 2)
    assert dice[0].tolist() == pytest.approx([2 / 3, 4 / 5])
    assert soft_dice_loss(probs, onehot, smooth=0.0).item() == pytest.approx(1 - (2 / 3 + 4 / 5) / 2)
    # the default smooth (1e-5) does not move a small structure's Dice visibly
    assert soft_dice_loss(probs, onehot).item() == pytest.approx(1 - (2 / 3 + 4 / 5) / 2, abs=1e-5)


def test_batch_dice_sums_over_the_batch_before_the_ratio():
    # sample 0: pred {0}, ref {0,1} -> 2/3 ; sample 1: pred {0,1,2,3}, ref {0} -> 2/5
    probs = torch.stack([volume([1, 0, 0, 0]), volume([1, 1, 1, 1])])[:, None]
    onehot = torch.stack([volume([1, 1, 0, 0]), volume([1, 0, 0, 0])])[:, None]
    per_sample = soft_dice(probs, onehot, batch_dice=False, smooth=0.0)
    assert per_sample[:, 0].tolist() == pytest.approx([2 / 3, 2 / 5])
    pooled = soft_dice(probs, onehot, batch_dice=True, smooth=0.0)
    assert pooled.shape == (1,)
    assert pooled.item() == pytest.approx(2 * 2 / (5 + 3))  # intersection 1+1, sizes 1+4 and 2+1


@pytest.mark.parametrize("predicted_mass, expected", [(0.0, 1.0), (1.0, 1e-5 / (1 + 1e-5)), (1e-5, 0.5)])
def test_empty_class_dice(predicted_mass, expected):
    probs = volume([predicted_mass, 0, 0, 0])[None]
    onehot = torch.zeros_like(probs)
    assert soft_dice(probs, onehot, smooth=1e-5).item() == pytest.approx(expected, rel=1e-4)


def test_soft_dice_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        soft_dice(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4))


# ----------------------------------------------------------------------------------------------
# Dice + CE (softmax over labels)
# ----------------------------------------------------------------------------------------------
def logits_from_classes(classes: torch.Tensor, k: int, scale: float = 50.0) -> torch.Tensor:
    """Saturated logits whose softmax is (numerically) the one-hot of ``classes``."""
    return scale * F.one_hot(classes, k).permute(0, 4, 1, 2, 3).float()


def test_dice_ce_dice_term_equals_one_minus_hand_dice():
    target = torch.tensor([0, 1, 1, 2, 3, 3, 3, 0]).reshape(1, 2, 2, 2)
    pred = torch.tensor([0, 1, 0, 2, 3, 3, 0, 3]).reshape(1, 2, 2, 2)
    # foreground classes: NCR pred {1} ref {1,2} -> 2/3; ED {3} vs {3} -> 1; ET pred {4,5,7} ref {4,5,6} -> 2*2/6
    loss = DiceCELoss(dice_weight=1.0, ce_weight=0.0, smooth=0.0)(logits_from_classes(pred, 4), target)
    assert loss.item() == pytest.approx(1 - (2 / 3 + 1 + 2 / 3) / 3, abs=1e-6)
    with_bg = DiceCELoss(dice_weight=1.0, ce_weight=0.0, include_background=True, smooth=0.0)
    # background pred {0,2,6} ref {0,7} -> 2*1/5
    assert with_bg(logits_from_classes(pred, 4), target).item() == pytest.approx(
        1 - (2 / 5 + 2 / 3 + 1 + 2 / 3) / 4, abs=1e-6)


def test_dice_ce_is_weighted_sum_of_terms():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 5, 4)
    target = torch.randint(0, 4, (2, 6, 5, 4))
    dice_only = DiceCELoss(1.0, 0.0)(logits, target)
    ce = F.cross_entropy(logits, target)
    combined = DiceCELoss(dice_weight=0.7, ce_weight=2.0)(logits, target)
    assert combined.item() == pytest.approx(0.7 * dice_only.item() + 2.0 * ce.item(), rel=1e-6)


def test_dice_ce_accepts_channel_dim_target_and_rejects_wrong_shape():
    logits = torch.randn(1, 4, 4, 4, 4)
    target = torch.randint(0, 4, (1, 4, 4, 4))
    loss = DiceCELoss()
    assert loss(logits, target[:, None]).item() == pytest.approx(loss(logits, target).item())
    with pytest.raises(ValueError, match="target shape"):
        loss(logits, torch.zeros(1, 4, 4, 3, dtype=torch.long))


@pytest.mark.parametrize("kwargs, name", [({"dice_weight": -1.0}, "dice_weight"), ({"ce_weight": -0.5}, "ce_weight"),
                                          ({"smooth": -1e-5}, "smooth"),
                                          ({"dice_weight": 0.0, "ce_weight": 0.0}, "both 0")])
def test_bad_loss_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DiceCELoss(**kwargs)
    with pytest.raises(ValueError, match=name):
        RegionDiceBCELoss(GLI, **kwargs)


# ----------------------------------------------------------------------------------------------
# region Dice + BCE (sigmoid over the task's training regions)
# ----------------------------------------------------------------------------------------------
def test_region_loss_hand_values():
    target = torch.tensor([0, 2, 1, 3]).reshape(1, 1, 2, 2)  # WT {1,2,3}, TC {2,3}, ET {3}
    pred_regions = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float32).reshape(1, 3, 1, 2, 2)
    logits = 50.0 * (2 * pred_regions - 1)  # sigmoid ~ 0/1
    # WT Dice 1; TC pred {2} ref {2,3} -> 2/3; ET {3} vs {3} -> 1
    dice_only = RegionDiceBCELoss(GLI, dice_weight=1.0, ce_weight=0.0, smooth=0.0)(logits, target)
    assert dice_only.item() == pytest.approx(1 - (1 + 2 / 3 + 1) / 3, abs=1e-6)
    bce = F.binary_cross_entropy_with_logits(logits, regions_of(target))
    both = RegionDiceBCELoss(GLI, dice_weight=1.0, ce_weight=1.0, smooth=0.0)(logits, target)
    assert both.item() == pytest.approx(dice_only.item() + bce.item(), rel=1e-6)
    assert bce.item() == pytest.approx(50.0 / 12, rel=1e-4)  # one wrong voxel of 12, |logit| 50


def test_region_loss_rejects_wrong_channels():
    with pytest.raises(ValueError, match="channels"):
        RegionDiceBCELoss(GLI)(torch.zeros(1, 4, 2, 2, 2), torch.zeros(1, 2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"3 channels, expected 4 \(WT, TC, ET, RC\)"):
        RegionDiceBCELoss(GLI_2024)(torch.zeros(1, 3, 2, 2, 2), torch.zeros(1, 2, 2, 2, dtype=torch.long))


def test_region_loss_with_a_region_outside_wt():
    """GLI 2024: the RC channel is trained on its own; a perfect prediction of RC-only voxels
    costs nothing in WT/TC/ET."""
    target = torch.tensor([0, 4, 4, 1]).reshape(1, 1, 2, 2)  # two RC voxels and one NETC voxel
    regions = GLI_2024.training_targets(target)
    assert regions[0, :, 0].reshape(4, 4).tolist() == [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]]
    perfect = 50.0 * (2 * regions - 1)
    loss = RegionDiceBCELoss(GLI_2024, ce_weight=0.0, smooth=1e-5)(perfect, target)
    # WT, TC, RC Dice ~1; ET is empty in target and prediction: smooth / (sum p + smooth) ~ 1
    assert loss.item() == pytest.approx(0.0, abs=1e-4)
    wrong = perfect.clone()
    wrong[:, 3] = -wrong[:, 3]  # RC predicted where it is not, and not where it is
    assert RegionDiceBCELoss(GLI_2024, ce_weight=0.0, smooth=1e-5)(wrong, target).item() > 0.2


# ----------------------------------------------------------------------------------------------
# deep supervision
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, expected", [(1, [1.0]), (2, [2 / 3, 1 / 3]), (3, [4 / 7, 2 / 7, 1 / 7]),
                                         (4, [8 / 15, 4 / 15, 2 / 15, 1 / 15])])
def test_deep_supervision_weights(n, expected):
    assert deep_supervision_weights(n) == pytest.approx(expected)
    assert sum(deep_supervision_weights(n)) == pytest.approx(1.0)


def test_deep_supervision_weights_reject_zero():
    with pytest.raises(ValueError, match="n must be"):
        deep_supervision_weights(0)


def test_downsampling_of_targets():
    classes = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    classes[0, 1, 1, 1] = 3  # a single ET voxel at odd coordinates
    # nearest-exact picks voxel 2i+1 for a factor of 2 -> the ET voxel lands at (0, 0, 0)
    small = downsample_classes(classes, (2, 2, 2))
    assert small.dtype == torch.int64 and small.shape == (1, 2, 2, 2)
    assert small[0, 0, 0, 0] == 3 and small.sum() == 3
    regions = regions_of(classes)
    pooled = downsample_regions(regions, (2, 2, 2))
    assert pooled.shape == (1, 3, 2, 2, 2)
    assert pooled[0, :, 0, 0, 0].tolist() == [1.0, 1.0, 1.0] and pooled.sum() == 3
    # max-pooling keeps nesting and small islands; odd sizes work (adaptive pooling)
    classes[0, 2, 2, 2] = 3
    odd = downsample_regions(regions_of(classes), (3, 3, 3))
    assert odd.shape == (1, 3, 3, 3, 3)
    assert bool((odd[:, 0] >= odd[:, 1]).all() and (odd[:, 1] >= odd[:, 2]).all())


@pytest.mark.parametrize("name", ["dice_ce", "region_dice_bce"])
def test_deep_supervision_is_weighted_sum_over_scales(name):
    torch.manual_seed(0)
    cfg = LossConfig(name=name)
    loss_fn = build_loss(cfg, GLI_2024)
    k = GLI_2024.output_channels(output_mode(cfg))
    target = torch.randint(0, 5, (2, 8, 8, 8))
    outputs = [torch.randn(2, k, 8, 8, 8), torch.randn(2, k, 4, 4, 4), torch.randn(2, k, 2, 2, 2)]
    base = loss_fn.base
    if name == "dice_ce":
        parts = [base(o, downsample_classes(target, o.shape[2:])) for o in outputs]
    else:
        regions = GLI_2024.training_targets(target)
        parts = [base(o, downsample_regions(regions, o.shape[2:])) for o in outputs]
    expected = sum(w * p for w, p in zip([4 / 7, 2 / 7, 1 / 7], parts))
    assert loss_fn(outputs, target).item() == pytest.approx(expected.item(), rel=1e-6)
    # a plain tensor goes straight to the base loss
    assert loss_fn(outputs[0], target).item() == pytest.approx(parts[0].item(), rel=1e-6)


def test_deep_supervision_rejects_low_resolution_first():
    loss_fn = build_loss(LossConfig(), GLI)
    target = torch.randint(0, 4, (1, 8, 8, 8))
    with pytest.raises(ValueError, match="full resolution first"):
        loss_fn([torch.randn(1, 4, 4, 4, 4), torch.randn(1, 4, 8, 8, 8)], target)
    with pytest.raises(ValueError, match="mode"):
        DeepSupervisionLoss(DiceCELoss(), "softmax", GLI)


# ----------------------------------------------------------------------------------------------
# build_loss, dtypes, fitting
# ----------------------------------------------------------------------------------------------
def test_build_loss_and_output_mode():
    assert output_mode(LossConfig(name="dice_ce")) == "labels"
    assert output_mode(LossConfig(name="region_dice_bce")) == "regions"
    assert isinstance(build_loss(LossConfig(name="region_dice_bce"), GLI).base, RegionDiceBCELoss)
    cfg = LossConfig()
    cfg.name = "focal"
    with pytest.raises(ValueError, match="dice_ce, region_dice_bce"):
        build_loss(cfg, GLI)


@pytest.mark.parametrize("name", ["dice_ce", "region_dice_bce"])
def test_low_precision_inputs_give_float32_loss(name):
    cfg = LossConfig(name=name)
    loss_fn = build_loss(cfg, GLI)
    k = GLI.output_channels(output_mode(cfg))
    target = torch.randint(0, 4, (1, 6, 6, 6))
    conv = nn.Conv3d(1, k, 1)
    x = torch.randn(1, 1, 6, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        loss = loss_fn([logits, logits[:, :, ::2, ::2, ::2]], target)
    assert loss.dtype == torch.float32 and loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    half = loss_fn(torch.randn(1, k, 6, 6, 6).half(), target)
    assert half.dtype == torch.float32


def synthetic_volume(seed: int = 0):
    """An image whose intensity encodes the classes (noisy), and the classes ``(1, 12, 12, 12)``."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(12.0)] * 3, indexing="ij"))
    r = ((grid - 6.0) ** 2).sum(0).sqrt()
    classes = torch.zeros(12, 12, 12, dtype=torch.long)
    classes[r < 5] = 2
    classes[r < 3.5] = 1
    classes[r < 2] = 3
    image = classes.float() + 0.3 * torch.randn(12, 12, 12, generator=gen)
    return image[None, None], classes[None]


@pytest.mark.parametrize("name", ["dice_ce", "region_dice_bce"])
def test_loss_decreases_when_fitting_a_tiny_network(name, one_thread):
    torch.manual_seed(0)
    cfg = LossConfig(name=name)
    loss_fn = build_loss(cfg, GLI)
    k = GLI.output_channels(output_mode(cfg))
    image, classes = synthetic_volume()
    net = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, k, 3, padding=1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(net(image), classes)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
