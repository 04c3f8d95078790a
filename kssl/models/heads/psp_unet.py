"""GuidedMix-Net's network (paper Sec. 4.2): PSP module on the encoder, MITrans, and a
U-Net-style decoder with skip connections and PixelShuffle upsampling.

The paper gives the parts but not their sizes; kssl's choices, all head options:
- PSP (Zhao et al.): average pooling to 1x1, 2x2, 3x3 and 6x6 bins, a 1x1 conv-BN-ReLU per
  bin to `psp_channels / 4`, upsampled and concatenated with the input, fused by a 3x3
  conv-BN-ReLU to `psp_channels`.
- MITrans (`kssl.models.heads.mitrans`) on the fused deepest features.
- Decoder: for each skip block (the last block of every stride between the deepest
  features and `min_skip_stride`), upsample by PixelShuffle (a 1x1 conv to f^2 times the
  channels, then depth-to-space by f), concatenate the skip block reduced by a 1x1
  conv-BN-ReLU to `skip_channels`, and fuse with a 3x3 conv-BN-ReLU to
  `decoder_channels`. Logits come at the stride of the shallowest skip (4 for every
  kssl backbone), from a biased 1x1 classifier.
Built from named blocks like every head, so it runs on the ResNets, the small CPU backbone
and EfficientNet-Lite0.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from kssl.models.heads.mitrans import MITrans
from kssl.models.layers import ConvBNReLU, channels_shape, check_norm, resize_bilinear


def _pooling_matrix(length, bins: int, dtype) -> tf.Tensor:
    """[bins, length]: row i averages positions floor(i L / bins) .. ceil((i + 1) L / bins) - 1
    (PyTorch's adaptive pooling windows, which overlap when L is not a multiple of bins)."""
    length = tf.cast(length, tf.int32)
    i = tf.range(bins)
    start = (i * length) // bins
    end = ((i + 1) * length + bins - 1) // bins
    positions = tf.range(length)[None, :]
    inside = (positions >= start[:, None]) & (positions < end[:, None])
    weights = tf.cast(inside, dtype)
    return weights / tf.reduce_sum(weights, axis=1, keepdims=True)


def adaptive_average_pool(x: tf.Tensor, bins: int) -> tf.Tensor:
    """Adaptive average pooling of [B, H, W, C] to [B, bins, bins, C], for any H and W (two
    small matrix products, which have gradients, unlike TF's area resize)."""
    shape = tf.shape(x)
    rows = _pooling_matrix(shape[1], bins, x.dtype)
    cols = _pooling_matrix(shape[2], bins, x.dtype)
    return tf.einsum("ih,bhwc,jw->bijc", rows, x, cols)


@keras.saving.register_keras_serializable(package="kssl")
class PyramidPooling(keras.layers.Layer):
    """PSP module: x ++ [upsampled conv(pool_b(x)) for each bin b] -> 3x3 conv-BN-ReLU.

    Pooling to b x b is adaptive average pooling (`adaptive_average_pool`), so any input
    size works.
    """

    def __init__(self, channels: int = 512, bins: Sequence[int] = (1, 2, 3, 6),
                 norm: str = "batch", bn_momentum: float = 0.99, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.bins = tuple(int(b) for b in bins)
        self.norm = check_norm(norm)
        self.bn_momentum = bn_momentum
        common = dict(norm=norm, bn_momentum=bn_momentum)
        branch_channels = max(1, channels // len(self.bins))
        self.branch_channels = branch_channels
        self.pool_convs = [ConvBNReLU(branch_channels, 1, name=f"pool_{b}", **common)
                           for b in self.bins]
        self.fuse = ConvBNReLU(channels, 3, name="fuse", **common)

    def build(self, input_shape):
        for conv in self.pool_convs:
            conv.build(input_shape)
        self.fuse.build(channels_shape(int(input_shape[-1])
                                       + self.branch_channels * len(self.bins)))

    def call(self, x, training=None):
        size = tf.shape(x)[1:3]
        outs = [x]
        for b, conv in zip(self.bins, self.pool_convs):
            pooled = adaptive_average_pool(x, b)
            outs.append(resize_bilinear(conv(pooled, training=training), size))
        return self.fuse(tf.concat(outs, axis=-1), training=training)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "bins": list(self.bins),
                "norm": self.norm, "bn_momentum": self.bn_momentum}


@keras.saving.register_keras_serializable(package="kssl")
class PixelShuffleUp(keras.layers.Layer):
    """Upsampling by an integer factor f: 1x1 conv to f^2 * channels, depth-to-space."""

    def __init__(self, channels: int, factor: int, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.factor = int(factor)
        self.conv = keras.layers.Conv2D(channels * self.factor ** 2, 1, name="expand")

    def build(self, input_shape):
        self.conv.build(input_shape)

    def call(self, x):
        return tf.nn.depth_to_space(self.conv(x), self.factor)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "factor": self.factor}


@keras.saving.register_keras_serializable(package="kssl")
class PSPUNetHead(keras.layers.Layer):
    """PSP + MITrans on `in_block`, then a PixelShuffle U-Net decoder over `skip_blocks`.

    Args:
      num_classes: number of classes.
      in_block: the deepest block (its stride is `in_stride`).
      skip_blocks: (name, stride) pairs, deepest first, each stride smaller than the last
        (see `skip_blocks_of` for the default choice from a backbone).
      in_stride: the stride of `in_block`.
      psp_channels, skip_channels, decoder_channels: widths (see the module docstring).
      mitrans: apply MITrans after the PSP module (the paper's network; False gives the
        ablation "w/o MITrans").
    """

    def __init__(self, num_classes: int, in_block: str, skip_blocks: Sequence,
                 in_stride: int, psp_channels: int = 512, skip_channels: int = 48,
                 decoder_channels: int = 256, bins: Sequence[int] = (1, 2, 3, 6),
                 mitrans: bool = True, norm: str = "batch", bn_momentum: float = 0.99,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.in_block = in_block
        self.skip_blocks = tuple((str(n), int(s)) for n, s in skip_blocks)
        self.in_stride = int(in_stride)
        self.psp_channels = psp_channels
        self.skip_channels = skip_channels
        self.decoder_channels = decoder_channels
        self.use_mitrans = mitrans
        self.norm = check_norm(norm)
        self.bn_momentum = bn_momentum
        common = dict(norm=norm, bn_momentum=bn_momentum)
        self.psp = PyramidPooling(psp_channels, bins, name="psp", **common)
        self.mitrans = MITrans(name="mitrans") if mitrans else None
        self.ups, self.reduce, self.fuse = [], [], []
        stride, channels = self.in_stride, psp_channels
        for i, (name, skip_stride) in enumerate(self.skip_blocks):
            if skip_stride >= stride or stride % skip_stride:
                raise ValueError(f"skip block {name!r} has stride {skip_stride}, which does "
                                 f"not divide the previous stride {stride}")
            self.ups.append(PixelShuffleUp(channels, stride // skip_stride, name=f"up_{i}"))
            self.reduce.append(ConvBNReLU(skip_channels, 1, name=f"skip_{i}", **common))
            self.fuse.append(ConvBNReLU(decoder_channels, 3, name=f"fuse_{i}", **common))
            stride, channels = skip_stride, decoder_channels
        self.out_channels = channels
        self.classifier = keras.layers.Conv2D(num_classes, 1, name="classifier")

    @property
    def input_blocks(self) -> tuple:
        """The blocks the head reads from the features dict."""
        return (self.in_block,) + tuple(name for name, _ in self.skip_blocks)

    def build(self, features_shape):
        self.psp.build(features_shape[self.in_block])
        if self.mitrans is not None:
            self.mitrans.build(channels_shape(self.psp_channels))
        channels = self.psp_channels
        for (name, _), up, reduce, fuse in zip(self.skip_blocks, self.ups, self.reduce,
                                               self.fuse):
            up.build(channels_shape(channels))
            reduce.build(features_shape[name])
            fuse.build(channels_shape(channels + self.skip_channels))
            channels = self.decoder_channels
        self.classifier.build(channels_shape(channels))

    def classifier_inputs(self, features, training=None):
        """The decoder output [B, h, w, A] the 1x1 classifier reads."""
        x = self.psp(features[self.in_block], training=training)
        if self.mitrans is not None:
            x = self.mitrans(x)
        for (name, _), up, reduce, fuse in zip(self.skip_blocks, self.ups, self.reduce,
                                               self.fuse):
            skip = features[name]
            # A 'same'-padded block is ceil(H / stride) high, so f times the deeper map can
            # be a row or column larger than the skip: crop it.
            size = tf.shape(skip)[1:3]
            x = up(x)[:, :size[0], :size[1], :]
            x = tf.concat([x, reduce(skip, training=training)], axis=-1)
            x = fuse(x, training=training)
        return x

    def classify(self, x):
        """Logits from `classifier_inputs`: the biased 1x1 classifier."""
        return self.classifier(x)

    def classifier_weights(self):
        """The 1x1 classifier as [1, A, C] (see `DeepLabV3PlusHead.classifier_weights`)."""
        return tf.convert_to_tensor(self.classifier.kernel)[0]

    def call(self, features, training=None):
        return self.classify(self.classifier_inputs(features, training=training))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "in_block": self.in_block, "skip_blocks": [list(b) for b in self.skip_blocks],
                "in_stride": self.in_stride, "psp_channels": self.psp_channels,
                "skip_channels": self.skip_channels, "decoder_channels": self.decoder_channels,
                "bins": list(self.psp.bins), "mitrans": self.use_mitrans, "norm": self.norm,
                "bn_momentum": self.bn_momentum}


def skip_blocks_of(blocks, min_stride: int = 4) -> list:
    """[(name, stride)] of the decoder's skips: for every stride below the last block's and
    at least `min_stride`, the last block with that stride, deepest first."""
    last_stride = blocks[-1].stride
    chosen = {}
    for block in blocks:
        if min_stride <= block.stride < last_stride:
            chosen[block.stride] = block.name  # later blocks of a stride win
    return [(chosen[s], s) for s in sorted(chosen, reverse=True)]
