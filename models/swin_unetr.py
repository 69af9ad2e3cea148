"""Swin UNETR (Hatamizadeh et al. 2022): a 3D Swin-Transformer encoder with a convolutional U-Net decoder.

Encoder: a ``patch_size``^3 strided-conv patch embedding to ``feature_size`` channels, then one stage
per entry of ``depths``: ``depths[i]`` Swin blocks (window self-attention with a relative position
bias; every second block cyclically shifts the windows by ``window_size // 2``) followed by patch
merging (2x2x2 neighbours -> LayerNorm -> Linear, channels x2, size / 2). The embedding and every
stage output, layer-normalised, are the hidden states ``h0 .. hL`` (``L = len(depths)``); ``hi`` has
``feature_size * 2**i`` channels at input size / ``(patch_size * 2**i)``.

Decoder (as in the reference): residual conv blocks on the input and on ``h0 .. h(L-2)``, ``h(L-1)``
used as it is, a residual bottleneck on ``hL``; then up-blocks (transposed conv, concat skip, residual
block) back to full resolution (the last one upsamples by ``patch_size``) and a 1x1x1 head.

Input-size rule: every spatial size must be a multiple of ``d = patch_size * 2**len(depths)`` (32 for
the defaults), so the patch embedding and every merging divide evenly, and at least one size must be
larger than ``d`` (the bottleneck's instance norm needs more than one voxel): 64^3, 96^3, 128^3, 32x32x64
are fine for the defaults; 32^3 and 100^3 are not.

Windows: along an axis where a stage's feature map is not larger than ``window_size`` the window is
clipped to the map and that axis is not shifted (as in the reference); elsewhere the map is
zero-padded at the end to a multiple of the window. Unlike the reference, padded tokens are masked out as keys, so the output of real tokens does
not depend on the padding. E.g. a 128^3 input with patch 2 gives maps of 64, 32, 16, 8 at the four
stages: all larger than window 7, padded to 70, 35, 21, 14.

Attention uses ``F.scaled_dot_product_attention`` with the bias (+ shift/padding mask) as a float
``attn_mask``, so fused memory-efficient kernels are used on GPU; the mask's last dimension is
allocated 8-aligned (then sliced) so the kernel does not have to copy it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import DropPath, OutputHeads, ResidualBlock, UpBlock, checkpointed, init_weights
from models.checks import as_spatial_shape, positive_int, positive_int_list

MASK_VALUE = -1e4  # logit of a key a query must not see; finite, since a padded query may see no key at all
MASK_ALIGN = 8  # elements; the fused kernels want the mask rows aligned


class WindowGeometry(NamedTuple):
    """How one stage's ``(X, Y, Z)`` token map is cut into windows (N tokens each, nW windows)."""

    window: tuple[int, int, int]  # window edge per axis, clipped to the map
    shift: tuple[int, int, int]  # cyclic shift per axis (0 = none)
    pad: tuple[int, int, int]  # zeros appended per axis to reach a multiple of the window
    index: torch.Tensor  # (N, N_aligned) long: relative-position-bias column of each (query, key)
    allowed: torch.Tensor | None  # (nW, N, N_aligned) bool: key visible to query; None = all visible


