"""RandAugment + Cutout with coordinate maps, as batched tensor ops ("A" and "B").

The three-stage self-training method (Ke et al., "A Three-Stage Self-Training Framework
for Semi-Supervised Semantic Segmentation") trains the student on strongly augmented
images:

- A, the strong augmentation of the image: for every image, `num_ops` ops drawn with
  replacement from 14 (Identity, AutoContrast, Equalize, Rotate, Solarize, Color,
  Contrast, Brightness, Sharpness, ShearX, TranslateX, TranslateY, Posterize, ShearY),
  each applied with probability 0.5 at a level drawn from 1..9; then Cutout, `cutout_count`
  mid-grey squares of side `cutout_size` at uniformly random centres, always applied.
- B, its geometric part, carried over to the targets: alongside the image a map of
  source pixel coordinates (row, col) goes through the same geometric ops (Rotate, Shear,
  Translate), so a target map (labels, teacher probabilities) can be warped to the
  augmented image with `warp_labels`. Pixels that came from outside the image have
  coordinates -1; they are mid-grey in the image and `ignore_label` in warped labels.
  Photometric ops and Cutout never touch the coordinates: the student must predict what
  Cutout hides.

Everything runs on the whole batch inside a compiled train step; every per-example draw
comes from `seeds.per_example_uniform`, so an example's augmentation depends only on the
seed and its global index in the batch.

Geometric ops follow PIL's affine transform, as the released code calls it: output pixel
(row i, col j) samples the source point M @ (j + 0.5, i + 0.5, 1) (pixel centres), taking
the pixel that contains it (nearest), so that each op's matrix is the tuple the released
code hands to PIL. They are applied one at a time, in the drawn order, to the image and
the coordinate map with the same gather, so the coordinates describe exactly where each
output pixel came from (composing the affines and resampling once could differ by a
pixel from sequential nearest resampling, which is what the released code does). Source
points are computed in double precision, as PIL does for the released code's uint16 index
maps (mode I;16): the coordinates equal those maps exactly, exact ties included.

Deviations from the released code (`randaugment_seg.py` / `apply_rand.py`):

- PIL resamples the RGBA image itself in 16.16 fixed point, so at an exact tie between
  two source pixels (e.g. ShearX at level 4 in every 25th row) the released image can be
  a pixel off its own index maps; here image and coordinates use the same gather.
- The released code turns each image into uint8 (truncating) and back; here ops work
  directly on float [0, 255] pixels. Ops defined on integer levels (Equalize, Posterize)
  use the floor of each pixel; blends (Color, Contrast, Brightness, Sharpness) and
  AutoContrast are not rounded to integers, nor is the Contrast mean, so results on
  integer images are within about one grey level of PIL's (1.4 at most in the tests).
- Pixels from outside the image are black to the photometric ops that follow (as PIL's
  transparent pixels are, e.g. to Equalize's histogram), and always mid-grey at the end.
  In the released code, AutoContrast, Equalize, Solarize and Posterize go through RGB
  and make those pixels opaque again (they then keep their processed colour although
  their label is ignored), and blends can make them partly opaque; that quirk is not
  reproduced.
- Cutout squares are exactly `cutout_size` wide (rows c - size // 2 .. c - size // 2 +
  size - 1), clipped at the borders; the released code covers c - size // 2 .. c + size // 2
  - 1, the same for even sizes (32 there).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import tensorflow as tf

from kssl.augment import seeds

# The op list in the released code's order; op indices refer to it.
OPS = ("Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "TranslateX", "TranslateY", "Posterize",
       "ShearY")
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
_OP_INDEX = {name: i for i, name in enumerate(OPS)}

# Random streams, folded into the caller's seed.
_OP_CHOICE, _LEVEL, _COIN, _SIGN, _CUTOUT = range(5)

# ITU-R 601-2 luma, as PIL's convert("L").
_LUMA = (0.299, 0.587, 0.114)


class Policy(NamedTuple):
    """Per-example draws of one call; the slot axis runs over the `num_ops` ops in order.

    ops: int32 [B, N], indices into `OPS`. levels: int32 [B, N] in 1..max_level.
    applied: bool [B, N]. signs: float32 [B, N] of +-1 (geometric ops' direction).
    cutout: float32 [B, K, 2] in [0, 1): Cutout centres as fractions of (height, width).
    """
    ops: tf.Tensor
    levels: tf.Tensor
    applied: tf.Tensor
    signs: tf.Tensor
    cutout: tf.Tensor


def identity_coords(batch, height, width) -> tf.Tensor:
    """int32 [B, H, W, 2]: every pixel's own (row, col)."""
    rows, cols = tf.meshgrid(tf.range(height), tf.range(width), indexing="ij")
    grid = tf.stack([rows, cols], axis=-1)
    return tf.tile(grid[None], tf.stack([batch, 1, 1, 1]))


def _flat_index(coords, height, width):
    """Index into a [B * H * W, ...] reshape for source coords [B, H', W', 2] (clamped)."""
    batch = tf.shape(coords)[0]
    rows = tf.clip_by_value(coords[..., 0], 0, height - 1)
    cols = tf.clip_by_value(coords[..., 1], 0, width - 1)
    examples = tf.reshape(tf.range(batch), [-1, 1, 1])
    return (examples * height + rows) * width + cols


def warp_labels(labels, coords, ignore_label=255) -> tf.Tensor:
    """Label maps [B, H, W] (or [B, H, W, ...]) gathered at coords [B, H, W, 2].

    Pixels whose coordinates are -1 (outside the image) get `ignore_label`. Any dtype
    (integer labels, float probabilities); the result has labels' dtype.
    """
    labels = tf.convert_to_tensor(labels)
    coords = tf.convert_to_tensor(coords, tf.int32)
    shape = tf.shape(labels)
    flat = tf.reshape(labels, tf.concat([[-1], shape[3:]], 0))
    gathered = tf.gather(flat, _flat_index(coords, shape[1], shape[2]))
    valid = coords[..., 0] >= 0
    valid = tf.reshape(valid, tf.concat([tf.shape(valid), tf.ones_like(shape[3:])], 0))
    return tf.where(valid, gathered, tf.cast(ignore_label, labels.dtype))


# ---------------------------------------------------------------------------------------
# Photometric ops on float [B, H, W, 3] images in [0, 255]; parameters are per image [B].

def _per_image(value):
    return tf.reshape(tf.cast(value, tf.float32), [-1, 1, 1, 1])


def _clip(x):
    return tf.clip_by_value(x, 0.0, 255.0)


def _grey(images):
    return tf.reduce_sum(images * tf.constant(_LUMA), axis=-1, keepdims=True)


def autocontrast(images) -> tf.Tensor:
    """Per-channel stretch of [min, max] to [0, 255] (PIL's autocontrast, cutoff 0);
    constant channels are left alone."""
    lo = tf.reduce_min(images, axis=[1, 2], keepdims=True)
    hi = tf.reduce_max(images, axis=[1, 2], keepdims=True)
    stretch = hi > lo
    scale = 255.0 / tf.where(stretch, hi - lo, 1.0)
    return tf.where(stretch, _clip((images - lo) * scale), images)


def equalize(images) -> tf.Tensor:
    """Per-channel histogram equalisation with PIL's lookup table.

    PIL: step = (pixels - count of the highest non-empty bin) // 255; lut[i] =
    (step // 2 + pixels below level i) // step; a channel with step 0 is left alone.
    Levels are the floor of the pixel values.
    """
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    levels = tf.cast(tf.floor(_clip(images)), tf.int32)
    channel = tf.reshape(tf.range(3), [1, 1, 1, 3])
    example = tf.reshape(tf.range(batch), [-1, 1, 1, 1])
    bins = (example * 3 + channel) * 256 + levels  # [B, H, W, 3] into B * 3 * 256 bins
    hist = tf.math.unsorted_segment_sum(tf.ones_like(bins), bins, batch * 3 * 256)
    hist = tf.reshape(hist, [batch, 3, 256])
    last = 255 - tf.argmax(tf.reverse(tf.cast(hist > 0, tf.int32), [-1]), axis=-1,
                           output_type=tf.int32)
    last_count = tf.gather(hist, last, batch_dims=2)  # [B, 3]
    step = (height * width - last_count) // 255
    below = tf.cumsum(hist, axis=-1, exclusive=True)
    lut = tf.minimum((step[..., None] // 2 + below) // tf.maximum(step, 1)[..., None], 255)
    equalized = tf.cast(tf.gather(tf.reshape(lut, [-1]), bins), images.dtype)
    return tf.where((step > 0)[:, None, None, :], equalized, images)


def solarize(images, threshold) -> tf.Tensor:
    """Pixels >= threshold (per image) are inverted (255 - x)."""
    return tf.where(images >= _per_image(threshold), 255.0 - images, images)


def posterize(images, bits) -> tf.Tensor:
    """Keeps the top `bits` bits (per image) of each pixel's integer level."""
    quantum = _per_image(tf.bitwise.left_shift(1, 8 - tf.cast(bits, tf.int32)))
    return tf.floor(_clip(images) / quantum) * quantum


def _blend(degenerate, images, factor):
    """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped."""
    return _clip(degenerate + _per_image(factor) * (images - degenerate))


def color(images, factor) -> tf.Tensor:
    """Saturation: blend with the greyscale image."""
    return _blend(_grey(images), images, factor)


def contrast(images, factor) -> tf.Tensor:
    """Blend with the image's mean grey level."""
    mean = tf.reduce_mean(_grey(images), axis=[1, 2, 3], keepdims=True)
    return _blend(mean, images, factor)


def brightness(images, factor) -> tf.Tensor:
    """Blend with black."""
    return _blend(tf.zeros_like(images), images, factor)


def sharpness(images, factor) -> tf.Tensor:
    """Blend with PIL's SMOOTH filter (3x3, [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13) of the
    image; as in PIL the filter leaves the one-pixel border unchanged."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(images, kernel, [1, 1, 1, 1], "VALID")
    smooth = tf.pad(smooth, [[0, 0], [1, 1], [1, 1], [0, 0]])
    shape = tf.shape(images)
    rows = tf.range(shape[1])[:, None]
    cols = tf.range(shape[2])[None, :]
    interior = ((rows > 0) & (rows < shape[1] - 1) & (cols > 0) & (cols < shape[2] - 1))
    smooth = tf.where(interior[None, :, :, None], smooth, images)
    return _blend(smooth, images, factor)


def _enhance_factor(level):
    # The released code's float_parameter(level, 1.8) + 0.1, in double like Python.
    return tf.cast(tf.cast(level, tf.float64) * 1.8 / 10.0 + 0.1, tf.float32)


# op name -> fn(images, level [B]); integer parameters as the released code's
# int_parameter(level, max) = int(level * max / 10), computed exactly in integers.
_PHOTOMETRIC = {
    "AutoContrast": lambda x, level: autocontrast(x),
    "Equalize": lambda x, level: equalize(x),
    "Solarize": lambda x, level: solarize(x, 256 - (level * 256) // 10),
    "Posterize": lambda x, level: posterize(x, 4 - (level * 4) // 10),
    "Color": lambda x, level: color(x, _enhance_factor(level)),
    "Contrast": lambda x, level: contrast(x, _enhance_factor(level)),
    "Brightness": lambda x, level: brightness(x, _enhance_factor(level)),
    "Sharpness": lambda x, level: sharpness(x, _enhance_factor(level)),
}


# ---------------------------------------------------------------------------------------
# Geometric ops: PIL affine data (a, b, c, d, e, f) per image, float64 [B, 6]; the output
# point (x, y) samples the source point (a x + b y + c, d x + e y + f).

def _rotation_table(max_level):
    """PIL's rotate matrix entries (rounded to 15 places as PIL does) for int(3 * level)
    degrees counter-clockwise, indexed by level; computed in Python with math.cos /
    math.sin, as PIL computes them, so the matrices match the released code's."""
    cos, sin = [], []
    for level in range(max_level + 1):
        angle = -math.radians((level * 30) // 10)
        cos.append(round(math.cos(angle), 15))
        sin.append(round(math.sin(angle), 15))
    return cos, sin


def _affine(name, level, sign, height, width, rotation_table):
    """The affine data of op `name` at the given per-image levels and signs."""
    level = tf.cast(level, tf.float64)
    sign = tf.cast(sign, tf.float64)
    zero, one = tf.zeros_like(level), tf.ones_like(level)
    if name == "Rotate":
        # PIL's Image.rotate(degrees), no expand: about (W / 2, H / 2), angle = -degrees.
        cos_table, sin_table = rotation_table
        index = tf.cast(level, tf.int32)
        cos = tf.gather(tf.constant(cos_table, tf.float64), index)
        # sin(-angle) = -sin(angle): the sign flips b and d only.
        sin = sign * tf.gather(tf.constant(sin_table, tf.float64), index)
        a, b, d, e = cos, sin, -sin, cos
        cx = tf.cast(width, tf.float64) / 2.0
        cy = tf.cast(height, tf.float64) / 2.0
        c = a * -cx + b * -cy + cx
        f = d * -cx + e * -cy + cy
        return tf.stack([a, b, c, d, e, f], axis=-1)
    if name in ("ShearX", "ShearY"):
        shear = sign * (level * 0.3 / 10.0)  # float_parameter(level, 0.3)
        if name == "ShearX":
            return tf.stack([one, shear, zero, zero, one, zero], axis=-1)
        return tf.stack([one, zero, zero, shear, one, zero], axis=-1)
    if name in ("TranslateX", "TranslateY"):
        shift = sign * level  # int_parameter(level, 10): whole pixels
        if name == "TranslateX":
            return tf.stack([one, zero, shift, zero, one, zero], axis=-1)
        return tf.stack([one, zero, zero, zero, one, shift], axis=-1)
    raise ValueError(f"not a geometric op: {name}")


def source_pixels(affine, height, width) -> tf.Tensor:
    """int32 [B, H, W, 2]: the (row, col) each output pixel samples under PIL affine data
    [B, 6] with nearest resampling; -1 where the source point lies outside the image."""
    cols = tf.cast(tf.range(width), tf.float64)[None, None, :] + 0.5
    rows = tf.cast(tf.range(height), tf.float64)[None, :, None] + 0.5
    a, b, c, d, e, f = tf.unstack(affine[:, :, None, None], axis=1)
    x = tf.floor(a * cols + b * rows + c)
    y = tf.floor(d * cols + e * rows + f)
    inside = ((x >= 0) & (x < tf.cast(width, tf.float64)) &
              (y >= 0) & (y < tf.cast(height, tf.float64)))
    src = tf.cast(tf.stack([tf.where(inside, y, -1.0), tf.where(inside, x, -1.0)], -1),
                  tf.int32)
    return src


def _resample(images, coords, affine):
    """Images and coordinate maps resampled by the same per-image affine (one gather).
    Pixels from outside the image become black (PIL's transparent black) and -1."""
    shape = tf.shape(images)
    height, width = shape[1], shape[2]
    src = source_pixels(affine, height, width)
    index = _flat_index(src, height, width)
    inside = src[..., :1] >= 0
    # One gather for both: coordinates are exact in float32 below 2 ** 24.
    both = tf.concat([images, tf.cast(coords, tf.float32)], axis=-1)
    both = tf.gather(tf.reshape(both, [-1, 5]), index)
    images = tf.where(inside, both[..., :3], 0.0)
    coords = tf.where(inside, tf.cast(both[..., 3:], tf.int32), -1)
    return images, coords


# ---------------------------------------------------------------------------------------

def cutout_mask(centres, size, height, width) -> tf.Tensor:
    """bool [B, H, W]: the union of squares of side `size` at centres [B, K, 2] (float
    fractions of height and width), top-left corner at centre - size // 2, clipped."""
    top = tf.cast(tf.floor(centres[..., 0] * tf.cast(height, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(centres[..., 1] * tf.cast(width, tf.float32)), tf.int32)
    top, left = top - size // 2, left - size // 2  # [B, K]
    rows = tf.range(height)[None, None, :]
    cols = tf.range(width)[None, None, :]
    in_rows = (rows >= top[..., None]) & (rows < top[..., None] + size)  # [B, K, H]
    in_cols = (cols >= left[..., None]) & (cols < left[..., None] + size)  # [B, K, W]
    return tf.reduce_any(in_rows[:, :, :, None] & in_cols[:, :, None, :], axis=1)


class RandAugmentCutout:
    """The strong augmentation "A" of three-stage self-training, with coordinate maps "B".

    Args:
      num_ops: ops drawn per image, with replacement.
      probability: chance of applying each drawn op.
      max_level: levels are drawn uniformly from 1..max_level (the released code: 9; at
        most 10, the level of each op's full strength).
      cutout_size, cutout_count: side and number of the Cutout squares (0 count: none).
      ops: names from `OPS` to draw from (default all 14).
      fill: the grey of Cutout and of pixels from outside the image.
      skip_unused: run an op (or a slot's resampling) only when some image of the batch
        uses it in that slot (a `tf.cond` each); about 3x faster on CPU. False computes
        every op for the whole batch and selects per image, which avoids the conds' host
        round trips on accelerators.
    Called as `augment(images, seed)` with float [0, 255] RGB images [B, H, W, 3] (values
    outside are clipped) and a stateless seed pair; returns (augmented images,
    coords int32 [B, H, W, 2]).
    """

    def __init__(self, num_ops=3, probability=0.5, max_level=9, cutout_size=32,
                 cutout_count=3, ops=None, fill=127.5, skip_unused=True):
        ops = tuple(OPS if ops is None else ops)
        unknown = [name for name in ops if name not in _OP_INDEX]
        if unknown or not ops:
            raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops}")
        if not 1 <= max_level <= 10:
            raise ValueError(f"max_level must be in 1..10, got {max_level}")
        self.num_ops = int(num_ops)
        self.probability = float(probability)
        self.max_level = int(max_level)
        self.cutout_size = int(cutout_size)
        self.cutout_count = int(cutout_count)
        self.ops = ops
        self.fill = float(fill)
        self.skip_unused = skip_unused
        self._rotation_table = _rotation_table(self.max_level)

    def sample_policy(self, seed, batch) -> Policy:
        """The per-example draws for a batch (keyed by global example index)."""
        fold = tf.random.experimental.stateless_fold_in
        slots = (self.num_ops,)

        def draw(stream, shape=slots):
            return seeds.per_example_uniform(fold(seed, stream), batch, shape)

        count = len(self.ops)
        choice = tf.minimum(tf.cast(draw(_OP_CHOICE) * count, tf.int32), count - 1)
        ops = tf.gather(tf.constant([_OP_INDEX[name] for name in self.ops], tf.int32),
                        choice)
        levels = 1 + tf.minimum(tf.cast(draw(_LEVEL) * self.max_level, tf.int32),
                                self.max_level - 1)
        applied = draw(_COIN) < self.probability
        # The released code negates when random() > 0.5.
        signs = tf.where(draw(_SIGN) > 0.5, -1.0, 1.0)
        cutout = draw(_CUTOUT, (self.cutout_count, 2))
        return Policy(ops, levels, applied, signs, cutout)

    def _maybe(self, run, unchanged, needed):
        """`run()` if `needed` (a scalar bool) or always, as `skip_unused` says."""
        if self.skip_unused:
            return tf.cond(needed, run, lambda: unchanged)
        return run()

    def _photometric(self, name, images, levels, selected):
        op = _PHOTOMETRIC[name]
        return self._maybe(
            lambda: tf.where(selected[:, None, None, None], op(images, levels), images),
            images, tf.reduce_any(selected))

    def apply(self, images, policy: Policy):
        """Applies a drawn policy: (augmented images, coords int32 [B, H, W, 2])."""
        images = tf.convert_to_tensor(images)
        dtype = images.dtype
        x = _clip(tf.cast(images, tf.float32))
        shape = tf.shape(x)
        batch, height, width = shape[0], shape[1], shape[2]
        coords = identity_coords(batch, height, width)
        geometric = [name for name in self.ops if name in GEOMETRIC_OPS]
        photometric = [name for name in self.ops if name in _PHOTOMETRIC]
        identity = tf.constant([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], tf.float64)
        for slot in range(self.num_ops):
            ops = policy.ops[:, slot]
            levels = policy.levels[:, slot]
            applied = policy.applied[:, slot]
            # Each image runs one op per slot, so the ops of a slot commute across images.
            if geometric:
                affine = tf.tile(identity[None], [batch, 1])
                for name in geometric:
                    selected = applied & tf.equal(ops, _OP_INDEX[name])
                    affine = tf.where(selected[:, None],
                                      _affine(name, levels, policy.signs[:, slot], height,
                                              width, self._rotation_table), affine)
                moved = tf.reduce_any(applied & tf.reduce_any(
                    tf.equal(ops[:, None], [_OP_INDEX[name] for name in geometric]), -1))
                x, coords = self._maybe(lambda x=x, coords=coords, affine=affine:
                                        _resample(x, coords, affine), (x, coords), moved)
                x = tf.ensure_shape(x, images.shape)
                coords = tf.ensure_shape(coords, images.shape[:-1] + [2])
            for name in photometric:
                selected = applied & tf.equal(ops, _OP_INDEX[name])
                x = self._photometric(name, x, levels, selected)
                x = tf.ensure_shape(x, images.shape)
        hidden = coords[..., :1] < 0
        if self.cutout_count > 0 and self.cutout_size > 0:
            hidden |= cutout_mask(policy.cutout, self.cutout_size, height, width)[..., None]
        x = tf.where(hidden, self.fill, x)
        return tf.cast(x, dtype), coords

    def __call__(self, images, seed):
        """(augmented images like `images`, coords int32 [B, H, W, 2], -1 outside)."""
        policy = self.sample_policy(seed, tf.shape(images)[0])
        return self.apply(images, policy)
