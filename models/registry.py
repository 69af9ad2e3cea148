"""Model registry: ``model.name`` -> network class; the config section ``model.<name>`` holds its arguments.

Each class takes ``(in_channels, out_channels, **section, checkpointing=...)``, where the keys of the
section (``core/config.py``: ``UNet3DConfig``, ``SwinUNETRConfig``) are its constructor arguments.
To add a network: write the class (validating arguments, with ``check_input_size``), add it to
``MODELS`` and add its config section to ``ModelConfig``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from core.config import ConfigError, ModelConfig
from models.swin_unetr import SwinUNETR
from models.unet3d import UNet3D

MODELS: dict[str, type[nn.Module]] = {"unet3d": UNet3D, "swin_unetr": SwinUNETR}


class ModelConfigError(ConfigError, ValueError):
    """A model setting or patch size the network cannot use: a ``ValueError`` and a one-line ``UserError``."""


def build_model(model_cfg: ModelConfig, in_channels: int, out_channels: int,
                patch_size: Sequence[int] | None = None) -> nn.Module:
    """The network named by ``model_cfg.name``, built from its config section.

    With ``patch_size`` (X, Y, Z), also checks the network can take patches of that size. Raises
    ``ModelConfigError`` (a ``ValueError``) naming the config key for an unknown name, a bad
    argument or an unsupported patch size.
    """
    name = model_cfg.name
    if name not in MODELS:
        raise ModelConfigError(f"model.name: unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    section = getattr(model_cfg, name)
    try:
        model = MODELS[name](in_channels, out_channels, **dataclasses.asdict(section),
                             checkpointing=model_cfg.checkpointing)
    except ValueError as err:
        raise ModelConfigError(f"model.{name}: {err}") from None
    if patch_size is not None:
        try:
            model.check_input_size(patch_size)
        except ValueError as err:
            raise ModelConfigError(f"data.patch_size: {err}") from None
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter elements, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
