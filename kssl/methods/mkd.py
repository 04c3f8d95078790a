"""MKD (Yuan et al., "Semi-supervised semantic segmentation with mutual knowledge
distillation"): two students, an EMA teacher each, and feature augmentation.

Four networks of one architecture: students S1 and S2 (the same pretrained backbone
weights, independently initialised heads; separate variables) and their mean teachers T1
and T2. One step (paper Algorithm 1 and Eq. 1-5; the released code where the paper is
silent or differs, the paper's choice then being an option):

1. Each teacher follows its own student, before any forward pass (Eq. 1):
   T_k <- m T_k + (1 - m) S_k with m = min(1 - 1/t, 0.6) at the t-th step (t from 1).
2. The students' view of the unlabelled batch: one photometric op per image (colour
   jitter, blur, equalize, solarize or greyscale: `kssl.augment.strong.OneOfPhotometric`),
   then CutMix: image i inside three random boxes (XOR-combined), image i+1 of the global
   batch outside (with `class_aware_mixing`, the first box centred on a class of the
   teachers' pseudo-labels of image i, the teachers' pass of step 3 then running first).
3. The teachers run on the weak (unaugmented) unlabelled images and, while the
   consistency terms cover the labelled images (the code's default), on the labelled
   images; their unlabelled logits and classifier features are mixed with the same boxes.
4. The students run on the labelled images (supervised cross-entropy at full resolution,
   Eq. 5) and on the mixed images.
5. Feature augmentation (Eq. 3, ISDA-style; `kssl.methods.feature_augmentation`) of every
   network's logits z at the loss resolution (1/8 of the input): each network keeps a
   running per-class mean and diagonal variance var_y of the features its classifier
   reads, updated from the step's labelled pixels (ground-truth class; a teacher only when
   it ran on the labelled images) and then its unlabelled pixels (its own argmax); the
   pixel's logits become z_c + lambda/2 * sum_a (w_c,a - w_y,a)^2 var_y,a (w: the
   classifier weights; no gradient through the term unless `offset_gradient`), lambda
   ramped up by a cosine over training. Ignore pixels are left out of the statistics and
   get no term; a batch with non-finite features (a skipped mixed-precision step) leaves
   them unchanged.
6. Eq. 2 and 4, on the augmented logits, over the labelled and mixed rows:
   L = CE(S1, y) + CE(S2, y)
     + alpha * [CE(S1, argmax T2) + CE(S2, argmax T1)]      (teacher k teaches the other)
     + beta  * [CE(S1, argmax S2) + CE(S2, argmax S1)]      (the students teach each other)
   with alpha = 1.5, beta = 1.0, an optional confidence threshold on the teacher targets
   (fixed or class-adaptive, optionally after distribution alignment: the shared
   `pseudo_label_controls`, off by default), and one optimizer step over both students.

Student 1 is evaluated and exported (either student or teacher on request).

Under `tf.distribute`, every mean divides by global counts (`kssl.losses`), masks and
strong ops are drawn per global example index (`kssl.augment.seeds`), and the class
statistics are updated from per-class sums all-reduced over the replicas, so every replica
keeps the same estimates as a single device would.
"""

from __future__ import annotations

import random
from typing import NamedTuple, Optional, Sequence

import tensorflow as tf

from kssl import losses
from kssl.augment import mixing, seeds
from kssl.augment.strong import MKD_CODE_OP_WEIGHTS, OneOfPhotometric
from kssl.methods import ema
from kssl.methods import pseudo_label_controls as controls
from kssl.methods.base import SegmentationMethod, unpack_batch
from kssl.methods.feature_augmentation import (ClassStatistics, augmented_logits,
                                               feature_augmentation_strength, logit_offsets)
from kssl.models.layers import resize_bilinear, spatial_size
from kssl.models.segmenter import Segmenter

# Random streams of one step (see kssl.augment.seeds.step_seed).
_MASK_STREAM, _STRONG_STREAM, _CLASS_STREAM = 1, 2, 3

