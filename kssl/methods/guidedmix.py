"""GuidedMix-Net (Tu, Huang et al., AAAI 2022): labelled images guide the unlabelled ones.

Two recipes, a class each, because the authors' released code does not implement the
paper; they share the lambdas, the pairing helpers and the step (`GuidedMixBase`).

`GuidedMix`, the paper's recipe (Sec. 3.1-3.4, Eq. 2-12), per step:
  1. The network predicts M_l on the labelled batch (cross-entropy against the masks) and
     M_u on the unlabelled batch. With similar pairs, an image-level classifier on the
     pooled encoder features learns the classes present in each labelled mask (L_cla).
  2. LUPI: each unlabelled image gets a labelled partner (the nearest by encoder
     features, Eq. 3, or a random one) and lambda ~ Beta(1, 1), folded and capped;
     x_mix = lambda x_l + (1 - lambda) x_u.
  3. The network predicts M_mix on x_mix; the unlabelled image's decoupled mask
     M_mix - lambda M_l (soft; hard: M_mix - M_l) is compared with M_u by the squared
     error of Eq. 10, weighted by a sigmoid ramp-up (L_usup).
  4. L_dec (Eq. 12): the same with two labelled images, the decoupled mask against the
     partner's prediction.
  Loss = CE + L_dec + L_cla + w(t) L_usup (Eq. 9 and 11).
  The paper leaves open on which representation the masks are decoupled and what is
  detached: kssl decouples softmax probabilities and uses the decoupled mask as a
  stop-gradient target (the direct prediction learns), both configurable. Then the target
  is the network's own prediction on a harder (blended) view less lambda times the
  partner's, which sums to 1 - lambda: the term mostly lowers the confidence of M_u
  (measured in BENCHMARKS.md); detach="direct" trains the blended pass instead.
  The network is the paper's (`model.arch = 'psp_unet'`: PSP, MITrans, PixelShuffle
  U-Net decoder); any segmenter with named blocks works.

`GuidedMixReleased`, the authors' released (mmsegmentation) code, per step:
  one backbone pass over [x_l; x_u]; the DeepLabV3 head's concatenated ASPP branch
  features are mixed, f_mix = lambda f_l + (1 - lambda) f_u[pi] (pi a random permutation,
  one lambda per batch, uniform on (0, cap)); a second head decodes f_mix; the decoupled
  logits p_mix - lambda p_l (p_l not detached) learn the argmax of the detached direct
  prediction p_u[pi] through a sigmoid focal loss (gamma 0.5, alpha 0.5, weight 10) at the
  head's resolution. Needs `model.arch = 'deeplabv3'`.

Pairs are chosen on each replica's local batch (a labelled partner must be on the same
device as its unlabelled image, since its prediction enters the loss with a gradient);
on several replicas the candidates are therefore the replica's own labelled images, not
the whole global batch.
"""

from __future__ import annotations

import random
from typing import Optional

import keras
import tensorflow as tf

from kssl import losses
from kssl.augment import mixing, seeds
from kssl.methods.base import SegmentationMethod, unpack_batch
from kssl.methods.schedules import sigmoid_rampup
from kssl.models.heads import MITrans
from kssl.models.layers import resize_bilinear, spatial_size

PAIRS = ("similar", "random")
DECOUPLINGS = ("soft", "hard", "normalised")
DETACH = ("decoupled", "direct", "none")
REPRESENTATIONS = ("probabilities", "logits")
TARGETS = ("soft", "argmax")
PAIR_FEATURES = ("spatial", "pooled")
LAMBDA_PER = ("pair", "batch")

# Random streams of one step (see kssl.augment.seeds.step_seed).
_PAIR_STREAM, _LAMBDA_STREAM, _LABELLED_PAIR_STREAM, _LABELLED_LAMBDA_STREAM = 1, 2, 3, 4


# -- pairing --------------------------------------------------------------------------------
def nearest_partners(queries: tf.Tensor, keys: tf.Tensor,
                     exclude_self: bool = False) -> tf.Tensor:
    """For each query row, the index of the key row at the smallest Euclidean distance.

    Args:
      queries: [Q, ...] features; keys: [K, ...] features of the same trailing shape.
      exclude_self: queries and keys are the same batch; never pair a row with itself
        (unless the batch has a single row).
    Returns:
      int32 [Q].
    """
    q = tf.reshape(tf.cast(queries, tf.float32), [tf.shape(queries)[0], -1])
    k = tf.reshape(tf.cast(keys, tf.float32), [tf.shape(keys)[0], -1])
    # |q - k|^2 = |q|^2 - 2 q.k + |k|^2 (a [Q, K] matmul rather than a [Q, K, D] tensor).
    distances = (tf.reduce_sum(q * q, axis=1)[:, None] - 2.0 * tf.matmul(q, k, transpose_b=True)
                 + tf.reduce_sum(k * k, axis=1)[None, :])
    if exclude_self:
        n = tf.shape(q)[0]
        distances = tf.where(tf.eye(n, dtype=tf.bool) & (n > 1),
                             tf.constant(float("inf")), distances)
    return tf.argmin(distances, axis=1, output_type=tf.int32)


