"""The supervised baseline: masked cross-entropy on labelled images only."""

from __future__ import annotations

from kssl.methods.base import SegmentationMethod


class Supervised(SegmentationMethod):
    """Trains the segmenter on the labelled batch alone; unlabelled images are ignored.

    The reference point every semi-supervised method is measured against.
    """

    uses_unlabelled = False

    def __init__(self, segmenter, num_classes, **kwargs):
        super().__init__(segmenter, num_classes, **kwargs)
        self.build_networks()

    def train_step(self, data):
        return self.supervised_step(data)
