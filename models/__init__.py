"""Segmentation networks, built by name from the config: ``build_model(cfg.model, in_ch, out_ch, patch_size)``."""
from models.registry import MODELS, ModelConfigError, build_model, count_parameters
from models.swin_unetr import SwinUNETR
from models.unet3d import UNet3D

__all__ = ["MODELS", "ModelConfigError", "SwinUNETR", "UNet3D", "build_model", "count_parameters"]
