"""Dilated ResNet-50/101 (v1 bottleneck) with keras.applications layer names.

Layout as keras.applications.ResNet50/101: the stride of a stage sits on the first 1x1 conv
of its first block (and on the 1x1 shortcut conv), convs have biases, BN epsilon 1.001e-5.
Every layer carries the keras.applications name ("conv1_conv", "conv4_block23_3_bn", ...),
so ImageNet weights transfer layer by layer by name; dilation does not change any shape.

For output_stride 8 or 16 the strides of the last stages are removed and their 3x3 convs
dilated instead (OS 16: stage4 rate 2; OS 8: stage3 rate 2, stage4 rate 4). Every block of
a dilated stage uses the stage's rate, as in the DeepLab-v2 ResNet.

Blocks (name: stride at output_stride 32 / 16 / 8, channels):
  stem   (conv1 + pool1):  4 / 4 / 4,   64
  stage1 (conv2_x):        4 / 4 / 4,   256
  stage2 (conv3_x):        8 / 8 / 8,   512
  stage3 (conv4_x):       16 / 16 / 8,  1024
  stage4 (conv5_x):       32 / 16 / 8,  2048
A block's feature map is ceil(H / stride) x ceil(W / stride) (with stem_pool="ceil", see
below, one more row/column where ceil(H / 2) is even).

Layout options, for weights trained elsewhere (`kssl.models.checkpoints.convert` records the
ones a converted file needs, and `resnet()` adopts them from the file):
  stride_on:  "1x1" (keras.applications, Caffe, the DeepLab-v2 ResNet: the stride on the
              first 1x1 conv of a stage) or "3x3" (torchvision's ResNet v1.5: the stride on
              the 3x3 conv, padded by 1 on every side as PyTorch does).
  stem_pool:  "floor" (keras.applications and torchvision: 3x3/2 max pool, padding 1) or
              "ceil" (Caffe / `MaxPool2d(3, 2, padding=1, ceil_mode=True)` of the DeepLab-v2
              ResNet: for even sizes one more output row/column).
  preprocess: "caffe" (keras.applications: BGR minus the ImageNet mean), "torchvision" (RGB
              / 255, minus mean, divided by std), "deeplab_rgb" (RGB minus the DeepLab mean
              (122.675, 116.669, 104.008): what the AdvSemiSeg / ClassMix / three-stage code
              feeds the COCO DeepLab-v2 weights), "deeplab_bgr" (BGR minus the same mean, the
              order of the original Caffe model).
Weight shapes do not depend on any of them.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

import keras
import tensorflow as tf

from kssl.models.checkpoints import loading
from kssl.models.checkpoints.loading import first_names, weighted_leaf_layers
from kssl.models.layers import (CAFFE_BGR_MEAN, CaffePreprocess, channels_shape, check_norm,
                                make_norm)
from kssl.models.segmenter import Backbone, Block

BN_EPSILON = 1.001e-5
STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_FILTERS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
OUTPUT_STRIDES = (8, 16, 32)
STRIDE_ON = ("1x1", "3x3")
STEM_POOLS = ("floor", "ceil")
# Input normalisations: (channel order, mean, std) on [0, 255] values. "caffe" is built by
# CaffePreprocess (unchanged since before the other modes existed); the others by
# ResNetPreprocess.
PREPROCESS = {
    "caffe": ("bgr", CAFFE_BGR_MEAN, (1.0, 1.0, 1.0)),
    "torchvision": ("rgb", (0.485 * 255, 0.456 * 255, 0.406 * 255),
                    (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    # The DeepLab-v2 Caffe mean, as the PyTorch DeepLab-v2 code writes it (B, G, R).
    "deeplab_rgb": ("rgb", (122.67891434, 116.66876762, 104.00698793), (1.0, 1.0, 1.0)),
    "deeplab_bgr": ("bgr", (104.00698793, 116.66876762, 122.67891434), (1.0, 1.0, 1.0)),
}
# What keras.applications ResNet weights ("imagenet" or a keras.applications file) need.
KERAS_APPLICATIONS_LAYOUT = {"stride_on": "1x1", "stem_pool": "floor", "preprocess": "caffe"}
DEFAULT_LAYOUT = KERAS_APPLICATIONS_LAYOUT


def check_layout_option(option: str, value: str) -> str:
    """Returns `value` if it is a known value of layout `option`, else raises ValueError."""
    known = {"stride_on": STRIDE_ON, "stem_pool": STEM_POOLS, "preprocess": tuple(PREPROCESS)}
    if value not in known[option]:
        raise ValueError(f"unknown {option} {value!r}; known: {', '.join(known[option])}")
    return value


@keras.saving.register_keras_serializable(package="kssl")
class ResNetPreprocess(keras.layers.Layer):
    """RGB [0, 255] -> (channels in `PREPROCESS[mode]` order - mean) / std.

    Always computes in float32 (also under a mixed policy): the next layer casts.
    """

    def __init__(self, mode: str = "torchvision", **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.mode = check_layout_option("preprocess", mode)
        self.order, self.mean, self.std = PREPROCESS[mode]

    def call(self, images):
        x = tf.cast(images, "float32")
        if self.order == "bgr":
            x = tf.reverse(x, axis=[-1])
        return (x - tf.constant(self.mean, "float32")) / tf.constant(self.std, "float32")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def make_preprocess(mode: str) -> keras.layers.Layer:
    """The input-normalisation layer for `mode` (see PREPROCESS), named "preprocess"."""
    if check_layout_option("preprocess", mode) == "caffe":
        return CaffePreprocess(name="preprocess")
    return ResNetPreprocess(mode, name="preprocess")


@keras.saving.register_keras_serializable(package="kssl")
class ResNetStem(keras.layers.Layer):
    """conv1 (7x7/2, 64) + BN + ReLU + 3x3/2 max pool, padded as keras.applications.

    pool="ceil" pools as Caffe / PyTorch `ceil_mode=True` with padding 1: the same windows
    plus, where the conv output size is even, one more at the end (which holds one real
    column). An extra zero column on the right/bottom gives exactly that window.
    """

    def __init__(self, norm: str = "batch", bn_momentum: float = 0.99, pool: str = "floor",
                 **kwargs):
        super().__init__(**kwargs)
        self.norm = norm
        self.bn_momentum = bn_momentum
        self.pool_mode = check_layout_option("stem_pool", pool)
        self.pad1 = keras.layers.ZeroPadding2D(3, name="conv1_pad")
        self.conv = keras.layers.Conv2D(64, 7, strides=2, name="conv1_conv")
        self.bn = make_norm(norm, "conv1_bn", epsilon=BN_EPSILON, momentum=bn_momentum)
        padding = 1 if pool == "floor" else ((1, 2), (1, 2))
        self.pad2 = keras.layers.ZeroPadding2D(padding, name="pool1_pad")
        self.pool = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")

    def build(self, input_shape):
        self.conv.build(channels_shape(input_shape[-1]))
        self.bn.build(channels_shape(64))

    def call(self, x, training=None):
        x = self.bn(self.conv(self.pad1(x)), training=training)
        # Zero padding before the max pool is harmless: inputs are >= 0 after the ReLU.
        return self.pool(self.pad2(tf.nn.relu(x)))

    def get_config(self):
        return {**super().get_config(), "norm": self.norm, "bn_momentum": self.bn_momentum,
                "pool": self.pool_mode}


@keras.saving.register_keras_serializable(package="kssl")
class Bottleneck(keras.layers.Layer):
    """ResNet v1 bottleneck 1x1 -> 3x3 (dilation) -> 1x1 (4x), with shortcut.

    The stride sits on the first 1x1 conv (stride_on="1x1", keras.applications / Caffe) or
    on the 3x3 conv (stride_on="3x3", torchvision v1.5). The layer's own name is the
    keras.applications block prefix, e.g. "conv4_block3".
    """

    def __init__(self, filters: int, strides: int = 1, dilation_rate: int = 1,
                 conv_shortcut: bool = False, norm: str = "batch", bn_momentum: float = 0.99,
                 stride_on: str = "1x1", **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.strides = strides
        self.dilation_rate = dilation_rate
        self.conv_shortcut = conv_shortcut
        self.norm = norm
        self.bn_momentum = bn_momentum
        self.stride_on = check_layout_option("stride_on", stride_on)
        p = self.name

        def bn(suffix):
            return make_norm(norm, f"{p}_{suffix}_bn", epsilon=BN_EPSILON, momentum=bn_momentum)

        if conv_shortcut:
            self.conv0 = keras.layers.Conv2D(4 * filters, 1, strides=strides, name=f"{p}_0_conv")
            self.bn0 = bn(0)
        strided_3x3 = stride_on == "3x3" and strides > 1
        self.conv1 = keras.layers.Conv2D(filters, 1, strides=1 if strided_3x3 else strides,
                                         name=f"{p}_1_conv")
        self.bn1 = bn(1)
        if strided_3x3:
            # TF's "same" padding of a stride-2 conv pads only the bottom/right for even
            # sizes; PyTorch pads every side by the dilation, which shifts the sampling
            # grid by one pixel. Explicit symmetric padding reproduces PyTorch.
            self.pad2 = keras.layers.ZeroPadding2D(dilation_rate, name=f"{p}_2_pad")
            self.conv2 = keras.layers.Conv2D(filters, 3, strides=strides,
                                             dilation_rate=dilation_rate, name=f"{p}_2_conv")
        else:
            self.pad2 = None
            self.conv2 = keras.layers.Conv2D(filters, 3, padding="same",
                                             dilation_rate=dilation_rate, name=f"{p}_2_conv")
        self.bn2 = bn(2)
        self.conv3 = keras.layers.Conv2D(4 * filters, 1, name=f"{p}_3_conv")
        self.bn3 = bn(3)

    def build(self, input_shape):
        inputs, inner, outputs = (channels_shape(c) for c in
                                  (input_shape[-1], self.filters, 4 * self.filters))
        if self.conv_shortcut:
            self.conv0.build(inputs)
            self.bn0.build(outputs)
        self.conv1.build(inputs)
        self.bn1.build(inner)
        self.conv2.build(inner)
        self.bn2.build(inner)
        self.conv3.build(inner)
        self.bn3.build(outputs)

    def call(self, x, training=None):
        if self.conv_shortcut:
            shortcut = self.bn0(self.conv0(x), training=training)
        else:
            shortcut = x
        y = tf.nn.relu(self.bn1(self.conv1(x), training=training))
        if self.pad2 is not None:
            y = self.pad2(y)
        y = tf.nn.relu(self.bn2(self.conv2(y), training=training))
        y = self.bn3(self.conv3(y), training=training)
        return tf.nn.relu(shortcut + y)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides,
                "dilation_rate": self.dilation_rate, "conv_shortcut": self.conv_shortcut,
                "norm": self.norm, "bn_momentum": self.bn_momentum, "stride_on": self.stride_on}


@keras.saving.register_keras_serializable(package="kssl")
class ResNetStage(keras.layers.Layer):
    """One stage (conv{n}_x): `depth` bottlenecks, the first with the stride and shortcut conv."""

    def __init__(self, index: int, depth: int, filters: int, strides: int = 1,
                 dilation_rate: int = 1, norm: str = "batch", bn_momentum: float = 0.99,
                 stride_on: str = "1x1", **kwargs):
        super().__init__(**kwargs)
        self.index = index
        self.depth = depth
        self.filters = filters
        self.strides = strides
        self.dilation_rate = dilation_rate
        self.norm = norm
        self.bn_momentum = bn_momentum
        self.stride_on = stride_on
        self.units = [
            Bottleneck(filters, strides=strides if i == 0 else 1, dilation_rate=dilation_rate,
                       conv_shortcut=(i == 0), norm=norm, bn_momentum=bn_momentum,
                       stride_on=stride_on, name=f"conv{index}_block{i + 1}")
            for i in range(depth)]

    def build(self, input_shape):
        self.units[0].build(input_shape)
        for unit in self.units[1:]:
            unit.build(channels_shape(4 * self.filters))

    def call(self, x, training=None):
        for unit in self.units:
            x = unit(x, training=training)
        return x

    @property
    def output_channels(self) -> int:
        return 4 * self.filters

    def width_scaled(self, factor: float, name: str) -> "ResNetStage":
        """A fresh stage like this one with `factor` times the channels (same depth,
        stride, dilation and norm); the first unit's shortcut conv adapts the input."""
        return ResNetStage(self.index, self.depth, max(1, round(self.filters * factor)),
                           strides=self.strides, dilation_rate=self.dilation_rate,
                           norm=self.norm, bn_momentum=self.bn_momentum,
                           stride_on=self.stride_on, name=name)

    def get_config(self):
        return {**super().get_config(), "index": self.index, "depth": self.depth,
                "filters": self.filters, "strides": self.strides,
                "dilation_rate": self.dilation_rate, "norm": self.norm,
                "bn_momentum": self.bn_momentum, "stride_on": self.stride_on}


