"""Re-estimating a trained network's batch-norm moving statistics from chosen images.

A network's moving statistics follow every training-mode pass it made, including passes
over strongly augmented or mixed images (UniMatch's strong views, ClassMix's mixed
images). Replacing them by the average statistics of clean images, with the weights
unchanged, tells whether those passes moved the statistics far enough to matter at
evaluation (batch-norm recalibration, e.g. Li et al., "Revisiting Batch Normalization
for Practical Domain Adaptation", 2016).
"""

from __future__ import annotations

from typing import Iterable, List

import keras

from kssl.models.layers import FrozenBatchNormalization


def updatable_batch_norms(network) -> List[keras.layers.BatchNormalization]:
    """The batch-norm layers of `network` that update their moving statistics in training
    mode (frozen ones never do)."""
    return [layer for layer in network._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization)
            and not isinstance(layer, FrozenBatchNormalization)]


def recompute_batch_norm_statistics(network, image_batches: Iterable) -> int:
    """Sets every updatable batch norm's moving mean and variance of `network` to the
    average, over `image_batches`, of the batch mean and variance it sees in a
    training-mode pass, with dropout off; the weights are not touched. Runs eagerly (each
    layer's momentum is set per batch: k / (k + 1) before batch k averages them).
    Returns the number of batches used; raises ValueError when there was none."""
    norms = updatable_batch_norms(network)
    dropouts = [layer for layer in network._flatten_layers(include_self=False)
                if isinstance(layer, keras.layers.Dropout)]
    momenta = [layer.momentum for layer in norms]
    rates = [layer.rate for layer in dropouts]
    count = 0
    try:
        for layer in dropouts:
            layer.rate = 0.0
        for images in image_batches:
            for layer in norms:
                layer.momentum = count / (count + 1.0)
            network(images, training=True)
            count += 1
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
        for layer, rate in zip(dropouts, rates):
            layer.rate = rate
    if not count:
        raise ValueError("recompute_batch_norm_statistics got no image batch")
    return count
