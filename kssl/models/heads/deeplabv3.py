"""DeepLabV3 head as mmsegmentation builds it: ASPP branches, a 3x3 bottleneck, a classifier.

The head is split at the concatenated branch features, because GuidedMix-Net's released
recipe mixes labelled and unlabelled images *there* and decodes the mix with a second,
independently initialised bottleneck and classifier (`BranchDecoder`).
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from kssl.models.heads.deeplabv3plus import ASPP
from kssl.models.layers import ConvBNReLU, channels_shape, check_norm


@keras.saving.register_keras_serializable(package="kssl")
class BranchDecoder(keras.layers.Layer):
    """Concatenated ASPP branches -> k x k conv-BN-ReLU bottleneck -> channel dropout ->
    1x1 logits."""

    def __init__(self, num_classes: int, channels: int = 256, kernel_size: int = 3,
                 dropout: float = 0.1, norm: str = "batch", bn_momentum: float = 0.99,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.channels = channels
        self.kernel_size = kernel_size
        self.dropout_rate = dropout
        self.norm = check_norm(norm)
        self.bn_momentum = bn_momentum
        self.bottleneck = ConvBNReLU(channels, kernel_size, norm=norm, bn_momentum=bn_momentum,
                                     name="bottleneck")
        # Whole channels dropped, as mmsegmentation's Dropout2d.
        self.dropout = keras.layers.SpatialDropout2D(dropout) if dropout > 0 else None
        self.classifier = keras.layers.Conv2D(num_classes, 1, name="classifier")

    def build(self, input_shape):
        self.bottleneck.build(input_shape)
        self.classifier.build(channels_shape(self.channels))

    def classifier_inputs(self, x, training=None):
        """The bottleneck output (after dropout) that the 1x1 classifier reads."""
        y = self.bottleneck(x, training=training)
        return self.dropout(y, training=training) if self.dropout is not None else y

    def call(self, x, training=None):
        return self.classifier(self.classifier_inputs(x, training=training))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "channels": self.channels, "kernel_size": self.kernel_size,
                "dropout": self.dropout_rate, "norm": self.norm,
                "bn_momentum": self.bn_momentum}


@keras.saving.register_keras_serializable(package="kssl")
class DeepLabV3Head(keras.layers.Layer):
    """logits = decoder(ASPP branches(features[in_block])), at the stride of `in_block`.

    The branches are a 1x1 conv, one dilated 3x3 conv per rate and image pooling, each
    conv-BN-ReLU with `channels` outputs (mmsegmentation's ASPPHead: 512 channels, rates
    12/24/36 at output stride 8); `decoder` is a `BranchDecoder`. Methods:
    `branch_features(features)` -> [B, h, w, (len(rates) + 2) * channels] and
    `decode(branch_features)` -> logits, with call(f) == decode(branch_features(f)).
    """

    def __init__(self, num_classes: int, in_block: str = "stage4",
                 rates: Sequence[int] = (12, 24, 36), channels: int = 256,
                 dropout: float = 0.1, bottleneck_kernel: int = 3, separable: bool = False,
                 norm: str = "batch", bn_momentum: float = 0.99, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.in_block = in_block
        self.channels = channels
        self.bottleneck_kernel = bottleneck_kernel
        self.aspp = ASPP(channels, rates, dropout=0.0, separable=separable, norm=norm,
                         bn_momentum=bn_momentum, project=False, name="aspp")
        self.decoder = BranchDecoder(num_classes, channels, bottleneck_kernel, dropout=dropout,
                                     norm=norm, bn_momentum=bn_momentum, name="decoder")

    @property
    def branch_channels(self) -> int:
        """Channels of `branch_features`."""
        return self.aspp.branch_channels

    @property
    def input_blocks(self) -> tuple:
        """The block the head reads from the features dict."""
        return (self.in_block,)

    def build(self, features_shape):
        self.aspp.build(features_shape[self.in_block])
        self.decoder.build(channels_shape(self.branch_channels))

    def branch_features(self, features, training=None):
        """The concatenated ASPP branch outputs for the block features dict."""
        return self.aspp.branch_features(features[self.in_block], training=training)

    def decode(self, branch_features, training=None):
        """Logits from `branch_features`."""
        return self.decoder(branch_features, training=training)

    def call(self, features, training=None):
        return self.decode(self.branch_features(features, training=training),
                           training=training)

    # The final classifier, as DeepLabV3+ and DeepLabV2 expose it (MKD's feature augmentation).
    def classifier_inputs(self, features, training=None):
        """The bottleneck output [B, h, w, channels] the 1x1 classifier reads."""
        return self.decoder.classifier_inputs(self.branch_features(features, training),
                                              training=training)

    def classify(self, x):
        """Logits from `classifier_inputs`: the biased 1x1 classifier."""
        return self.decoder.classifier(x)

    def classifier_weights(self):
        """The 1x1 classifier as [1, A, C] (see `DeepLabV3PlusHead.classifier_weights`)."""
        return tf.convert_to_tensor(self.decoder.classifier.kernel)[0]

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "in_block": self.in_block, "rates": list(self.aspp.rates),
                "channels": self.channels, "dropout": self.decoder.dropout_rate,
                "bottleneck_kernel": self.bottleneck_kernel, "separable": self.aspp.separable,
                "norm": self.aspp.norm, "bn_momentum": self.aspp.bn_momentum}
