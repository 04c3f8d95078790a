"""Segmentation networks: backbones, heads, the `Segmenter` that joins them, and the
factory that builds one by name (`kssl.models.factory`, re-exported here)."""

from kssl.models.factory import (BACKBONES, DEFAULT_OUTPUT_STRIDE, HEADS, Backbone, Block,
                                 Segmenter, backbone_layout, build_backbone, build_head,
                                 build_segmenter, deeplabv2_head, deeplabv3_head,
                                 deeplabv3plus_head, psp_unet_head)

__all__ = ["BACKBONES", "HEADS", "DEFAULT_OUTPUT_STRIDE", "Backbone", "Block", "Segmenter",
           "backbone_layout", "build_backbone", "build_head", "build_segmenter",
           "deeplabv2_head", "deeplabv3_head", "deeplabv3plus_head", "psp_unet_head"]
