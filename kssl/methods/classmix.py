"""ClassMix (Olsson, Tranheden et al., WACV 2021): a mean teacher with class-mixed pairs.

Per step (paper Algorithm 1 and Eq. 1-2, released-code details where the paper is silent):
the EMA teacher predicts on the unlabelled batch; for each pair (image i, image i+1) a mask
selects half of the classes of the teacher's argmax on image i; images and teacher
probabilities are mixed with that mask; the student learns the argmax of the mixed
probabilities on the mixed image, weighted by the share of confident pixels, next to the
supervised cross-entropy; the teacher follows the student after the optimizer step.
"""

from __future__ import annotations

import random
from typing import Optional

import tensorflow as tf

from kssl import losses
from kssl.augment import mixing, seeds
from kssl.augment.strong import StrongAugment
from kssl.methods import ema
from kssl.methods import pseudo_label_controls as controls
from kssl.methods.base import SegmentationMethod, unpack_batch

# Random streams of one step (see kssl.augment.seeds.step_seed).
_MASK_STREAM, _STRONG_STREAM, _MIX_CHOICE_STREAM = 1, 2, 3


class ClassMix(SegmentationMethod):
    """ClassMix semi-supervised training of `segmenter` with an EMA teacher.

    Args:
      segmenter: the student network (also the inference network by default).
      num_classes: number of classes.
      confidence_threshold: a mixed teacher pixel is confident above this (0.968).
      weighting: how confidence weighs the unsupervised loss: "batch" (share of confident
        pixels in the global batch, the released code; default), "image" (share in each
        mixed image, the paper's wording), "pixel" (0/1 per pixel) or "none".
      unsup_weight: lambda of Eq. 1, multiplying the unsupervised loss (1).
      strong_augment: False, True (colour jitter p=0.8 then blur p=0.5 on the mixed
        images, as the released Cityscapes config), or a `StrongAugment` / callable
        `(images, seed) -> images`.
      ema_decay: the teacher's decay once warmed up (0.99).
      ema_warmup: use min(1 - 1/(step+1), ema_decay), as the released code.
      teacher_bn: "ema" (the default, the paper's mean teacher read as an average of the
        whole network: batch-norm moving statistics are averaged with the weights and the
        teacher predicts in inference mode) or "batch" (the released code:
        only the weights are averaged and the teacher runs in training mode on the
        unlabelled batch's statistics).
      mix_mask: "class" (ClassMix) or "cut" (the code's CutMix ablation: image i+1
        inside one box of half the image area, image i outside).
      mix_probability: the chance that an unlabelled image is mixed with the next one
        (1, the paper: every image); the student's sample for an image left unmixed is
        that image alone with its own pseudo-labels (strongly augmented when
        `strong_augment` is set), though it may still fill the previous image's mix.
        FixMatch and UniMatch mix with CutMix half of the time; below 1 ClassMix's
        student sees fewer pasted object edges and more whole scenes.
      inference: "student" (evaluated and exported, as the paper) or "teacher".
      thresholds: "fixed" (`confidence_threshold` for every class, the paper) or
        "class_adaptive" (per class, `confidence_threshold` scaled by the teacher's
        running confidence on that class over the most confident class's; see
        `pseudo_label_controls`).
      distribution_alignment: rescale the teacher's probabilities by the labelled class
        prior over their running class distribution before mixing and the argmax
        (ReMixMatch; needs `class_prior`, which the driver passes). Off: the paper.
      class_aware_mixing: choose the pasted half of the classes by a draw weighted
        towards the classes the teacher is least confident on (AEL's adaptive
        copy-paste) instead of uniformly. Off: the paper.
      control_decay: decay of the running class confidence and class distribution
        those controls keep (0.99).
      unsup_class_weights: weight each pixel of the unsupervised loss by the supervised
        loss's class weight of its pseudo-label (a weighted mean, as the supervised loss;
        needs `class_weights`, e.g. `supervised_loss.class_weights = 'median_frequency'`).
        Off: the paper, whose unsupervised loss is unweighted; with a class-weighted
        supervised loss the two terms then pull the network towards different class
        priors (the rare classes the weighted term lifts, the unweighted term damps).
      seed: seeds the mask choices and strong augmentation, which are drawn statelessly
        per step and per global example index (so they do not depend on the number of
        replicas and repeat on resume); default: drawn from Python's `random` (seeded by
        `keras.utils.set_random_seed`, i.e. `train.seed`).
    """

    tracked_losses = ("loss", "supervised_loss", "unsupervised_loss", "confident_share")

    def __init__(self, segmenter, num_classes, confidence_threshold: float = 0.968,
                 weighting: str = "batch", unsup_weight: float = 1.0,
                 strong_augment=False, ema_decay: float = 0.99, ema_warmup: bool = True,
                 teacher_bn: str = "ema", mix_mask: str = "class",
                 mix_probability: float = 1.0, inference: str = "student",
                 thresholds: str = "fixed",
                 distribution_alignment: bool = False, class_aware_mixing: bool = False,
                 control_decay: float = 0.99, unsup_class_weights: bool = False,
                 seed: Optional[int] = None, **kwargs):
        super().__init__(segmenter, num_classes, **kwargs)
        self.unsup_class_weights = controls.unlabelled_class_weights(
            "ClassMix", unsup_class_weights, self.class_weights)
        for name, value, allowed in [("weighting", weighting, losses.PSEUDO_LABEL_WEIGHTINGS),
                                     ("teacher_bn", teacher_bn, ("ema", "batch")),
                                     ("mix_mask", mix_mask, ("class", "cut")),
                                     ("inference", inference, ("student", "teacher")),
                                     ("thresholds", thresholds, ("fixed", "class_adaptive"))]:
            if value not in allowed:
                raise ValueError(f"ClassMix {name} must be one of {allowed}, got {value!r}")
        self.confidence_threshold = confidence_threshold
        self.weighting = weighting
        self.unsup_weight = unsup_weight
        if strong_augment is True:
            strong_augment = StrongAugment()
        self.strong_augment = strong_augment or None
        self.teacher_bn = teacher_bn
        self.mix_mask = mix_mask
        if not 0.0 <= mix_probability <= 1.0:
            raise ValueError(
                f"ClassMix mix_probability must be in [0, 1], got {mix_probability}")
        self.mix_probability = float(mix_probability)
        self.inference = inference
        self.seed = random.randrange(2**31) if seed is None else int(seed)
        # The teacher is an attribute of this model, so BackupAndRestore and save_weights
        # keep it with the student.
        self.teacher = ema.clone_network(segmenter)
        self.build_networks()
        self.ema = ema.EMATeacher(segmenter, self.teacher, max_decay=ema_decay,
                                  warmup=ema_warmup,
                                  include_statistics=teacher_bn == "ema")
        # Pseudo-label controls (state in Keras weights: saved with the checkpoints).
        self.thresholds = thresholds
        self.class_aware_mixing = class_aware_mixing
        self.class_confidence, self.alignment = controls.control_layers(
            "ClassMix", num_classes, self.class_prior,
            thresholds == "class_adaptive" or class_aware_mixing, distribution_alignment,
            control_decay)

    def networks(self) -> list:
        """The student and the teacher."""
        return [self.segmenter, self.teacher]

    def optimized_variables(self) -> list:
        """The student's trainable variables: the teacher only follows by EMA."""
        return self.segmenter.trainable_variables

    @property
    def inference_network(self):
        """The student (or the teacher with `inference="teacher"`)."""
        return self.teacher if self.inference == "teacher" else self.segmenter

    def pseudo_label_targets(self, images, labelled_images=None) -> dict:
        """The teacher's argmax on the unmixed images, admitted where its confidence
        exceeds the threshold (a mixed pseudo-label takes each pixel from one of these).
        The teacher runs in inference mode even with teacher_bn="batch", so that the
        monitor leaves its statistics untouched."""
        probs = tf.nn.softmax(tf.cast(self.teacher(images, training=False), tf.float32))
        if self.alignment is not None:  # with the stored running distribution
            probs = self.alignment.rescale(probs)
        labels = tf.argmax(probs, -1, output_type=tf.int32)
        threshold = self.pixel_thresholds(labels)
        return {"teacher": (labels, tf.reduce_max(probs, -1) > threshold)}

    def pixel_thresholds(self, pseudo_labels):
        """The confidence a pixel must exceed: the fixed threshold, or its pseudo-label's
        class-adaptive one (from the stored running class confidence)."""
        adaptive = self.thresholds == "class_adaptive"
        return controls.pixel_thresholds(
            pseudo_labels, self.class_confidence.confidence if adaptive else None,
            self.confidence_threshold)

    def masks(self, teacher_labels, seed):
        """One mixing mask per unlabelled image: 1 where image i is kept over image i+1."""
        batch = tf.shape(teacher_labels)[0]
        if self.mix_mask == "class":
            scores = seeds.per_example_uniform(seed, batch, (self.num_classes,))
            if self.class_aware_mixing:
                scores = controls.class_aware_scores(
                    scores, controls.mixing_weights(self.class_confidence.confidence))
            return mixing.class_mix_masks(teacher_labels, self.num_classes, scores)
        size = tf.shape(teacher_labels)[1:3]
        return 1.0 - mixing.box_masks(batch, size[0], size[1], seed)

    def mixed_images_chosen(self, batch, seed):
        """[b] bool: which images of this replica are mixed (all with mix_probability 1,
        the draws lying in [0, 1)). Drawn per global example index, as the masks, so
        replicas agree with one device."""
        return seeds.per_example_uniform(seed, batch) < self.mix_probability

    def mix_pairs(self, images, teacher_probs, step):
        """(mixed images, mixed teacher probabilities): both mixed with the same masks,
        built from the teacher's argmax on the unmixed images (pairs i, i+1); an image
        not chosen for mixing keeps a mask of ones, i.e. itself."""
        masks = self.masks(tf.argmax(teacher_probs, axis=-1, output_type=tf.int32),
                           seeds.step_seed(self.seed, step, _MASK_STREAM))
        chosen = self.mixed_images_chosen(
            tf.shape(images)[0], seeds.step_seed(self.seed, step, _MIX_CHOICE_STREAM))
        masks = tf.where(chosen[:, None, None], masks, tf.ones_like(masks))
        return mixing.mix(masks, images), mixing.mix(masks, teacher_probs)

    def train_step(self, data):
        labelled, unlabelled = unpack_batch(data)
        if unlabelled is None:
            raise ValueError("ClassMix needs (labelled, unlabelled) training elements")
        # The 0-based index of this step, read before the optimizer increments it; it keys
        # the step's randomness and the teacher's decay.
        step = tf.identity(self.optimizer.iterations)
        images = unlabelled["image"]

        # 1. The teacher predicts on the unmixed unlabelled batch.
        teacher_logits = self.teacher(images, training=self.teacher_bn == "batch")
        teacher_probs = tf.stop_gradient(tf.nn.softmax(tf.cast(teacher_logits, tf.float32)))
        #    Optional controls: align the probabilities to the labelled class prior, and
        #    fold them into the running per-class confidence (adaptive thresholds and
        #    class-aware mixing read it).
        if self.alignment is not None:
            teacher_probs = self.alignment.align(teacher_probs)
        if self.class_confidence is not None:
            self.class_confidence.updated(teacher_probs)
        # 2. Half of the classes of image i's prediction select where image i is pasted
        #    over image i+1; images and teacher probabilities are mixed with the same masks
        #    (optionally only a `mix_probability` share of the images).
        mixed_images, mixed_probs = self.mix_pairs(images, teacher_probs, step)
        # 3. The artificial label is the argmax of the mixed probabilities.
        pseudo_labels = tf.argmax(mixed_probs, axis=-1, output_type=tf.int32)
        confidence = tf.reduce_max(mixed_probs, axis=-1)
        threshold = self.pixel_thresholds(pseudo_labels)
        # 4. Optional strong augmentation of the mixed images (never of the targets).
        if self.strong_augment is not None:
            mixed_images = self.strong_augment(
                mixed_images, seeds.step_seed(self.seed, step, _STRONG_STREAM))

        # 5. Eq. 1: supervised CE + lambda * confidence-weighted CE on the mixed images,
        #    two student passes (labelled and mixed batch statistics kept apart, as the code).
        with tf.GradientTape() as tape:
            labelled_logits = self.segmenter(labelled["image"], training=True)
            supervised = self.supervised_loss(labelled_logits, labelled["mask"])
            mixed_logits = self.segmenter(mixed_images, training=True)
            unsupervised = losses.confidence_weighted_cross_entropy(
                mixed_logits, pseudo_labels, confidence, threshold, self.weighting,
                self.ignore_label, class_weights=self.unsup_class_weights)
            loss = supervised + self.unsup_weight * unsupervised
        self.apply_gradients(tape, loss, self.optimized_variables())

        # 6. The teacher follows the updated student.
        self.ema.update(step)

        confident = tf.cast(confidence > threshold, tf.float32)
        return self.report(
            loss=loss, supervised_loss=supervised, unsupervised_loss=unsupervised,
            confident_share=losses.global_mean(tf.reduce_sum(confident), tf.size(confident)))
