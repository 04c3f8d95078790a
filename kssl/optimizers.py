"""Keras optimizers with per-variable learning-rate multipliers.

DeepLab-style fine-tuning trains the pretrained backbone at a fraction of the new layers'
learning rate (the three-stage code: Adam 3e-5 on new layers, 3e-6 on the backbone). Keras
has no parameter groups, and scaling gradients does not scale Adam's update, so the
multiplier is applied to the learning rate inside `update_step`, where the optimizer
computes each variable's update (after any mixed-precision unscaling and the cross-replica
gradient sum). Decoupled weight decay is not multiplied.

`build_optimizer` (gin name `optimizer`) builds the one a run trains with.
"""

from __future__ import annotations

import math
from typing import Optional

import gin
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


# -- the configured optimizer --------------------------------------------------------------
BATCH_SCALING_RULES = ("linear", "sqrt", "none")


def scaled_learning_rate(learning_rate: float, batch_size: Optional[int],
                         reference_batch_size: Optional[int], rule: str = "linear") -> float:
    """`learning_rate`, given for a global labelled batch of `reference_batch_size`, for a
    batch of `batch_size`: times batch / reference ("linear", the usual rule for SGD),
    times its square root ("sqrt", often used with Adam), or unchanged ("none", and
    whenever either size is None)."""
    if rule not in BATCH_SCALING_RULES:
        raise ValueError(f"optimizer.batch_scaling must be one of {BATCH_SCALING_RULES}, "
                         f"got {rule!r}")
    if reference_batch_size is not None and reference_batch_size <= 0:
        raise ValueError("optimizer.reference_batch_size must be a positive number of "
                         f"images, got {reference_batch_size!r}")
    if not batch_size or not reference_batch_size or rule == "none":
        return learning_rate
    ratio = batch_size / reference_batch_size
    return learning_rate * (ratio if rule == "linear" else math.sqrt(ratio))


@gin.configurable("optimizer")
def build_optimizer(total_steps, name="sgd", learning_rate=0.01, momentum=0.9,
                    weight_decay=1e-4, schedule="poly", power=0.9, end_learning_rate=0.0,
                    reference_batch_size=None, batch_scaling="linear", batch_size=None,
                    nesterov=False):
    """SGD (momentum; Nesterov momentum with `nesterov`, as ClassMix trains) or
    Adam/AdamW with a poly or constant schedule.

    The optimizers take per-variable learning-rate multipliers (`kssl.optimizers`), which a
    method sets (e.g. `ThreeStage.backbone_lr_multiplier`). Weight decay is decoupled
    (applied by the optimizer) and skips biases and norm layers.

    `reference_batch_size`: the global labelled batch `learning_rate` was tuned for (the
    paper configs give the paper's). When the run's `batch_size` (`pipeline.batch_size`,
    passed by `train`) differs, e.g. on fewer or smaller GPUs, the rate (and the poly
    schedule's end rate) follows `batch_scaling` (see `scaled_learning_rate`).
    """
    scaled = scaled_learning_rate(learning_rate, batch_size, reference_batch_size,
                                  batch_scaling)
    if scaled != learning_rate:
        print(f"kssl: learning rate {learning_rate:g} scaled to {scaled:g} for a global "
              f"batch of {batch_size} (tuned for {reference_batch_size}; "
              f"optimizer.batch_scaling = {batch_scaling!r})", flush=True)
        end_learning_rate *= scaled / learning_rate
        learning_rate = scaled
    if schedule == "poly":
        lr = keras.optimizers.schedules.PolynomialDecay(
            learning_rate, total_steps, end_learning_rate=end_learning_rate, power=power)
    elif schedule == "constant":
        lr = learning_rate
    else:
        raise ValueError(f"optimizer.schedule must be 'poly' or 'constant', got {schedule!r}")
    if nesterov and name != "sgd":
        raise ValueError(f"optimizer.nesterov is an SGD option; optimizer.name is {name!r}")
    if name == "sgd":
        opt = SGD(lr, momentum=momentum, nesterov=nesterov,
                             weight_decay=weight_decay or None)
    elif name == "adam":
        opt = Adam(lr)
    elif name == "adamw":
        opt = AdamW(lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer.name must be 'sgd', 'adam' or 'adamw', got {name!r}")
    if weight_decay:
        opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return opt
