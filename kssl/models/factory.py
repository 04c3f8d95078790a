"""The model factory: `build_segmenter(arch=..., backbone=..., num_classes=...)`.

Backbones and heads are looked up by name in `BACKBONES` and `HEADS`; a new one slots in by
adding a builder to the dict. Plain keyword-argument functions (configuration files bind
them from outside).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import keras
import tensorflow as tf
from absl import logging

from kssl.models.backbones import BACKBONES
from kssl.models.checkpoints import loading
from kssl.models.heads import (DeepLabV2Head, DeepLabV3Head, DeepLabV3PlusHead, PSPUNetHead,
                               skip_blocks_of)
from kssl.models.layers import check_norm
from kssl.models.segmenter import Backbone, Block, Segmenter


def deeplabv2_head(backbone: Backbone, num_classes: int, *, output_stride: int,
                   norm: str, bn_momentum: float, align_corners: bool,
                   aspp_rates: Sequence[int] | None = None) -> keras.layers.Layer:
    """DeepLabV2 ASPP classifier on the backbone's last block (rates default 6/12/18/24)."""
    del output_stride, norm, bn_momentum, align_corners  # no BN, no internal resize
    return DeepLabV2Head(num_classes, rates=aspp_rates or (6, 12, 18, 24),
                         in_block=backbone.blocks[-1].name, name="head")


