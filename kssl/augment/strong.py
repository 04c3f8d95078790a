"""Strong photometric augmentation of (mixed) images: colour jitter, Gaussian blur and
the other photometric ops of the released codes' strong views.

Three strong views live here: `StrongAugment` (the ClassMix code's, described below),
`ColorJitterGrayscaleBlur` (the UniMatch / FixMatch code's) and `OneOfPhotometric` (the
MKD code's), the last two described in their docstrings.

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

import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from kssl.augment import randaugment, seeds

# Random streams of one step (see seeds.step_seed); distinct from the callers' streams
# because the caller passes in a seed already folded with its own stream.
_JITTER_COIN, _JITTER_FACTORS, _JITTER_ORDER, _BLUR_COIN, _BLUR_SIGMA = range(5)
# OneOfPhotometric's streams, folded into the seed it is called with.
_ONE_OF_CHOICE, _ONE_OF_JITTER_FACTORS, _ONE_OF_JITTER_ORDER, _ONE_OF_BLUR = range(4)

# OneOfPhotometric's ops, in the order its weights are given.
PHOTOMETRIC_OPS = ("jitter", "blur", "equalize", "solarize", "grayscale")
# The MKD code's albumentations SomeOf(n=1) over the five ops with these p values: one op
# per image, chosen with probability proportional to them.
MKD_CODE_OP_WEIGHTS = (0.3, 0.5, 0.1, 0.1, 0.5)


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


def _per_image(flags):
    """[B] -> [B, 1, 1, 1], to select whole images with tf.where."""
    return flags[:, None, None, None]


def gaussian_blur_per_image(images, sigma, radius: int):
    """Separable Gaussian blur of [B, H, W, C] images with one sigma per image [B].

    The kernel has taps -radius..radius (normalised to sum 1); beyond the border the edge
    pixel repeats, as in PIL's blur.
    """
    sigma = tf.reshape(tf.cast(sigma, tf.float32), [-1, 1])
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)[None, :]
    weights = tf.exp(-tf.square(offsets) / (2.0 * tf.square(sigma)))
    weights = weights / tf.reduce_sum(weights, axis=1, keepdims=True)  # [B, 2r + 1]

    def blur_axis(x, axis):
        size = tf.shape(x)[axis]
        # Edge padding by a clamped gather (tf.pad has no edge mode).
        index = tf.clip_by_value(tf.range(-radius, size + radius), 0, size - 1)
        padded = tf.gather(x, index, axis=axis)
        total = tf.zeros_like(x)
        for tap in range(2 * radius + 1):
            window = (padded[:, tap:tap + size] if axis == 1
                      else padded[:, :, tap:tap + size])
            total += tf.reshape(weights[:, tap], [-1, 1, 1, 1]) * window
        return total

    return blur_axis(blur_axis(tf.cast(images, tf.float32), 1), 2)


class ColorJitterGrayscaleBlur:
    """The strong view of the UniMatch / FixMatch released code, per image.

    torchvision on PIL images there; here batched ops on float [0, 255] RGB:
    - with probability `jitter_probability` (0.8), colour jitter: brightness, contrast and
      saturation factors ~ U[1 - s, 1 + s] (0.5 each: PIL's ImageEnhance, a blend with
      black, with the mean grey level, with the grey image) and a hue shift ~ U[-h, h]
      (0.25) of the colour circle, the four in a random order drawn per image (torchvision
      draws a permutation per call, i.e. per image);
    - with probability `grayscale_probability` (0.2), the ITU-R 601-2 luma on all three
      channels;
    - with probability `blur_probability` (0.5), a Gaussian blur with sigma ~ U(0.1, 2.0)
      per image (PIL's `GaussianBlur(radius=sigma)`; PIL approximates the Gaussian by
      three box blurs, here it is exact up to 3 sigma).
    PIL rounds to 8 bits after every op and takes the contrast mean as an integer; here
    pixels stay floats. Called as `augment(images, seed)` with a stateless seed pair;
    every draw is keyed by global example index (`kssl.augment.seeds`).
    """

    def __init__(self, jitter_probability=0.8, brightness=0.5, contrast=0.5, saturation=0.5,
                 hue=0.25, grayscale_probability=0.2, blur_probability=0.5,
                 sigma_range=(0.1, 2.0)):
        self.jitter_probability = jitter_probability
        self.strengths = (brightness, contrast, saturation, hue)
        self.grayscale_probability = grayscale_probability
        self.blur_probability = blur_probability
        self.sigma_range = tuple(sigma_range)

    def jitter(self, images, factors, order):
        """Brightness, contrast, saturation and hue with per-image `factors` [B, 4] in
        [-1, 1) (scaled by the strengths), applied in the per-image `order` [B, 4]."""
        b, c, s, h = self.strengths
        ops = [lambda x: randaugment.brightness(x, 1.0 + b * factors[:, 0]),
               lambda x: randaugment.contrast(x, 1.0 + c * factors[:, 1]),
               lambda x: randaugment.color(x, 1.0 + s * factors[:, 2]),
               lambda x: 255.0 * _adjust_hue(_clip01(x / 255.0),
                                             h * factors[:, 3, None, None])]
        for position in range(4):
            chosen = order[:, position][:, None, None, None]
            out = images
            for index, op in enumerate(ops):
                out = tf.where(tf.equal(chosen, index), op(images), out)
            images = out
        return images

    def __call__(self, images, seed):
        dtype = images.dtype
        x = tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 255.0)
        batch = tf.shape(x)[0]
        # Columns: jitter coin, 4 jitter factors, 4 order keys, grey coin, blur coin, sigma.
        u = seeds.per_example_uniform(seed, batch, (12,))
        order = tf.argsort(u[:, 5:9], axis=1)
        jittered = self.jitter(x, 2.0 * u[:, 1:5] - 1.0, order)
        x = tf.where(_per_image(u[:, 0] < self.jitter_probability), jittered, x)
        grey = tf.reduce_sum(x * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)
        x = tf.where(_per_image(u[:, 9] < self.grayscale_probability),
                     tf.broadcast_to(grey, tf.shape(x)), x)
        low, high = self.sigma_range
        sigma = low + (high - low) * u[:, 11]
        radius = max(1, int(math.ceil(3.0 * high)))
        blurred = gaussian_blur_per_image(x, sigma, radius)
        x = tf.where(_per_image(u[:, 10] < self.blur_probability), blurred, x)
        return tf.cast(x, dtype)


class OneOfPhotometric:
    """The MKD code's strong view: one photometric op per image, drawn from
    `PHOTOMETRIC_OPS`.

    The ops (float RGB in [0, 255]; targets are never touched):
      jitter: brightness (x * f), contrast (blend with the mean grey) and saturation (blend
        with the grey image), each f ~ U(1 - s, 1 + s) per image, and a hue rotation
        ~ U(-hue, hue) of the colour circle, the four in a random order per batch
        (albumentations' ColorJitter(0.5, 0.5, 0.5, 0.25) shuffles per image);
      blur: Gaussian, kernel side drawn from `blur_kernel_sizes` and sigma from
        `blur_sigma_range`, once per batch (albumentations draws per image);
      equalize: per-channel histogram equalisation (PIL's table; the code uses OpenCV's);
      solarize: pixels >= `solarize_threshold` inverted;
      grayscale: ITU-R 601 luma on all three channels.
    Args:
      weights: relative chances of the five ops. Default: the MKD code's p values
        (SomeOf picks in proportion to them: 20, 33, 7, 7, 33 %); (1, 1, 1, 1, 1) is the
        MKD paper's "randomly select an operator".
    Called as `augment(images, seed)` with a stateless seed pair; draws are keyed by global
    example index (`kssl.augment.seeds`), so they do not depend on the replica count.
    """

    def __init__(self, weights: Sequence[float] = MKD_CODE_OP_WEIGHTS,
                 brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25,
                 blur_kernel_sizes: Sequence[int] = (3, 5, 7),
                 blur_sigma_range=(0.1, 2.0), solarize_threshold=128.0):
        weights = np.asarray(weights, np.float64)
        if (weights.shape != (len(PHOTOMETRIC_OPS),) or (weights < 0).any()
                or weights.sum() <= 0):
            raise ValueError(f"strong op weights must be {len(PHOTOMETRIC_OPS)} non-negative "
                             f"numbers (for {', '.join(PHOTOMETRIC_OPS)}), got "
                             f"{list(weights)}")
        if any(k < 1 or k % 2 == 0 for k in blur_kernel_sizes):
            raise ValueError(f"blur kernel sizes must be odd, got {list(blur_kernel_sizes)}")
        self.probabilities = weights / weights.sum()
        self.jitter_strength = (brightness, contrast, saturation, hue)
        self.blur_kernel_sizes = tuple(int(k) for k in blur_kernel_sizes)
        self.blur_sigma_range = tuple(blur_sigma_range)
        self.solarize_threshold = float(solarize_threshold)

    def choose(self, seed, batch) -> tf.Tensor:
        """int32 [batch]: the index into `PHOTOMETRIC_OPS` of each image's op."""
        draws = seeds.per_example_uniform(
            tf.random.experimental.stateless_fold_in(seed, _ONE_OF_CHOICE), batch)
        bounds = tf.constant(np.cumsum(self.probabilities)[:-1], tf.float32)
        return tf.reduce_sum(tf.cast(draws[:, None] >= bounds[None, :], tf.int32), axis=1)

    def _jitter(self, images, seed):
        fold = tf.random.experimental.stateless_fold_in
        b, c, s, h = self.jitter_strength
        u = seeds.per_example_uniform(fold(seed, _ONE_OF_JITTER_FACTORS),
                                      tf.shape(images)[0], (4,), -1.0, 1.0)
        ops = [lambda x: randaugment.brightness(x, 1.0 + b * u[:, 0]),
               lambda x: randaugment.contrast(x, 1.0 + c * u[:, 1]),
               lambda x: randaugment.color(x, 1.0 + s * u[:, 2]),
               lambda x: 255.0 * _adjust_hue(_clip01(x / 255.0), h * u[:, 3, None, None])]
        order = tf.argsort(seeds.batch_uniform(fold(seed, _ONE_OF_JITTER_ORDER), (4,)))
        for position in range(4):
            images = tf.switch_case(order[position],
                                    [lambda op=op, x=images: op(x) for op in ops])
            images = tf.ensure_shape(images, [None, None, None, 3])
        return images

    def _blur(self, images, seed):
        draws = seeds.batch_uniform(
            tf.random.experimental.stateless_fold_in(seed, _ONE_OF_BLUR), (2,))
        sizes = tf.constant(self.blur_kernel_sizes, tf.int32)
        count = len(self.blur_kernel_sizes)
        size = sizes[tf.minimum(tf.cast(draws[0] * count, tf.int32), count - 1)]
        low, high = self.blur_sigma_range
        return gaussian_blur(images, low + (high - low) * draws[1], size, size)

    def __call__(self, images, seed):
        dtype = images.dtype
        x = tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 255.0)
        choice = self.choose(seed, tf.shape(x)[0])
        ops = {"jitter": lambda y: self._jitter(y, seed),
               "blur": lambda y: self._blur(y, seed),
               "equalize": randaugment.equalize,
               "solarize": lambda y: randaugment.solarize(y, self.solarize_threshold),
               "grayscale": lambda y: randaugment.color(y, tf.zeros(tf.shape(y)[:1]))}
        for index, name in enumerate(PHOTOMETRIC_OPS):
            if self.probabilities[index] == 0:
                continue
            selected = tf.equal(choice, index)
            # Each image runs its own op once; an op no image drew is skipped.
            x = tf.cond(tf.reduce_any(selected),
                        lambda op=ops[name], x=x, selected=selected:
                        tf.where(selected[:, None, None, None], op(x), x),
                        lambda x=x: x)
            x = tf.ensure_shape(x, images.shape)
        return tf.cast(x, dtype)
