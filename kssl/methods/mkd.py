"""MKD (Yuan et al., "Semi-supervised semantic segmentation with mutual knowledge
distillation"): two students, an EMA teacher each, and feature augmentation.

Four networks of one architecture: students S1 and S2 (the same pretrained backbone
weights, independently initialised heads; separate variables) and their mean teachers T1
and T2. One step (paper Algorithm 1 and Eq. 1-5; the released code where the paper is
silent or differs, the paper's choice then being an option):

1. Each teacher follows its own student, before any forward pass (Eq. 1):
   T_k <- m T_k + (1 - m) S_k with m = min(1 - 1/t, 0.6) at the t-th step (t from 1).
2. The students' view of the unlabelled batch: one photometric op per image (colour
   jitter, blur, equalize, solarize or greyscale), then CutMix: image i inside three
   random boxes (XOR-combined), image i+1 of the global batch outside.
3. The teachers run on the weak (unaugmented) unlabelled images and, while the
   consistency terms cover the labelled images (the code's default), on the labelled
   images; their unlabelled logits and classifier features are mixed with the same boxes.
4. The students run on the labelled images (supervised cross-entropy at full resolution,
   Eq. 5) and on the mixed images.
5. Feature augmentation (Eq. 3, ISDA-style) of every network's logits z at the loss
   resolution (1/8 of the input): each network keeps a running per-class mean and diagonal
   variance var_y of the features its classifier reads, updated from the step's labelled
   pixels (ground-truth class; a teacher only when it ran on the labelled images) and then
   its unlabelled pixels (its own argmax); the pixel's logits become
   z_c + lambda/2 * sum_a (w_c,a - w_y,a)^2 var_y,a (w: the classifier weights; no
   gradient through the term unless `offset_gradient`), lambda ramped up by a cosine over
   training. Ignore pixels are left out of the statistics and get no term; a batch with
   non-finite features (a skipped mixed-precision step) leaves them unchanged.
6. Eq. 2 and 4, on the augmented logits, over the labelled and mixed rows:
   L = CE(S1, y) + CE(S2, y)
     + alpha * [CE(S1, argmax T2) + CE(S2, argmax T1)]      (teacher k teaches the other)
     + beta  * [CE(S1, argmax S2) + CE(S2, argmax S1)]      (the students teach each other)
   with alpha = 1.5, beta = 1.0, an optional confidence threshold on the teacher targets,
   and one optimizer step over both students.

Student 1 is evaluated and exported (either student or teacher on request).

Under `tf.distribute`, every mean divides by global counts (`kssl.losses`), masks and
strong ops are drawn per global example index (`kssl.augment.seeds`), and the class
statistics are updated from per-class sums all-reduced over the replicas, so every replica
keeps the same estimates as a single device would.
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from kssl import losses
from kssl.augment import mixing, randaugment, seeds, strong
from kssl.methods import ema, replicated_state
from kssl.methods.base import SegmentationMethod, unpack_batch
from kssl.models.layers import resize_bilinear, spatial_size
from kssl.models.segmenter import Segmenter

# Random streams of one step (see kssl.augment.seeds.step_seed).
_MASK_STREAM, _STRONG_STREAM = 1, 2
# Streams inside the strong view, folded into the seed of _STRONG_STREAM.
_CHOICE, _JITTER_FACTORS, _JITTER_ORDER, _BLUR = range(4)

STRONG_OPS = ("jitter", "blur", "equalize", "solarize", "grayscale")
# The released code's albumentations SomeOf(n=1) over the five ops with these p values:
# one op per image, chosen with probability proportional to them.
CODE_STRONG_OP_WEIGHTS = (0.3, 0.5, 0.1, 0.1, 0.5)
NETWORKS = ("student_1", "student_2", "teacher_1", "teacher_2")


# -- the strong view ------------------------------------------------------------------------
def _shift_hue(images, shift):
    """Rotates the HSV hue of [0, 255] images [B, H, W, 3] by `shift` [B] (a fraction of the
    colour circle, as albumentations' hue factor)."""
    hsv = tf.image.rgb_to_hsv(tf.clip_by_value(images, 0.0, 255.0) / 255.0)
    hue, saturation, value = tf.unstack(hsv, axis=-1)
    hue = tf.math.floormod(hue + tf.reshape(shift, [-1, 1, 1]), 1.0)
    return tf.image.hsv_to_rgb(tf.stack([hue, saturation, value], axis=-1)) * 255.0


class OneOfPhotometric:
    """MKD's strong view: one photometric op per image, drawn from `STRONG_OPS`.

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
      weights: relative chances of the five ops. Default: the released code's p values
        (SomeOf picks in proportion to them: 20, 33, 7, 7, 33 %); (1, 1, 1, 1, 1) is the
        paper's "randomly select an operator".
    Called as `augment(images, seed)` with a stateless seed pair; draws are keyed by global
    example index (`kssl.augment.seeds`), so they do not depend on the replica count.
    """

    def __init__(self, weights: Sequence[float] = CODE_STRONG_OP_WEIGHTS,
                 brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25,
                 blur_kernel_sizes: Sequence[int] = (3, 5, 7),
                 blur_sigma_range=(0.1, 2.0), solarize_threshold=128.0):
        weights = np.asarray(weights, np.float64)
        if weights.shape != (len(STRONG_OPS),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"strong op weights must be {len(STRONG_OPS)} non-negative "
                             f"numbers (for {', '.join(STRONG_OPS)}), got {list(weights)}")
        if any(k < 1 or k % 2 == 0 for k in blur_kernel_sizes):
            raise ValueError(f"blur kernel sizes must be odd, got {list(blur_kernel_sizes)}")
        self.probabilities = weights / weights.sum()
        self.jitter_strength = (brightness, contrast, saturation, hue)
        self.blur_kernel_sizes = tuple(int(k) for k in blur_kernel_sizes)
        self.blur_sigma_range = tuple(blur_sigma_range)
        self.solarize_threshold = float(solarize_threshold)

    def choose(self, seed, batch) -> tf.Tensor:
        """int32 [batch]: the index into `STRONG_OPS` of each image's op."""
        draws = seeds.per_example_uniform(
            tf.random.experimental.stateless_fold_in(seed, _CHOICE), batch)
        bounds = tf.constant(np.cumsum(self.probabilities)[:-1], tf.float32)
        return tf.reduce_sum(tf.cast(draws[:, None] >= bounds[None, :], tf.int32), axis=1)

    def _jitter(self, images, seed):
        fold = tf.random.experimental.stateless_fold_in
        b, c, s, h = self.jitter_strength
        u = seeds.per_example_uniform(fold(seed, _JITTER_FACTORS), tf.shape(images)[0], (4,),
                                      -1.0, 1.0)
        ops = [lambda x: randaugment.brightness(x, 1.0 + b * u[:, 0]),
               lambda x: randaugment.contrast(x, 1.0 + c * u[:, 1]),
               lambda x: randaugment.color(x, 1.0 + s * u[:, 2]),
               lambda x: _shift_hue(x, h * u[:, 3])]
        order = tf.argsort(seeds.batch_uniform(fold(seed, _JITTER_ORDER), (4,)))
        for position in range(4):
            images = tf.switch_case(order[position],
                                    [lambda op=op, x=images: op(x) for op in ops])
            images = tf.ensure_shape(images, [None, None, None, 3])
        return images

    def _blur(self, images, seed):
        draws = seeds.batch_uniform(tf.random.experimental.stateless_fold_in(seed, _BLUR),
                                    (2,))
        sizes = tf.constant(self.blur_kernel_sizes, tf.int32)
        count = len(self.blur_kernel_sizes)
        size = sizes[tf.minimum(tf.cast(draws[0] * count, tf.int32), count - 1)]
        low, high = self.blur_sigma_range
        return strong.gaussian_blur(images, low + (high - low) * draws[1], size, size)

    def __call__(self, images, seed):
        dtype = images.dtype
        x = tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 255.0)
        choice = self.choose(seed, tf.shape(x)[0])
        ops = {"jitter": lambda y: self._jitter(y, seed),
               "blur": lambda y: self._blur(y, seed),
               "equalize": randaugment.equalize,
               "solarize": lambda y: randaugment.solarize(y, self.solarize_threshold),
               "grayscale": lambda y: randaugment.color(y, tf.zeros(tf.shape(y)[:1]))}
        for index, name in enumerate(STRONG_OPS):
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


