"""DeepLabV3+ head: ASPP on the last block plus a decoder that adds stride-4 features."""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from kssl.models.layers import (ConvBNReLU, channels_shape, check_norm, resize_bilinear,
                                spatial_size)


@keras.saving.register_keras_serializable(package="kssl")
class ASPP(keras.layers.Layer):
    """Atrous spatial pyramid pooling (DeepLabV3): 1x1, dilated 3x3 per rate, image pooling.

    Every branch is conv-BN-ReLU with `channels` outputs; the concatenation is projected by
    a 1x1 conv-BN-ReLU to `channels`, then dropout (0 disables it). With `project=False`
    the layer stops at the concatenation (`branch_features`), for heads that decode it
    themselves (`DeepLabV3Head`).
    """

    def __init__(self, channels: int = 256, rates: Sequence[int] = (6, 12, 18),
                 dropout: float = 0.1, separable: bool = False, norm: str = "batch",
                 bn_momentum: float = 0.99, project: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.with_projection = project
        self.rates = tuple(int(r) for r in rates)
        self.dropout_rate = dropout
        self.separable = separable
        self.norm = check_norm(norm)
        self.bn_momentum = bn_momentum
        common = dict(norm=norm, bn_momentum=bn_momentum)
        self.conv1x1 = ConvBNReLU(channels, 1, name="conv1x1", **common)
        self.atrous = [ConvBNReLU(channels, 3, dilation_rate=r, separable=separable,
                                  name=f"atrous_{i}", **common)
                       for i, r in enumerate(self.rates)]
        self.pool_conv = ConvBNReLU(channels, 1, name="pool_conv", **common)
        if project:
            self.project = ConvBNReLU(channels, 1, name="project", **common)
            self.dropout = keras.layers.Dropout(dropout) if dropout > 0 else None

    @property
    def branch_channels(self) -> int:
        """Channels of `branch_features`: one `channels` block per branch."""
        return self.channels * (len(self.atrous) + 2)

    def build(self, input_shape):
        for conv in [self.conv1x1, *self.atrous, self.pool_conv]:
            conv.build(input_shape)
        if self.with_projection:
            self.project.build(channels_shape(self.branch_channels))

    def branch_features(self, x, training=None):
        """The concatenated branch outputs [B, h, w, branch_channels], before projection."""
        outs = [self.conv1x1(x, training=training)]
        outs += [conv(x, training=training) for conv in self.atrous]
        pooled = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
        pooled = self.pool_conv(pooled, training=training)
        # Broadcasting the 1x1 pooled vector equals bilinear upsampling from 1x1.
        outs.append(tf.broadcast_to(pooled, tf.shape(outs[0])))
        return tf.concat(outs, axis=-1)

    def call(self, x, training=None):
        y = self.branch_features(x, training=training)
        if not self.with_projection:
            return y
        y = self.project(y, training=training)
        if self.dropout is not None:
            y = self.dropout(y, training=training)
        return y

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "rates": list(self.rates),
                "dropout": self.dropout_rate, "separable": self.separable, "norm": self.norm,
                "bn_momentum": self.bn_momentum, "project": self.with_projection}


@keras.saving.register_keras_serializable(package="kssl")
class DeepLabV3PlusHead(keras.layers.Layer):
    """DeepLabV3+: ASPP(features[high_block]) upsampled onto features[low_block], refined.

    Decoder: low-level 1x1 conv-BN-ReLU to `low_level_channels` (48 in the paper), concat
    with the upsampled ASPP output, two 3x3 conv-BN-ReLU with `decoder_channels`, then a
    biased 1x1 classifier. Logits come at the stride of `low_block`.

    rates: ASPP dilation rates; the paper's (6, 12, 18) are for output stride 16, doubled
      for output stride 8 (the factory does that).
    separable: depthwise-separable 3x3 convs in ASPP and decoder (cheaper, as in the
      paper's Xception variant).
    """

    def __init__(self, num_classes: int, high_block: str = "stage4",
                 low_block: str = "stage1", rates: Sequence[int] = (6, 12, 18),
                 aspp_channels: int = 256, low_level_channels: int = 48,
                 decoder_channels: int = 256, dropout: float = 0.1, separable: bool = False,
                 norm: str = "batch", bn_momentum: float = 0.99, align_corners: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.high_block = high_block
        self.low_block = low_block
        self.aspp_channels = aspp_channels
        self.low_level_channels = low_level_channels
        self.decoder_channels = decoder_channels
        self.separable = separable
        self.norm = check_norm(norm)
        self.bn_momentum = bn_momentum
        self.align_corners = align_corners
        common = dict(norm=norm, bn_momentum=bn_momentum)
        self.aspp = ASPP(aspp_channels, rates, dropout=dropout, separable=separable,
                         name="aspp", **common)
        self.low_level = ConvBNReLU(low_level_channels, 1, name="low_level", **common)
        self.decoder = [ConvBNReLU(decoder_channels, 3, separable=separable,
                                   name=f"decoder_{i}", **common) for i in range(2)]
        self.classifier = keras.layers.Conv2D(num_classes, 1, name="classifier")

    @property
    def input_blocks(self) -> tuple:
        """The blocks the head reads from the features dict."""
        return (self.low_block, self.high_block)

    def build(self, features_shape):
        self.aspp.build(features_shape[self.high_block])
        self.low_level.build(features_shape[self.low_block])
        self.decoder[0].build(channels_shape(self.aspp_channels + self.low_level_channels))
        self.decoder[1].build(channels_shape(self.decoder_channels))
        self.classifier.build(channels_shape(self.decoder_channels))

    def call(self, features, training=None):
        return self.classify(self.classifier_inputs(features, training=training))

    # The final linear classifier, exposed for methods that work on its input features
    # (e.g. MKD's feature augmentation): call(f) == classify(classifier_inputs(f)).
    def classifier_inputs(self, features, training=None):
        """The decoder output [B, h, w, decoder_channels] the 1x1 classifier reads."""
        high = self.aspp(features[self.high_block], training=training)
        low = self.low_level(features[self.low_block], training=training)
        high = resize_bilinear(high, spatial_size(low), align_corners=self.align_corners)
        x = tf.concat([high, low], axis=-1)
        for conv in self.decoder:
            x = conv(x, training=training)
        return x

    def classify(self, x):
        """Logits from `classifier_inputs`: the biased 1x1 classifier."""
        return self.classifier(x)

    def classifier_weights(self):
        """The classifier as per-position linear maps [T, A, C]: here T = 1 (a 1x1 conv),
        so row 0 is w_c for every class c (no bias)."""
        kernel = tf.convert_to_tensor(self.classifier.kernel)  # [1, 1, A, C]
        return kernel[0, :, :, :]

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "high_block": self.high_block, "low_block": self.low_block,
                "rates": list(self.aspp.rates), "aspp_channels": self.aspp_channels,
                "low_level_channels": self.low_level_channels,
                "decoder_channels": self.decoder_channels, "dropout": self.aspp.dropout_rate,
                "separable": self.separable, "norm": self.norm,
                "bn_momentum": self.bn_momentum, "align_corners": self.align_corners}
