"""Strong photometric augmentation of (mixed) images: colour jitter and Gaussian blur.

Images are float RGB in [0, 255], the kssl convention; targets are never touched. The ops
follow the ClassMix code's strong transform (kornia of 2020): colour jitter with an additive
brightness offset, a multiplicative contrast factor, an HSV saturation factor and an HSV hue
shift (a fraction of the colour circle), the four in a random order, each clamped to the
valid range; then a Gaussian blur with one sigma for the batch and a kernel of about 10% of each side.

Keras's RandomColorJitter / RandomGaussianBlur are not used: their contrast blends with
the mean and their brightness is relative to the value range (different ops), and their
stateful seed generators would draw different values on each replica. Here every draw is
stateless and keyed by step and global example index (`kssl.augment.seeds`).
"""

from __future__ import annotations


import tensorflow as tf

from kssl.augment import seeds

# Random streams of one step (see seeds.step_seed); distinct from the callers' streams
# because the caller passes in a seed already folded with its own stream.
_JITTER_COIN, _JITTER_FACTORS, _JITTER_ORDER, _BLUR_COIN, _BLUR_SIGMA = range(5)


def _clip01(x):
    return tf.clip_by_value(x, 0.0, 1.0)


def _adjust_saturation(images, factor):
    hsv = tf.image.rgb_to_hsv(images)
    h, s, v = tf.unstack(hsv, axis=-1)
    return tf.image.hsv_to_rgb(tf.stack([h, _clip01(s * factor), v], axis=-1))


def _adjust_hue(images, shift):
    hsv = tf.image.rgb_to_hsv(images)
    h, s, v = tf.unstack(hsv, axis=-1)
    # `shift` is a fraction of the colour circle, as TF stores hue. kornia 0.3's ColorJitter
    # (the released code) draws its hue factor from U(-hue, hue) and multiplies it by 2*pi
    # before shifting hue in radians: the same fraction of the circle.
    h = tf.math.floormod(h + shift, 1.0)
    return tf.image.hsv_to_rgb(tf.stack([h, s, v], axis=-1))


def color_jitter(images, seed, brightness=0.25, contrast=0.25, saturation=0.25, hue=0.25):
    """Per-image colour jitter of [0, 1] images [B, H, W, 3], ops in a random order.

    brightness: offset ~ U(-b, b) added; contrast: factor ~ U(1 - c, 1 + c) multiplied;
    saturation: HSV S times ~ U(1 - s, 1 + s); hue: HSV H shifted by ~ U(-h, h) of the
    colour circle.
    The order of the four ops is drawn once per batch (as kornia's ColorJitter per call).
    """
    batch = tf.shape(images)[0]
    factors = seeds.per_example_uniform(
        tf.random.experimental.stateless_fold_in(seed, _JITTER_FACTORS), batch, (4,),
        -1.0, 1.0)[:, None, None, :]  # [B, 1, 1, 4] in [-1, 1)
    ops = [
        lambda x: _clip01(x + brightness * factors[..., 0:1]),
        lambda x: _clip01(x * (1.0 + contrast * factors[..., 1:2])),
        lambda x: _adjust_saturation(x, 1.0 + saturation * factors[..., 2]),
        lambda x: _adjust_hue(x, hue * factors[..., 3]),
    ]
    order = tf.argsort(seeds.batch_uniform(
        tf.random.experimental.stateless_fold_in(seed, _JITTER_ORDER), (4,)))
    for position in range(4):
        branches = [lambda op=op, x=images: op(x) for op in ops]
        images = tf.switch_case(order[position], branches)
        images = tf.ensure_shape(images, [None, None, None, 3])
    return images


def blur_kernel_size(size, fraction=0.1) -> tf.Tensor:
    """`fraction` of a side, rounded down, forced odd (at 0.1: 33 for 321, 51 for 512,
    103 for 1024, as the ClassMix code)."""
    k = tf.cast(tf.cast(size, tf.float32) * fraction, tf.int32)
    return k + 1 - k % 2


def gaussian_blur(images, sigma, kernel_height, kernel_width):
    """Separable Gaussian blur [B, H, W, C] with one sigma, reflect padding."""
    channels = images.shape[-1]

    def kernel(size):
        x = tf.cast(tf.range(size), tf.float32) - tf.cast(size - 1, tf.float32) / 2.0
        g = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
        return g / tf.reduce_sum(g)

    kh, kw = kernel(kernel_height), kernel(kernel_width)
    pad_h, pad_w = kernel_height // 2, kernel_width // 2
    x = tf.pad(images, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]], mode="REFLECT")
    x = tf.nn.depthwise_conv2d(x, tf.tile(kh[:, None, None, None], [1, 1, channels, 1]),
                               [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(x, tf.tile(kw[None, :, None, None], [1, 1, channels, 1]),
                                  [1, 1, 1, 1], "VALID")


class StrongAugment:
    """Colour jitter (probability 0.8) then Gaussian blur (probability 0.5) on images.

    Args:
      jitter_probability, blur_probability: chance of applying each op.
      brightness, contrast, saturation, hue: jitter strengths (see `color_jitter`).
      sigma_range: the blur sigma, drawn once per batch.
      kernel_fraction: blur kernel side as a fraction of the image side (forced odd).
      per_image: toss the two coins per image; the released code tosses one per batch
        (the default), so a whole batch is jittered or not.
    Called as `augment(images, seed)` with [0, 255] RGB images and a stateless seed pair.
    """

    def __init__(self, jitter_probability=0.8, blur_probability=0.5, brightness=0.25,
                 contrast=0.25, saturation=0.25, hue=0.25, sigma_range=(0.15, 1.15),
                 kernel_fraction=0.1, per_image=False):
        self.jitter_probability = jitter_probability
        self.blur_probability = blur_probability
        self.jitter = dict(brightness=brightness, contrast=contrast, saturation=saturation,
                           hue=hue)
        self.sigma_range = tuple(sigma_range)
        self.kernel_fraction = kernel_fraction
        self.per_image = per_image

    def _maybe(self, op, images, probability, seed):
        """`op(images)` with the given probability, per batch or per image."""
        if probability <= 0:
            return images
        if probability >= 1:
            return op(images)
        if self.per_image:
            coins = seeds.per_example_uniform(seed, tf.shape(images)[0])
            return tf.where((coins < probability)[:, None, None, None], op(images), images)
        coin = seeds.batch_uniform(seed)
        return tf.cond(coin < probability, lambda: op(images), lambda: images)

    def _blur(self, images, seed):
        sigma = seeds.batch_uniform(seed, (), *self.sigma_range)
        size = tf.shape(images)[1:3]
        kh = blur_kernel_size(size[0], self.kernel_fraction)
        kw = blur_kernel_size(size[1], self.kernel_fraction)
        return gaussian_blur(images, sigma, kh, kw)

    def __call__(self, images, seed):
        dtype = images.dtype
        x = tf.cast(images, tf.float32) / 255.0
        fold = tf.random.experimental.stateless_fold_in
        x = self._maybe(lambda y: color_jitter(y, seed, **self.jitter), x,
                        self.jitter_probability, fold(seed, _JITTER_COIN))
        x = self._maybe(lambda y: self._blur(y, fold(seed, _BLUR_SIGMA)), x,
                        self.blur_probability, fold(seed, _BLUR_COIN))
        return tf.cast(x * 255.0, dtype)
