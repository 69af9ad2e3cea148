"""3D U-Net (nnU-Net style) built from per-stage lists, with optional residual encoder and deep supervision.

Encoder stage ``i`` has ``blocks_per_stage[i]`` blocks of two 3x3x3 convs and ``features[i]`` channels;
its first conv has stride ``strides[i]`` (strided-conv downsampling; ``strides[0]`` must be 1; a stride
is one int for all axes or ``[x, y, z]``, so a thick-slice axis can be pooled later than the others). The
decoder is derived from the encoder (it reads ``encoder.features`` / ``encoder.strides``): for each
stage ``i`` from deep to shallow, a transposed conv (kernel = stride = ``strides[i + 1]``) to
``features[i]``, concatenation with encoder stage ``i``, then ``decoder_blocks`` plain blocks.

Output: logits ``(B, out_channels, X, Y, Z)``. In training mode with ``deep_supervision``, a list
``[full, 1/s1, 1/(s1*s2), ...]`` with one tensor per decoder stage except the lowest (as in nnU-Net,
whose lowest output has zero loss weight); decoder stage ``i`` is at input size / ``prod(strides[:i+1])``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from models.blocks import OutputHeads, PlainBlock, ResidualBlock, UpBlock, checkpointed, init_weights
from models.checks import as_spatial_shape, positive_int, positive_int_list, stride_list


class UNetEncoder(nn.Module):
    """``forward(x (B, in, X, Y, Z))`` -> list of stage outputs, stage ``i``: ``(B, features[i], X / prod(strides[:i+1]), ...)``."""

    def __init__(self, in_channels: int, features: list[int], strides: list[tuple[int, int, int]],
                 blocks_per_stage: list[int],
                 residual: bool, checkpointing: bool):
        super().__init__()
        self.features, self.strides, self.checkpointing = list(features), list(strides), checkpointing
        block = ResidualBlock if residual else PlainBlock
        stages, channels = [], in_channels
        for width, stride, blocks in zip(features, strides, blocks_per_stage):
            stages.append(nn.Sequential(block(channels, width, stride), *[block(width, width) for _ in range(blocks - 1)]))
            channels = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = checkpointed(stage, x, enabled=self.checkpointing)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """Mirror of an ``UNetEncoder``: ``forward(skips)`` -> decoder features, full resolution first."""

    def __init__(self, encoder: UNetEncoder, blocks: int, checkpointing: bool):
        super().__init__()
        features, strides = encoder.features, encoder.strides
        self.checkpointing = checkpointing
        self.stages = nn.ModuleList(  # deepest first
            UpBlock(features[i + 1], features[i], strides[i + 1],
                    nn.Sequential(PlainBlock(2 * features[i], features[i]),
                                  *[PlainBlock(features[i], features[i]) for _ in range(blocks - 1)]))
            for i in reversed(range(len(features) - 1))
        )
        self.channels = features[:-1]  # channels of the outputs, full resolution first

    def forward(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        x, outputs = skips[-1], []
        for stage, skip in zip(self.stages, reversed(skips[:-1])):
            x = checkpointed(stage, x, skip, enabled=self.checkpointing)
            outputs.append(x)
        return outputs[::-1]


class UNet3D(nn.Module):
    """nnU-Net-style 3D U-Net: ``(B, in_channels, X, Y, Z)`` -> logits ``(B, out_channels, X, Y, Z)``.

    Args:
        in_channels: input modalities.
        out_channels: output channels (4 labels for softmax, 3 regions for sigmoid; the loss decides).
        features: channels per encoder stage, e.g. ``[32, 64, 128, 256, 320, 320]`` (at least 2 stages).
        strides: downsampling stride entering each stage, an int or ``[x, y, z]``; ``strides[0] == 1``.
        blocks_per_stage: blocks (two 3x3x3 convs each) per encoder stage.
        decoder_blocks: plain blocks per decoder stage.
        residual: residual encoder blocks (nnU-Net ResEnc); the decoder stays plain.
        deep_supervision: in training mode return ``[full, 1/2, 1/4, ...]`` (see module docstring).
        checkpointing: gradient checkpointing per encoder/decoder stage.
    """

    def __init__(self, in_channels: int, out_channels: int, features: Sequence[int] = (32, 64, 128, 256, 320, 320),
                 strides: Sequence[int | Sequence[int]] = (1, 2, 2, 2, 2, 2),
                 blocks_per_stage: Sequence[int] = (1, 1, 1, 1, 1, 1),
                 decoder_blocks: int = 1, residual: bool = False, deep_supervision: bool = True,
                 checkpointing: bool = False):
        super().__init__()
        positive_int("in_channels", in_channels)
        positive_int("out_channels", out_channels)
        features = positive_int_list("features", features)
        if len(features) < 2:
            raise ValueError(f"features must list at least 2 stages, got {features!r}")
        given = strides
        strides = stride_list("strides", strides, len(features))
        blocks_per_stage = positive_int_list("blocks_per_stage", blocks_per_stage, len(features))
        positive_int("decoder_blocks", decoder_blocks)
        if strides[0] != (1, 1, 1):
            raise ValueError(f"strides[0] must be 1 so the output has the input's resolution, got strides={list(given)!r}")
        self.deep_supervision = bool(deep_supervision)
        self.divisor = tuple(math.prod(s[axis] for s in strides) for axis in range(3))  # per axis

        self.encoder = UNetEncoder(in_channels, features, strides, blocks_per_stage, residual, checkpointing)
        self.decoder = UNetDecoder(self.encoder, decoder_blocks, checkpointing)
        # deep supervision: every decoder stage but the lowest (at least the full-resolution one)
        n_heads = max(len(self.decoder.channels) - 1, 1) if self.deep_supervision else 1
        self.heads = OutputHeads(self.decoder.channels[:n_heads], out_channels)
        self.apply(init_weights)

    def check_input_size(self, spatial_shape: Sequence[int]) -> None:
        """``ValueError`` unless every spatial size is a multiple of ``d = prod(strides)`` along its axis
        and the deepest feature map (size / d) has more than one voxel (instance norm needs two)."""
        shape = as_spatial_shape(spatial_shape)
        divisor = self.divisor
        if any(s % d for s, d in zip(shape, divisor)) or math.prod(shape) == math.prod(divisor):
            shown = divisor[0] if len(set(divisor)) == 1 else list(divisor)
            raise ValueError(f"spatial_shape {list(shape)} is not supported by unet3d: every size must be a "
                             f"multiple of {shown} (the product of strides "
                             f"{[s[0] if len(set(s)) == 1 else list(s) for s in self.encoder.strides]}), "
                             f"and at least one larger than {shown}")

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_input_size(x.shape[2:])
        features = self.decoder(self.encoder(x))
        return self.heads(features, all_outputs=self.training and self.deep_supervision)