NETWORKS = ("student_1", "student_2", "teacher_1", "teacher_2")
TEACHERS = NETWORKS[2:]


class TeacherTargets(NamedTuple):
    """What one teacher hands the other student, per consistency part ([labelled,] mixed
    unlabelled) at the loss resolution."""

    targets: list  # argmax of the augmented logits, the ignore label below the threshold
    admitted: list  # where the un-augmented confidence reaches the threshold (all: none)
    changed: tf.Tensor  # how many pixels' argmax the feature augmentation changed


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
      thresholds: "fixed" (`confidence_threshold` for every class; the default) or
        "class_adaptive": per class, `confidence_threshold` scaled by the teacher's
        running confidence on that class over its most confident class's (AEL's
        confidence bank with FreeMatch's normalisation; needs `confidence_threshold`).
        A target pixel is measured against the threshold of its (augmented) class.
      distribution_alignment: rescale each teacher's probabilities, un-augmented and
        augmented, by the labelled class prior over a running average of that teacher's
        class distribution on the mixed unlabelled batch, before the argmax and the
        threshold (ReMixMatch; DARS for segmentation; needs `class_prior`, which the
        driver passes).
      control_decay: decay of the running class confidence and class distribution of
        those two controls (0.99). The two are controls against confirmation bias (see
        `pseudo_label_controls`), off by default: the paper's recipe. Each teacher keeps
        its own state, updated from its un-augmented probabilities on the mixed
        unlabelled batch; its targets on the labelled images are thresholded and aligned
        with that state but not counted in it (predictions fitted to their masks would
        hide the teacher's bias on the unlabelled images).
      class_aware_mixing: centre the first CutMix box of image i on a pixel of one class
        of its weak view, so that the classes the teachers are least sure of are pasted
        most (AEL's adaptive CutMix; Hu et al., NeurIPS 2021). Per image, a class is
        drawn among those of the teachers' pseudo-labels (the argmax of the two teachers'
        mean probabilities, aligned under `distribution_alignment`, before the feature
        augmentation), weighted by `pseudo_label_controls.mixing_weights` of the two
        teachers' mean running class confidence as the step starts; the box keeps its
        drawn size and is centred on a uniform pixel of that class, the other boxes stay
        where they were drawn (`mixing.class_box_masks`: boxes all centred on one class
        would cancel under the XOR). The teachers then run on the unlabelled images
        before the boxes are drawn (the same outputs are mixed), and each keeps its
        running class confidence as for class-adaptive thresholds (the thresholds stay
        fixed unless `thresholds='class_adaptive'`). Off: the paper's uniform boxes.
      unsup_class_weights: True weighs each pixel of the four consistency terms by the
        supervised loss's class weight of its target (teacher's or other student's
        argmax), normalised by the sum of those weights (see `losses.masked_cross_entropy`;
        needs `class_weights`); 'teacher_terms' weighs the two teacher-to-student terms
        only, leaving the students' mutual argmax terms (never thresholded) unweighted.
        False: the paper, whose consistency terms are unweighted.
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
                 strong_op_weights: Sequence[float] = MKD_CODE_OP_WEIGHTS,
                 share_backbone_init: bool = True, inference: str = "student_1",
                 thresholds: str = "fixed", distribution_alignment: bool = False,
                 control_decay: float = 0.99, unsup_class_weights=False,
                 class_aware_mixing: bool = False, seed: Optional[int] = None, **kwargs):
        for name, value, allowed in [("teacher_bn", teacher_bn, ("batch", "ema")),
                                     ("lambda_schedule", lambda_schedule,
                                      ("cosine", "linear")),
                                     ("inference", inference, NETWORKS),
                                     ("thresholds", thresholds, ("fixed", "class_adaptive"))]:
            if value not in allowed:
                raise ValueError(f"MKD {name} must be one of {allowed}, got {value!r}")
        if thresholds == "class_adaptive" and confidence_threshold is None:
            raise ValueError("MKD thresholds='class_adaptive' scales confidence_threshold: "
                             "set it (e.g. 0.95)")
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
        if unsup_class_weights not in (False, True, "teacher_terms"):
            raise ValueError("MKD unsup_class_weights must be False, True or "
                             f"'teacher_terms', got {unsup_class_weights!r}")
        self.unsup_class_weights = controls.unlabelled_class_weights(
            "MKD", bool(unsup_class_weights), self.class_weights)
        # The students' mutual argmax has no threshold: weights there multiply unfiltered
        # rare-class guesses, so 'teacher_terms' leaves those two terms unweighted.
        self.student_term_weights = (self.unsup_class_weights
                                     if unsup_class_weights is True else None)
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
        # Pseudo-label controls (state in Keras weights: saved with the checkpoints). One
        # state per teacher: each teacher's targets come from its own network, whose
        # confidence and class bias drift apart from the other's, and the two targets
        # supervise different students; a shared state would let one teacher's bias set
        # the other's thresholds.
        self.thresholds = thresholds
        self.class_aware_mixing = class_aware_mixing
        layers = {name: controls.control_layers(
                      "MKD", num_classes, self.class_prior,
                      thresholds == "class_adaptive" or class_aware_mixing,
                      distribution_alignment, control_decay, prefix=f"{name}_")
                  for name in TEACHERS}
        self.class_confidence = {name: confidence for name, (confidence, _) in layers.items()
                                 if confidence is not None}
        self.alignment = {name: alignment for name, (_, alignment) in layers.items()
                          if alignment is not None}

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

    def student_view(self, images, step, teacher_outputs=None) -> tuple:
        """(mixed images, box masks): the strong op per image, then CutMix pairing image i
        (inside the boxes) with image i+1 of the global batch (outside). With
        `class_aware_mixing`, the first box is centred on a class of the teachers'
        pseudo-labels, from `teacher_outputs` ({teacher name: its `teacher_pass` on the
        weak images})."""
        if self.strong_augment is not None:
            images = self.strong_augment(images, seeds.step_seed(self.seed, step,
                                                                 _STRONG_STREAM))
        height, width = spatial_size(images)
        mask_seed = seeds.step_seed(self.seed, step, _MASK_STREAM)
        if self.class_aware_mixing:
            if teacher_outputs is None:
                raise ValueError("class-aware mixing centres the boxes on the teachers' "
                                 "pseudo-labels; pass teacher_outputs")
            labels, classes = self.box_classes(teacher_outputs, (height, width), step)
            boxes = mixing.class_box_masks(labels, classes, mask_seed,
                                           num_boxes=self.num_boxes,
                                           proportion_range=self.box_proportion)
        else:
            boxes = mixing.box_masks(tf.shape(images)[0], height, width, mask_seed,
                                     num_boxes=self.num_boxes,
                                     proportion_range=self.box_proportion)
        return mixing.mix(boxes, images), boxes

    def box_classes(self, teacher_outputs, size, step) -> tuple:
        """(pseudo-labels int32 [B, H, W] at the input size `size`, the class int32 [B]
        each image's first box is centred on) for class-aware mixing: the argmax of the
        teachers' mean probabilities (each aligned with its stored running distribution
        under `distribution_alignment`), and a class drawn among each image's
        pseudo-labels with the weights `mixing_weights` of the teachers' mean stored class
        confidence."""
        probs = []
        for name, (_, logits) in teacher_outputs.items():
            teacher_probs = tf.nn.softmax(tf.cast(logits, tf.float32))
            if name in self.alignment:
                teacher_probs = self.alignment[name].rescale(teacher_probs)
            probs.append(teacher_probs)
        probs = tf.add_n(probs) / len(probs)
        labels = self.resize_labels(tf.argmax(probs, -1, output_type=tf.int32), size)
        confidence = tf.add_n([tf.convert_to_tensor(self.class_confidence[name].confidence)
                               for name in TEACHERS]) / len(TEACHERS)
        uniform = seeds.per_example_uniform(seeds.step_seed(self.seed, step, _CLASS_STREAM),
                                            tf.shape(labels)[0], (self.num_classes,))
        classes = controls.draw_present_class(labels, self.num_classes, uniform,
                                              controls.mixing_weights(confidence))
        return labels, classes

    def teacher_pass(self, name, images) -> tuple:
        """(classifier features, logits) of teacher `name` on `images`, at its output size:
        in training mode (batch statistics) with `teacher_bn='batch'`, as the code."""
        return self.network(name).classifier_inputs_and_logits(
            images, training=self.teacher_bn == "batch")

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
        return (full,) + self.at_loss_size(images, features, logits, boxes)

    def at_loss_size(self, images, features, logits, boxes=None) -> tuple:
        """(features, logits) of a network on `images` at the loss resolution, mixed with
        `boxes` first when given (the teachers' outputs, like the students' inputs)."""
        if boxes is not None:
            features, logits = mixing.mix(boxes, features), mixing.mix(boxes, logits)
        size = self.loss_size(images)
        # The code downsamples bilinearly (align_corners False) before every semi loss.
        features = resize_bilinear(tf.cast(features, tf.float32), size)
        logits = resize_bilinear(logits, size)
        return features, logits

    def augmented(self, name, parts, strength) -> list:
        """Feature-augmented logits of network `name` for each (features, logits, labels)
        part, in order: the network's class statistics are updated with each part's
        pixels just before that part is augmented (labelled, then unlabelled)."""
        if name not in self.statistics:
            return [logits for _, logits, _ in parts]
        weights = self.network(name).classifier_weights()
        if not self.offset_gradient:
            weights = tf.stop_gradient(weights)
        return augmented_logits(self.statistics[name], weights, parts, strength,
                                self.ignore_label)

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

    def teacher_targets(self, name, images_l, labels_l, images_u, boxes, strength,
                        outputs_u=None) -> TeacherTargets:
        """The targets of teacher `name` at the loss resolution (see `TeacherTargets`): the
        argmax of its augmented logits on the [labelled and] weak unlabelled images, the
        latter mixed with the students' boxes; no gradient. `outputs_u`: the teacher's
        `teacher_pass` on `images_u` when it already ran (class-aware mixing)."""
        training = self.teacher_bn == "batch"
        parts = []
        if self.consistency_on_labelled:
            _, features, logits = self.forward(name, images_l, training)
            parts.append((features, logits, labels_l))
        if outputs_u is None:
            outputs_u = self.teacher_pass(name, images_u)
        features, logits = self.at_loss_size(images_u, *outputs_u, boxes)
        # The class statistics take the teacher's own argmax (the features' class for the
        # feature augmentation), not the controlled target.
        parts.append((features, logits, tf.argmax(logits, -1, output_type=tf.int32)))
        augmented = self.augmented(name, parts, strength)
        return self.targets_from_logits(name, [logits for _, logits, _ in parts],
                                        augmented)

    def targets_from_logits(self, name, logits_parts, augmented_parts) -> TeacherTargets:
        """Teacher `name`'s targets from its logits and their feature-augmented version,
        per consistency part (the mixed unlabelled part last): the pseudo-label controls'
        state is first updated from the unlabelled part, then each part's target is the
        argmax of its [aligned] augmented probabilities, ignored where the [aligned]
        un-augmented confidence is below the [class-adaptive] threshold."""
        running, confidence_bank = self.update_controls(name, logits_parts[-1])
        alignment = self.alignment.get(name)
        targets, admitted_parts, changed = [], [], 0.0
        for logits, logits_aug in zip(logits_parts, augmented_parts):
            if alignment is None:  # the paper's targets, in the logits' precision
                probs = tf.nn.softmax(logits)
                target = tf.argmax(logits_aug, -1, output_type=tf.int32)
                plain = tf.argmax(logits, -1, output_type=tf.int32)
            else:
                probs = alignment.rescale(tf.nn.softmax(tf.cast(logits, tf.float32)),
                                          running)
                target = tf.argmax(alignment.rescale(
                    tf.nn.softmax(tf.cast(logits_aug, tf.float32)), running), -1,
                    output_type=tf.int32)
                plain = tf.argmax(probs, -1, output_type=tf.int32)
            # Against the un-augmented argmax under the same alignment: what the
            # augmentation alone changed.
            changed += tf.reduce_sum(tf.cast(target != plain, tf.float32))
            admitted = tf.ones_like(target, tf.bool)
            if self.confidence_threshold is not None:
                admitted = tf.reduce_max(probs, -1) >= self.pixel_thresholds(
                    name, target, confidence_bank)
                target = tf.where(admitted, target, self.ignore_label)
            targets.append(tf.stop_gradient(target))
            admitted_parts.append(admitted)
        return TeacherTargets(targets, admitted_parts, changed)

    def update_controls(self, name, logits_u) -> tuple:
        """Folds teacher `name`'s un-augmented probabilities on the mixed unlabelled batch
        into its running class distribution, then (aligned) into its running class
        confidence, from global-batch sums. Returns (the new running distribution, the
        new class confidence), each None when its control is off."""
        running = confidence = None
        if name in self.alignment or name in self.class_confidence:
            probs = tf.nn.softmax(tf.cast(logits_u, tf.float32))
            if name in self.alignment:
                running = self.alignment[name].updated(probs)
                probs = self.alignment[name].rescale(probs, running)
            if name in self.class_confidence:
                confidence = self.class_confidence[name].updated(probs)
        return running, confidence

    def pixel_thresholds(self, name, pseudo_labels, class_confidence=None):
        """The confidence a target pixel of teacher `name` must reach: the fixed
        threshold, or its pseudo-label's class-adaptive one from `class_confidence`
        (default: the teacher's stored running class confidence)."""
        if self.thresholds != "class_adaptive":
            # Class-aware mixing alone keeps a class confidence too; the bar stays fixed.
            class_confidence = None
        elif class_confidence is None:
            class_confidence = self.class_confidence[name].confidence
        return controls.pixel_thresholds(pseudo_labels, class_confidence,
                                         self.confidence_threshold)

    def pseudo_label_targets(self, images, labelled_images=None) -> dict:
        """Each teacher's targets on the weak unlabelled view at the input size: the
        argmax of its [aligned] probabilities, admitted where its confidence reaches the
        [class-adaptive] threshold (all pixels without one), with the controls' stored
        running state (nothing is updated); and each student's argmax ("student_1",
        "student_2", every pixel admitted), the target the other student learns in the
        mutual terms, with no threshold or alignment: a drift there does not show in the
        teachers' controlled targets. The feature augmentation of the logits is left out:
        it would update the class statistics."""
        targets = {}
        for name in NETWORKS[:2]:
            logits = self.network(name)(images, training=False)
            targets[name] = (tf.argmax(logits, -1, output_type=tf.int32), None)
        for name in TEACHERS:
            logits = tf.cast(self.network(name)(images, training=False), tf.float32)
            probs = tf.nn.softmax(logits)
            if name in self.alignment:
                probs = self.alignment[name].rescale(probs)
            labels = tf.argmax(probs, -1, output_type=tf.int32)
            admitted = (None if self.confidence_threshold is None
                        else tf.reduce_max(probs, -1) >= self.pixel_thresholds(name, labels))
            targets[name] = (labels, admitted)
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

    def cross_entropy(self, logits_parts, label_parts, class_weights=None) -> tf.Tensor:
        """Mean CE over the non-ignored pixels of all parts of the global batch (a mean
        weighted by the targets' `class_weights` [C] when given)."""
        total, count = 0.0, 0.0
        for logits, labels in zip(logits_parts, label_parts):
            part_total, part_count = losses.weighted_cross_entropy_sums(
                logits, labels, self.ignore_label, class_weights=class_weights)
            total += part_total
            count += part_count
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

        teacher_weights, student_weights = self.unsup_class_weights, self.student_term_weights
        terms = {"teacher_2_to_student_1": self.cross_entropy(logits_1, targets_2,
                                                              teacher_weights),
                 "teacher_1_to_student_2": self.cross_entropy(logits_2, targets_1,
                                                              teacher_weights),
                 "student_2_to_student_1": self.cross_entropy(logits_1, argmax(logits_2),
                                                              student_weights),
                 "student_1_to_student_2": self.cross_entropy(logits_2, argmax(logits_1),
                                                              student_weights)}
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

    def health_logs(self, strength, teachers: Sequence[TeacherTargets]) -> dict:
        """The feature augmentation's and the threshold's health, as replica shares of
        global values: "largest_logit_offset" (the students' largest offset),
        "augmented_target_changes" (the share of teacher targets whose class the
        augmentation changed) and "confident_share" (the share of teacher pixels at or
        above their threshold), each where the settings make it meaningful."""
        logs = {}
        if self.feature_augment:
            logs["largest_logit_offset"] = losses.global_mean(
                self.largest_logit_offset(strength), 1.0)  # identical on every replica
        if self.feature_augment and self.augment_teachers:
            targets = [t for teacher in teachers for t in teacher.targets]
            logs["augmented_target_changes"] = losses.global_mean(
                tf.add_n([teacher.changed for teacher in teachers]),
                tf.add_n([tf.cast(tf.size(t), tf.float32) for t in targets]))
        if self.confidence_threshold is not None:
            confident = [tf.cast(a, tf.float32)
                         for teacher in teachers for a in teacher.admitted]
            logs["confident_share"] = losses.global_mean(
                tf.add_n([tf.reduce_sum(c) for c in confident]),
                tf.add_n([tf.cast(tf.size(c), tf.float32) for c in confident]))
        return logs

    # -- the step (Algorithm 1) ---------------------------------------------------------
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

        # Algorithm 1, line 6: update M_t1, M_t2 - each teacher follows its own student
        # (Eq. 1), before any forward pass.
        self.update_teachers(step)
        # With class-aware mixing, the teachers see WDA(x^u) first: their pseudo-labels
        # place the boxes of line 9.
        outputs_u = ({name: self.teacher_pass(name, images_u) for name in TEACHERS}
                     if self.class_aware_mixing else {})
        # Line 9: SDA(x^u) - a strong op per unlabelled image, then CutMix boxes.
        mixed, boxes = self.student_view(images_u, step, outputs_u or None)
        # Line 10: the teachers on WDA(x^u) (and x^l), their outputs mixed with the same
        # boxes; the targets max(p_t^u), no gradient (the teachers' logits feature-augmented
        # too, as the released code, unless augment_teachers=False).
        teacher_1 = self.teacher_targets("teacher_1", images_l, labels_l, images_u, boxes,
                                         strength, outputs_u.get("teacher_1"))
        teacher_2 = self.teacher_targets("teacher_2", images_l, labels_l, images_u, boxes,
                                         strength, outputs_u.get("teacher_2"))
        with tf.GradientTape() as tape:
            # Lines 11-12: the students' p_s^l (supervised CE, Eq. 5) and FD(p_s^u), the
            # feature-augmented logits (Eq. 3).
            supervised_1, logits_1 = self.student_outputs("student_1", images_l, masks_l,
                                                          labels_l, mixed, strength)
            supervised_2, logits_2 = self.student_outputs("student_2", images_l, masks_l,
                                                          labels_l, mixed, strength)
            # Lines 13-16: loss_sup + alpha loss_st + beta loss_ss (Eq. 2, 4): teacher k's
            # targets supervise the *other* student, and each student learns the other's
            # argmax (CPS).
            terms = self.mutual_losses((supervised_1, supervised_2), (logits_1, logits_2),
                                       (teacher_1.targets, teacher_2.targets))
        # One optimizer step over both students.
        self.apply_gradients(tape, terms["loss"], self.optimized_variables())
        return self.report(**{name: terms[name] for name in self.base_losses},
                           **self.health_logs(strength, (teacher_1, teacher_2)))
