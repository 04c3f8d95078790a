"""UniMatch (Yang, Qi, Feng, Zhang, Shi, CVPR 2023) and FixMatch, as the released code
trains them for segmentation.

One network and no teacher: the network's own prediction on the weak view, in the same
step, gives the pseudo-labels. A UniMatch step (the released `unimatch.py`), in order:

1. the mix partners' weak views are predicted in inference mode, without gradient;
2. two strong views (colour jitter, grayscale, blur) of every unlabelled image, each with
   its own CutMix box inside which it shows its partner's strong view (optionally centred
   on a class of the partner's prediction, `class_aware_mixing`);
3. one training-mode pass over [labelled; weak] images; the decoder also reads a copy of
   the features it takes from the backbone with whole channels dropped (p = 0.5), which
   gives the feature-perturbed prediction;
4. one training-mode pass over the two strong views together;
5. pseudo-labels (argmax) and confidences (max softmax) from the detached weak prediction;
   a pixel is admitted where its confidence is >= the threshold;
6. each strong view's targets: the weak ones, and the partner's inside its box (labels,
   admission and padding alike);
7. loss = (L_x + 0.5 L_fp + 0.25 L_s1 + 0.25 L_s2) / 2 (`total_weight`), where every
   unlabelled term is sum(CE * [confidence >= threshold] * [not padding]) / count(not padding).

FixMatch (`variant="fixmatch"` or the `FixMatch` class; the code's `fixmatch.py`) is the
same without the feature-perturbed stream and with one strong view: (L_x + L_s) / 2
(`total_weight` 0.5).
"""

from __future__ import annotations

import math
import numbers
import random
from typing import Optional

import tensorflow as tf

from kssl import losses, optimizers
from kssl.augment import features as feature_ops
from kssl.augment import mixing, seeds
from kssl.augment.strong import ColorJitterGrayscaleBlur
from kssl.methods import pseudo_label_controls as controls
from kssl.methods.base import SegmentationMethod, unpack_batch

VARIANTS = ("unimatch", "fixmatch")
MIX_SOURCES = ("second_batch", "batch")
SUPERVISED_CRITERIA = ("cross_entropy", "ohem")
THRESHOLDS = ("fixed", "class_adaptive")

# Random streams of one step (see kssl.augment.seeds.step_seed). Each strong view k has
# its own stream _VIEW + k, inside which the images, the partners and the box draw apart.
_DROPOUT_LABELLED, _DROPOUT_UNLABELLED, _VIEW = 1, 2, 10
_IMAGES, _PARTNERS, _BOX, _CLASS = 0, 1, 2, 3


