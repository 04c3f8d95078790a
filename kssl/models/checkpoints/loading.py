"""Loading weights into built layers, matched by layer name.

The reading side of the converted-weights files `kssl.models.checkpoints.convert` writes
(format in its docstring), and the leaf-layer matching that both those files and
`kssl.models.backbones.resnet.transfer_weights` (keras.applications weights) use. It
imports no backbone, so a backbone can load weights through it.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import keras

INFO_ATTR = "kssl_converted_weights"
FORMAT_VERSION = 1
BACKBONE_GROUP = "backbone"
CLASSIFIER_GROUP = "classifier"


def weighted_leaf_layers(layers: Iterable[keras.layers.Layer]) -> dict:
    """name -> layer for every layer under `layers` that owns weights directly."""
    found = {}
    for root in layers:
        for layer in root._flatten_layers(include_self=True, recursive=True):
            own = layer._trainable_variables + layer._non_trainable_variables
            if not own:
                continue
            if layer.name in found and found[layer.name] is not layer:
                raise ValueError(f"two layers are named {layer.name!r}: cannot match by name")
            found[layer.name] = layer
    return found


def first_names(names) -> str:
    """The first five of `names` for an error message, with ' ...' when there are more."""
    return f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"


def read_info(path) -> dict | None:
    """The metadata of a file written by `save_conversion`; None for anything else
    ("imagenet", a keras.applications file, a missing path)."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    path = os.fspath(path)
    if not path.endswith(".h5") or not os.path.isfile(path):
        return None
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get(INFO_ATTR)
    except OSError:
        return None
    if raw is None:
        return None
    info = json.loads(raw)
    if int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer kssl (converted-weights format "
                         f"{info['format_version']}; this kssl reads {FORMAT_VERSION})")
    return info


def load_backbone_weights(path: str, layers, target_name: str = "backbone") -> None:
    """Assigns a converted file's backbone weights to the same-named layers under `layers`.

    Fails, naming the layer or variable, if the file lacks one of the model's weighted
    layers, holds a layer the model lacks, or a shape differs: nothing keeps its random
    initialisation silently.
    """
    import h5py

    targets = weighted_leaf_layers(layers)
    with h5py.File(path, "r") as f:
        group = f[BACKBONE_GROUP]
        missing = sorted(set(targets) - set(group))
        if missing:
            raise ValueError(f"{path} lacks layers of {target_name}: "
                             f"{first_names(missing)}")
        extra = sorted(set(group) - set(targets))
        if extra:
            raise ValueError(f"{path} holds layers {target_name} lacks: "
                             f"{first_names(extra)}")
        values = []
        for name, layer in targets.items():
            for variable in layer.weights:
                key = f"{name}/{variable.name}"
                if key not in group:
                    raise ValueError(f"{path} lacks {key} for {target_name}")
                value = group[key][()]
                if tuple(value.shape) != tuple(variable.shape):
                    raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, "
                                     f"{target_name} needs {tuple(variable.shape)}")
                values.append((variable, value))
    for variable, value in values:
        variable.assign(value)


def load_classifier(path: str, head) -> tuple[bool, str | None]:
    """Loads a converted file's ASPP branches into a `DeepLabV2Head`, matched by rate.

    Returns (True, None) when loaded; (False, reason) when the head does not fit (other
    num_classes, a rate the file lacks), leaving the head's fresh initialisation; (False,
    None) when the file has no classifier.
    """
    import h5py

    info = read_info(path)
    if info is None or not info.get("classifier"):
        return False, None
    saved = info["classifier"]
    if not hasattr(head, "rates") or not hasattr(head, "branches"):
        return False, f"{path} holds a DeepLab-v2 classifier; the model's head is not one"
    if int(head.num_classes) != int(saved["num_classes"]):
        return False, (f"{path} holds a {saved['num_classes']}-class classifier, the model "
                       f"has {head.num_classes} classes")
    lacking = [r for r in head.rates if r not in saved["rates"]]
    if lacking:
        return False, (f"{path} has no classifier branch for rate(s) "
                       f"{', '.join(map(str, lacking))} (it has {saved['rates']})")
    with h5py.File(path, "r") as f:
        group = f[CLASSIFIER_GROUP]
        by_rate = {int(group[k].attrs["rate"]): group[k] for k in group}
        values = []
        for rate, branch in zip(head.rates, head.branches):
            for variable in branch.weights:
                value = by_rate[rate][variable.name][()]
                if tuple(value.shape) != tuple(variable.shape):
                    raise ValueError(f"{path}: classifier rate {rate} {variable.name} has "
                                     f"shape {tuple(value.shape)}, the head needs "
                                     f"{tuple(variable.shape)}")
                values.append((variable, value))
    for variable, value in values:
        variable.assign(value)
    return True, None
