"""GuidedMix-Net's mutual information transfer (MITrans): a non-local block (Eq. 4-5).

For a feature map v [B, h, w, C] at N = h * w positions:
  Q = conv_q(v), K = conv_k(v), V = conv_v(v)      (1x1 convs to C / 2 channels)
  A[n, m] = softmax_m(Q_n . K_m / sqrt(C / 2))      (attention over all positions)
  v'_n = v_n + conv_out(sum_m A[n, m] V_m)          (1x1 conv back to C, residual sum)

Two choices follow the authors' module (mmcv's embedded-Gaussian non-local block) where the
paper's text differs or is silent: the softmax runs over the key positions m (the paper
says "over the channel dimension", which would not give each position a weighting of the
others), and conv_out starts at zero, so the block is the identity at initialisation and
a pretrained network's behaviour is unchanged until the block learns something.
Attention is within each image: on a mixed image it relates the labelled and unlabelled
contents that the interpolation has laid on top of each other. This is the non-local core
of the authors' module; the 3x3 convs they wrap around it are left to the surrounding
network (PSP before it, the decoder after it).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from kssl.models.layers import channels_shape


@keras.saving.register_keras_serializable(package="kssl")
class MITrans(keras.layers.Layer):
    """Non-local attention block with a zero-initialised residual output (see module doc).

    Args:
      reduction: Q, K and V have channels // reduction channels (2, the paper's "half").
      scale: divide the affinities by sqrt(key channels) (the authors' `use_scale`).
    """

    def __init__(self, reduction: int = 2, scale: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.reduction = reduction
        self.scale = scale
        self.channels = None

    def build(self, input_shape):
        self.channels = int(input_shape[-1])
        inner = max(1, self.channels // self.reduction)
        self.inner_channels = inner
        # N(0, 0.01) projections as the authors' block; a fresh initializer per layer, or
        # Q, K and V would start identical.
        self.query, self.key, self.value = [
            keras.layers.Conv2D(inner, 1, name=name,
                                kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01))
            for name in ("query", "key", "value")]
        self.output_conv = keras.layers.Conv2D(self.channels, 1, kernel_initializer="zeros",
                                               name="output")
        for layer in (self.query, self.key, self.value):
            layer.build(input_shape)
        self.output_conv.build(channels_shape(inner))

    def attention(self, x):
        """Attention weights [B, N, N] (rows: query positions, summing to 1 over keys)."""
        # In float32: under mixed precision, float16 dot products over many channels can
        # overflow, and a float16 softmax over thousands of positions loses small weights.
        q = tf.cast(self._positions(self.query(x)), tf.float32)
        k = tf.cast(self._positions(self.key(x)), tf.float32)
        affinity = tf.matmul(q, k, transpose_b=True)
        if self.scale:
            affinity = affinity / math.sqrt(self.inner_channels)
        return tf.nn.softmax(affinity, axis=-1)

    def call(self, x, training=None):
        del training
        weights = self.attention(x)
        values = self._positions(self.value(x))
        context = tf.matmul(tf.cast(weights, values.dtype), values)  # [B, N, C']
        shape = tf.shape(x)
        context = tf.reshape(context, [shape[0], shape[1], shape[2], self.inner_channels])
        return x + self.output_conv(context)

    @staticmethod
    def _positions(x):
        """[B, h, w, C] -> [B, h * w, C]."""
        shape = tf.shape(x)
        return tf.reshape(x, [shape[0], shape[1] * shape[2], x.shape[-1]])

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "reduction": self.reduction, "scale": self.scale}