class UniMatch(SegmentationMethod):
    """UniMatch (or FixMatch) semi-supervised training of `segmenter`.

    The defaults follow the released code; where the paper differs it is one argument away:

    - Mix partners. The code mixes with a second batch from a second iterator over the
      same loader: the same images, augmented again (its author calls this unintended),
      predicted in inference mode. Here the unlabelled batch holds the images in its even
      rows and their partners in its odd rows (`mix_source="second_batch"`): with
      `pipeline.unlabelled_views = 2` (the shipped configs) an odd row is another weak
      view of the image above it, as the code; with 1 it is another image (the released
      medical-scenario script's separate sampler). `mix_source="batch"` takes the next
      image of the unlabelled batch as partner and its targets from the same training-mode
      weak prediction (the paper's single weak prediction; no extra pass).
    - The feature-perturbed pass also runs the labelled features through the decoder (their
      perturbed logits are discarded, but they enter the decoder's batch statistics), as
      the code (`perturb_labelled=True`); the paper perturbs unlabelled features only.
    - The code runs [labelled; weak] through the network in one training-mode pass, so
      batch norm normalises the labelled images with statistics shared with the
      unlabelled ones (`joint_batch_norm=True`); the paper does not say. With False each
      group has its own pass and its own batch statistics.
    - Cityscapes trains the labelled loss with OHEM and threshold 0 in the code
      (`supervised_criterion="ohem"`, `confidence_threshold=0.0`; the Cityscapes config).

    Args:
      segmenter: the network (a `kssl.models.Segmenter` for the feature-perturbed pass:
        the dropout hits the blocks its head reads, `Segmenter.head_input_blocks`; any
        Keras model for FixMatch).
      num_classes: number of classes.
      variant: "unimatch" or "fixmatch" (one strong view, no feature perturbation).
      confidence_threshold: a pseudo-label counts where its confidence is >= this (0.95).
      strong_views: strong views per unlabelled image (default 2, FixMatch 1); their
        losses share the unlabelled weight 1 - fp_weight equally.
      fp_weight: weight of the feature-perturbed loss inside the unlabelled loss (0.5; 0
        for FixMatch; the total unlabelled weight stays 1, as the author keeps it).
      fp_rate: the channel dropout probability of the perturbed pass (0.5).
      perturb_labelled: whether the perturbed pass includes the labelled features (code).
      mix_source: "second_batch" (code) or "batch" (the paper's), see above.
      joint_batch_norm: True (code): labelled and weak images share one training-mode
        pass and its batch statistics, in the encoder and (with the feature-perturbed
        pass) in the decoder; False: one pass per group, labelled rows (and their
        perturbed copies) apart from unlabelled rows (and theirs). Either way the moving
        statistics follow every training-mode pass, the strong views' included.
      strong_augment: True (`ColorJitterGrayscaleBlur()`, the code's), False (CutMix
        alone), or a callable `(images, seed) -> images`.
      cutmix_probability, cutmix_area, cutmix_ratio: the box (see
        `kssl.augment.mixing.cutmix_boxes`): 0.5, (0.02, 0.4), (0.3, 1 / 0.3).
      supervised_criterion: "cross_entropy" or "ohem" (Cityscapes in the code; see
        `kssl.losses.ohem_cross_entropy`), with `ohem_threshold` (0.7) and
        `ohem_min_kept` (pixels kept at least per labelled image: 100,000, the code's
        200,000 for 2 images per GPU).
      backbone_lr_multiplier: learning-rate factor of the backbone blocks (the code trains
        the head at 10x the backbone's rate on VOC and COCO: set the head's rate as
        `optimizer.learning_rate` and 0.1 here; 1 on Cityscapes).
      thresholds: "fixed" (`confidence_threshold` for every class; the code) or
        "class_adaptive": per class, `confidence_threshold` scaled by the network's running
        confidence on the weak pixels it assigns to that class over its most confident
        class's (AEL's confidence bank with FreeMatch's normalisation), so a class the
        network is unsure of is not starved of pseudo-labels by a dominant one. A pixel is
        admitted where its confidence is >= the threshold of its own pseudo-label's class.
      distribution_alignment: rescale the weak probabilities by the labelled class prior
        over their running class distribution before the argmax and the confidence
        (ReMixMatch; DARS for segmentation; needs `class_prior`, which the driver passes).
      class_aware_mixing: centre each strong view's CutMix box on a pixel of a class of
        its partner, the image shown inside the box, so that the classes the network is
        least sure of are pasted most (AEL's adaptive CutMix; Hu et al., "Semi-Supervised
        Semantic Segmentation via Adaptive Equalization Learning", NeurIPS 2021). Per
        image and view, a class is drawn among those of the partner's inference-mode
        pseudo-labels of step 1 (on its counted pixels; aligned with the stored running
        distribution under `distribution_alignment`), weighted by
        `pseudo_label_controls.mixing_weights` of the running class confidence as the step
        starts, and the box is centred on a uniform pixel of that class (cut off at the
        borders); whether there is a box, and its size, are drawn as without the option.
        The running class confidence is kept (and updated as for class-adaptive
        thresholds) even with fixed thresholds. Needs mix_source="second_batch", whose
        partners are predicted before the strong views. Off: the released code, which
        places the boxes uniformly.
      control_decay: decay of the running class confidence and class distribution of
        those controls (0.99). They are controls against confirmation bias (see
        `pseudo_label_controls`), off by default: the released code. Their state is
        updated once per step from the weak view's training-mode probabilities on the
        counted (not padding) pixels of the unlabelled images, over the global batch; the
        mix partners' targets use the state just updated (see `train_step`).
      unsup_class_weights: weight each pixel of the unlabelled terms by the supervised
        loss's class weight of its pseudo-label, and normalise by the sum of those weights
        over the counted pixels instead of their count (see `losses.masked_cross_entropy`;
        needs `class_weights`, e.g. `supervised_loss.class_weights = 'median_frequency'`).
        Off: the code, whose unlabelled loss is unweighted whatever the labelled one.
      total_weight: the loss is total_weight * (L_x + L_u): 0.5, the code's average of
        the labelled and unlabelled losses, with which the labelled term moves the network
        half as far as in a supervised run at the same learning rate; 1.0 keeps it at a
        supervised run's weight, and doubles the unlabelled terms with it (not in the
        code).
      seed: seeds the strong views, boxes and dropout, drawn statelessly per step and per
        global example index (so they do not depend on the number of replicas and repeat
        on resume); default: drawn from Python's `random` (`train.seed`).
    The unlabelled dict may hold "padding" (`pipeline.unlabelled_padding = True`): pixels
    equal to the ignore label there are crop padding and count in no unlabelled loss.
    """

    def __init__(self, segmenter, num_classes, variant: str = "unimatch",
                 confidence_threshold: float = 0.95, strong_views: Optional[int] = None,
                 fp_weight: Optional[float] = None, fp_rate: float = 0.5,
                 perturb_labelled: bool = True, mix_source: str = "second_batch",
                 joint_batch_norm: bool = True,
                 strong_augment=True, cutmix_probability: float = 0.5,
                 cutmix_area=(0.02, 0.4), cutmix_ratio=(0.3, 1 / 0.3),
                 supervised_criterion: str = "cross_entropy", ohem_threshold: float = 0.7,
                 ohem_min_kept: int = 100000, backbone_lr_multiplier: float = 1.0,
                 thresholds: str = "fixed", distribution_alignment: bool = False,
                 class_aware_mixing: bool = False, control_decay: float = 0.99,
                 unsup_class_weights: bool = False, total_weight: float = 0.5,
                 seed: Optional[int] = None, **kwargs):
        if isinstance(total_weight, bool) or not isinstance(total_weight, numbers.Real) \
                or not 0 < total_weight < math.inf:
            raise ValueError(f"UniMatch total_weight must be a number > 0, got "
                             f"{total_weight!r}")
        for name, value, allowed in [("variant", variant, VARIANTS),
                                     ("mix_source", mix_source, MIX_SOURCES),
                                     ("supervised_criterion", supervised_criterion,
                                      SUPERVISED_CRITERIA),
                                     ("thresholds", thresholds, THRESHOLDS)]:
            if value not in allowed:
                raise ValueError(f"UniMatch {name} must be one of {allowed}, got {value!r}")
        fixmatch = variant == "fixmatch"
        if fp_weight is None:
            fp_weight = 0.0 if fixmatch else 0.5
        if fixmatch and fp_weight:
            raise ValueError("FixMatch has no feature-perturbed stream: leave fp_weight unset "
                             "or use variant='unimatch'")
        if not 0.0 <= fp_weight <= 1.0:
            raise ValueError(f"fp_weight must be in [0, 1], got {fp_weight!r}")
        strong_views = (1 if fixmatch else 2) if strong_views is None else int(strong_views)
        if strong_views < 1:
            raise ValueError(f"strong_views must be at least 1, got {strong_views!r}")
        if thresholds == "class_adaptive" and not confidence_threshold > 0:
            raise ValueError("UniMatch thresholds='class_adaptive' scales confidence_threshold, "
                             f"which is {confidence_threshold!r}: every class's threshold "
                             "would stay 0")
        if class_aware_mixing and mix_source != "second_batch":
            raise ValueError("UniMatch class_aware_mixing centres the boxes on the partners' "
                             "pseudo-labels, which only mix_source='second_batch' predicts "
                             f"before the strong views; got mix_source={mix_source!r}")
        self.feature_perturbation = fp_weight > 0
        if self.feature_perturbation:
            missing = [a for a in ("features", "logits_from_features", "head_input_blocks")
                       if not hasattr(segmenter, a)]
            if missing:
                raise TypeError("the feature-perturbed pass needs a kssl Segmenter (named "
                                f"blocks and a head); {type(segmenter).__name__} lacks "
                                f"{', '.join(missing)}")
        tracked = ("loss", "supervised_loss", "strong_loss")
        tracked += ("fp_loss",) if self.feature_perturbation else ()
        super().__init__(segmenter, num_classes,
                         tracked_losses=tracked + ("confident_share",), **kwargs)
        self.unsup_class_weights = controls.unlabelled_class_weights(
            "UniMatch", unsup_class_weights, self.class_weights)
        self.variant = variant
        self.confidence_threshold = float(confidence_threshold)
        self.strong_views = strong_views
        self.fp_weight = float(fp_weight)
        self.total_weight = float(total_weight)
        self.fp_rate = float(fp_rate)
        self.perturb_labelled = perturb_labelled
        self.mix_source = mix_source
        self.joint_batch_norm = bool(joint_batch_norm)
        if strong_augment is True:
            strong_augment = ColorJitterGrayscaleBlur()
        self.strong_augment = strong_augment or None
        self.cutmix = dict(probability=cutmix_probability, area_range=tuple(cutmix_area),
                           ratio_range=tuple(cutmix_ratio))
        self.supervised_criterion = supervised_criterion
        self.ohem_threshold = ohem_threshold
        self.ohem_min_kept = ohem_min_kept
        self.backbone_lr_multiplier = backbone_lr_multiplier
        self.seed = random.randrange(2**31) if seed is None else int(seed)
        self.build_networks()
        # Pseudo-label controls (state in Keras weights: saved with the checkpoints; none
        # when off, so the released recipe's checkpoints keep their layout).
        self.thresholds = thresholds
        self.class_aware_mixing = class_aware_mixing
        self.class_confidence, self.alignment = controls.control_layers(
            "UniMatch", num_classes, self.class_prior,
            thresholds == "class_adaptive" or class_aware_mixing, distribution_alignment,
            control_decay)

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        if self.backbone_lr_multiplier != 1.0:
            if not hasattr(self.segmenter, "block_layers"):
                raise TypeError("backbone_lr_multiplier needs a kssl Segmenter")
            backbone = [v for layer in self.segmenter.block_layers
                        for v in layer.trainable_variables]
            optimizers.set_learning_rate_multiplier(self.optimizer, backbone,
                                                    self.backbone_lr_multiplier)

    def pseudo_label_targets(self, images, labelled_images=None) -> dict:
        """The network's argmax of its [aligned] probabilities on the (weak) images,
        admitted where its confidence is >= the [class-adaptive] threshold; every mixed
        target takes each pixel from one of these. Computed in inference mode and with the
        controls' stored state, so that the monitor changes no batch-norm statistics and
        no running state (a step's targets come from its training-mode pass)."""
        del labelled_images
        labels, admitted = self.targets(
            self.probabilities(self.segmenter(images, training=False)))
        return {"network": (labels, admitted)}

    # -- pieces of a step -----------------------------------------------------------
    def split_unlabelled(self, unlabelled):
        """(images, counted, partner images, partner counted): `counted` is True on the
        image, False on crop padding. With mix_source="second_batch" the even rows are the
        images and the odd rows their partners; with "batch" partners are None."""
        images = tf.convert_to_tensor(unlabelled["image"])
        if "padding" in unlabelled:
            counted = tf.not_equal(tf.cast(unlabelled["padding"], tf.int32), self.ignore_label)
        else:
            counted = tf.ones(tf.shape(images)[:3], tf.bool)
        if self.mix_source == "batch":
            return images, counted, None, None
        rows = images.shape[0]
        if rows is not None and rows % 2:
            raise ValueError(
                f"mix_source='second_batch' pairs the rows of the unlabelled batch (image, "
                f"partner); this replica holds {rows}: use an even number of unlabelled rows "
                "per replica (pipeline.unlabelled_views = 2 gives pairs of views)")
        return images[0::2], counted[0::2], images[1::2], counted[1::2]

    @staticmethod
    def probabilities(logits):
        """Softmax of logits in float32, without gradient."""
        return tf.nn.softmax(tf.stop_gradient(tf.cast(logits, tf.float32)))

    def update_controls(self, probs, counted) -> tuple:
        """Folds the weak probabilities on the counted pixels into the running class
        distribution, then (aligned) into the running class confidence, from global-batch
        sums. Returns (running distribution, class confidence), each None when off."""
        running = class_confidence = None
        if self.alignment is not None:
            running = self.alignment.updated(probs, counted)
            probs = self.alignment.rescale(probs, running)
        if self.class_confidence is not None:
            class_confidence = self.class_confidence.updated(probs, counted)
        return running, class_confidence

    def targets(self, probs, state=(None, None)):
        """(pseudo-labels, admitted) of `probabilities`: the argmax of the [aligned]
        probabilities, admitted where their max is >= the [class-adaptive] threshold of
        that class. `state`: (running distribution, class confidence) as `update_controls`
        returns them; None reads the stored one (nothing is updated)."""
        running, class_confidence = state
        if self.alignment is not None:
            probs = self.alignment.rescale(probs, running)
        labels = tf.argmax(probs, axis=-1, output_type=tf.int32)
        confidence = tf.reduce_max(probs, axis=-1)
        return labels, confidence >= self.pixel_thresholds(labels, class_confidence)

    def pixel_thresholds(self, pseudo_labels, class_confidence=None):
        """The confidence a pixel must reach: the fixed threshold, or its pseudo-label's
        class-adaptive one from `class_confidence` (default: the stored one)."""
        if self.thresholds != "class_adaptive":
            class_confidence = None  # kept for class-aware mixing alone
        elif class_confidence is None:
            class_confidence = self.class_confidence.confidence
        return controls.pixel_thresholds(pseudo_labels, class_confidence,
                                         self.confidence_threshold)

    def strong(self, images, seed):
        """The strong photometric view of images (unchanged without strong_augment)."""
        return images if self.strong_augment is None else self.strong_augment(images, seed)

    def placement_labels(self, partner_logits, partner_counted):
        """The partners' pseudo-labels class-aware mixing centres the boxes on: the argmax
        of their inference-mode probabilities [aligned with the stored running
        distribution: this step's is folded in later, from the training-mode pass that
        needs the boxes], -1 (no class) on padding."""
        probs = self.probabilities(partner_logits)
        if self.alignment is not None:
            probs = self.alignment.rescale(probs)
        labels = tf.argmax(probs, axis=-1, output_type=tf.int32)
        return tf.where(partner_counted, labels, -1)

    def class_aware_boxes(self, partner_labels, view_seed):
        """One view's CutMix boxes [B, H, W], each centred on a pixel of a class of its
        partner: a class drawn among those in `partner_labels[i]`, favouring the classes
        the network is least confident on (the stored running class confidence), then a
        uniform pixel of it (see `mixing.class_cutmix_boxes`; a partner without a counted
        pixel keeps the uniform box)."""
        fold = tf.random.experimental.stateless_fold_in
        uniform = seeds.per_example_uniform(fold(view_seed, _CLASS),
                                            tf.shape(partner_labels)[0], (self.num_classes,))
        classes = controls.draw_present_class(
            partner_labels, self.num_classes, uniform,
            controls.mixing_weights(self.class_confidence.confidence))
        return mixing.class_cutmix_boxes(partner_labels, classes, fold(view_seed, _BOX),
                                         **self.cutmix)

    def mixed_views(self, weak, partner_weak, step, partner_labels=None):
        """(boxes, views): for each strong view k, the CutMix box [B, H, W] and the strong
        view of the weak images showing the partner's strong view inside the box. Partners:
        `partner_weak` ("second_batch") or the next image of the batch ("batch").
        `partner_labels`: the partners' `placement_labels`, which class-aware mixing
        needs."""
        if self.class_aware_mixing and partner_labels is None:
            raise ValueError("class-aware mixing places the boxes on the partners' "
                             "placement_labels; pass partner_labels")
        fold = tf.random.experimental.stateless_fold_in
        size = tf.shape(weak)
        boxes, views = [], []
        for k in range(self.strong_views):
            view_seed = seeds.step_seed(self.seed, step, _VIEW + k)
            own = self.strong(weak, fold(view_seed, _IMAGES))
            if self.mix_source == "second_batch":
                partner = self.strong(partner_weak, fold(view_seed, _PARTNERS))
            else:
                partner = mixing.next_in_batch(own)
            if self.class_aware_mixing:
                box = self.class_aware_boxes(partner_labels, view_seed)
            else:
                box = mixing.cutmix_boxes(size[0], size[1], size[2], fold(view_seed, _BOX),
                                          **self.cutmix)
            boxes.append(box)
            views.append(mixing.mix(box, partner, own))
        return boxes, views

    @staticmethod
    def mix_targets(box, own, partner) -> tuple:
        """(labels, admitted, counted) of a view: `own` outside its box, `partner`'s
        inside (the same box that mixed the images)."""
        return tuple(mixing.mix(box, theirs, mine) for mine, theirs in zip(own, partner))

    def perturbed_features(self, features, labelled_count, step):
        """The decoder's inputs for the clean and the perturbed pass: each block the head
        reads, followed along the batch by its channel-dropped copy (labelled rows, when
        perturbed, then unlabelled rows; independent masks per block, as the code)."""
        fold = tf.random.experimental.stateless_fold_in
        labelled_seed = seeds.step_seed(self.seed, step, _DROPOUT_LABELLED)
        unlabelled_seed = seeds.step_seed(self.seed, step, _DROPOUT_UNLABELLED)
        out = {}
        for index, name in enumerate(self.segmenter.head_input_blocks):
            clean = features[name]
            parts = [clean]
            if self.perturb_labelled:
                parts.append(feature_ops.channel_dropout(
                    clean[:labelled_count], self.fp_rate, fold(labelled_seed, index)))
            parts.append(feature_ops.channel_dropout(
                clean[labelled_count:], self.fp_rate, fold(unlabelled_seed, index)))
            out[name] = tf.concat(parts, axis=0)
        return out

    def weak_pass(self, labelled_images, weak_images, step):
        """(labelled logits, weak logits, perturbed weak logits or None) of the
        training-mode pass over [labelled; weak] images: one pass, or one per group
        without `joint_batch_norm`."""
        labelled_count = tf.shape(labelled_images)[0]
        weak_count = tf.shape(weak_images)[0]
        if not self.feature_perturbation:
            if not self.joint_batch_norm:
                return (tf.cast(self.segmenter(labelled_images, training=True), tf.float32),
                        tf.cast(self.segmenter(weak_images, training=True), tf.float32),
                        None)
            logits = tf.cast(self.segmenter(tf.concat([labelled_images, weak_images], 0),
                                            training=True), tf.float32)
            return logits[:labelled_count], logits[labelled_count:], None
        size = tf.shape(labelled_images)[1:3]
        if self.joint_batch_norm:
            features = self.segmenter.features(
                tf.concat([labelled_images, weak_images], 0), training=True)
        else:
            labelled_features = self.segmenter.features(labelled_images, training=True)
            weak_features = self.segmenter.features(weak_images, training=True)
            features = {name: tf.concat([labelled_features[name], weak_features[name]], 0)
                        for name in self.segmenter.head_input_blocks}
        # Rows: clean labelled, clean weak, [perturbed labelled,] perturbed weak.
        decoder_inputs = self.perturbed_features(features, labelled_count, step)
        if self.joint_batch_norm:
            logits = self.segmenter.logits_from_features(decoder_inputs, size, training=True)
        else:
            logits = self.decode_by_group(decoder_inputs, labelled_count, weak_count, size)
        total = labelled_count + weak_count
        return (logits[:labelled_count], logits[labelled_count:total],
                logits[tf.shape(logits)[0] - weak_count:])

    def decode_by_group(self, decoder_inputs, labelled_count, weak_count, size):
        """The decoder run once on the labelled rows of `decoder_inputs` (clean and, with
        `perturb_labelled`, perturbed) and once on the unlabelled rows, so that they do
        not share batch statistics; logits returned in the rows' order."""
        # Rows: clean labelled, clean weak, [perturbed labelled,] perturbed weak. The
        # layout is fixed, so each group is two slices.
        total = labelled_count + weak_count
        perturbed_weak_start = total + (labelled_count if self.perturb_labelled else 0)
        labelled_inputs, weak_inputs = {}, {}
        for name, value in decoder_inputs.items():
            labelled_inputs[name] = tf.concat(
                [value[:labelled_count], value[total:perturbed_weak_start]], 0)
            weak_inputs[name] = tf.concat(
                [value[labelled_count:total], value[perturbed_weak_start:]], 0)
        labelled_logits = self.segmenter.logits_from_features(labelled_inputs, size,
                                                              training=True)
        weak_logits = self.segmenter.logits_from_features(weak_inputs, size, training=True)
        return tf.concat([labelled_logits[:labelled_count], weak_logits[:weak_count],
                          labelled_logits[labelled_count:], weak_logits[weak_count:]], 0)

    def labelled_loss(self, logits, masks):
        """Cross-entropy over the labelled pixels, or its OHEM version."""
        if self.supervised_criterion == "cross_entropy":
            return self.supervised_loss(logits, masks)
        images = losses.replica_sum(tf.cast(tf.shape(masks)[0], tf.float32))
        return losses.ohem_cross_entropy(
            logits, masks, self.ohem_threshold, tf.cast(images, tf.int32) * self.ohem_min_kept,
            self.ignore_label, class_weights=self.class_weights)

    def unlabelled_loss(self, logits, labels, admitted, counted):
        """sum(CE * admitted) over counted pixels / global count of counted pixels,
        admitted or not (the code's normaliser; with `unsup_class_weights` both weighted
        by the pseudo-label's class weight). `admitted`: [confidence >= threshold],
        decided before mixing, where each pixel's own threshold is known."""
        labels = tf.where(counted, labels, self.ignore_label)
        return losses.masked_cross_entropy(logits, labels, self.ignore_label,
                                           pixel_weights=tf.cast(admitted, tf.float32),
                                           class_weights=self.unsup_class_weights)

    # -- the step -------------------------------------------------------------------
    def train_step(self, data):
        labelled, unlabelled = unpack_batch(data)
        if unlabelled is None:
            raise ValueError(f"{type(self).__name__} needs (labelled, unlabelled) training "
                             "elements")
        # The 0-based index of this step, read before the optimizer increments it; it keys
        # the step's randomness.
        step = tf.identity(self.optimizer.iterations)
        weak, counted, partner_weak, partner_counted = self.split_unlabelled(unlabelled)

        # 1. The partners of the second batch are predicted in inference mode (moving
        #    batch-norm statistics, nothing updated), without gradient.
        partner_labels = None
        if self.mix_source == "second_batch":
            partner_logits = self.segmenter(partner_weak, training=False)
            if self.class_aware_mixing:
                partner_labels = self.placement_labels(partner_logits, partner_counted)
        # 2. Strong views of the images and of their partners; each view has its own box,
        #    inside which it shows the partner's view (with class_aware_mixing, centred on
        #    a class of the partner's prediction).
        boxes, views = self.mixed_views(weak, partner_weak, step, partner_labels)

        with tf.GradientTape() as tape:
            # 3. One training-mode pass over [labelled; weak], with the perturbed decoder
            #    pass on channel-dropped features (UniMatch).
            labelled_logits, weak_logits, fp_logits = self.weak_pass(labelled["image"], weak,
                                                                     step)
            # 4. One training-mode pass over the strong views together.
            strong_logits = tf.split(
                tf.cast(self.segmenter(tf.concat(views, axis=0), training=True), tf.float32),
                self.strong_views, axis=0)
            # 5. Pseudo-labels and their admission from the detached weak prediction, after
            #    the optional controls fold its counted pixels into their running state.
            #    The second batch's partners take the state just updated too: the same
            #    thresholds and alignment as the weak targets they are mixed with (as with
            #    mix_source="batch", whose partners are those weak targets), computed from
            #    global sums, hence the same on every replica.
            weak_probs = self.probabilities(weak_logits)
            state = self.update_controls(weak_probs, counted)
            labels, admitted = self.targets(weak_probs, state)
            if self.mix_source == "batch":
                partner_labels, partner_admitted, partner_counted = (
                    mixing.next_in_batch(t) for t in (labels, admitted, counted))
            else:
                partner_labels, partner_admitted = self.targets(
                    self.probabilities(partner_logits), state)
            # 6. Each view's targets: the weak ones, the partner's inside its box. Admission
            #    is decided per pixel before mixing, against the threshold of that pixel's
            #    own pseudo-label, and mixed with it.
            view_targets = [self.mix_targets(box, (labels, admitted, counted),
                                             (partner_labels, partner_admitted,
                                              partner_counted)) for box in boxes]
            # 7. The losses, weighted as the code.
            supervised = self.labelled_loss(labelled_logits, labelled["mask"])
            strong_terms = [self.unlabelled_loss(logits, *targets)
                            for logits, targets in zip(strong_logits, view_targets)]
            strong_loss = tf.add_n(strong_terms) / float(self.strong_views)
            unsupervised = (1.0 - self.fp_weight) * strong_loss
            values = {}
            if self.feature_perturbation:
                fp_loss = self.unlabelled_loss(fp_logits, labels, admitted, counted)
                unsupervised += self.fp_weight * fp_loss
                values["fp_loss"] = fp_loss
            loss = self.total_weight * (supervised + unsupervised)
        self.apply_gradients(tape, loss, self.segmenter.trainable_variables)

        # The code's "mask ratio": admitted share of the weak view's image pixels.
        confident = tf.cast(admitted & counted, tf.float32)
        return self.report(
            loss=loss, supervised_loss=supervised, strong_loss=strong_loss,
            confident_share=losses.global_mean(tf.reduce_sum(confident),
                                               tf.reduce_sum(tf.cast(counted, tf.float32))),
            **values)


class FixMatch(UniMatch):
    """FixMatch as the UniMatch code trains it (`fixmatch.py`): `UniMatch` with
    variant="fixmatch", i.e. one strong view with its CutMix box and no feature-perturbed
    stream, loss (L_x + L_s) / 2 (`total_weight`). Takes every other `UniMatch`
    argument."""

    def __init__(self, segmenter, num_classes, **kwargs):
        super().__init__(segmenter, num_classes, variant="fixmatch", **kwargs)
