"""The supervised baseline: masked cross-entropy on labelled images only."""

from __future__ import annotations

import tensorflow as tf

from kssl.methods.base import SegmentationMethod, unpack_batch


class Supervised(SegmentationMethod):
    """Trains the segmenter on the labelled batch alone; unlabelled images are ignored.

    The reference point every semi-supervised method is measured against.
    """

    uses_unlabelled = False

    def __init__(self, segmenter, num_classes, **kwargs):
        super().__init__(segmenter, num_classes, **kwargs)
        self.build_networks()

    def train_step(self, data):
        labelled, _ = unpack_batch(data)
        with tf.GradientTape() as tape:
            logits = self.segmenter(labelled["image"], training=True)
            loss = self.supervised_loss(logits, labelled["mask"])
        self.apply_gradients(tape, loss, self.segmenter.trainable_variables)
        return self.report(loss=loss)
