"""Auxiliary branches: second networks that share a segmenter's first blocks.

Multi-task self-training (the three-stage method) trains a second head next to the main
one. Two shapes of branch are built generically from any segmenter's named blocks:

- "last_block": shares every backbone block but the last, and has its own copy of the last
  block at a fraction of its width (half by default) and its own head (stage 2's branch,
  for a ResNet: shared stem and conv2-conv4, its own half-width conv5 and ASPP);
- "head": shares every backbone block and has only its own head (stage 3's branch).

A block can be copied at another width when its layer offers `width_scaled(factor, name)`
and `output_channels` (the ResNet, small and EfficientNet-Lite0 stages do). Heads are
rebuilt from their config with a new number of outputs, so their variables are fresh.
"""

from __future__ import annotations

import keras

from kssl.models.segmenter import Block, Segmenter

BRANCH_KINDS = ("last_block", "head")


def width_scaled_block(block: Block, factor: float, name: str) -> Block:
    """A fresh copy of `block` with `factor` times its channels, under the same block name
    (so a head reading the block by name reads the copy in the branch)."""
    layer = block.layer
    if not hasattr(layer, "width_scaled"):
        raise ValueError(
            f"block {block.name!r} ({type(layer).__name__}) cannot be copied at another "
            "width: its layer has no width_scaled(factor, name) method")
    copy = layer.width_scaled(factor, name=name)
    return Block(block.name, copy, block.stride, copy.output_channels)


def head_copy(head: keras.layers.Layer, num_classes: int, name: str) -> keras.layers.Layer:
    """A freshly initialised head of the same kind and settings with `num_classes` outputs."""
    config = {**head.get_config(), "num_classes": num_classes, "name": name}
    return head.__class__.from_config(config)


def auxiliary_branch(segmenter: Segmenter, kind: str, num_outputs: int,
                     width: float = 0.5, name: str = "auxiliary") -> Segmenter:
    """A built branch of `segmenter` (see the module docstring for `kind`).

    num_outputs: the branch head's channels (the released three-stage code gives it one
      more than the number of classes, a placeholder no target uses).
    width: the channel fraction of the copied last block ("last_block" only).
    Returns a Segmenter whose `shared_blocks` attribute is the number of leading blocks it
    shares (the same layer objects, hence the same variables) with `segmenter`.
    """
    if kind not in BRANCH_KINDS:
        raise ValueError(f"branch kind must be one of {BRANCH_KINDS}, got {kind!r}")
    blocks = segmenter.block_specs
    head = head_copy(segmenter.head, num_outputs, name=f"{name}_head")
    if kind == "head":
        shared, own = len(blocks), ()
    else:
        if len(blocks) < 2:
            raise ValueError("a 'last_block' branch needs a backbone of at least two blocks")
        shared = len(blocks) - 1
        own = (width_scaled_block(blocks[-1], width, name=f"{blocks[-1].name}_{name}"),)
    branch = segmenter.branch(shared, later_blocks=own, head=head, name=name)
    branch.build((None, None, None, 3))
    branch.shared_blocks = shared
    return branch