def random_partners(seed, num_queries, num_keys) -> tf.Tensor:
    """A random permutation of the local key indices, cycled to `num_queries` entries
    (every key is used once before any repeats)."""
    scores = seeds.per_example_uniform(seed, num_keys)
    order = tf.argsort(scores)
    return tf.gather(order, tf.range(num_queries) % num_keys)


def random_other_partners(seed, batch_size) -> tf.Tensor:
    """Row i is paired with row (i + k) mod b for one random k in [1, b - 1]: a random
    partner that is never the row itself (unless b = 1)."""
    b = tf.cast(batch_size, tf.int32)
    shift = 1 + tf.cast(tf.floor(seeds.batch_uniform(seed) * tf.cast(b - 1, tf.float32)),
                        tf.int32)
    return (tf.range(b) + shift) % b


def classifier_targets(masks: tf.Tensor, num_classes: int, ignore_label: int) -> tf.Tensor:
    """The image-level classifier's multi-hot targets [B, C]: 1 where class c occurs in
    image b's mask, ignore pixels skipped whatever the ignore label's value."""
    masks = tf.cast(masks, tf.int32)
    labels = tf.where(tf.equal(masks, ignore_label), -1, masks)  # -1 counts for no class
    return tf.cast(mixing.present_classes(labels, num_classes), tf.float32)


def check_choices(method: str, choices) -> None:
    """Raises a ValueError for the first (name, value, allowed) whose value is not allowed."""
    for name, value, allowed in choices:
        if value not in allowed:
            raise ValueError(f"{method} {name} must be one of {allowed}, got {value!r}")


# -- the methods ----------------------------------------------------------------------------
class GuidedMixBase(SegmentationMethod):
    """What both GuidedMix-Net recipes share: the lambdas, the seed and the step.

    A recipe computes its loss terms in `loss_terms(labelled, unlabelled_images, step)`,
    a dict with at least "loss"; the step takes one optimizer step on it and reports
    every term.

    Args:
      segmenter: the network; a `kssl.models.Segmenter` (named blocks).
      num_classes: number of classes.
      lambda_cap: lambda is drawn below this (0.5 VOC, 0.3 Cityscapes in the paper).
      lambda_alpha: the Beta distribution's alpha (1).
      lambda_per: "pair" (one lambda per mixed pair) or "batch" (one for the batch);
        None: the recipe's `default_lambda_per`.
      seed: seeds pairing and lambdas (drawn statelessly per step); default from Python's
        `random` (seeded by `train.seed`).
      **kwargs: for `SegmentationMethod`; a recipe passes the names of its terms as
        `tracked_losses`.
    """

    default_lambda_per = "pair"

    def __init__(self, segmenter, num_classes, lambda_cap: float = 0.5,
                 lambda_alpha: float = 1.0, lambda_per: Optional[str] = None,
                 seed: Optional[int] = None, **kwargs):
        method = type(self).__name__
        lambda_per = lambda_per or self.default_lambda_per
        check_choices(method, [("lambda_per", lambda_per, LAMBDA_PER)])
        if not 0.0 < lambda_cap <= 1.0:
            raise ValueError(f"{method} lambda_cap must be in (0, 1], got {lambda_cap!r}")
        if not hasattr(segmenter, "block_names"):
            raise TypeError(f"{method} needs a kssl Segmenter (named blocks), got "
                            f"{type(segmenter).__name__}")
        super().__init__(segmenter, num_classes, **kwargs)
        self.lambda_cap = lambda_cap
        self.lambda_alpha = lambda_alpha
        self.lambda_per = lambda_per
        self.seed = random.randrange(2**31) if seed is None else int(seed)
        self.build_networks()

    def train_step(self, data):
        labelled, unlabelled = unpack_batch(data)
        if unlabelled is None:
            raise ValueError("GuidedMix-Net needs (labelled, unlabelled) training elements")
        # The 0-based index of this step keys its randomness and the ramp-up.
        step = tf.identity(self.optimizer.iterations)
        with tf.GradientTape() as tape:
            terms = self.loss_terms(labelled, unlabelled["image"], step)
        self.apply_gradients(tape, terms["loss"], self.optimized_variables())
        return self.report(**terms)

    def loss_terms(self, labelled, unlabelled_images, step) -> dict:
        """Every loss term of the recipe for one (labelled, unlabelled) batch."""
        raise NotImplementedError

    def _lambdas(self, step, stream, batch_size):
        """One lambda per example [b] (lambda_per="pair") or one for all, broadcast."""
        seed = seeds.step_seed(self.seed, step, stream)
        if self.lambda_per == "pair":
            return mixing.interpolation_lambdas(seed, batch_size, self.lambda_alpha,
                                                self.lambda_cap)
        one = mixing.interpolation_lambdas(seed, None, self.lambda_alpha, self.lambda_cap)
        return tf.fill([batch_size], one)

    def _mean_lambda(self, lambdas):
        """This replica's share of the global mean lambda."""
        return losses.global_mean(tf.reduce_sum(lambdas), tf.size(lambdas))