def resolve_layout(weights, stride_on: str | None = None, stem_pool: str | None = None,
                   preprocess: str | None = None, backbone: str | None = None) -> dict:
    """The layout {stride_on, stem_pool, preprocess} a ResNet needs for `weights`.

    A None option follows the weights: the layout recorded in a kssl-converted file
    (`kssl.models.checkpoints.convert`), keras.applications' layout for "imagenet" or a
    keras.applications file, the defaults (keras.applications' layout) for no weights. An
    option given explicitly must agree with what the weights need: otherwise the network
    would silently compute something the weights were not trained for, so it is an error
    naming the option, the weights and the value they need.
    backbone: the backbone being built, checked against the one a converted file is for.
    """
    given = {"stride_on": stride_on, "stem_pool": stem_pool, "preprocess": preprocess}
    for option, value in given.items():
        if value is not None:
            check_layout_option(option, value)
    if weights is None:
        needed, source = None, None
    else:
        info = _converted_info(weights)
        if info is None:
            needed, source = KERAS_APPLICATIONS_LAYOUT, "keras.applications ResNet weights"
        else:
            if backbone is not None and info["backbone"] != backbone:
                raise ValueError(f"{weights} holds weights converted for {info['backbone']} "
                                 f"(arch {info['arch']}), not {backbone}")
            needed, source = info["layout"], f"{weights} (converted from {info['arch']})"
    layout = {}
    for option, value in given.items():
        if needed is not None and value is not None and value != needed[option]:
            raise ValueError(f"{option}={value!r} disagrees with the weights: {source} "
                             f"need {option}={needed[option]!r} (leave {option} unset to "
                             "follow the weights)")
        layout[option] = value or (needed or DEFAULT_LAYOUT)[option]
    return layout


