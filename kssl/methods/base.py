"""The base every training method stands on.

`SegmentationMethod` is a `keras.Model` whose subclasses override `train_step` (Keras's
"customizing what happens in fit" pattern). It owns what every method needs and would get
wrong alone:

- building every sub-network before `fit` (otherwise Keras would try to build the model by
  calling it on the whole `(labelled, unlabelled)` batch);
- taking gradients of a loss scaled for mixed precision (`optimizer.scale_loss`), which the
  optimizer unscales in `apply`;
- loss trackers exposed through `metrics`, reported as global (all-replica) values;
- a `test_step` that scores the inference network with a streaming confusion matrix;
- naming the inference network, the one that `bin/export` and `bin/predict` use, as
  opposed to the training wrapper with its teachers and auxiliary branches.

Losses must come from `kssl.losses`, whose means divide by global counts, so gradients
summed over replicas equal the single-device gradient.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from kssl import losses
from kssl.constants import IGNORE_LABEL
from kssl.evaluation import ConfusionMatrix


def unpack_batch(data):
    """Splits one training element into (labelled, unlabelled).

    Accepted forms: a labelled dict {"image", "mask", ...}; an `(images, masks)` pair; or a
    pair `(labelled, unlabelled)` where labelled is either of the above and unlabelled is a
    dict {"image", ...} or an image tensor. Returns dicts; unlabelled is None when absent.
    """
    if isinstance(data, dict):
        return data, None
    if isinstance(data, (tuple, list)) and len(data) == 2:
        first, second = data
        if tf.is_tensor(first) and tf.is_tensor(second):
            return {"image": first, "mask": second}, None
        labelled, _ = unpack_batch(first)
        unlabelled = second if isinstance(second, dict) else {"image": second}
        return labelled, unlabelled
    raise ValueError(
        "a training element must be a labelled dict, an (images, masks) pair, or a "
        f"(labelled, unlabelled) pair; got {type(data).__name__}")


class SegmentationMethod(keras.Model):
    """Base class of the training methods (supervised and semi-supervised).

    Args:
      segmenter: the segmentation network being trained (a `kssl.models.Segmenter` or any
        Keras model from float images [B, H, W, 3] to logits [B, H, W, C]).
      num_classes: number of classes.
      ignore_label: label value no loss or metric counts.
      tracked_losses: the names `report` takes (default: the class's `tracked_losses`).
      class_weights: optional [num_classes] weights of the supervised loss (see
        `kssl.data.class_balance`); None trains unweighted, as the papers do.
      class_prior: optional [num_classes] class distribution of the labelled masks (the
        driver passes it); pseudo-label controls such as distribution alignment read it.
    Subclasses create their other sub-networks (teachers, branches) before calling
    `self.build_networks()`, list every loss they report in `tracked_losses`, and implement
    `train_step`.
    """

    tracked_losses = ("loss",)
    uses_unlabelled = True  # whether train_step reads an unlabelled batch

    # -- the staged protocol ----------------------------------------------------------
    # A method of several stages (e.g. `ThreeStage`) is trained by the driver as one run
    # per stage (`kssl.training.train_stages`): each stage's model is built with
    # `stage=N`, and at the end of every stage but the last the driver stores the argmax
    # of `pseudo_mask_network` on every training image, which the next stage reads under
    # `kssl.constants.PSEUDO_MASK_KEY`. A single-stage method leaves these defaults.
    stages = 1
    """How many training runs the method is made of (1: an ordinary method)."""

    pseudo_mask_threshold = None
    """Staged methods: the confidence below which a stored pseudo-mask pixel becomes the
    ignore label (None keeps every pixel); see `kssl.data.pseudo_masks`."""

    reliable_share = None
    """Staged methods: ST++'s reliable-image selection of the first stage's pseudo-masks
    (None: off; see `ThreeStage.reliable_share` and `kssl.training.ReliableSelection`)."""

    reliable_checkpoints = 3
    """Staged methods: the checkpoints that selection compares, the final one included."""

    @classmethod
    def uses_unlabelled_in(cls, stage: int) -> bool:
        """Staged methods: whether stage `stage` reads a second sub-batch (drawn from all
        training images, each with its stored pseudo-mask). Default: `uses_unlabelled`."""
        del stage
        return cls.uses_unlabelled

    def __init__(self, segmenter: keras.Model, num_classes: int,
                 ignore_label: int = IGNORE_LABEL, tracked_losses=None,
                 class_weights=None, class_prior=None, **kwargs):
        super().__init__(**kwargs)
        self.segmenter = segmenter
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.class_weights = (None if class_weights is None
                              else tf.constant(class_weights, tf.float32, [num_classes]))
        self.class_prior = None if class_prior is None else np.asarray(class_prior, np.float32)
        # A method whose losses depend on its settings passes its own list.
        names = tuple(tracked_losses or self.tracked_losses)
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}
        self.confusion = ConfusionMatrix(num_classes, ignore_label=ignore_label,
                                         name="mean_iou")

    # -- building ---------------------------------------------------------------------
    def networks(self) -> list:
        """Every sub-network that holds variables; subclasses extend the list."""
        return [self.segmenter]

    def build_networks(self, image_size=(32, 32)):
        """Creates every sub-network's variables by calling it once on a dummy batch."""
        dummy = tf.zeros((1, image_size[0], image_size[1], 3), tf.float32)
        for network in self.networks():
            network(dummy, training=False)
        self.built = True

    def build(self, input_shape=None):
        self.build_networks()

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Every sub-network is built in __init__. Keras's generic build under a strategy
        # would average one input batch over replicas (which fails on the string example
        # ids) and consume that batch; only the optimizer is left to build.
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.optimized_variables())
        self._post_build()

    def optimized_variables(self) -> list:
        """The variables the optimizer updates: it creates its slots for these only.

        Every trainable variable by default; a method with networks that are not trained
        by gradient (an EMA teacher) returns the trained networks' variables, so the
        optimizer holds no momentum for them and checkpoints stay small.
        """
        return self.trainable_variables

    @property
    def inference_network(self) -> keras.Model:
        """The network that predicts after training (exported, evaluated)."""
        return self.segmenter

    @property
    def pseudo_mask_network(self) -> keras.Model:
        """Staged methods: the network whose argmax becomes the next stage's stored
        pseudo-masks. Default: the inference network."""
        return self.inference_network

    def call(self, images, training=False):
        return self.inference_network(images, training=training)

    # -- steps ------------------------------------------------------------------------
    def supervised_loss(self, logits, masks):
        """Masked cross-entropy over labelled pixels (class-weighted when the method has
        `class_weights`), replica-correct."""
        return losses.masked_cross_entropy(logits, masks, self.ignore_label,
                                           class_weights=self.class_weights)

    def pseudo_label_targets(self, images, labelled_images=None) -> dict:
        """What the unlabelled loss trains on for `images`, for the pseudo-label monitor
        (`kssl.pseudo_label_monitor`): {name: (labels [B, H, W] int, admitted [B, H, W]
        bool or None for all)} at the images' size, computed in inference mode without
        changing any state. Mixing and strong augmentation are left out: a mixed target
        takes each pixel from one of these. `labelled_images` [B, H, W, 3], one labelled
        image per unlabelled one, serves methods whose target mixes in a labelled image.
        A method without pseudo-labels returns {} (the default)."""
        del images, labelled_images
        return {}

    def apply_gradients(self, tape: tf.GradientTape, loss, variables):
        """One optimizer step on `variables`, with mixed-precision loss scaling.

        `tape` must have recorded the computation of `loss`; it is used once.
        """
        with tape:  # the scaling must be on the tape too, or no gradient reaches it
            scaled = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply(gradients, variables)

    def supervised_step(self, data) -> dict:
        """One optimizer step of masked cross-entropy on the labelled batch alone (the
        supervised baseline, and the supervised stage of a staged method)."""
        labelled, _ = unpack_batch(data)
        with tf.GradientTape() as tape:
            logits = self.segmenter(labelled["image"], training=True)
            loss = self.supervised_loss(logits, labelled["mask"])
        self.apply_gradients(tape, loss, self.segmenter.trainable_variables)
        return self.report(loss=loss)

    def report(self, **values) -> dict:
        """Updates the loss trackers with global values and returns the logs of a step.

        Each value is this replica's share of a global mean (see `kssl.losses`); summing
        over replicas gives the global value every replica then records.
        """
        for name, value in values.items():
            self.trackers[name].update_state(losses.replica_sum(value))
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def test_step(self, data):
        labelled, _ = unpack_batch(data)
        logits = self.inference_network(labelled["image"], training=False)
        self.trackers["loss"].update_state(
            losses.replica_sum(self.supervised_loss(logits, labelled["mask"])))
        self.confusion.update_state(labelled["mask"], logits)
        # Every metric is returned (other trackers stay at their reset value) so Keras
        # reads the replica-aggregated metric results rather than one replica's logs.
        return {metric.name: metric.result() for metric in self.metrics}

    @property
    def metrics(self):
        return list(self.trackers.values()) + [self.confusion]