class GuidedMix(GuidedMixBase):
    """GuidedMix-Net's paper recipe (LUPI in image space, decoupled masks; see the module
    docstring) for `segmenter`, any `kssl.models.Segmenter` (the paper's is `psp_unet`).

    Args:
      segmenter, num_classes, lambda_cap, lambda_alpha, seed: see `GuidedMixBase`.
      lambda_per: "pair" (the paper, default: one lambda per mixed pair) or "batch".
      pairs: "similar" (nearest labelled image by encoder features, with the image-level
        classifier; the paper's VOC setting) or "random" (its Cityscapes setting).
      pair_features: "spatial" (Eq. 3: distance between whole encoder feature maps) or
        "pooled" (between globally pooled encoder features).
      decoupling: "soft" (M_mix - lambda M_l, Eq. 8), "hard" (M_mix - M_l, Eq. 7) or
        "normalised" ((M_mix - lambda M_l) / (1 - lambda), which makes the decoupled
        probabilities sum to 1; not in the paper).
      decouple_on: "probabilities" (softmax; default) or "logits".
      detach: what is a stop-gradient target in L_usup and L_dec: "decoupled" (default:
        the direct prediction learns from the decoupled mask), "direct" (the released
        code's direction) or "none".
      unsup_weight: the maximum of w_usup (1); rampup_steps: length of the sigmoid ramp-up
        (0: no ramp).
      decoupling_weight: weight of L_dec (1; 0 drops the labelled-labelled mixing pass).
      classifier_weight: weight of L_cla (1; used with similar pairs).
      target: what L_usup and L_dec compare the direct prediction with. "soft" (the
        paper): the decoupled mask itself, by squared error; with a pretrained encoder
        this acts mostly as a confidence penalty that carries little class information.
        "argmax" (a pseudo-label control, not in the paper): the decoupled mask's argmax
        as a hard class target, learnt by cross-entropy of the direct logits (always
        detached, whatever `detach`), kept where the decoupled mask's normalised
        confidence (its clipped-at-0 values over their sum) reaches `target_threshold`.
      target_threshold: see `target` (0: every pixel).
    """

    def __init__(self, segmenter, num_classes, lambda_cap: float = 0.5,
                 lambda_alpha: float = 1.0, lambda_per: Optional[str] = None,
                 pairs: str = "similar", pair_features: str = "spatial",
                 decoupling: str = "soft", decouple_on: str = "probabilities",
                 detach: str = "decoupled", unsup_weight: float = 1.0,
                 rampup_steps: int = 0, decoupling_weight: float = 1.0,
                 classifier_weight: float = 1.0, target: str = "soft",
                 target_threshold: float = 0.0, seed: Optional[int] = None, **kwargs):
        check_choices(type(self).__name__,
                      [("pairs", pairs, PAIRS), ("pair_features", pair_features, PAIR_FEATURES),
                       ("decoupling", decoupling, DECOUPLINGS),
                       ("decouple_on", decouple_on, REPRESENTATIONS),
                       ("detach", detach, DETACH), ("target", target, TARGETS)])
        names = ["loss", "supervised_loss", "unsupervised_loss", "decoupling_loss",
                 "unsup_weight", "mean_lambda"]
        if pairs == "similar":
            names.insert(5, "classifier_loss")
        super().__init__(segmenter, num_classes, lambda_cap, lambda_alpha, lambda_per, seed,
                         tracked_losses=names, **kwargs)
        self.pairs = pairs
        self.pair_features = pair_features
        self.decoupling = decoupling
        self.decouple_on = decouple_on
        self.detach = detach
        self.unsup_weight = unsup_weight
        self.rampup_steps = int(rampup_steps)
        self.decoupling_weight = decoupling_weight
        self.classifier_weight = classifier_weight
        self.target = target
        self.target_threshold = float(target_threshold)
        self.encoder_block = segmenter.block_names[-1]
        self.image_classifier = None
        if pairs == "similar":
            # A dense layer on the pooled encoder features (Sec. 3.1).
            self.image_classifier = keras.layers.Dense(num_classes, name="image_classifier")
            self.image_classifier.build((None, segmenter.channels[self.encoder_block]))

    def loss_terms(self, labelled, unlabelled_images, step) -> dict:
        """The paper recipe's terms (`paper_losses`)."""
        return self.paper_losses(labelled, unlabelled_images, step)

    def paper_losses(self, labelled, unlabelled_images, step) -> dict:
        """Every loss term of the paper's recipe, for one (labelled, unlabelled) batch."""
        net = self.segmenter
        # Float images, so that interpolation weights are not rounded to integers.
        images_l = tf.cast(labelled["image"], tf.float32)
        images_u = tf.cast(unlabelled_images, tf.float32)
        masks = labelled["mask"]
        n_l, n_u = tf.shape(images_l)[0], tf.shape(images_u)[0]

        # 1. Direct predictions M_l (supervised) and M_u.
        features_l = net.features(images_l, training=True)
        logits_l = net.logits_from_features(features_l, spatial_size(images_l), training=True)
        supervised = self.supervised_loss(logits_l, masks)
        features_u = net.features(images_u, training=True)
        logits_u = net.logits_from_features(features_u, spatial_size(images_u), training=True)
        terms = {}

        # 2. Partners, on this replica's batch: nearest labelled image by encoder features
        #    (trained by the image-level classifier), or random.
        if self.pairs == "similar":
            encoded_l = features_l[self.encoder_block]
            pooled = tf.reduce_mean(tf.cast(encoded_l, tf.float32), axis=[1, 2])
            terms["classifier_loss"] = losses.multilabel_cross_entropy(
                self.image_classifier(pooled),
                classifier_targets(masks, self.num_classes, self.ignore_label))
            keys = tf.stop_gradient(self._pairing_features(encoded_l))
            queries = tf.stop_gradient(self._pairing_features(features_u[self.encoder_block]))
            partners = nearest_partners(queries, keys)
            labelled_partners = nearest_partners(keys, keys, exclude_self=True)
        else:
            partners = random_partners(seeds.step_seed(self.seed, step, _PAIR_STREAM), n_u, n_l)
            labelled_partners = random_other_partners(
                seeds.step_seed(self.seed, step, _LABELLED_PAIR_STREAM), n_l)

        # 3. LUPI and L_usup: the labelled partner takes the small weight lambda.
        lambdas = self._lambdas(step, _LAMBDA_STREAM, n_u)
        mixed = mixing.interpolate(lambdas, tf.gather(images_l, partners), images_u)
        logits_mix = net(mixed, training=True)
        unsupervised = self.decoupling_loss(logits_mix, tf.gather(logits_l, partners),
                                            logits_u, lambdas)

        # 4. L_dec: two labelled images mixed the same way, the seed taking lambda. The
        #    configured decoupling applies here too (Eq. 12 prints the hard form). A
        #    replica holding a single labelled image has no pair: its row does not count
        #    (mixed with itself, the "decoupled" mask would only shrink the prediction).
        decoupling = tf.constant(0.0)
        if self.decoupling_weight:
            lambdas_l = self._lambdas(step, _LABELLED_LAMBDA_STREAM, n_l)
            mixed_l = mixing.interpolate(lambdas_l, images_l,
                                         tf.gather(images_l, labelled_partners))
            decoupling = self.decoupling_loss(
                net(mixed_l, training=True), logits_l, tf.gather(logits_l, labelled_partners),
                lambdas_l, counted=tf.not_equal(labelled_partners, tf.range(n_l)))

        weight = self.unsup_weight * sigmoid_rampup(step, self.rampup_steps)
        loss = (supervised + self.decoupling_weight * decoupling + weight * unsupervised
                + self.classifier_weight * terms.get("classifier_loss", 0.0))
        return {"loss": loss, "supervised_loss": supervised, "unsupervised_loss": unsupervised,
                "decoupling_loss": decoupling, **terms,
                "unsup_weight": self._replica_share(weight),
                "mean_lambda": self._mean_lambda(lambdas)}

    def decoupling_loss(self, logits_mix, logits_guide, logits_direct, lambdas,
                        counted=None):
        """Squared error between the decoupled mask M_mix - lambda M_guide and the direct
        prediction (Eq. 10 and 12), per `decoupling`, `decouple_on` and `detach`;
        `counted` [B] optionally leaves rows out (see `losses.squared_error`)."""
        decoupled = self.decoupled(logits_mix, logits_guide, lambdas)
        if self.target == "argmax":
            return self.class_target_loss(logits_direct, decoupled, counted)
        direct = self._representation(logits_direct)
        if self.detach == "decoupled":
            decoupled = tf.stop_gradient(decoupled)
        elif self.detach == "direct":
            direct = tf.stop_gradient(direct)
        return losses.squared_error(direct, decoupled, counted)

    def class_target_loss(self, logits_direct, decoupled, counted=None):
        """Cross-entropy of the direct logits against the decoupled mask's argmax, where
        its normalised confidence reaches `target_threshold` (rows with counted = 0 and
        pixels below the threshold are ignored); the mean is over the kept pixels of the
        global batch."""
        decoupled = tf.stop_gradient(tf.cast(decoupled, tf.float32))
        labels = tf.argmax(decoupled, -1, output_type=tf.int32)
        positive = tf.nn.relu(decoupled)
        confidence = tf.reduce_max(positive, -1) / tf.maximum(
            tf.reduce_sum(positive, -1), 1e-12)
        keep = confidence >= self.target_threshold
        if counted is not None:
            keep &= tf.cast(counted, tf.bool)[:, None, None]
        labels = tf.where(keep, labels, self.ignore_label)
        return losses.masked_cross_entropy(logits_direct, labels, self.ignore_label)

    def decoupled(self, logits_mix, logits_guide, lambdas):
        """The decoupled mask M_mix - lambda M_guide (per `decoupling` and `decouple_on`):
        the paper recipe's target for the direct prediction."""
        mixed, guide = self._representation(logits_mix), self._representation(logits_guide)
        weight = tf.reshape(lambdas, [-1, 1, 1, 1])
        if self.decoupling == "hard":
            return mixed - guide
        if self.decoupling == "soft":
            return mixed - weight * guide
        return (mixed - weight * guide) / (1.0 - weight)

    def pseudo_label_targets(self, images, labelled_images=None) -> dict:
        """The argmax of the decoupled mask, with each image mixed with its labelled
        partner by the lambdas of step 0 (fixed, so the curve follows the network alone)."""
        net = self.segmenter
        if labelled_images is None:
            return {}
        images = tf.cast(images, tf.float32)
        partners = tf.cast(labelled_images, tf.float32)
        lambdas = self._lambdas(tf.constant(0, tf.int64), _LAMBDA_STREAM, tf.shape(images)[0])
        logits_mix = net(mixing.interpolate(lambdas, partners, images), training=False)
        decoupled = self.decoupled(logits_mix, net(partners, training=False), lambdas)
        return {"decoupled": (tf.argmax(decoupled, -1, output_type=tf.int32), None)}

    # -- helpers ----------------------------------------------------------------------
    def _representation(self, logits):
        logits = tf.cast(logits, tf.float32)
        return tf.nn.softmax(logits) if self.decouple_on == "probabilities" else logits

    def _pairing_features(self, encoded):
        encoded = tf.cast(encoded, tf.float32)
        if self.pair_features == "pooled":
            return tf.reduce_mean(encoded, axis=[1, 2])
        return encoded

    @staticmethod
    def _replica_share(value):
        """A global constant as this replica's share, so `report`'s replica sum is it."""
        _, replicas = seeds.replica_position()
        return value / float(replicas)