def layout_of(preprocess: keras.layers.Layer, block_layers) -> dict:
    """{stride_on, stem_pool, preprocess} of a built ResNet from its layers; {} if the
    layers are not a kssl ResNet (so callers can ask any backbone)."""
    blocks = list(block_layers)
    if not blocks or not isinstance(blocks[0], ResNetStem):
        return {}
    stages = [b for b in blocks[1:] if isinstance(b, ResNetStage)]
    if isinstance(preprocess, ResNetPreprocess):
        mode = preprocess.mode
    elif isinstance(preprocess, CaffePreprocess):
        mode = "caffe"
    else:
        return {}
    return {"stride_on": stages[0].stride_on if stages else "1x1",
            "stem_pool": blocks[0].pool_mode, "preprocess": mode}


def resnet(depth: int, weights: str | None = None, output_stride: int = 16,
           norm: str = "batch", bn_momentum: float = 0.99, stride_on: str | None = None,
           stem_pool: str | None = None, preprocess: str | None = None) -> Backbone:
    """A dilated ResNet-`depth` backbone (50 or 101), built, with weights loaded.

    weights: None (random init), "imagenet" (keras.applications download), a path to a
      keras.applications ResNet `.h5` / `.weights.h5` file (with or without the top), or a
      file written by `bin/convert_weights` (PyTorch weights, see
      `kssl.models.checkpoints.convert`).
    output_stride: 8, 16 or 32.
    norm: "batch", "sync_batch" or "frozen" (see `kssl.models.layers.make_norm`).
    stride_on, stem_pool, preprocess: the layout (see the module docstring); None follows
      the weights (see `resolve_layout`), an explicit value must agree with them.
    """
    if depth not in STAGE_DEPTHS:
        raise ValueError(f"unknown ResNet depth {depth}; known: {sorted(STAGE_DEPTHS)}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"ResNet output_stride must be one of {OUTPUT_STRIDES}, "
                         f"got {output_stride!r}")
    check_norm(norm)
    name = f"resnet{depth}"
    layout = resolve_layout(weights, stride_on, stem_pool, preprocess, backbone=name)
    converted = _converted_info(weights) is not None
    # Load the weights first, so a bad file fails before anything else is built.
    source = None
    if weights is not None and not converted:
        source = keras_applications_model(depth, weights)
    blocks = [Block("stem", ResNetStem(norm, bn_momentum, pool=layout["stem_pool"],
                                       name="stem"), 4, 64)]
    stride, rate = 4, 1
    for i, (n, filters, s) in enumerate(zip(STAGE_DEPTHS[depth], STAGE_FILTERS, STAGE_STRIDES)):
        if stride * s > output_stride:
            # Trade this stage's stride for dilation so the feature map keeps its size
            # while the receptive field grows as if the stride were there.
            rate, s = rate * s, 1
        stride *= s
        stage = ResNetStage(i + 2, n, filters, strides=s, dilation_rate=rate, norm=norm,
                            bn_momentum=bn_momentum, stride_on=layout["stride_on"],
                            name=f"stage{i + 1}")
        blocks.append(Block(f"stage{i + 1}", stage, stride, 4 * filters))
    backbone = Backbone(name, make_preprocess(layout["preprocess"]), tuple(blocks),
                        low_level_block="stage1", output_stride=output_stride)
    backbone.build()
    if source is not None:
        transfer_weights(source, [b.layer for b in backbone.blocks], target_name=name)
    if converted:
        loading.load_backbone_weights(weights, [b.layer for b in backbone.blocks],
                                      target_name=name)
    return backbone