def window_geometry(size: Sequence[int], window: Sequence[int], shifted: bool, device: torch.device) -> WindowGeometry:
    """The windows of a map of ``size`` for a block with configured ``window`` (shifted or not)."""
    clipped = tuple(min(w, s) for w, s in zip(window, size))
    shift = tuple(w // 2 if shifted and s > w else 0 for w, s in zip(window, size))
    pad = tuple(-s % w for s, w in zip(size, clipped))
    n = math.prod(clipped)
    extra = -n % MASK_ALIGN
    index = F.pad(relative_position_index(clipped, window, device), (0, extra))
    allowed = None
    if any(shift) or any(pad):
        allowed = F.pad(attention_allowed(size, clipped, shift, pad, device), (0, extra))
    return WindowGeometry(clipped, shift, pad, index, allowed)


def relative_position_index(window: Sequence[int], table_window: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(N, N)`` column of the bias table for each (query, key) offset in a ``window`` (N = prod(window)).

    The table covers offsets of the configured ``table_window``: ``prod(2 * table_window - 1)`` columns.
    """
    coords = torch.stack(torch.meshgrid(*[torch.arange(w, device=device) for w in window], indexing="ij")).flatten(1)
    offset = coords[:, :, None] - coords[:, None, :]  # (3, N, N), in [-(w - 1), w - 1]
    sizes = [2 * t - 1 for t in table_window]
    # shift each offset to [0, 2t - 2] with Python ints: no host-to-device copy (a GPU sync) per forward pass
    dx, dy, dz = (offset[i] + (t - 1) for i, t in enumerate(table_window))
    return (dx * sizes[1] + dy) * sizes[2] + dz


def attention_allowed(size: Sequence[int], window: Sequence[int], shift: Sequence[int], pad: Sequence[int],
                      device: torch.device) -> torch.Tensor:
    """``(nW, N, N)`` bool: may a query see a key of its window after padding and rolling by ``-shift``?

    Per axis, in the rolled frame of length ``P = size + pad``: tokens in ``[P - window, P - shift)``
    and ``[P - shift, P)`` came from opposite ends of the map and must not see each other; keys whose
    original position is ``>= size`` are padding and are never seen.
    """
    regions, valids = [], []
    for s, w, sh, p in zip(size, window, shift, pad):
        rolled = torch.arange(s + p, device=device)
        valids.append((rolled + sh) % (s + p) < s)
        region = (rolled >= s + p - w).long() + (rolled >= s + p - sh).long() if sh else torch.zeros_like(rolled)
        regions.append(region)
    region = regions[0][:, None, None] * 9 + regions[1][None, :, None] * 3 + regions[2][None, None, :]
    valid = valids[0][:, None, None] & valids[1][None, :, None] & valids[2][None, None, :]
    region = window_partition(region[None, ..., None], window)[0, :, :, 0]  # (nW, N)
    valid = window_partition(valid[None, ..., None], window)[0, :, :, 0]
    return (region[:, :, None] == region[:, None, :]) & valid[:, None, :]


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """``(B, X, Y, Z, C)`` -> ``(B, nW, N, C)``; sizes must be multiples of ``window``."""
    b, X, Y, Z, c = x.shape
    wx, wy, wz = window
    x = x.reshape(b, X // wx, wx, Y // wy, wy, Z // wz, wz, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, -1, wx * wy * wz, c)


def window_reverse(windows: torch.Tensor, window: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """``(B, nW, N, C)`` -> ``(B, X, Y, Z, C)``; the inverse of ``window_partition``."""
    b, c = windows.shape[0], windows.shape[-1]
    (X, Y, Z), (wx, wy, wz) = size, window
    x = windows.reshape(b, X // wx, Y // wy, Z // wz, wx, wy, wz, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, X, Y, Z, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    ``forward(windows (B, nW, N, C), geometry)`` -> ``(B, nW, N, C)``.
    """

    def __init__(self, dim: int, num_heads: int, window: Sequence[int]):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros(num_heads, math.prod(2 * w - 1 for w in window)))  # (heads, offsets)
        nn.init.trunc_normal_(self.bias_table, std=0.02)

    def forward(self, windows: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        b, nw, n, c = windows.shape
        h = self.num_heads
        q, k, v = self.qkv(windows).reshape(b, nw, n, 3, h, c // h).permute(3, 0, 1, 4, 2, 5).unbind(0)
        bias = self.bias_table[:, geometry.index].to(q.dtype)  # (h, N, N_aligned)
        if geometry.allowed is None:  # one bias for all windows: broadcast over batch x windows
            mask, shape = bias[None, :, :, :n], (b * nw, h, n, -1)
        else:  # a mask per window: fold the windows into the head dimension, broadcast over the batch
            mask = torch.where(geometry.allowed[:, None], bias, MASK_VALUE)[..., :n].reshape(1, nw * h, n, n)
            shape = (b, nw * h, n, -1)
        out = F.scaled_dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), attn_mask=mask)
        return self.proj(out.reshape(b, nw, h, n, -1).transpose(2, 3).reshape(b, nw, n, c))


class SwinBlock(nn.Module):
    """Pre-norm transformer block on a token map ``(B, X, Y, Z, C)``: window attention, then a 4x MLP."""

    def __init__(self, dim: int, num_heads: int, window: Sequence[int], drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        x = x + self.drop_path(self.attend(self.norm1(x), geometry))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def attend(self, x: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        """Pad, roll by ``-shift``, attend per window, undo all three. ``(B, X, Y, Z, C)`` -> same."""
        size = x.shape[1:4]
        (px, py, pz), shift = geometry.pad, geometry.shift
        if px or py or pz:
            x = F.pad(x, (0, 0, 0, pz, 0, py, 0, px))
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        padded = x.shape[1:4]
        x = window_reverse(self.attn(window_partition(x, geometry.window), geometry), geometry.window, padded)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        return x[:, : size[0], : size[1], : size[2]]


class PatchMerging(nn.Module):
    """``(B, X, Y, Z, C)`` -> ``(B, X/2, Y/2, Z/2, 2C)``: concat each 2x2x2 neighbourhood, LayerNorm, Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, X, Y, Z, c = x.shape
        x = x.reshape(b, X // 2, 2, Y // 2, 2, Z // 2, 2, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return self.reduction(self.norm(x.reshape(b, X // 2, Y // 2, Z // 2, 8 * c)))


class SwinStage(nn.Module):
    """Swin blocks (odd ones shifted) then patch merging: ``(B, X, Y, Z, C)`` -> ``(B, X/2, Y/2, Z/2, 2C)``."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: Sequence[int], drop_paths: Sequence[float],
                 checkpointing: bool):
        super().__init__()
        self.window, self.checkpointing = tuple(window), checkpointing
        self.blocks = nn.ModuleList(SwinBlock(dim, num_heads, window, drop_paths[i]) for i in range(depth))
        self.merge = PatchMerging(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[1:4])
        geometries = [window_geometry(size, self.window, shifted, x.device) for shifted in (False, True)]
        for i, block in enumerate(self.blocks):
            x = checkpointed(block, x, geometries[i % 2], enabled=self.checkpointing)
        return self.merge(x)


class SwinEncoder(nn.Module):
    """``forward(x (B, in, X, Y, Z))`` -> hidden states ``[h0, .., hL]``, ``hi``: ``(B, fs * 2**i, X / (p * 2**i), ..)``."""

    def __init__(self, in_channels: int, feature_size: int, depths: Sequence[int], num_heads: Sequence[int],
                 window_size: int, patch_size: int, drop_path: float, checkpointing: bool):
        super().__init__()
        self.embed = nn.Conv3d(in_channels, feature_size, patch_size, stride=patch_size)
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()  # stochastic depth grows linearly over blocks
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.stages = nn.ModuleList(
            SwinStage(feature_size * 2**i, depth, heads, (window_size,) * 3, rates[start:start + depth], checkpointing)
            for i, (depth, heads, start) in enumerate(zip(depths, num_heads, starts))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.embed(x).permute(0, 2, 3, 4, 1)  # tokens channels-last: (B, X, Y, Z, C)
        hidden = [x]
        for stage in self.stages:
            x = stage(x)
            hidden.append(x)
        return [F.layer_norm(h, h.shape[-1:]).permute(0, 4, 1, 2, 3) for h in hidden]


class SwinUNETR(nn.Module):
    """Swin UNETR: ``(B, in_channels, X, Y, Z)`` -> logits ``(B, out_channels, X, Y, Z)``.

    Args:
        in_channels: input modalities.
        out_channels: output channels (the loss decides softmax vs sigmoid).
        feature_size: embedding channels, a multiple of 12 (48 in the paper); stage ``i`` has ``feature_size * 2**i``.
        depths: Swin blocks per stage (``[2, 2, 2, 2]``).
        num_heads: attention heads per stage (``[3, 6, 12, 24]``); must divide that stage's channels.
        window_size: attention window edge in tokens (7); clipped to small maps, see the module docstring.
        patch_size: patch embedding edge in voxels (2).
        drop_path: stochastic depth rate of the last block (linearly increasing from 0), in [0, 1).
        deep_supervision: in training mode return ``[full, 1/p, 1/(2p), ...]``: every decoder stage but the lowest.
        checkpointing: gradient checkpointing per Swin block and per decoder block.
    """

    def __init__(self, in_channels: int, out_channels: int, feature_size: int = 48, depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, patch_size: int = 2,
                 drop_path: float = 0.0, deep_supervision: bool = False, checkpointing: bool = False):
        super().__init__()
        positive_int("in_channels", in_channels)
        positive_int("out_channels", out_channels)
        if positive_int("feature_size", feature_size) % 12:
            raise ValueError(f"feature_size must be a multiple of 12, got {feature_size!r}")
        depths = positive_int_list("depths", depths)
        num_heads = positive_int_list("num_heads", num_heads, len(depths))
        for i, heads in enumerate(num_heads):
            if (feature_size * 2**i) % heads:
                raise ValueError(f"num_heads[{i}]={heads} must divide stage {i}'s {feature_size * 2**i} channels "
                                 f"(feature_size * 2**{i})")
        positive_int("window_size", window_size)
        positive_int("patch_size", patch_size)
        if isinstance(drop_path, bool) or not isinstance(drop_path, (int, float)) or not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be a number in [0, 1), got {drop_path!r}")
        self.deep_supervision, self.checkpointing = bool(deep_supervision), checkpointing
        self.divisor = patch_size * 2 ** len(depths)
        fs, levels = feature_size, len(depths)

        self.encoder = SwinEncoder(in_channels, fs, depths, num_heads, window_size, patch_size, drop_path, checkpointing)
        self.skip_blocks = nn.ModuleList(  # on the input, then on h0 .. h(L-2)
            [ResidualBlock(in_channels, fs)] + [ResidualBlock(fs * 2**i, fs * 2**i) for i in range(levels - 1)])
        self.bottleneck = ResidualBlock(fs * 2**levels, fs * 2**levels)
        self.up_blocks = nn.ModuleList(  # deepest first; the last one goes from 1/patch_size to full resolution
            [UpBlock(fs * 2**i, fs * 2 ** (i - 1), 2, ResidualBlock(fs * 2**i, fs * 2 ** (i - 1)))
             for i in range(levels, 0, -1)]
            + [UpBlock(fs, fs, patch_size, ResidualBlock(2 * fs, fs))])
        channels = [fs] + [fs * 2 ** (i - 1) for i in range(1, levels + 1)]  # decoder outputs, full resolution first
        self.heads = OutputHeads(channels[:levels] if self.deep_supervision else channels[:1], out_channels)
        self.apply(init_weights)

    def check_input_size(self, spatial_shape: Sequence[int]) -> None:
        """``ValueError`` unless every spatial size is a multiple of ``d = patch_size * 2**len(depths)`` and
        the deepest feature map (size / d) has more than one voxel (instance norm needs two)."""
        shape = as_spatial_shape(spatial_shape)
        if any(s % self.divisor for s in shape) or math.prod(shape) == self.divisor**3:
            raise ValueError(f"spatial_shape {list(shape)} is not supported by swin_unetr: every size must be a "
                             f"multiple of {self.divisor} (patch_size * 2**len(depths)), and at least one larger "
                             f"than {self.divisor}")

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_input_size(x.shape[2:])
        features = self.decode(x, self.encoder(x))
        return self.heads(features, all_outputs=self.training and self.deep_supervision)

    def decode(self, x: torch.Tensor, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Input + hidden states -> decoder features, full resolution first."""
        run = partial(checkpointed, enabled=self.checkpointing)
        skips = [run(block, h) for block, h in zip(self.skip_blocks, [x, *hidden[:-2]])] + [hidden[-2]]
        y, outputs = run(self.bottleneck, hidden[-1]), []
        for up, skip in zip(self.up_blocks, reversed(skips)):
            y = run(up, y, skip)
            outputs.append(y)
        return outputs[::-1]
