"""Keras optimizers with per-variable learning-rate multipliers.

DeepLab-style fine-tuning trains the pretrained backbone at a fraction of the new layers'
learning rate (the three-stage code: Adam 3e-5 on new layers, 3e-6 on the backbone). Keras
has no parameter groups, and scaling gradients does not scale Adam's update, so the
multiplier is applied to the learning rate inside `update_step`, where the optimizer
computes each variable's update (after any mixed-precision unscaling and the cross-replica
gradient sum). Decoupled weight decay is not multiplied.
"""

from __future__ import annotations

import keras


class LearningRateMultipliers:
    """Mixin for a Keras optimizer: `set_learning_rate_multiplier(variables, factor)`."""

    def set_learning_rate_multiplier(self, variables, factor: float) -> None:
        """Trains `variables` with `factor` times the learning rate (1 restores it)."""
        if not hasattr(self, "_lr_factors"):
            self._lr_factors = {}
        for variable in variables:
            self._lr_factors[self._var_key(variable)] = float(factor)

    def learning_rate_multiplier(self, variable) -> float:
        """The factor `variable` is trained with."""
        return getattr(self, "_lr_factors", {}).get(self._var_key(variable), 1.0)

    def update_step(self, gradient, variable, learning_rate):
        factor = self.learning_rate_multiplier(variable)
        if factor != 1.0:
            learning_rate = learning_rate * factor
        return super().update_step(gradient, variable, learning_rate)


class SGD(LearningRateMultipliers, keras.optimizers.SGD):
    """`keras.optimizers.SGD` with learning-rate multipliers."""


class Adam(LearningRateMultipliers, keras.optimizers.Adam):
    """`keras.optimizers.Adam` with learning-rate multipliers."""


class AdamW(LearningRateMultipliers, keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` with learning-rate multipliers."""


def set_learning_rate_multiplier(optimizer, variables, factor: float) -> None:
    """Sets a multiplier on `optimizer`, or on the one a loss-scale wrapper holds."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not isinstance(inner, LearningRateMultipliers):
        if factor == 1.0:
            return
        raise ValueError(
            f"{type(inner).__name__} takes no learning-rate multipliers: compile with an "
            "optimizer of kssl.optimizers (e.g. kssl.optimizers.Adam; bin/train's "
            "optimizer.name builds those), or set the multiplier to 1.0")
    inner.set_learning_rate_multiplier(variables, factor)
