"""Backbone builders by name. Each returns a built `kssl.models.segmenter.Backbone`.

A builder takes keyword arguments weights, output_stride, norm, bn_momentum. Add new
backbones to BACKBONES.
"""

from kssl.models.backbones.efficientnet_lite import efficientnet_lite0
from kssl.models.backbones.resnet import resnet50, resnet101
from kssl.models.backbones.small import small_net

BACKBONES = {
    "resnet50": resnet50,
    "resnet101": resnet101,
    "small": small_net,
    "efficientnet_lite0": efficientnet_lite0,
}

__all__ = ["BACKBONES", "efficientnet_lite0", "resnet50", "resnet101", "small_net"]
