"""Building blocks shared by the networks: conv blocks, up-sampling, output heads, drop path, init.

All convolutional tensors are ``(B, C, X, Y, Z)``. Convolutions that feed a normalization have no
bias (the norm's shift makes it redundant); every norm is ``InstanceNorm3d(affine=True)`` and every
activation ``LeakyReLU(0.01)``, as in nnU-Net.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

Stride = int | tuple[int, int, int]  # one stride for all axes, or one per axis


def conv3d(in_channels: int, out_channels: int, kernel_size: int = 3, stride: Stride = 1) -> nn.Conv3d:
    """A bias-free ``kernel_size``^3 convolution with 'same' padding (before the stride)."""
    return nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)


def norm3d(channels: int) -> nn.InstanceNorm3d:
    return nn.InstanceNorm3d(channels, eps=1e-5, affine=True)


class ConvNormAct(nn.Sequential):
    """Conv3d(3x3x3, stride) -> InstanceNorm -> LeakyReLU(0.01)."""

    def __init__(self, in_channels: int, out_channels: int, stride: Stride = 1):
        super().__init__(conv3d(in_channels, out_channels, 3, stride), norm3d(out_channels), nn.LeakyReLU(0.01, inplace=True))


class PlainBlock(nn.Sequential):
    """Two ConvNormAct; the first carries the stride (nnU-Net's 'two convs per stage')."""

    def __init__(self, in_channels: int, out_channels: int, stride: Stride = 1):
        super().__init__(ConvNormAct(in_channels, out_channels, stride), ConvNormAct(out_channels, out_channels))


class ResidualBlock(nn.Module):
    """conv-norm-act, conv-norm, plus the input, then act (nnU-Net ResEnc / MONAI UnetResBlock).

    The skip is a 1x1x1 conv (with the stride) + norm when channels or resolution change, else identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Stride = 1):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, stride)
        self.conv2 = conv3d(out_channels, out_channels)
        self.norm2 = norm3d(out_channels)
        if in_channels != out_channels or stride not in (1, (1, 1, 1)):
            self.skip = nn.Sequential(conv3d(in_channels, out_channels, 1, stride), norm3d(out_channels))
        else:
            self.skip = nn.Identity()
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm2(self.conv2(self.conv1(x))) + self.skip(x))


class UpBlock(nn.Module):
    """Transposed conv (kernel = stride = ``scale``) to ``out_channels``, concat the skip, then ``body``.

    ``forward(x (B, in, X, Y, Z), skip (B, skip_ch, sX, sY, sZ))`` with ``s = scale`` -> ``body``'s output.
    """

    def __init__(self, in_channels: int, out_channels: int, scale: Stride, body: nn.Module):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, scale, stride=scale, bias=False)
        self.body = body

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([self.up(x), skip], dim=1))


class OutputHeads(nn.Module):
    """1x1x1 conv heads producing logits: head 0 at full resolution, the others for deep supervision.

    ``forward(features, all_outputs)`` takes decoder features ordered full resolution first; it returns
    head 0's logits ``(B, out, X, Y, Z)``, or, with ``all_outputs``, a list with one tensor per head.
    """

    def __init__(self, channels: list[int], out_channels: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv3d(c, out_channels, 1) for c in channels)

    def forward(self, features: list[torch.Tensor], all_outputs: bool) -> torch.Tensor | list[torch.Tensor]:
        if not all_outputs:
            return self.heads[0](features[0])
        return [head(f) for head, f in zip(self.heads, features)]


class DropPath(nn.Module):
    """Stochastic depth: zero the whole residual branch of a sample with probability ``p`` (training only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def checkpointed(fn: Callable[..., torch.Tensor], *args, enabled: bool) -> torch.Tensor:
    """``fn(*args)``; with ``enabled`` and autograd on, recompute it in backward instead of storing activations."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs (LeakyReLU slope 0.01), truncated-normal(0.02) linears, unit norms, zero biases."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=0.01)
    elif isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, (nn.LayerNorm, nn.InstanceNorm3d)) and module.weight is not None:
        nn.init.ones_(module.weight)
    if isinstance(getattr(module, "bias", None), nn.Parameter):
        nn.init.zeros_(module.bias)
