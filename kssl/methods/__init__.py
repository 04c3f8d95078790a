"""Training methods: each a keras.Model whose train_step tells the whole algorithm."""

from kssl.methods.base import SegmentationMethod, unpack_batch
from kssl.methods.supervised import Supervised

__all__ = ["SegmentationMethod", "Supervised", "unpack_batch"]
