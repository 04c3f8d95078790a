"""Mask-based mixing of unlabelled images: ClassMix and box (CutMix) masks, and `mix`.

A mask is float32 [B, H, W] of 0/1. Mixing pairs example i of the batch with example i+1
(cyclically, over the *global* batch): `mixed[i] = mask[i] * a[i] + (1 - mask[i]) * a[i+1]`,
i.e. the masked region of image i is pasted on top of image i+1, as in the ClassMix code.
The same mask applied to images and to the teacher's probabilities (or logits, features)
keeps the artificial label aligned with the mixed image.

Everything is batched tensor ops (no per-example Python) and runs inside a compiled,
distributed train step; random choices come from `kssl.augment.seeds`, so they do not
depend on how the batch is split over replicas.
"""

from __future__ import annotations

import math

import tensorflow as tf

from kssl.augment import seeds


def next_in_batch(x: tf.Tensor) -> tf.Tensor:
    """x rolled by one over the global batch: row i holds global example i+1 (cyclic).

    On one replica this is `tf.roll(x, -1, axis=0)`. Split over replicas, the last row of
    replica r needs the first row of replica r+1: each replica contributes its first row
    to one all-gather (one example per replica, not the whole batch), so the pairing, and
    hence the result, equals the single-device one. No gradient is meant to flow through
    the partner (images and teacher outputs are constants of the step).
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tf.roll(x, shift=-1, axis=0)
    if x.dtype == tf.bool:  # all_gather takes numbers only
        return tf.cast(next_in_batch(tf.cast(x, tf.int32)), tf.bool)
    firsts = context.all_gather(x[:1], axis=0)  # [R, ...]: every replica's first row
    following = (context.replica_id_in_sync_group + 1) % context.num_replicas_in_sync
    return tf.concat([x[1:], tf.gather(firsts, [following])], axis=0)


def mix(mask: tf.Tensor, a: tf.Tensor, b: tf.Tensor | None = None) -> tf.Tensor:
    """`a` where the mask is 1, `b` elsewhere; `b` defaults to `next_in_batch(a)`.

    Args:
      mask: [B, H, W] of 0/1 (any dtype). Resized (nearest) to `a`'s spatial size when it
        differs, so one full-resolution mask also mixes lower-resolution features.
      a, b: [B, H', W'] or [B, H', W', C] of any dtype (images, probabilities, logits,
        features, label maps).
    Returns:
      A tensor like `a`. Exact (a selection, not a blend), so integer maps stay integer.
    """
    a = tf.convert_to_tensor(a)
    b = next_in_batch(a) if b is None else tf.convert_to_tensor(b, a.dtype)
    keep = tf.cast(mask, tf.float32)[..., None]  # [B, H, W, 1], the layout resize takes
    if not (keep.shape[1:3].is_fully_defined() and keep.shape[1:3] == a.shape[1:3]):
        # Nearest resizing to an equal size is the identity, so a dynamic shape is safe.
        keep = tf.image.resize(keep, tf.shape(a)[1:3], method="nearest")
    if a.shape.rank == 3:
        keep = keep[..., 0]
    return tf.where(keep > 0.5, a, b)


def present_classes(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
    """Which classes each image holds: bool [B, C], True where some pixel of `labels[i]`
    (int [B, H, W]) has class c. Values outside [0, C) count for no class."""
    labels = tf.cast(labels, tf.int32)
    batch = tf.shape(labels)[0]
    flat = tf.reshape(labels, [batch, -1])
    # A segment max rather than tf.math.bincount, whose output size depends on the values
    # and so cannot be compiled with XLA (train.jit_compile). Values outside [0, C) land
    # in a spare column that is dropped.
    column = tf.where((flat >= 0) & (flat < num_classes), flat, num_classes)
    segments = column + (num_classes + 1) * tf.range(batch)[:, None]
    hits = tf.math.unsorted_segment_max(tf.ones_like(segments), segments,
                                        batch * (num_classes + 1))
    return tf.reshape(hits, [batch, num_classes + 1])[:, :num_classes] > 0


def class_mix_masks(labels: tf.Tensor, num_classes: int, scores: tf.Tensor) -> tf.Tensor:
    """ClassMix masks: for each image, the pixels of half of its classes.

    For image i with n_i distinct classes in `labels[i]` (the teacher's argmax on the
    unmixed image), floor(n_i / 2) of them are chosen uniformly without replacement (the
    released code's floor; the paper's |C|/2 is silent on odd counts). An image with a
    single class gives the all-zero mask (nothing is pasted).

    Args:
      labels: int [B, H, W] class ids in [0, num_classes).
      num_classes: C.
      scores: float [B, C] i.i.d. uniform in [0, 1) per image and class (e.g.
        `seeds.per_example_uniform(seed, B, (C,))`): the chosen classes are the present
        ones with the smallest scores, which is a uniform draw without replacement.
    Returns:
      float32 [B, H, W]: 1 where the pixel's class was chosen.
    """
    labels = tf.cast(labels, tf.int32)
    present = present_classes(labels, num_classes)  # [B, C]
    half = tf.reduce_sum(tf.cast(present, tf.int32), axis=1) // 2
    # Absent classes sort after every present one (scores are < 1), so the first
    # `half` ranks are always present classes.
    keys = tf.where(present, tf.cast(scores, tf.float32), 2.0)
    ranks = tf.argsort(tf.argsort(keys, axis=1), axis=1)
    chosen = ranks < half[:, None]  # [B, C]
    return tf.cast(tf.gather(chosen, labels, batch_dims=1), tf.float32)


def box_mask_draws(batch_size, height, width, seed, num_boxes: int = 1,
                   proportion_range=(0.5, 0.5)) -> tuple:
    """The boxes of `box_masks`: (top, left, box_h, box_w), float32 [B, num_boxes] whole
    numbers each, every box inside the image (see `box_masks` for the draw)."""
    low, high = proportion_range
    draws = seeds.per_example_uniform(seed, batch_size, (num_boxes, 4))
    proportion = low + (high - low) * draws[..., 0]
    aspect = draws[..., 1]
    scale = 1.0 / math.sqrt(num_boxes)
    height_f = tf.cast(height, tf.float32)
    width_f = tf.cast(width, tf.float32)
    box_h = tf.round(tf.pow(proportion, aspect) * scale * height_f)
    box_w = tf.round(tf.pow(proportion, 1.0 - aspect) * scale * width_f)
    top = tf.floor(draws[..., 2] * (height_f - box_h + 1.0))
    left = tf.floor(draws[..., 3] * (width_f - box_w + 1.0))
    return top, left, box_h, box_w


def xor_rectangles(top, left, box_h, box_w, height, width) -> tf.Tensor:
    """float32 [B, height, width]: 1 where an odd number of image i's rectangles
    (float [B, k] whole numbers: rows top..top+box_h-1, columns left..left+box_w-1, cut
    off at the borders) cover the pixel, 0 elsewhere."""
    rows = tf.range(tf.cast(height, tf.float32))[None, None, :, None]
    cols = tf.range(tf.cast(width, tf.float32))[None, None, None, :]
    top, left, box_h, box_w = (tf.cast(x, tf.float32)[..., None, None]
                               for x in (top, left, box_h, box_w))
    inside = ((rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w))
    return tf.cast(tf.reduce_sum(tf.cast(inside, tf.int32), axis=1) % 2, tf.float32)


def box_masks(batch_size, height, width, seed, num_boxes: int = 1,
              proportion_range=(0.5, 0.5)) -> tf.Tensor:
    """Box (CutMix) masks: 1 inside `num_boxes` random rectangles per image, 0 outside.

    Each box draws its own proportion p ~ U(proportion_range) (as the MKD code does; the
    boxes of an image together cover the mean of their p before overlaps): it has height
    fraction p^u / sqrt(k) and width fraction p^(1-u) / sqrt(k) (u ~ U(0, 1) per box,
    k = num_boxes, so it covers p / k of the image with a log-uniform aspect), at a
    uniform position where it fits. Overlapping boxes combine by
    XOR. One box with p = 0.5 is the ClassMix code's "cut" mask up to its width
    distribution (uniform in [W/2, W] there); that code pastes the *outside* of the box,
    i.e. uses `1 - box_masks(...)`.

    Args:
      batch_size: B (this replica's examples); height, width: the mask size.
      seed: a stateless seed pair (see `seeds.step_seed`).
    Returns:
      float32 [B, height, width].
    """
    boxes = box_mask_draws(batch_size, height, width, seed, num_boxes, proportion_range)
    return xor_rectangles(*boxes, height, width)


def cutmix_box_draws(batch_size, height, width, seed, probability: float = 0.5,
                     area_range=(0.02, 0.4), ratio_range=(0.3, 1 / 0.3),
                     candidates: int = 256) -> tuple:
    """Each image's CutMix box as the UniMatch / FixMatch released code draws it.

    With probability `probability` an image gets a box: an area
    a ~ U(area_range) * height * width is drawn once; then a ratio r ~ U(ratio_range), a
    width floor(sqrt(a / r)), a height floor(sqrt(a * r)) and a top-left corner (x, y)
    uniform over the integer pixels are redrawn until the box fits in the image. The code
    draws on square crops (a is a share of S * S); a rectangular image uses its own height
    and width. The redraw loop becomes the first of `candidates` draws that fits; at the
    largest area of a square crop one draw fits with probability about 0.06, so all 256
    miss with probability below 1e-7 (the last draw is then clamped into the image).

    Args:
      batch_size: B (this replica's examples); height, width: the image size.
      seed: a stateless seed pair (see `seeds.step_seed`); draws are keyed by global index.
    Returns:
      (drawn, top, left, box_h, box_w): `drawn` bool [B], whether the image gets a box;
      the others float32 [B] whole numbers, the box's first row and column and its size
      (drawn for every image, used where `drawn`).
    """
    draws = seeds.per_example_uniform(seed, batch_size, (2 + 3 * candidates,))
    height_f = tf.cast(height, tf.float32)
    width_f = tf.cast(width, tf.float32)
    low, high = area_range
    area = (low + (high - low) * draws[:, 1:2]) * height_f * width_f  # [B, 1]
    tries = tf.reshape(draws[:, 2:], [-1, candidates, 3])
    r_low, r_high = ratio_range
    ratio = r_low + (r_high - r_low) * tries[..., 0]
    box_w = tf.floor(tf.sqrt(area / ratio))
    box_h = tf.floor(tf.sqrt(area * ratio))
    left = tf.floor(tries[..., 1] * width_f)  # uniform integers in [0, width)
    top = tf.floor(tries[..., 2] * height_f)
    fits = (left + box_w <= width_f) & (top + box_h <= height_f)  # [B, K]
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)[:, None]

    def pick(x):  # each image's first fitting draw, [B, 1]
        return tf.gather(x, first, batch_dims=1)

    found = tf.reduce_any(fits, axis=1, keepdims=True)
    box_w = tf.where(found, pick(box_w), tf.minimum(box_w[:, -1:], width_f))
    box_h = tf.where(found, pick(box_h), tf.minimum(box_h[:, -1:], height_f))
    left = tf.where(found, pick(left), tf.minimum(left[:, -1:], width_f - box_w))
    top = tf.where(found, pick(top), tf.minimum(top[:, -1:], height_f - box_h))
    return draws[:, 0] < probability, top[:, 0], left[:, 0], box_h[:, 0], box_w[:, 0]


def rectangle_masks(top, left, box_h, box_w, height, width, drawn=None) -> tf.Tensor:
    """float32 [B, height, width]: 1 on rows top..top+box_h-1 and columns
    left..left+box_w-1 of image i (float [B] whole numbers; a box reaching past a border is
    cut off there), 0 elsewhere and on every image where `drawn` (bool [B]) is False."""
    one_box = (tf.cast(x, tf.float32)[:, None] for x in (top, left, box_h, box_w))
    inside = xor_rectangles(*one_box, height, width)  # one rectangle: XOR is the box
    if drawn is not None:
        inside *= tf.cast(tf.cast(drawn, tf.bool), tf.float32)[:, None, None]
    return inside


def cutmix_boxes(batch_size, height, width, seed, probability: float = 0.5,
                 area_range=(0.02, 0.4), ratio_range=(0.3, 1 / 0.3),
                 candidates: int = 256) -> tf.Tensor:
    """At most one CutMix box per image, drawn and placed as the UniMatch / FixMatch
    released code does (see `cutmix_box_draws`; an image without a box is all zero).

    Args:
      batch_size: B (this replica's examples); height, width: the mask size.
      seed: a stateless seed pair (see `seeds.step_seed`); draws are keyed by global index.
    Returns:
      float32 [B, height, width]: 1 inside the box (rows y..y+h-1, columns x..x+w-1).
    """
    drawn, top, left, box_h, box_w = cutmix_box_draws(
        batch_size, height, width, seed, probability, area_range, ratio_range, candidates)
    return rectangle_masks(top, left, box_h, box_w, height, width, drawn)


def _centred_corner(size, centre):
    """The first row (column) of a box of `size` rows (columns) centred on `centre`."""
    return tf.cast(centre, tf.float32) - tf.floor(tf.cast(size, tf.float32) / 2.0)


def _centred_where_found(found, rows, cols, top, left, box_h, box_w) -> tuple:
    """(top, left) [B]: each box moved to be centred on (rows, cols) where `found`, kept
    where it was elsewhere."""
    return (tf.where(found, _centred_corner(box_h, rows), top),
            tf.where(found, _centred_corner(box_w, cols), left))


def centred_boxes(box_h, box_w, centre_row, centre_col, height, width) -> tf.Tensor:
    """Box masks float32 [B, height, width] of given sizes around given pixels.

    Image i's box has box_h[i] rows and box_w[i] columns, and pixel
    (centre_row[i], centre_col[i]) on its row floor(box_h / 2) and column
    floor(box_w / 2) (the middle, or just past it for an even size); the part outside the
    image is cut off, so a box centred near a border covers less than its size.
    """
    return rectangle_masks(_centred_corner(box_h, centre_row),
                           _centred_corner(box_w, centre_col), box_h, box_w, height, width)


def class_centres(labels, classes, seed) -> tuple:
    """For each image, a pixel drawn uniformly among those whose label is its class.

    Args:
      labels: int [B, H, W].
      classes: int [B], the class of each image (a negative one matches no pixel).
      seed: a stateless seed pair; one draw per image, keyed by global example index.
    Returns:
      (rows, cols, found): int32 [B] each, and bool [B], False where image i has no pixel
      of classes[i] (its row and column are then 0).
    """
    labels = tf.cast(labels, tf.int32)
    classes = tf.cast(classes, tf.int32)
    batch, width = tf.shape(labels)[0], tf.shape(labels)[2]
    flat = tf.reshape(labels, [batch, -1])
    matches = tf.cast((flat == classes[:, None]) & (classes[:, None] >= 0), tf.int32)
    count = tf.reduce_sum(matches, axis=1)  # [B]
    # The k-th matching pixel in raster order, k uniform in [0, count): one draw per image
    # instead of a score per pixel. 52-bit draws keep k uniform at millions of pixels.
    u = seeds.per_example_uniform(seed, batch, dtype=tf.float64)
    k = tf.cast(tf.floor(u * tf.cast(count, tf.float64)), tf.int32)
    k = tf.minimum(k, count - 1)
    reached = tf.cast(tf.cumsum(matches, axis=1) > k[:, None], tf.int32)
    index = tf.argmax(reached, axis=1, output_type=tf.int32)  # first pixel past k matches
    found = count > 0
    index = tf.where(found, index, 0)
    return index // width, index % width, found


_CENTRE_STREAM = 1  # the centre draw of class_cutmix_boxes, folded into its seed


def class_cutmix_boxes(labels, classes, seed, probability: float = 0.5,
                       area_range=(0.02, 0.4), ratio_range=(0.3, 1 / 0.3),
                       candidates: int = 256) -> tf.Tensor:
    """CutMix boxes centred on a pixel of a given class (AEL's adaptive CutMix, Hu et al.
    2021): `cutmix_boxes` with each box moved onto a class.

    Whether image i gets a box and its size are those `cutmix_boxes` draws with the same
    seed; the box is then centred (see `centred_boxes`, cut off at the borders) on a pixel
    drawn uniformly among those of `labels[i]` equal to `classes[i]`. An image with no
    such pixel keeps `cutmix_boxes`' uniform placement, so its box is the same.

    Args:
      labels: int [B, H, W] (e.g. the pseudo-labels of the image pasted inside the box);
        the mask has this size.
      classes: int [B], the class each box is centred on (negative: none, uniform box).
      seed: a stateless seed pair; draws are keyed by global example index.
    Returns:
      float32 [B, H, W]: 1 inside the box.
    """
    labels = tf.convert_to_tensor(labels)
    size = tf.shape(labels)
    drawn, top, left, box_h, box_w = cutmix_box_draws(
        size[0], size[1], size[2], seed, probability, area_range, ratio_range, candidates)
    rows, cols, found = class_centres(
        labels, classes, tf.random.experimental.stateless_fold_in(seed, _CENTRE_STREAM))
    top, left = _centred_where_found(found, rows, cols, top, left, box_h, box_w)
    return rectangle_masks(top, left, box_h, box_w, size[1], size[2], drawn)


def class_box_masks(labels, classes, seed, num_boxes: int = 1,
                    proportion_range=(0.5, 0.5)) -> tf.Tensor:
    """`box_masks` with the first box of image i centred on a pixel of class `classes[i]`
    (AEL's adaptive CutMix, Hu et al. 2021, for MKD's several XOR-combined boxes).

    Every box keeps the size `box_masks` draws with the same seed, and boxes 2..k keep
    its uniform placement; the first box is centred (its row floor(box_h / 2) and column
    floor(box_w / 2) on the pixel, cut off at the borders) on a pixel drawn uniformly
    among those of `labels[i]` equal to `classes[i]`. Only one box moves: boxes all
    centred on one compact class would nearly coincide and cancel under the XOR, halving
    the mixed area. An image with no such pixel keeps `box_masks`' mask.

    Args:
      labels: int [B, H, W] (e.g. the pseudo-labels of the image shown inside the boxes);
        the mask has this size.
      classes: int [B], the class the first box of each image is centred on (negative:
        none).
      seed: a stateless seed pair; draws are keyed by global example index.
    Returns:
      float32 [B, H, W]: 1 where an odd number of the image's boxes cover the pixel.
    """
    labels = tf.convert_to_tensor(labels)
    size = tf.shape(labels)
    top, left, box_h, box_w = box_mask_draws(size[0], size[1], size[2], seed, num_boxes,
                                             proportion_range)
    rows, cols, found = class_centres(
        labels, classes, tf.random.experimental.stateless_fold_in(seed, _CENTRE_STREAM))
    first_top, first_left = _centred_where_found(found, rows, cols, top[:, 0], left[:, 0],
                                                 box_h[:, 0], box_w[:, 0])
    top = tf.concat([first_top[:, None], top[:, 1:]], axis=1)
    left = tf.concat([first_left[:, None], left[:, 1:]], axis=1)
    return xor_rectangles(top, left, box_h, box_w, size[1], size[2])


def interpolation_lambdas(seed, batch_size=None, alpha: float = 1.0, cap: float = 0.5,
                          candidates: int = 32) -> tf.Tensor:
    """Mixup weights of the smaller partner: lambda ~ Beta(alpha, alpha), folded to
    min(lambda, 1 - lambda), conditioned on lambda < cap (GuidedMix-Net's LUPI).

    The condition is a rejection, as the authors' code redraws until lambda < cap: with
    alpha = 1 the result is uniform on (0, min(cap, 0.5)). Each lambda takes the first of
    `candidates` stateless draws below the cap (all of them miss with probability
    (1 - 2 cap)^candidates at alpha = 1, about 1e-13 for cap 0.3; the last fallback then
    clips that draw to just under the cap).

    Args:
      seed: a stateless seed pair (see `kssl.augment.seeds.step_seed`).
      batch_size: None for one lambda shared by the whole global batch (a scalar, equal on
        every replica); else this replica's batch size, for one lambda per example keyed
        by its global index (float32 [batch_size]).
    """
    if not 0.0 < cap:
        raise ValueError(f"the lambda cap must be positive, got {cap!r}")
    _, replicas = seeds.replica_position()
    n = 1 if batch_size is None else tf.cast(batch_size, tf.int32) * replicas
    shape = tf.stack([candidates, n])
    first_seed = tf.random.experimental.stateless_fold_in(seed, 1)
    if alpha == 1.0:
        # Beta(1, 1) is uniform; drawn directly, which XLA compiles (its gamma sampler
        # has no XLA kernel, so other alphas cannot run under train.jit_compile).
        draws = tf.random.stateless_uniform(shape, first_seed)
    else:
        first = tf.random.stateless_gamma(shape, first_seed, alpha=alpha)
        second = tf.random.stateless_gamma(
            shape, tf.random.experimental.stateless_fold_in(seed, 2), alpha=alpha)
        draws = first / tf.maximum(first + second, 1e-30)
    draws = tf.minimum(draws, 1.0 - draws)
    accepted = draws < cap
    index = tf.argmax(tf.cast(accepted, tf.int32), axis=0, output_type=tf.int32)
    chosen = tf.gather(tf.transpose(draws), index[:, None], batch_dims=1)[:, 0]
    fallback = tf.minimum(draws[-1], cap * (1.0 - 1e-6))
    chosen = tf.where(tf.reduce_any(accepted, axis=0), chosen, fallback)
    if batch_size is None:
        return chosen[0]
    return tf.gather(chosen, seeds.global_batch_index(batch_size))


def interpolate(weights: tf.Tensor, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """weights * a + (1 - weights) * b, with a scalar or one weight per example [B]."""
    a = tf.convert_to_tensor(a)
    weights = tf.cast(weights, a.dtype)
    if weights.shape.rank == 1:
        weights = tf.reshape(weights, [-1] + [1] * (a.shape.rank - 1))
    return weights * a + (1.0 - weights) * tf.cast(b, a.dtype)