# -- feature augmentation -------------------------------------------------------------------
def feature_augmentation_strength(step, lambda_max: float, steps: int,
                                  schedule: str = "cosine") -> tf.Tensor:
    """lambda at 0-based optimizer step `step`, with t = step + 1 (the code's counter) capped
    at `steps`: "cosine" lambda_max * (1 - cos(pi t / steps)) / 2 (the released code),
    "linear" lambda_max * t / steps (ISDA's ramp)."""
    t = tf.minimum(tf.cast(step, tf.float32) + 1.0, float(steps))
    if schedule == "cosine":
        return lambda_max * (1.0 - tf.cos(math.pi * t / steps)) / 2.0
    if schedule == "linear":
        return lambda_max * t / steps
    raise ValueError(f"lambda schedule must be 'cosine' or 'linear', got {schedule!r}")


def logit_offsets(weights, variances, strength) -> tf.Tensor:
    """The C x C table D[y, c] = strength / 2 * sum_t,a (W[t,a,c] - W[t,a,y])^2 var[y,a].

    Args:
      weights: [T, A, C] the classifier as per-position linear maps (T = 1 for a 1x1
        classifier; see `Segmenter.classifier_weights`).
      variances: [C, A] per-class diagonal feature variances.
      strength: lambda.
    Row y is what a pixel of class y adds to its logits: 0 for c = y, >= 0 elsewhere.
    Computed as sums of matrix products, without the [C, C, T * A] difference tensor.
    """
    weights = tf.cast(weights, tf.float32)
    variances = tf.cast(variances, tf.float32)
    classes = tf.shape(weights)[-1]
    flat = tf.reshape(weights, [-1, classes])  # [T * A, C]
    taps = tf.shape(weights)[0]
    spread = tf.tile(variances, [1, taps])  # [C, T * A]: var[y, a] for every tap t
    squares = tf.matmul(spread, tf.square(flat))  # [y, c]: sum var_y W_c^2
    cross = tf.matmul(spread * tf.transpose(flat), flat)  # [y, c]: sum var_y W_y W_c
    own = tf.linalg.diag_part(squares)  # [y]: sum var_y W_y^2
    table = tf.maximum(squares - 2.0 * cross + own[:, None], 0.0)  # >= 0 up to rounding
    table = tf.linalg.set_diag(table, tf.zeros([classes]))
    return 0.5 * tf.cast(strength, tf.float32) * table


