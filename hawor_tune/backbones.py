"""Crop backbones: timm models, and HaMeR's ViT-H (the ViTPose layout) built from timm's VisionTransformer.

HaMeR and HaWoR read each hand through HaMeR's ViT-H/16 (geopavlakos/hamer ``hamer/models/backbones/vit.py``):
a 256 px square crop cut to its middle 192 columns, a patch convolution with 2 px of padding (16x12 tokens),
no class token (its position is added to every patch), pre-norm blocks and a final ``last_norm``. timm's
VisionTransformer holds exactly those layers; :class:`HaMeRViT` sets the three differences.
"""

from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from hawor_tune.config import ConfigError

# HaMeR's ViT-H (``vit()`` in hamer/models/backbones/vit.py): 32 blocks, 1280 wide, 16 heads.
HAMER_VIT_H = {"patch_size": 16, "embed_dim": 1280, "depth": 32, "num_heads": 16, "mlp_ratio": 4.0, "qkv_bias": True}
# Backbones this project defines, by the name a config gives in model.backbone.
HAMER_BACKBONE = "hamer_vit_h"


class HaMeRViT(VisionTransformer):
    """HaMeR's ViT on a square ``crop_size`` crop: it reads the middle 3/4 of the columns (256x192 for a
    256 px crop, HaMeR's ``x[:, :, :, 32:-32]``) through a patch convolution padded by 2 (HaMeR's
    ``4 + 2 * (ratio // 2 - 1)`` with ratio 1), so a 256x192 input gives a 16x12 grid.

    Args:
        crop_size: side of the square crop the model is given.
        kwargs: VisionTransformer arguments over :data:`HAMER_VIT_H` (e.g. a smaller ``depth``).
    """

    def __init__(self, *, crop_size: int, **kwargs) -> None:
        arch = {**HAMER_VIT_H, **kwargs}
        width = crop_size * 3 // 4
        if crop_size % arch["patch_size"] or width % arch["patch_size"]:
            raise ConfigError(f"config key 'data.crop_size': {crop_size} does not fit {HAMER_BACKBONE}: the crop "
                              f"side and 3/4 of it must be multiples of its patch size {arch['patch_size']} "
                              "(HaMeR's is 256)")
        super().__init__(img_size=(crop_size, width), num_classes=0, class_token=False, global_pool="",
                         fc_norm=False, **arch)
        self.patch_embed.proj.padding = (2, 2)
        self.margin = (crop_size - width) // 2

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, C, C) -> (N, C/16 * 3C/64, F) tokens, row-major over the (C/16, 3C/64) grid."""
        return super().forward_features(x[..., self.margin:x.shape[-1] - self.margin])


def create_backbone(name: str, crop_size: int, kwargs: dict) -> nn.Module:
    """A backbone without classifier for ``crop_size`` crops: :class:`HaMeRViT` for ``hamer_vit_h``, else timm's
    model (``img_size`` passed to the models that take it, ViTs, not to CNNs)."""
    if name == HAMER_BACKBONE:
        try:
            return HaMeRViT(crop_size=crop_size, **kwargs)
        except TypeError as e:
            raise ConfigError(f"config key 'model.backbone_kwargs': {kwargs} does not fit {HAMER_BACKBONE} ({e})") from None
    if not timm.is_model(name):
        raise ConfigError(f"config key 'model.backbone': unknown backbone {name!r} (a timm model, see "
                          f"timm.list_models(), or {HAMER_BACKBONE!r})")
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **{"img_size": crop_size, **kwargs})
    except TypeError:
        if "img_size" in kwargs:
            raise
        # CNNs reject img_size; a TypeError from the user's kwargs shows up again here.
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def spatial_tokens(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, 3, C, C) normalised crops -> (N, L, F) the backbone's spatial tokens.

    CNNs give a feature map (N, F, h, w), flattened to h*w tokens; ViTs give their token sequence
    (prefix tokens included).
    """
    feats = backbone.forward_features(x)
    return feats.flatten(2).transpose(1, 2) if feats.dim() == 4 else feats


def token_count(backbone: nn.Module, size: int) -> int:
    """Spatial tokens the backbone gives for one ``size`` x ``size`` crop (shapes only: runs on any device)."""
    was_training = backbone.training
    device = next(backbone.parameters()).device
    with torch.no_grad():
        n = spatial_tokens(backbone.eval(), torch.zeros(1, 3, size, size, device=device)).shape[1]
    backbone.train(was_training)
    return n


def freeze_backbone(backbone: nn.Module, trainable_blocks: int) -> None:
    """Freeze the backbone except its last ``trainable_blocks`` transformer blocks (and the final norm
    with them), as HaWoR freezes HaMeR's ViT (ThunderVVV/HaWoR ``lib/models/hawor.py``).

    Raises:
        ConfigError: blocks asked to train in a backbone without transformer blocks, or more than it has.
    """
    blocks = getattr(backbone, "blocks", None)
    if trainable_blocks and not isinstance(blocks, nn.Sequential):
        raise ConfigError(f"config key 'model.trainable_blocks': {trainable_blocks} needs a transformer backbone "
                          f"with blocks; {type(backbone).__name__} has none (use 0)")
    if trainable_blocks > (len(blocks) if blocks is not None else 0):
        raise ConfigError(f"config key 'model.trainable_blocks': {trainable_blocks} is more than the backbone's "
                          f"{len(blocks)} blocks")
    backbone.requires_grad_(False)
    if trainable_blocks:
        blocks[len(blocks) - trainable_blocks:].requires_grad_(True)
        backbone.norm.requires_grad_(True)
