"""Segmenter: a segmentation network made of named backbone blocks and a head.

A backbone is an input-normalisation layer plus an ordered list of named blocks ("stem",
"stage1", ...); each block maps the previous block's output to its own. The head reads the
dict of all block outputs (so a decoder can pick a low-level stage by name) and returns
logits at its own stride; the segmenter resizes them to the input size.

Because blocks are separate layer objects, a semi-supervised method can build a second
network that reuses the first k blocks (the same objects, hence the same variables) and
has its own later blocks and head: `Segmenter.branch`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import keras
import tensorflow as tf

from kssl.models.layers import channels_shape, resize_bilinear, spatial_size


@dataclasses.dataclass(frozen=True)
class Block:
    """One named backbone block.

    stride: the block's output stride relative to the input image (its feature map is
      ceil(H / stride) x ceil(W / stride)); dilated stages keep the stride of the stage before.
    channels: the number of channels of the block's output.
    """

    name: str
    layer: keras.layers.Layer
    stride: int
    channels: int


@dataclasses.dataclass(frozen=True)
class Backbone:
    """What a backbone builder returns: input normalisation, blocks, and facts for heads.

    preprocess: maps float RGB images in [0, 255] to the backbone's expected input.
    low_level_block: the block a DeepLabV3+-style decoder reads (stride 4 by convention).
    """

    name: str
    preprocess: keras.layers.Layer
    blocks: tuple[Block, ...]
    low_level_block: str | None = None
    output_stride: int | None = None

    def __post_init__(self):
        names = [b.name for b in self.blocks]
        if len(set(names)) != len(names):
            raise ValueError(f"backbone {self.name!r} has duplicate block names: {names}")

    def build(self, input_channels: int = 3) -> "Backbone":
        """Creates every block's variables from the channel counts; returns self."""
        channels = input_channels
        for block in self.blocks:
            if not block.layer.built:
                block.layer.build(channels_shape(channels))
            channels = block.channels
        return self


