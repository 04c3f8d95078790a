"""Small pieces shared by backbones and heads: the norm-layer choice, conv-BN-ReLU, resizing."""

from __future__ import annotations

import keras
import tensorflow as tf

NORMS = ("batch", "sync_batch", "frozen")


@keras.saving.register_keras_serializable(package="kssl")
class FrozenBatchNormalization(keras.layers.BatchNormalization):
    """Batch norm that always normalises with its moving statistics and is never trained.

    DeepLab-style training often freezes the backbone's BN (small per-device batches make
    batch statistics noisy). Unlike `BatchNormalization(trainable=False)`, the layer stays
    frozen when a parent sets `model.trainable = True`, so a method cannot unfreeze it by
    accident. Its weights have the same names and order as `BatchNormalization`, so
    pretrained weights load into it unchanged.
    """

    def __init__(self, **kwargs):
        kwargs["trainable"] = False
        super().__init__(**kwargs)

    @property
    def trainable(self):
        return False

    @trainable.setter
    def trainable(self, value):
        # Ignore `value`: frozen by definition. Still run the base setter so the variables
        # keep their trainable flag False (models filter variables by that flag).
        keras.layers.Layer.trainable.fset(self, False)

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=False, mask=mask)


def make_norm(norm: str, name: str | None = None, epsilon: float = 1e-3,
              momentum: float = 0.99) -> keras.layers.Layer:
    """A batch-norm layer of the chosen kind.

    norm: "batch" (per-replica statistics), "sync_batch" (statistics all-reduced over the
      replicas of a tf.distribute strategy, so N replicas train like one device) or "frozen"
      (always inference mode, not trainable).
    momentum: Keras convention (moving = momentum * moving + (1 - momentum) * batch);
      PyTorch's momentum m corresponds to 1 - m here.
    """
    if norm == "batch":
        return keras.layers.BatchNormalization(name=name, epsilon=epsilon, momentum=momentum)
    if norm == "sync_batch":
        return keras.layers.BatchNormalization(name=name, epsilon=epsilon, momentum=momentum,
                                               synchronized=True)
    if norm == "frozen":
        return FrozenBatchNormalization(name=name, epsilon=epsilon, momentum=momentum)
    raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")


def check_norm(norm: str) -> str:
    """Returns `norm` if it is a known norm name, else raises a one-line ValueError."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
    return norm


def channels_shape(channels: int) -> tuple:
    """An NHWC shape with only the channel count known, for building sublayers.

    Container layers here implement `build` by building their sublayers from shapes like
    this one; without it Keras traces `call` symbolically once per nesting level on the
    first call, which made a ResNet-50 build take about 1.5x longer.
    """
    return (None, None, None, int(channels))


@keras.saving.register_keras_serializable(package="kssl")
class ConvBNReLU(keras.layers.Layer):
    """Conv2D (no bias) -> batch norm -> ReLU, optionally depthwise-separable.

    separable=True uses a depthwise 3x3 (with its own BN-ReLU) followed by a pointwise
    1x1, the MobileNet / DeepLabV3+ "separable conv" that costs about 1/9 of a full 3x3.
    """

    def __init__(self, filters: int, kernel_size: int = 3, strides: int = 1,
                 dilation_rate: int = 1, separable: bool = False, norm: str = "batch",
                 bn_momentum: float = 0.99, activation: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.dilation_rate = dilation_rate
        self.separable = separable and kernel_size > 1
        self.norm = check_norm(norm)
        self.bn_momentum = bn_momentum
        self.activation = activation
        if self.separable:
            self.depthwise = keras.layers.DepthwiseConv2D(
                kernel_size, strides=strides, dilation_rate=dilation_rate, padding="same",
                use_bias=False, depthwise_initializer="he_normal", name="depthwise")
            self.depthwise_bn = make_norm(norm, "depthwise_bn", momentum=bn_momentum)
            self.conv = keras.layers.Conv2D(filters, 1, use_bias=False,
                                            kernel_initializer="he_normal", name="pointwise")
        else:
            self.conv = keras.layers.Conv2D(
                filters, kernel_size, strides=strides, dilation_rate=dilation_rate,
                padding="same", use_bias=False, kernel_initializer="he_normal", name="conv")
        self.bn = make_norm(norm, "bn", momentum=bn_momentum)

    def build(self, input_shape):
        if self.separable:
            self.depthwise.build(input_shape)
            self.depthwise_bn.build(channels_shape(input_shape[-1]))
            self.conv.build(channels_shape(input_shape[-1]))
        else:
            self.conv.build(input_shape)
        self.bn.build(channels_shape(self.filters))

    def call(self, x, training=None):
        if self.separable:
            x = self.depthwise(x)
            x = tf.nn.relu(self.depthwise_bn(x, training=training))
        x = self.bn(self.conv(x), training=training)
        return tf.nn.relu(x) if self.activation else x

    def compute_output_shape(self, input_shape):
        spatial = [None if d is None else -(-d // self.strides) for d in input_shape[1:3]]
        return (input_shape[0], *spatial, self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": self.kernel_size, "strides": self.strides,
                "dilation_rate": self.dilation_rate, "separable": self.separable,
                "norm": self.norm, "bn_momentum": self.bn_momentum,
                "activation": self.activation}


def resize_bilinear(x, size, align_corners: bool = False):
    """Bilinear resize of an NHWC tensor to `size` = (height, width) (ints or scalar tensors).

    align_corners=False is TF2 / `F.interpolate(align_corners=False)` sampling (half-pixel
    centres); True matches the PyTorch DeepLab code that upsamples with align_corners=True.
    Keeps the input dtype (tf.image.resize would return float32).
    """
    # Resized in float32, which the op outputs anyway: the XLA gradient of a float16
    # resize mixes float16 and float32 and does not compile (mixed precision with
    # train.jit_compile).
    images = tf.cast(x, tf.float32)
    if align_corners:
        out = tf.compat.v1.image.resize_bilinear(images, size, align_corners=True,
                                                 half_pixel_centers=False)
    else:
        out = tf.image.resize(images, size, method="bilinear")
    return tf.cast(out, x.dtype)


def spatial_size(x):
    """(height, width) of an NHWC tensor, as Python ints where known, else scalar tensors."""
    dynamic = tf.shape(x)
    return tuple(x.shape[i] if x.shape[i] is not None else dynamic[i] for i in (1, 2))


# ImageNet channel means in BGR order, as keras.applications' caffe-mode `preprocess_input`.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="kssl")
class CaffePreprocess(keras.layers.Layer):
    """RGB [0, 255] -> BGR minus the ImageNet mean (keras.applications ResNet input).

    Always computes in float32 (also under a mixed policy): the next layer casts.
    """

    def __init__(self, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)

    def call(self, images):
        bgr = tf.reverse(tf.cast(images, "float32"), axis=[-1])
        return bgr - tf.constant(CAFFE_BGR_MEAN, "float32")

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="kssl")
class ScalePreprocess(keras.layers.Layer):
    """RGB [0, 255] -> [-1, 1] (x / 127.5 - 1), for networks trained from scratch."""

    def __init__(self, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)

    def call(self, images):
        return tf.cast(images, "float32") / 127.5 - 1.0

    def compute_output_shape(self, input_shape):
        return input_shape