def augment_logits(logits, labels, offsets, ignore_label: int) -> tf.Tensor:
    """logits [B, h, w, C] + offsets[label] per pixel; ignore pixels are left as they are.
    The gradient reaches `offsets` unless the caller stops it."""
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_label)
    added = tf.gather(offsets, tf.where(valid, labels, 0))
    return logits + tf.where(valid[..., None], added, 0.0)


class ClassStatistics(keras.layers.Layer):
    """A running per-class mean and diagonal variance of features, over every pixel seen.

    Weights (non-trainable, so they are checkpointed with the method): count [C], mean
    [C, A], variance [C, A] (biased, i.e. the population variance), all starting at 0.
    `merge` pools the stored moments with a batch's: with n_c batch pixels of class c
    (mean m_b, variance v_b) and N_c seen before, w = n_c / (n_c + N_c) and
      var <- (1 - w) var + w v_b + w (1 - w) (mean - m_b)^2,  mean <- (1 - w) mean + w m_b,
    the exact moments of all pixels so far (no forgetting), as the released estimator.
    Under `tf.distribute` the batch's per-class counts and sums are all-reduced, so the
    moments are those of the global batch and every replica stores the same values (the
    released code keeps per-GPU estimates that drift apart).
    """

    def __init__(self, num_classes: int, channels: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(trainable=False, **kwargs)
        self.num_classes = int(num_classes)
        self.channels = int(channels)
        common = dict(initializer="zeros", trainable=False, dtype="float32", autocast=False)
        self.count = self.add_weight(shape=(self.num_classes,), name="count", **common)
        self.mean = self.add_weight(shape=(self.num_classes, self.channels), name="mean",
                                    **common)
        self.variance = self.add_weight(shape=(self.num_classes, self.channels),
                                        name="variance", **common)
        self.built = True

    def read(self) -> tuple:
        """The stored (count, mean, variance) as tensors."""
        return (tf.convert_to_tensor(self.count), tf.convert_to_tensor(self.mean),
                tf.convert_to_tensor(self.variance))

    def batch_moments(self, features, labels) -> tuple:
        """(count [C], mean [C, A], variance [C, A]) of the global batch's pixels per class.

        features: [B, h, w, A]; labels: [B, h, w] class ids, anything outside [0, C)
        (the ignore label) left out.
        """
        features = tf.reshape(tf.cast(features, tf.float32), [-1, self.channels])
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        classes = self.num_classes
        # Pixels of no class go to an extra segment that is dropped.
        segments = tf.where((labels >= 0) & (labels < classes), labels, classes)

        def per_class_sum(values):
            return tf.math.unsorted_segment_sum(values, segments, classes + 1)[:classes]

        # Sums over the global batch (the released code keeps per-GPU statistics, which
        # drift apart; here every replica pools the same pixels a single device would).
        count = losses.replica_sum(per_class_sum(tf.ones_like(features[:, 0])))
        mean = losses.replica_sum(per_class_sum(features)) / tf.maximum(count, 1.0)[:, None]
        # Second pass about the global mean: stable where the variance is small.
        deviation = features - tf.gather(tf.concat([mean, tf.zeros([1, self.channels])], 0),
                                         segments)
        variance = (losses.replica_sum(per_class_sum(tf.square(deviation)))
                    / tf.maximum(count, 1.0)[:, None])
        return count, mean, variance

    def merge(self, state: tuple, features, labels) -> tuple:
        """`state` (count, mean, variance) pooled with the global batch's moments."""
        count, mean, variance = state
        batch_count, batch_mean, batch_variance = self.batch_moments(
            tf.stop_gradient(features), labels)
        # A batch with inf/NaN features (a mixed-precision step the optimizer skips) is
        # left out: the moments pool every pixel ever seen, so it would spoil them for good.
        finite = tf.reduce_all(tf.math.is_finite(batch_mean)) & tf.reduce_all(
            tf.math.is_finite(batch_variance))
        batch_count = tf.where(finite, batch_count, 0.0)
        batch_mean = tf.where(finite, batch_mean, 0.0)
        batch_variance = tf.where(finite, batch_variance, 0.0)
        total = count + batch_count
        w = tf.math.divide_no_nan(batch_count, total)[:, None]
        variance = ((1.0 - w) * variance + w * batch_variance
                    + w * (1.0 - w) * tf.square(mean - batch_mean))
        mean = (1.0 - w) * mean + w * batch_mean
        return total, mean, variance

    def assign(self, state: tuple) -> None:
        """Stores `state`, computed identically on every replica, on each replica's copy."""
        replicated_state.assign_identical((self.count, self.mean, self.variance), state)

    def update(self, features, labels) -> tuple:
        """Pools one batch into the stored moments; returns the new state."""
        state = self.merge(self.read(), features, labels)
        self.assign(state)
        return state

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "channels": self.channels}


