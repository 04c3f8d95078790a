"""Segmentation heads: layers called as `head(features_dict, training=...)` -> logits."""

from kssl.models.heads.deeplabv2 import DeepLabV2Head
from kssl.models.heads.deeplabv3 import BranchDecoder, DeepLabV3Head
from kssl.models.heads.deeplabv3plus import ASPP, DeepLabV3PlusHead
from kssl.models.heads.mitrans import MITrans
from kssl.models.heads.psp_unet import PSPUNetHead, PyramidPooling, skip_blocks_of

__all__ = ["ASPP", "BranchDecoder", "DeepLabV2Head", "DeepLabV3Head", "DeepLabV3PlusHead",
           "MITrans", "PSPUNetHead", "PyramidPooling", "skip_blocks_of"]