class GuidedMixReleased(GuidedMixBase):
    """GuidedMix-Net as the authors' released code trains it: the ASPP branch features of
    a DeepLabV3 head mixed, a second head, a sigmoid focal loss (see the module
    docstring).

    Args:
      segmenter: a `kssl.models.Segmenter` with a `deeplabv3` head.
      num_classes, lambda_cap, lambda_alpha, seed: see `GuidedMixBase`.
      lambda_per: "batch" (the released code, default: one lambda for the batch) or "pair".
      focal_weight (10), focal_gamma (0.5), focal_alpha (0.5): the unsupervised loss.
      mitrans: apply a MITrans block to the mixed features before the second head (the
        code defines it but no config enables it: False).
    """

    default_lambda_per = "batch"

    def __init__(self, segmenter, num_classes, lambda_cap: float = 0.5,
                 lambda_alpha: float = 1.0, lambda_per: Optional[str] = None,
                 focal_weight: float = 10.0, focal_gamma: float = 0.5,
                 focal_alpha: float = 0.5, mitrans: bool = False,
                 seed: Optional[int] = None, **kwargs):
        super().__init__(segmenter, num_classes, lambda_cap, lambda_alpha, lambda_per, seed,
                         tracked_losses=["loss", "supervised_loss", "unsupervised_loss",
                                         "mean_lambda"], **kwargs)
        if not hasattr(segmenter.head, "branch_features"):
            raise ValueError("GuidedMixReleased mixes the ASPP branch features of a "
                             "DeepLabV3 head: set model.arch = 'deeplabv3' (the head is "
                             f"{type(segmenter.head).__name__})")
        self.focal_weight = focal_weight
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha
        # The second head: an independently initialised bottleneck and classifier.
        decoder = segmenter.head.decoder
        self.mix_head = type(decoder).from_config({**decoder.get_config(),
                                                   "name": "mix_head"})
        self.mix_head.build((None, None, None, segmenter.head.branch_channels))
        self.mitrans = None
        if mitrans:
            self.mitrans = MITrans(name="mix_mitrans")
            self.mitrans.build((None, None, None, segmenter.head.branch_channels))

    def loss_terms(self, labelled, unlabelled_images, step) -> dict:
        """The released recipe's terms (`released_losses`)."""
        return self.released_losses(labelled, unlabelled_images, step)

    def released_losses(self, labelled, unlabelled_images, step) -> dict:
        """Every loss term of the released code's recipe (see the module docstring)."""
        net, head = self.segmenter, self.segmenter.head
        images_l, masks = labelled["image"], labelled["mask"]
        images = tf.concat([images_l, tf.cast(unlabelled_images, images_l.dtype)], axis=0)
        n_l, n_u = tf.shape(images_l)[0], tf.shape(unlabelled_images)[0]

        # One backbone and head pass over [x_l; x_u], as the code (joint batch statistics).
        branches = head.branch_features(net.features(images, training=True), training=True)
        logits = tf.cast(head.decode(branches, training=True), tf.float32)
        logits_l, logits_u = logits[:n_l], logits[n_l:]
        # kssl averages the cross-entropy over labelled pixels; mmseg 0.27 divides by all
        # pixels, ignored ones included (a constant rescaling per batch).
        supervised = self.supervised_loss(
            resize_bilinear(logits_l, spatial_size(images_l), net.align_corners), masks)

        # Labelled image i is mixed with unlabelled image pi(i) in feature space, the
        # labelled side taking the small weight lambda; nothing is detached.
        partners = random_partners(seeds.step_seed(self.seed, step, _PAIR_STREAM), n_l, n_u)
        lambdas = self._lambdas(step, _LAMBDA_STREAM, n_l)
        mixed = mixing.interpolate(lambdas, branches[:n_l], tf.gather(branches[n_l:], partners))
        if self.mitrans is not None:
            mixed = self.mitrans(mixed)
        logits_mix = tf.cast(self.mix_head(mixed, training=True), tf.float32)
        # Soft decoupling on logits, through a non-detached p_l; the target is the argmax
        # of the detached direct prediction, at the head's resolution.
        decoupled = logits_mix - tf.reshape(lambdas, [-1, 1, 1, 1]) * logits_l
        targets = tf.argmax(tf.stop_gradient(tf.gather(logits_u, partners)), axis=-1,
                            output_type=tf.int32)
        unsupervised = self.focal_weight * losses.sigmoid_focal_loss(
            decoupled, targets, self.focal_gamma, self.focal_alpha)
        return {"loss": supervised + unsupervised, "supervised_loss": supervised,
                "unsupervised_loss": unsupervised,
                "mean_lambda": self._mean_lambda(lambdas)}

    def pseudo_label_targets(self, images, labelled_images=None) -> dict:
        """The argmax of the direct prediction: the focal loss's target."""
        del labelled_images
        logits = self.segmenter(images, training=False)
        return {"direct_prediction": (tf.argmax(logits, -1, output_type=tf.int32), None)}
