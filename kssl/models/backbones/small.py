"""A small from-scratch backbone for CPU experiments (trains in minutes on 2 cores).

Plain 3x3 conv-BN-ReLU units; each stage halves the resolution with a strided unit and adds
residual units. Full 3x3 convs rather than depthwise-separable ones: at these widths a
depthwise + pointwise pair measured no faster with TensorFlow's CPU kernels (about 80 ms
either way for a training step at batch 8, 96x128 with a narrow DeepLabV3+ head on 2 cores).

Blocks (name: stride at output_stride 16 / 8, channels with the default widths):
  stem:    2 / 2,   16
  stage1:  4 / 4,   32   (the low-level block for a DeepLabV3+ decoder)
  stage2:  8 / 8,   64
  stage3: 16 / 8,  128   (dilated 2 at output_stride 8)
A block's feature map is ceil(H / stride) x ceil(W / stride).
"""

from __future__ import annotations

from typing import Sequence

import keras

from kssl.models.layers import ConvBNReLU, ScalePreprocess, channels_shape, check_norm
from kssl.models.segmenter import Backbone, Block

DEFAULT_WIDTHS = (16, 32, 64, 128)
DEFAULT_DEPTHS = (1, 2, 2, 2)


@keras.saving.register_keras_serializable(package="kssl")
class SmallStage(keras.layers.Layer):
    """A strided conv-BN-ReLU unit, then `depth - 1` residual conv-BN-ReLU units."""

    def __init__(self, filters: int, depth: int = 2, strides: int = 2, dilation_rate: int = 1,
                 norm: str = "batch", bn_momentum: float = 0.99, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.depth = depth
        self.strides = strides
        self.dilation_rate = dilation_rate
        self.norm = norm
        self.bn_momentum = bn_momentum
        # The downsampling unit is not dilated: its stride already enlarges the receptive field.
        self.units = [ConvBNReLU(filters, 3, strides=strides, norm=norm,
                                 bn_momentum=bn_momentum, name="unit0")]
        self.units += [ConvBNReLU(filters, 3, dilation_rate=dilation_rate, norm=norm,
                                  bn_momentum=bn_momentum, name=f"unit{i}")
                       for i in range(1, depth)]

    def build(self, input_shape):
        self.units[0].build(input_shape)
        for unit in self.units[1:]:
            unit.build(channels_shape(self.filters))

    def call(self, x, training=None):
        x = self.units[0](x, training=training)
        for unit in self.units[1:]:
            x = x + unit(x, training=training)
        return x

    @property
    def output_channels(self) -> int:
        return self.filters

    def width_scaled(self, factor: float, name: str) -> "SmallStage":
        """A fresh stage like this one with `factor` times the channels."""
        return SmallStage(max(1, round(self.filters * factor)), self.depth,
                          strides=self.strides, dilation_rate=self.dilation_rate,
                          norm=self.norm, bn_momentum=self.bn_momentum, name=name)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "depth": self.depth,
                "strides": self.strides, "dilation_rate": self.dilation_rate,
                "norm": self.norm, "bn_momentum": self.bn_momentum}


def small_net(weights: str | None = None, output_stride: int = 16, norm: str = "batch",
              bn_momentum: float = 0.99, widths: Sequence[int] = DEFAULT_WIDTHS,
              depths: Sequence[int] = DEFAULT_DEPTHS) -> Backbone:
    """The small CPU backbone, built. Blocks: stem, stage1..stage3 (see module docstring).

    weights: only None (trained from scratch); use Segmenter.load_weights for checkpoints.
    output_stride: 16, or 8 (the last stage dilated instead of strided).
    """
    if weights is not None:
        raise ValueError(f"the small backbone has no pretrained weights; got weights={weights!r}")
    if output_stride not in (8, 16):
        raise ValueError(f"small backbone output_stride must be 8 or 16, got {output_stride!r}")
    if len(widths) != 4 or len(depths) != 4:
        raise ValueError("small backbone needs 4 widths and 4 depths (stem, stage1..stage3)")
    check_norm(norm)
    blocks = []
    stride = 1
    for i, (width, depth) in enumerate(zip(widths, depths)):
        name = "stem" if i == 0 else f"stage{i}"
        strides, rate = 2, 1
        if stride * 2 > output_stride:
            strides, rate = 1, 2
        stride *= strides
        layer = SmallStage(width, depth, strides=strides, dilation_rate=rate, norm=norm,
                           bn_momentum=bn_momentum, name=name)
        blocks.append(Block(name, layer, stride, width))
    backbone = Backbone("small", ScalePreprocess(name="preprocess"), tuple(blocks),
                        low_level_block="stage1", output_stride=output_stride)
    return backbone.build()
