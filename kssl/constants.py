"""Constants every layer shares: the ground floor, importing nothing from kssl.

Losses, metrics, methods and the data pipeline agree on these values; keeping them here
lets each read them without importing the others.
"""

IGNORE_LABEL = 255
"""The label of pixels that no loss or metric counts, everywhere inside kssl."""

PSEUDO_MASK_KEY = "pseudo_mask"
"""The example key under which the pipeline attaches a stored pseudo-mask (uint8 [H, W]),
and under which a staged method's train step reads it."""
