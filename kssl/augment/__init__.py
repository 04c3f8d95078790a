"""Augmentations that run inside the train step, as batched tensor ops.

- `mixing`: ClassMix and box (CutMix) masks (CutMix boxes also centred on a class), and
  `mix`, which applies one mask to images, probabilities or features, pairing example i
  with i+1 of the global batch.
- `strong`: colour jitter and Gaussian blur of images (`StrongAugment`; with grayscale,
  `ColorJitterGrayscaleBlur`; one photometric op per image, `OneOfPhotometric`).
- `features`: channel dropout of feature maps (`channel_dropout`).
- `randaugment`: RandAugment + Cutout of images with maps of source coordinates for
  warping targets (`RandAugmentCutout`, `warp_labels`), as three-stage self-training.
- `seeds`: stateless random draws keyed by step and global example index, so results do
  not depend on how a batch is split over replicas.

Weak, per-example augmentation (scale, crop, flip) lives in `kssl.data.transforms`.
"""

from kssl.augment import features, mixing, randaugment, seeds, strong
from kssl.augment.features import channel_dropout
from kssl.augment.mixing import (box_masks, class_cutmix_boxes, class_mix_masks, cutmix_boxes,
                                  mix, next_in_batch)
from kssl.augment.randaugment import RandAugmentCutout, identity_coords, warp_labels
from kssl.augment.strong import ColorJitterGrayscaleBlur, OneOfPhotometric, StrongAugment

__all__ = ["ColorJitterGrayscaleBlur", "OneOfPhotometric", "RandAugmentCutout",
           "StrongAugment", "box_masks", "channel_dropout", "class_cutmix_boxes",
           "class_mix_masks", "cutmix_boxes", "features", "identity_coords", "mix", "mixing",
           "next_in_batch", "randaugment", "seeds", "strong", "warp_labels"]