class Segmenter(keras.Model):
    """images [B, H, W, 3] float RGB in [0, 255] -> float32 logits [B, H, W, num_classes].

    Any height and width work (dynamic shapes allowed). Public pieces for methods:
      block_names, blocks (name -> layer), strides, channels (name -> int),
      head_input_blocks, preprocess, head,
      features(), extend_features(), logits_from_features(), branch(),
      classifier_inputs_and_logits() and classifier_weights() (the head's final classifier).

    Args:
      preprocess: layer mapping [0, 255] RGB floats to the backbone's input normalisation.
      blocks: the named blocks, in order.
      head: layer called as `head(features_dict, training=...)` -> logits at its own stride.
      align_corners: how logits are upsampled to the input size (see `resize_bilinear`).
    """

    def __init__(self, preprocess: keras.layers.Layer, blocks: Sequence[Block],
                 head: keras.layers.Layer, align_corners: bool = False,
                 name: str | None = None, **kwargs):
        super().__init__(name=name, **kwargs)
        blocks = tuple(blocks)
        if not blocks:
            raise ValueError("a Segmenter needs at least one block")
        names = [b.name for b in blocks]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate block names: {names}")
        self.preprocess = preprocess
        # Keras tracks layers in a plain list (variables, save_weights) but does not look
        # inside the Block records, which are kept alongside for names/strides/channels.
        self.block_layers = [b.layer for b in blocks]
        self._block_specs = blocks
        self.head = head
        self.align_corners = align_corners
        # Any batch, height and width; exactly 3 (RGB) channels.
        self.input_spec = keras.InputSpec(shape=(None, None, None, 3))

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_backbone(cls, backbone: Backbone, head: keras.layers.Layer,
                      align_corners: bool = False, name: str | None = None) -> "Segmenter":
        """A segmenter from a backbone builder's result and a head."""
        return cls(backbone.preprocess, backbone.blocks, head,
                   align_corners=align_corners, name=name)

    @classmethod
    def from_blocks(cls, preprocess: keras.layers.Layer, blocks: Sequence[Block],
                    head: keras.layers.Layer, align_corners: bool = False,
                    name: str | None = None) -> "Segmenter":
        """Same as the constructor; reads better at call sites that assemble blocks."""
        return cls(preprocess, blocks, head, align_corners=align_corners, name=name)

    def branch(self, k: int | str, later_blocks: Sequence[Block] = (),
               head: keras.layers.Layer | None = None, name: str | None = None) -> "Segmenter":
        """A new Segmenter sharing this one's preprocessing and first k blocks.

        The first k block layers are the same objects (so the same variables: training
        either network updates the shared trunk); `later_blocks` and `head` are the
        branch's own. k may be a block name, meaning "up to and including that block".
        `head` is required: sharing the head as well would make the branch this network.
        The branch is not built: call it once on a dummy batch before `fit` (or use
        `branch.build((None, None, None, 3))`) so its own variables exist up front.
        """
        k = self._block_count(k)
        if head is None:
            raise ValueError("branch() needs its own head")
        blocks = self._block_specs[:k] + tuple(later_blocks)
        return Segmenter(self.preprocess, blocks, head, align_corners=self.align_corners,
                         name=name)

    # -- metadata -------------------------------------------------------------------
    @property
    def block_specs(self) -> tuple[Block, ...]:
        """The Block records (name, layer, stride, channels), in order."""
        return self._block_specs

    @property
    def block_names(self) -> tuple[str, ...]:
        """Block names in execution order."""
        return tuple(b.name for b in self._block_specs)

    @property
    def blocks(self) -> dict[str, keras.layers.Layer]:
        """Block name -> block layer, in order."""
        return {b.name: b.layer for b in self._block_specs}

    @property
    def strides(self) -> dict[str, int]:
        """Block name -> output stride relative to the input image."""
        return {b.name: b.stride for b in self._block_specs}

    @property
    def channels(self) -> dict[str, int]:
        """Block name -> number of output channels."""
        return {b.name: b.channels for b in self._block_specs}

    @property
    def head_input_blocks(self) -> tuple[str, ...]:
        """The names of the blocks whose outputs the head reads (its `input_blocks`; every
        block for a head that does not say)."""
        return tuple(getattr(self.head, "input_blocks", self.block_names))

    def _block_count(self, upto: int | str | None) -> int:
        """Number of blocks to run for `upto` (None: all; int: count; str: inclusive name)."""
        n = len(self._block_specs)
        if upto is None:
            return n
        if isinstance(upto, str):
            names = self.block_names
            if upto not in names:
                raise ValueError(f"unknown block {upto!r}; blocks: {', '.join(names)}")
            return names.index(upto) + 1
        if isinstance(upto, bool) or not 0 <= int(upto) <= n:
            raise ValueError(f"block count must be in 0..{n}, got {upto!r}")
        return int(upto)

    # -- forward --------------------------------------------------------------------
    def normalize(self, images):
        """[0, 255] RGB images (any numeric dtype) -> the backbone's normalised input."""
        return self.preprocess(tf.cast(images, "float32"))

    def features(self, images, training=None, upto: int | str | None = None) -> dict:
        """Block outputs {name: tensor} for `images`, running blocks up to `upto`.

        upto: None runs every block; a block name runs up to and including it; an int k runs
        the first k blocks.
        """
        stop = self._block_count(upto)
        return self._run_blocks({}, self.normalize(images), 0, stop, training)

    def extend_features(self, features: Mapping, start: int | str, training=None,
                        upto: int | str | None = None) -> dict:
        """Continues a features dict computed by a network sharing this one's first blocks.

        start: how many of this network's blocks `features` already holds (an int, or the
          name of the last one, inclusive), e.g. the trunk computed by the network this one
          branched from. Entries for later block names in `features` are ignored (a sibling
          network's own later blocks may share their names).
        Returns a new dict with this network's blocks up to `upto`.
        """
        start = self._block_count(start)
        if start == 0:
            raise ValueError("extend_features needs start >= 1; use features(images) instead")
        names = self.block_names
        missing = [n for n in names[:start] if n not in features]
        if missing:
            raise ValueError(f"extend_features: features lack blocks {missing}")
        out = {n: features[n] for n in names[:start]}
        stop = max(start, self._block_count(upto))
        return self._run_blocks(out, out[names[start - 1]], start, stop, training)

    def _run_blocks(self, out: dict, x, start: int, stop: int, training) -> dict:
        for block in self._block_specs[start:stop]:
            x = block.layer(x, training=training)
            out[block.name] = x
        return out

    def logits_from_features(self, features: Mapping, size, training=None):
        """Runs the head on `features` and resizes its logits to `size` = (height, width).

        Logits are cast to float32 before resizing, so they are float32 under mixed precision.
        """
        logits = self.head(dict(features), training=training)
        logits = tf.cast(logits, "float32")
        return resize_bilinear(logits, size, align_corners=self.align_corners)

    def classifier_inputs_and_logits(self, images, training=None):
        """(features the head's final classifier reads [B, h, w, A], float32 logits
        [B, h, w, C]), both at the head's stride, from one forward pass.

        `resize_bilinear(logits, input size, self.align_corners)` is `call(images)`. Needs a
        head with `classifier_inputs` and `classify` (DeepLabV3+ and DeepLabV2 have them).
        """
        self._check_classifier_api()
        feats = self.features(images, training=training)
        inputs = self.head.classifier_inputs(feats, training=training)
        return inputs, tf.cast(self.head.classify(inputs), "float32")

    def classifier_weights(self):
        """The head's final classifier as per-position linear maps [T, A, C] (no bias);
        T = 1 for a 1x1 classifier (row 0 holds w_c), see the head's `classifier_weights`."""
        self._check_classifier_api()
        return self.head.classifier_weights()

    def _check_classifier_api(self):
        missing = [name for name in ("classifier_inputs", "classify", "classifier_weights")
                   if not hasattr(self.head, name)]
        if missing:
            raise TypeError(f"head {type(self.head).__name__} does not expose its classifier "
                            f"({', '.join(missing)})")

    def call(self, images, training=None):
        feats = self.features(images, training=training)
        return self.logits_from_features(feats, spatial_size(images), training=training)

    def build(self, input_shape=None):
        """Creates all variables by running a tiny batch (unknown sizes default to 64)."""
        height = width = 64
        if input_shape is not None and len(input_shape) == 4:
            height = input_shape[1] or 64
            width = input_shape[2] or 64
        self.call(tf.zeros((1, height, width, 3)), training=False)
        self.built = True

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:3]) + (self.head.num_classes,)