def deeplabv3plus_head(backbone: Backbone, num_classes: int, *, output_stride: int,
                       norm: str, bn_momentum: float, align_corners: bool,
                       aspp_rates: Sequence[int] | None = None, aspp_channels: int = 256,
                       low_level_channels: int = 48, decoder_channels: int = 256,
                       dropout: float = 0.1, separable: bool = False) -> keras.layers.Layer:
    """DeepLabV3+ on the last block and the backbone's low-level (stride-4) block.

    ASPP rates default to (6, 12, 18) scaled by 16 / output_stride (12/24/36 at OS 8).
    """
    if backbone.low_level_block is None:
        raise ValueError(f"backbone {backbone.name!r} names no low-level block for DeepLabV3+")
    rates = aspp_rates or tuple(max(1, r * 16 // output_stride) for r in (6, 12, 18))
    return DeepLabV3PlusHead(
        num_classes, high_block=backbone.blocks[-1].name, low_block=backbone.low_level_block,
        rates=rates, aspp_channels=aspp_channels, low_level_channels=low_level_channels,
        decoder_channels=decoder_channels, dropout=dropout, separable=separable, norm=norm,
        bn_momentum=bn_momentum, align_corners=align_corners, name="head")


def deeplabv3_head(backbone: Backbone, num_classes: int, *, output_stride: int,
                   norm: str, bn_momentum: float, align_corners: bool,
                   aspp_rates: Sequence[int] | None = None, aspp_channels: int = 256,
                   dropout: float = 0.1, separable: bool = False) -> keras.layers.Layer:
    """DeepLabV3 as mmsegmentation's ASPPHead (branches, 3x3 bottleneck, classifier) on the
    last block; rates default to (6, 12, 18) scaled by 16 / output_stride."""
    del align_corners  # no internal resize
    rates = aspp_rates or tuple(max(1, r * 16 // output_stride) for r in (6, 12, 18))
    return DeepLabV3Head(num_classes, in_block=backbone.blocks[-1].name, rates=rates,
                         channels=aspp_channels, dropout=dropout, separable=separable,
                         norm=norm, bn_momentum=bn_momentum, name="head")


def psp_unet_head(backbone: Backbone, num_classes: int, *, output_stride: int,
                  norm: str, bn_momentum: float, align_corners: bool,
                  psp_channels: int = 512, low_level_channels: int = 48,
                  decoder_channels: int = 256, mitrans: bool = True) -> keras.layers.Layer:
    """GuidedMix-Net's network: PSP and MITrans on the last block, a PixelShuffle U-Net
    decoder with a skip from every coarser stride down to 4 (`low_level_channels` is the
    width each skip is reduced to)."""
    del output_stride, align_corners
    last = backbone.blocks[-1]
    return PSPUNetHead(num_classes, in_block=last.name,
                       skip_blocks=skip_blocks_of(backbone.blocks), in_stride=last.stride,
                       psp_channels=psp_channels, skip_channels=low_level_channels,
                       decoder_channels=decoder_channels, mitrans=mitrans, norm=norm,
                       bn_momentum=bn_momentum, name="head")


HEADS = {
    "deeplabv2": deeplabv2_head,
    "deeplabv3": deeplabv3_head,
    "deeplabv3plus": deeplabv3plus_head,
    "psp_unet": psp_unet_head,
}
DEFAULT_OUTPUT_STRIDE = {"deeplabv2": 8, "deeplabv3": 8, "deeplabv3plus": 16, "psp_unet": 16}


def _lookup(table: dict, kind: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def _head_builder(arch: str, options: dict):
    """The head builder for `arch`, after checking it accepts every key of `options`."""
    builder = _lookup(HEADS, "arch", arch)
    accepted = inspect.signature(builder).parameters
    fixed = ("backbone", "num_classes", "output_stride", "norm", "bn_momentum", "align_corners")
    unknown = sorted(k for k in options if k not in accepted or k in fixed)
    if unknown:
        raise ValueError(f"arch {arch!r} does not take {', '.join(unknown)}")
    return builder


def _backbone_builder(name: str, options: dict):
    """The backbone builder for `name`, after checking it accepts every key of `options`."""
    builder = _lookup(BACKBONES, "backbone", name)
    accepted = inspect.signature(builder).parameters
    # A builder forwarding **kwargs (resnet50 -> resnet) checks its own keywords.
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(k for k in options if not takes_any and k not in accepted)
    if unknown:
        raise ValueError(f"backbone {name!r} does not take {', '.join(unknown)}")
    return builder


def build_backbone(name: str, *, weights: str | None = None, output_stride: int = 16,
                   norm: str = "batch", bn_momentum: float = 0.99, **options) -> Backbone:
    """A built backbone by name (see BACKBONES): preprocessing layer + named blocks.

    options: backbone-specific keywords, passed on only when not None; for the ResNets the
      layout `stride_on`, `stem_pool`, `preprocess` (see `kssl.models.backbones.resnet`).
    """
    options = {k: v for k, v in options.items() if v is not None}
    builder = _backbone_builder(name, options)
    check_norm(norm)
    return builder(weights=weights, output_stride=output_stride, norm=norm,
                   bn_momentum=bn_momentum, **options)


def backbone_layout(model: Segmenter) -> dict:
    """The ResNet layout {stride_on, stem_pool, preprocess} a built segmenter uses (what its
    weights need); {} for other backbones."""
    from kssl.models.backbones.resnet import layout_of

    return layout_of(model.preprocess, model.block_layers)


def build_head(arch: str, backbone: Backbone, num_classes: int, *, output_stride: int,
               norm: str = "batch", bn_momentum: float = 0.99, align_corners: bool = False,
               **options) -> keras.layers.Layer:
    """A head by architecture name (see HEADS) for `backbone`; `options` are head-specific."""
    builder = _head_builder(arch, options)
    return builder(backbone, num_classes, output_stride=output_stride, norm=check_norm(norm),
                   bn_momentum=bn_momentum, align_corners=align_corners, **options)


def build_segmenter(arch: str = "deeplabv3plus", backbone: str = "resnet101", *,
                    num_classes: int, weights: str | None = None,
                    output_stride: int | None = None, norm: str = "batch",
                    head_norm: str | None = None, bn_momentum: float = 0.99,
                    aspp_rates: Sequence[int] | None = None, aspp_channels: int | None = None,
                    low_level_channels: int | None = None,
                    decoder_channels: int | None = None, dropout: float | None = None,
                    separable: bool | None = None, psp_channels: int | None = None,
                    mitrans: bool | None = None, align_corners: bool = False,
                    stride_on: str | None = None, stem_pool: str | None = None,
                    preprocess: str | None = None, name: str | None = None) -> Segmenter:
    """A built Segmenter, already called on a zero batch (ready for fit, export, load_weights).

    arch: "deeplabv3plus", "deeplabv3", "deeplabv2" or "psp_unet" (GuidedMix-Net's network)
      (see HEADS).
    backbone: "resnet50", "resnet101", "small" or "efficientnet_lite0" (see BACKBONES).
    weights: backbone weights: None, "imagenet" or a weight file path (ResNets: a
      keras.applications file or a file from `bin/convert_weights`; efficientnet_lite0: a
      PyTorch .pth or a .weights.h5). A converted DeepLab-v2 file also holds its ASPP
      classifier: it is loaded into a "deeplabv2" head when num_classes matches and every
      rate of `aspp_rates` is one of the file's (rates (6, 12) take the rate-6 and rate-12
      branches: the classifier the released PyTorch code effectively runs).
    output_stride: None picks the arch default (see DEFAULT_OUTPUT_STRIDE).
    norm: backbone norm, "batch" | "sync_batch" | "frozen".
    head_norm: head norm; None means `norm`, except that "frozen" becomes "batch" (a freshly
      initialised head has no statistics worth freezing).
    aspp_rates, aspp_channels, low_level_channels, decoder_channels, dropout, separable,
      psp_channels, mitrans: head options; None keeps the head's default. Passing one the
      arch lacks is an error.
    align_corners: bilinear upsampling convention for the logits (and the V3+ decoder).
    stride_on, stem_pool, preprocess: ResNet layout (see `kssl.models.backbones.resnet`);
      None follows the weights, an explicit value that disagrees with them is an error.
    """
    _lookup(HEADS, "arch", arch)
    _lookup(BACKBONES, "backbone", backbone)
    if num_classes is None or int(num_classes) < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if output_stride is None:
        output_stride = DEFAULT_OUTPUT_STRIDE[arch]
    check_norm(norm)
    if head_norm is None:
        head_norm = "batch" if norm == "frozen" else norm
    options = dict(aspp_rates=aspp_rates, aspp_channels=aspp_channels,
                   low_level_channels=low_level_channels, decoder_channels=decoder_channels,
                   dropout=dropout, separable=separable, psp_channels=psp_channels,
                   mitrans=mitrans)
    options = {k: v for k, v in options.items() if v is not None}
    _head_builder(arch, options)  # fail on a bad option before building anything
    layout = {k: v for k, v in dict(stride_on=stride_on, stem_pool=stem_pool,
                                    preprocess=preprocess).items() if v is not None}
    _backbone_builder(backbone, layout)
    bb = build_backbone(backbone, weights=weights, output_stride=output_stride, norm=norm,
                        bn_momentum=bn_momentum, **layout)
    head = build_head(arch, bb, int(num_classes), output_stride=output_stride, norm=head_norm,
                      bn_momentum=bn_momentum, align_corners=align_corners, **options)
    model = Segmenter.from_backbone(bb, head, align_corners=align_corners,
                                    name=name or f"{arch}_{backbone}")
    # build() with unknown sizes records a [None, None, None, 3] signature (what
    # `model.export` serves); the call marks the model as called, which export requires.
    model.build((None, None, None, 3))
    model(tf.zeros((1, 32, 32, 3)), training=False)
    if weights is not None and arch == "deeplabv2":
        _load_converted_classifier(weights, head)
    return model


def _load_converted_classifier(weights, head) -> None:
    """Loads a converted file's ASPP classifier into `head` where it fits, and says so."""
    if loading.read_info(weights) is None:
        return
    loaded, reason = loading.load_classifier(weights, head)
    if loaded:
        logging.info("loaded the ASPP classifier (rates %s) from %s", head.rates, weights)
    elif reason:
        logging.warning("the ASPP classifier keeps its fresh initialisation: %s", reason)


__all__ = ["BACKBONES", "HEADS", "DEFAULT_OUTPUT_STRIDE", "Backbone", "Block", "Segmenter",
           "backbone_layout", "build_backbone", "build_head", "build_segmenter",
           "deeplabv2_head", "deeplabv3_head", "deeplabv3plus_head", "psp_unet_head"]
