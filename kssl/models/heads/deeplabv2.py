"""DeepLabV2 ASPP classifier: the sum of parallel dilated 3x3 convs, each to num_classes."""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="kssl")
class DeepLabV2Head(keras.layers.Layer):
    """logits = sum_r conv3x3_rate_r(features[in_block]), at the stride of `in_block`.

    Each branch is a biased 3x3 conv with dilation r straight to num_classes channels,
    weights drawn from normal(0, 0.01) and zero biases, as in DeepLab-v2. `rates` defaults
    to (6, 12, 18, 24); (6, 12) reproduces reference code whose ASPP loop returns after the
    second branch. Branch i is the sublayer named "aspp_{i}".
    """

    def __init__(self, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24),
                 in_block: str = "stage4", **kwargs):
        super().__init__(**kwargs)
        if not rates:
            raise ValueError("DeepLabV2Head needs at least one rate")
        self.num_classes = num_classes
        self.rates = tuple(int(r) for r in rates)
        self.in_block = in_block
        # A fresh initializer per branch: an unseeded initializer instance reused across
        # layers would give every branch the same draw.
        self.branches = [
            keras.layers.Conv2D(num_classes, 3, padding="same", dilation_rate=r, use_bias=True,
                                kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
                                bias_initializer="zeros", name=f"aspp_{i}")
            for i, r in enumerate(self.rates)]

    @property
    def input_blocks(self) -> tuple:
        """The block the head reads from the features dict."""
        return (self.in_block,)

    def build(self, features_shape):
        for branch in self.branches:
            branch.build(features_shape[self.in_block])

    def call(self, features, training=None):
        return self.classify(self.classifier_inputs(features, training=training))

    # The classifier and its input, exposed for methods that work on the features the
    # classifier reads (e.g. MKD's feature augmentation): call(f) == classify(inputs(f)).
    def classifier_inputs(self, features, training=None):
        """The backbone features [B, h, w, A] the summed dilated convs read."""
        del training  # no layer before the classifier
        return features[self.in_block]

    def classify(self, x):
        """Logits from `classifier_inputs`: the sum of the dilated 3x3 branches."""
        logits = self.branches[0](x)
        for branch in self.branches[1:]:
            logits = logits + branch(x)
        return logits

    def _taps(self) -> dict:
        """{(row, col) offset: summed kernel weights [A, C]} over every branch's 3x3 taps."""
        taps = {}
        for branch, rate in zip(self.branches, self.rates):
            kernel = tf.convert_to_tensor(branch.kernel)  # [3, 3, A, C]
            for i in range(3):
                for j in range(3):
                    offset = ((i - 1) * rate, (j - 1) * rate)
                    weight = kernel[i, j]
                    taps[offset] = taps[offset] + weight if offset in taps else weight
        return taps

    def classifier_weights(self):
        """The classifier as per-position linear maps [T, A, C], one per distinct input
        offset (see `classifier_offsets`): away from the borders,
        logits(p) = bias + sum_t f(p + offset_t) @ W[t].

        Each branch reads the 9 offsets rate * {-1, 0, 1}^2; the centre offset is shared by
        every branch, so its weights are summed.
        """
        return tf.stack(list(self._taps().values()))

    def classifier_offsets(self) -> list:
        """The (row, col) offsets of `classifier_weights`' rows, in the same order."""
        return list(self._taps())

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "rates": list(self.rates), "in_block": self.in_block}