def _converted_info(weights) -> dict | None:
    """The metadata of a file written by kssl's converter; None for anything else."""
    if weights is None:
        return None
    return loading.read_info(weights)


def resnet50(**kwargs) -> Backbone:
    """Dilated ResNet-50; see `resnet` for the arguments."""
    return resnet(50, **kwargs)


def resnet101(**kwargs) -> Backbone:
    """Dilated ResNet-101; see `resnet` for the arguments."""
    return resnet(101, **kwargs)


def keras_applications_model(depth: int, weights: str) -> keras.Model:
    """keras.applications.ResNet{depth} (no top) holding `weights` ("imagenet" or a file).

    A file may hold the model with or without the classification top; the top is dropped.
    """
    constructor = {50: keras.applications.ResNet50, 101: keras.applications.ResNet101}[depth]
    if weights == "imagenet":
        return constructor(weights="imagenet", include_top=False, input_shape=(None, None, 3))
    path = os.fspath(weights) if isinstance(weights, (str, os.PathLike)) else None
    if path is None or not os.path.isfile(path):
        raise ValueError(f"weights must be None, 'imagenet' or an existing file; "
                         f"no file at {weights!r}")
    errors = []
    for include_top in (False, True):
        shape = (None, None, 3) if not include_top else (224, 224, 3)
        model = constructor(weights=None, include_top=include_top, input_shape=shape)
        try:
            model.load_weights(path)
        except Exception as e:  # noqa: BLE001 - re-raised below with both attempts' reasons
            errors.append(f"include_top={include_top}: {_short_load_error(e)}")
            continue
        if include_top:
            # Keep only the convolutional part: same layer objects, so weights come along.
            model = keras.Model(model.input, model.get_layer("conv5_block3_out").output)
        return model
    raise ValueError(f"{path} does not load into keras.applications.ResNet{depth}: "
                     + " | ".join(errors))


