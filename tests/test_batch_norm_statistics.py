"""Re-estimating batch-norm moving statistics: the averages of the batch statistics, with
dropout off and frozen layers untouched."""

import keras
import numpy as np
import pytest

from kssl.models.batch_norm_statistics import recompute_batch_norm_statistics
from kssl.models.layers import FrozenBatchNormalization


def test_moving_statistics_become_the_average_batch_statistics():
    keras.utils.set_random_seed(0)
    first = keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.9)
    dropout = keras.layers.Dropout(0.5)
    second = keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.8)
    frozen = FrozenBatchNormalization()
    network = keras.Sequential([keras.Input((5, 5, 3)), first, dropout, second, frozen])
    first.gamma.assign([2.0, 1.0, 0.5])
    first.beta.assign([1.0, -1.0, 0.0])
    frozen_before = [v.numpy().copy() for v in frozen.weights]
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc, scale, (4, 5, 5, 3)).astype(np.float32)
               for loc, scale in [(3.0, 2.0), (-1.0, 0.5), (0.0, 1.0)]]

    assert recompute_batch_norm_statistics(network, batches) == 3

    means = [b.mean(axis=(0, 1, 2)) for b in batches]
    variances = [b.var(axis=(0, 1, 2)) for b in batches]
    np.testing.assert_allclose(first.moving_mean.numpy(), np.mean(means, 0), rtol=1e-5)
    np.testing.assert_allclose(first.moving_variance.numpy(), np.mean(variances, 0),
                               rtol=1e-4)
    # The second layer reads the first's training-mode output undropped: per batch, mean
    # beta and variance gamma^2 var / (var + eps).
    gamma, beta = np.array([2.0, 1.0, 0.5]), np.array([1.0, -1.0, 0.0])
    np.testing.assert_allclose(second.moving_mean.numpy(), beta, atol=1e-5)
    expected = np.mean([gamma ** 2 * v / (v + 1e-3) for v in variances], 0)
    np.testing.assert_allclose(second.moving_variance.numpy(), expected, rtol=1e-4)
    for before, after in zip(frozen_before, frozen.weights):
        np.testing.assert_array_equal(after.numpy(), before)
    # Each layer's own settings are back.
    assert (first.momentum, second.momentum, dropout.rate) == (0.9, 0.8, 0.5)


def test_no_batch_is_an_error():
    network = keras.Sequential([keras.Input((2, 2, 1)), keras.layers.BatchNormalization()])
    with pytest.raises(ValueError, match="no image batch"):
        recompute_batch_norm_statistics(network, [])
