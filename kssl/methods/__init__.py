"""Training methods: each a keras.Model whose train_step tells the whole algorithm."""

from kssl.methods.base import SegmentationMethod, unpack_batch
from kssl.methods.classmix import ClassMix
from kssl.methods.ema import EMATeacher
from kssl.methods.guidedmix import GuidedMix, GuidedMixReleased
from kssl.methods.mkd import MKD
from kssl.methods.supervised import Supervised
from kssl.methods.threestage import ThreeStage
from kssl.methods.unimatch import FixMatch, UniMatch

__all__ = ["ClassMix", "EMATeacher", "FixMatch", "GuidedMix", "GuidedMixReleased", "MKD",
           "SegmentationMethod", "Supervised", "ThreeStage", "UniMatch", "unpack_batch"]
