"""Segmentation heads: layers called as `head(features_dict, training=...)` -> logits."""

from kssl.models.heads.deeplabv2 import DeepLabV2Head
from kssl.models.heads.deeplabv3plus import ASPP, DeepLabV3PlusHead

__all__ = ["ASPP", "DeepLabV2Head", "DeepLabV3PlusHead"]