# -- the method -----------------------------------------------------------------------------
class MKD(SegmentationMethod):
    """Mutual knowledge distillation: two students, two EMA teachers, feature augmentation.

    Args:
      segmenter: student 1, a `kssl.models.Segmenter` whose head exposes its classifier
        (DeepLabV3+ or DeepLabV2). Student 2 and the teachers are built from it.
      num_classes: number of classes.
      alpha: weight of the teacher -> other student terms (Eq. 2, 4): 1.5.
      beta: weight of the student <-> student terms (Eq. 4): 1.0.
      confidence_threshold: None (the released config) or e.g. 0.95 (the paper's starred
        rows): teacher targets whose un-augmented teacher probability is below it are
        ignored (left out of the mean), as the code's `prob` option.
      ema_decay, ema_warmup: the teachers' decay min(1 - 1/t, ema_decay) at the t-th step
        (t from 1; the code's 0.6 by default; 0.99 the usual mean teacher); without
        warm-up, ema_decay throughout (the paper's gamma = 0.4: `ema_decay=0.4,
        ema_warmup=False`).
      teacher_bn: "batch" (the released code: teachers average the students' trainable
        weights only and predict in training mode, on the batch's statistics; dropout in
        the head is then active in the teachers too, where the released network has
        none) or "ema" (batch-norm moving statistics averaged too; teachers predict in
        inference mode).
      feature_augment: apply the feature augmentation (Eq. 3) at all.
      augment_teachers: also augment the teachers' logits, whose argmax are then the
        targets (the released code; default) - False augments the students only (paper).
      offset_gradient: let the gradient reach the classifier weights through the logit
        offsets, as in ISDA's loss and the paper's Eq. 3 (the released code detaches
        them; default False). The detached offsets grow with the square of the weights
        and of the features while the margins they oppose grow only linearly, so a run
        whose features drift far (from scratch, large learning rate) can enter a
        feedback where the optimizer inflates both without limit; the gradient through
        the weights pays for that growth and stops it.
      lambda_max, lambda_schedule, lambda_steps: lambda ramps from 0 to lambda_max (1.5)
        over `lambda_steps` steps (the code: the whole run, so set it to train.steps;
        required with feature augmentation), by "cosine" (the code) or "linear".
      consistency_on_labelled: the four consistency terms also cover the labelled images
        (the released code; default; teachers then also run on them); False keeps them
        to the unlabelled images, as the paper writes Eq. 2. The teachers' class
        statistics then see only their own unlabelled argmax, while the students' still
        see the labelled pixels with their ground truth.
      loss_stride: the consistency terms and class statistics work at 1/loss_stride of
        the input (8: the code downsamples its stride-4 logits by 2); the supervised
        terms at full resolution.
      num_boxes, box_proportion: CutMix boxes per image and the range of the image share
        they cover together before XOR overlaps (the code: 3, (0.25, 0.5)).
      strong_augment: True (`OneOfPhotometric(strong_op_weights)`), False (CutMix only),
        or a callable `(images, seed) -> images`, applied before mixing.
      strong_op_weights: chances of jitter, blur, equalize, solarize, greyscale (the code's
        (0.3, 0.5, 0.1, 0.1, 0.5) by default; (1, 1, 1, 1, 1) for the paper's uniform pick).
      share_backbone_init: student 2 starts from student 1's backbone weights with its own
        fresh head (the code: both load the same pretrained backbone); False draws all of
        student 2 afresh.
      inference: the network evaluated and exported: "student_1" (the code), "student_2",
        "teacher_1" or "teacher_2".
      seed: seeds the masks and strong ops, drawn statelessly per step and global example
        index; default: drawn from Python's `random` (seeded by `train.seed`).
    """

    base_losses = ("loss", "supervised_loss", "teacher_student_loss",
                   "student_student_loss", "student_1_loss", "student_2_loss")
    # Health of the feature augmentation: the largest logit offset of the students, and
    # the share of teacher targets whose class the augmentation changed.
    augmentation_logs = ("largest_logit_offset", "augmented_target_changes")
    tracked_losses = base_losses + augmentation_logs + ("confident_share",)

    def __init__(self, segmenter, num_classes, alpha: float = 1.5, beta: float = 1.0,
                 confidence_threshold: Optional[float] = None, ema_decay: float = 0.6,
                 ema_warmup: bool = True, teacher_bn: str = "batch",
                 feature_augment: bool = True, augment_teachers: bool = True,
                 offset_gradient: bool = False,
                 lambda_max: float = 1.5, lambda_schedule: str = "cosine",
                 lambda_steps: Optional[int] = None, consistency_on_labelled: bool = True,
                 loss_stride: int = 8, num_boxes: int = 3,
                 box_proportion: Sequence[float] = (0.25, 0.5), strong_augment=True,
                 strong_op_weights: Sequence[float] = CODE_STRONG_OP_WEIGHTS,
                 share_backbone_init: bool = True, inference: str = "student_1",
                 seed: Optional[int] = None, **kwargs):
        for name, value, allowed in [("teacher_bn", teacher_bn, ("batch", "ema")),
                                     ("lambda_schedule", lambda_schedule,
                                      ("cosine", "linear")),
                                     ("inference", inference, NETWORKS)]:
            if value not in allowed:
                raise ValueError(f"MKD {name} must be one of {allowed}, got {value!r}")
        if not isinstance(segmenter, Segmenter):
            raise TypeError("MKD needs a kssl Segmenter (its feature augmentation reads the "
                            f"head's classifier), got {type(segmenter).__name__}")
        if feature_augment and not (lambda_steps and int(lambda_steps) > 0):
            raise ValueError("MKD.lambda_steps (the length of the lambda ramp, normally "
                             "train.steps) must be a positive number of steps")
        if int(loss_stride) < 1:
            raise ValueError(f"MKD loss_stride must be >= 1, got {loss_stride!r}")
        # The teachers' targets change only when their logits are augmented.
        augmentation_logs = self.augmentation_logs if augment_teachers else (
            "largest_logit_offset",)
        tracked = (self.base_losses
                   + (augmentation_logs if feature_augment else ())
                   + (("confident_share",) if confidence_threshold is not None else ()))
        super().__init__(segmenter, num_classes, tracked_losses=tracked, **kwargs)
        self.alpha = alpha
        self.beta = beta
        self.confidence_threshold = confidence_threshold
        self.teacher_bn = teacher_bn
        self.feature_augment = feature_augment
        self.augment_teachers = augment_teachers
        self.offset_gradient = bool(offset_gradient)
        self.lambda_max = lambda_max
        self.lambda_schedule = lambda_schedule
        self.lambda_steps = int(lambda_steps) if lambda_steps else None
        self.consistency_on_labelled = consistency_on_labelled
        self.loss_stride = int(loss_stride)
        self.num_boxes = int(num_boxes)
        self.box_proportion = tuple(box_proportion)
        if strong_augment is True:
            strong_augment = OneOfPhotometric(strong_op_weights)
        self.strong_augment = strong_augment or None
        self.inference = inference
        self.seed = random.randrange(2**31) if seed is None else int(seed)

        # The four networks are attributes of this model, so BackupAndRestore and
        # save_weights keep them together.
        self.student_2 = ema.clone_network(segmenter, name=f"{segmenter.name}_2")
        self.teacher_1 = ema.clone_network(segmenter, name=f"{segmenter.name}_teacher")
        self.teacher_2 = ema.clone_network(segmenter, name=f"{segmenter.name}_2_teacher")
        self.build_networks()
        if share_backbone_init:
            for source, target in zip([segmenter.preprocess, *segmenter.block_layers],
                                      [self.student_2.preprocess,
                                       *self.student_2.block_layers]):
                target.set_weights(source.get_weights())
        # Each teacher starts as a copy of its own student (Algorithm 1, line 4).
        statistics_too = teacher_bn == "ema"
        self.ema_1 = ema.EMATeacher(segmenter, self.teacher_1, max_decay=ema_decay,
                                    warmup=ema_warmup, include_statistics=statistics_too)
        self.ema_2 = ema.EMATeacher(self.student_2, self.teacher_2, max_decay=ema_decay,
                                    warmup=ema_warmup, include_statistics=statistics_too)
        # One estimator per augmented network, in its features' width.
        channels = int(segmenter.classifier_weights().shape[1])
        augmented = NETWORKS if augment_teachers else NETWORKS[:2]
        self.statistics = {
            name: ClassStatistics(num_classes, channels, name=f"{name}_statistics")
            for name in (augmented if feature_augment else ())}

    # -- networks -----------------------------------------------------------------------
    def networks(self) -> list:
        """Student 1, student 2, teacher 1, teacher 2."""
        return [self.segmenter, self.student_2, self.teacher_1, self.teacher_2]

    def network(self, name: str) -> Segmenter:
        """The network called `name` in `NETWORKS`."""
        return dict(zip(NETWORKS, self.networks()))[name]

    def optimized_variables(self) -> list:
        """Both students' trainable variables: the teachers only follow by EMA."""
        return self.segmenter.trainable_variables + self.student_2.trainable_variables

    @property
    def inference_network(self):
        """Student 1, or the network named by `inference`."""
        return self.network(self.inference)

    # -- pieces of a step ---------------------------------------------------------------
    def feature_augmentation_strength(self, step) -> tf.Tensor:
        """lambda at 0-based step `step` (0 without feature augmentation)."""
        if not self.feature_augment:
            return tf.constant(0.0)
        return feature_augmentation_strength(step, self.lambda_max, self.lambda_steps,
                                             self.lambda_schedule)

    def update_teachers(self, step) -> None:
        """Eq. 1 for both teachers, each from its own student. At the start of 0-based step
        `step` the code's counter is t = step + 1, so `ema.ema_decay(step)` =
        min(1 - 1/(step + 1), max) is the code's min(1 - 1/t, max) exactly."""
        self.ema_1.update(step)
        self.ema_2.update(step)

    def student_view(self, images, step) -> tuple:
        """(mixed images, box masks): the strong op per image, then CutMix pairing image i
        (inside the boxes) with image i+1 of the global batch (outside)."""
        if self.strong_augment is not None:
            images = self.strong_augment(images, seeds.step_seed(self.seed, step,
                                                                 _STRONG_STREAM))
        height, width = spatial_size(images)
        boxes = mixing.box_masks(tf.shape(images)[0], height, width,
                                 seeds.step_seed(self.seed, step, _MASK_STREAM),
                                 num_boxes=self.num_boxes,
                                 proportion_range=self.box_proportion)
        return mixing.mix(boxes, images), boxes

    def loss_size(self, images) -> tuple:
        """(height, width) of the consistency terms: ceil(input / loss_stride)."""
        height, width = spatial_size(images)
        s = self.loss_stride
        return (height + s - 1) // s, (width + s - 1) // s

    def forward(self, name, images, training, boxes=None, full_size=False) -> tuple:
        """(logits at the input size or None, classifier features, logits) of network
        `name`: the last two at the loss resolution, after mixing with `boxes` (teachers)
        when given; the first, as `network(images)`, when `full_size`."""
        network = self.network(name)
        features, logits = network.classifier_inputs_and_logits(images, training=training)
        full = (resize_bilinear(logits, spatial_size(images), network.align_corners)
                if full_size else None)
        if boxes is not None:  # the teachers' outputs mixed like the students' inputs
            features, logits = mixing.mix(boxes, features), mixing.mix(boxes, logits)
        size = self.loss_size(images)
        # The code downsamples bilinearly (align_corners False) before every semi loss.
        features = resize_bilinear(tf.cast(features, tf.float32), size)
        logits = resize_bilinear(logits, size)
        return full, features, logits

    def augmented(self, name, parts, strength) -> list:
        """Feature-augmented logits of network `name` for each (features, logits, labels)
        part, in order: the network's class statistics are updated with each part's
        pixels just before that part is augmented (labelled, then unlabelled)."""
        if name not in self.statistics:
            return [logits for _, logits, _ in parts]
        statistics = self.statistics[name]
        weights = self.network(name).classifier_weights()
        if not self.offset_gradient:
            weights = tf.stop_gradient(weights)
        state, out = statistics.read(), []
        for features, logits, labels in parts:
            state = statistics.merge(state, features, labels)
            offsets = logit_offsets(weights, state[2], strength)
            out.append(augment_logits(logits, labels, offsets, self.ignore_label))
        statistics.assign(state)
        return out

    def largest_logit_offset(self, strength) -> tf.Tensor:
        """The largest entry of the students' offset tables from their stored statistics:
        when it outgrows the logit margins, the augmentation decides the targets."""
        largest = []
        for name in NETWORKS[:2]:
            weights = tf.stop_gradient(self.network(name).classifier_weights())
            variances = tf.convert_to_tensor(self.statistics[name].variance)
            largest.append(tf.reduce_max(logit_offsets(weights, variances, strength)))
        return tf.reduce_max(tf.stack(largest))

    def resize_labels(self, masks, size):
        """Ground truth at the loss resolution (nearest; the ignore label stays)."""
        # Resized as float (exact for class ids), which every device's kernel takes.
        resized = tf.image.resize(tf.cast(masks, tf.float32)[..., None], size, "nearest")
        return tf.cast(resized[..., 0], tf.int32)

    def teacher_targets(self, name, images_l, labels_l, images_u, boxes, strength) -> tuple:
        """(targets, confidences, changed) of teacher `name` at the loss resolution: the
        first two lists of parts ([labelled,] mixed unlabelled), targets the argmax of the
        augmented logits, ignored where the un-augmented probability is below the
        threshold; `changed` counts the pixels whose argmax the augmentation changed."""
        training = self.teacher_bn == "batch"
        parts = []
        if self.consistency_on_labelled:
            _, features, logits = self.forward(name, images_l, training)
            parts.append((features, logits, labels_l))
        _, features, logits = self.forward(name, images_u, training, boxes)
        parts.append((features, logits, tf.argmax(logits, -1, output_type=tf.int32)))
        augmented = self.augmented(name, parts, strength)
        targets, confidences, changed = [], [], 0.0
        for (_, logits, _), logits_aug in zip(parts, augmented):
            target = tf.argmax(logits_aug, -1, output_type=tf.int32)
            changed += tf.reduce_sum(tf.cast(
                target != tf.argmax(logits, -1, output_type=tf.int32), tf.float32))
            confidence = tf.reduce_max(tf.nn.softmax(logits), -1)
            if self.confidence_threshold is not None:
                target = tf.where(confidence >= self.confidence_threshold, target,
                                  self.ignore_label)
            targets.append(tf.stop_gradient(target))
            confidences.append(confidence)
        return targets, confidences, changed

    def pseudo_label_targets(self, images, labelled_images=None) -> dict:
        """Each teacher's targets on the weak unlabelled view at the input size: the
        argmax of its logits, admitted where its confidence reaches the threshold (all
        pixels without one). The feature augmentation of the teachers' logits is left
        out: it would update the class statistics."""
        targets = {}
        for name in NETWORKS[2:]:
            logits = tf.cast(self.network(name)(images, training=False), tf.float32)
            probs = tf.nn.softmax(logits)
            admitted = (None if self.confidence_threshold is None
                        else tf.reduce_max(probs, -1) >= self.confidence_threshold)
            targets[name] = (tf.argmax(probs, -1, output_type=tf.int32), admitted)
        return targets

    def student_outputs(self, name, images_l, masks_l, labels_l, mixed, strength) -> tuple:
        """(supervised CE on the labelled images, augmented logits per consistency part)."""
        full, features_l, logits_l = self.forward(name, images_l, True, full_size=True)
        supervised = self.supervised_loss(full, masks_l)
        _, features_u, logits_u = self.forward(name, mixed, training=True)
        own_u = tf.stop_gradient(tf.argmax(logits_u, -1, output_type=tf.int32))
        # The labelled pixels always feed the class statistics (ground-truth class).
        labelled_aug, unlabelled_aug = self.augmented(
            name, [(features_l, logits_l, labels_l), (features_u, logits_u, own_u)],
            strength)
        parts = [labelled_aug, unlabelled_aug] if self.consistency_on_labelled else [
            unlabelled_aug]
        return supervised, parts

    def cross_entropy(self, logits_parts, label_parts) -> tf.Tensor:
        """Mean CE over the non-ignored pixels of all parts of the global batch."""
        total, count = 0.0, 0.0
        for logits, labels in zip(logits_parts, label_parts):
            loss, valid = losses.pixel_cross_entropy(logits, labels, self.ignore_label)
            total += tf.reduce_sum(loss)
            count += tf.reduce_sum(valid)
        return losses.global_mean(total, count)

    def mutual_losses(self, supervised, student_logits, teacher_targets) -> dict:
        """Eq. 4 from its pieces; every term is this replica's share of a global mean.

        Args:
          supervised: (CE of student 1, CE of student 2) on the labelled images (Eq. 5).
          student_logits: (parts of student 1, parts of student 2): augmented logits, one
            tensor per consistency part (labelled, mixed).
          teacher_targets: (parts of teacher 1, parts of teacher 2), matching the parts.
        Returns the named terms: "teacher_2_to_student_1" = CE(S1, argmax T2),
        "teacher_1_to_student_2", "student_2_to_student_1" = CE(S1, argmax S2),
        "student_1_to_student_2", each student's total "student_k_loss" = supervised +
        alpha * teacher term + beta * student term, their sum "loss", and the sums
        "supervised_loss", "teacher_student_loss", "student_student_loss".
        """
        (supervised_1, supervised_2), (logits_1, logits_2) = supervised, student_logits
        targets_1, targets_2 = teacher_targets

        def argmax(parts):  # a student's hard labels for the other, no gradient
            return [tf.stop_gradient(tf.argmax(z, -1, output_type=tf.int32)) for z in parts]

        terms = {"teacher_2_to_student_1": self.cross_entropy(logits_1, targets_2),
                 "teacher_1_to_student_2": self.cross_entropy(logits_2, targets_1),
                 "student_2_to_student_1": self.cross_entropy(logits_1, argmax(logits_2)),
                 "student_1_to_student_2": self.cross_entropy(logits_2, argmax(logits_1))}
        terms["student_1_loss"] = (supervised_1
                                   + self.alpha * terms["teacher_2_to_student_1"]
                                   + self.beta * terms["student_2_to_student_1"])
        terms["student_2_loss"] = (supervised_2
                                   + self.alpha * terms["teacher_1_to_student_2"]
                                   + self.beta * terms["student_1_to_student_2"])
        terms["loss"] = terms["student_1_loss"] + terms["student_2_loss"]
        terms["supervised_loss"] = supervised_1 + supervised_2
        terms["teacher_student_loss"] = (terms["teacher_2_to_student_1"]
                                         + terms["teacher_1_to_student_2"])
        terms["student_student_loss"] = (terms["student_2_to_student_1"]
                                         + terms["student_1_to_student_2"])
        return terms

    # -- the step -----------------------------------------------------------------------
    def train_step(self, data):
        labelled, unlabelled = unpack_batch(data)
        if unlabelled is None:
            raise ValueError("MKD needs (labelled, unlabelled) training elements")
        # The 0-based index of this step, read before the optimizer increments it; it keys
        # the step's randomness, the teachers' decay and lambda.
        step = tf.identity(self.optimizer.iterations)
        images_l, masks_l, images_u = labelled["image"], labelled["mask"], unlabelled["image"]
        labels_l = self.resize_labels(masks_l, self.loss_size(images_l))
        strength = self.feature_augmentation_strength(step)

        # 1. Each teacher follows its own student (Eq. 1), before any forward pass.
        self.update_teachers(step)
        # 2. The students' view: a strong op per unlabelled image, then CutMix boxes.
        mixed, boxes = self.student_view(images_u, step)
        # 3. Teachers on the labelled and the weak unlabelled images (outputs mixed with the
        #    same boxes); targets = argmax of their augmented logits, no gradient.
        targets_1, confidence_1, changed_1 = self.teacher_targets(
            "teacher_1", images_l, labels_l, images_u, boxes, strength)
        targets_2, confidence_2, changed_2 = self.teacher_targets(
            "teacher_2", images_l, labels_l, images_u, boxes, strength)
        with tf.GradientTape() as tape:
            # 4. Students: supervised CE (Eq. 5) and augmented logits (Eq. 3).
            supervised_1, logits_1 = self.student_outputs("student_1", images_l, masks_l,
                                                          labels_l, mixed, strength)
            supervised_2, logits_2 = self.student_outputs("student_2", images_l, masks_l,
                                                          labels_l, mixed, strength)
            # 5. Eq. 2, 4: teacher k's targets supervise the *other* student, and each
            #    student learns the other's argmax (CPS).
            terms = self.mutual_losses((supervised_1, supervised_2), (logits_1, logits_2),
                                       (targets_1, targets_2))
        # 6. One optimizer step over both students.
        self.apply_gradients(tape, terms["loss"], self.optimized_variables())

        values = {name: terms[name] for name in self.base_losses}
        if self.feature_augment:
            values["largest_logit_offset"] = losses.global_mean(
                self.largest_logit_offset(strength), 1.0)  # identical on every replica
        if self.feature_augment and self.augment_teachers:
            targets = targets_1 + targets_2
            values["augmented_target_changes"] = losses.global_mean(
                changed_1 + changed_2,
                tf.add_n([tf.cast(tf.size(t), tf.float32) for t in targets]))
        if self.confidence_threshold is not None:
            confident = [tf.cast(c >= self.confidence_threshold, tf.float32)
                         for c in confidence_1 + confidence_2]
            values["confident_share"] = losses.global_mean(
                tf.add_n([tf.reduce_sum(c) for c in confident]),
                tf.add_n([tf.cast(tf.size(c), tf.float32) for c in confident]))
        return self.report(**values)