def _short_load_error(error: Exception) -> str:
    """Keras's load error reduced to the layer name and shapes (it also dumps the values)."""
    text = str(error)
    layer = re.search(r"<\w+ name=([\w.-]+)", text)
    shapes = re.search(r"variable\.shape=\([^)]*\), Received: value\.shape=\([^)]*\)", text)
    if layer is None:
        return text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
    return f"layer {layer.group(1)!r}" + (f": {shapes.group(0)}" if shapes else "")


def transfer_weights(source: keras.Model, target_layers: Iterable[keras.layers.Layer],
                     target_name: str = "target") -> None:
    """Copies every weighted layer of `source` into the same-named layer under `target_layers`.

    Fails, naming the layer, if a source layer has no same-named target, if shapes differ,
    or if a target layer receives nothing (so no layer silently keeps its random init).
    """
    targets = weighted_leaf_layers(target_layers)
    sources = weighted_leaf_layers([source])
    for name, src in sources.items():
        dst = targets.get(name)
        if dst is None:
            raise ValueError(f"layer {name!r} of {source.name} has no counterpart in "
                             f"{target_name}")
        if len(src.weights) != len(dst.weights):
            raise ValueError(f"layer {name!r}: {source.name} has {len(src.weights)} weights, "
                             f"{target_name} has {len(dst.weights)}")
        for s, d in zip(src.weights, dst.weights):
            if tuple(s.shape) != tuple(d.shape):
                raise ValueError(f"layer {name!r}: weight {s.name!r} has shape "
                                 f"{tuple(s.shape)} in {source.name} but {tuple(d.shape)} "
                                 f"in {target_name}")
    missing = sorted(set(targets) - set(sources))
    if missing:
        raise ValueError(f"layers of {target_name} missing from {source.name}: "
                         f"{first_names(missing)}")
    for name, src in sources.items():
        for s, d in zip(src.weights, targets[name].weights):
            d.assign(s)
