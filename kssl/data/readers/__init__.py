"""Dataset readers by name: `get_reader("camvid", root=...)`.

Readers are imported when first asked for, so a reader whose optional dependency is
missing (tfds) or whose module is not installed breaks only its own name.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Tuple, Union

_BUILTIN: Dict[str, Tuple[str, str]] = {
    "voc": ("kssl.data.readers.voc", "VOC"),
    "cityscapes": ("kssl.data.readers.cityscapes", "Cityscapes"),
    "camvid": ("kssl.data.readers.camvid", "CamVid"),
    "folder": ("kssl.data.readers.folder", "Folder"),
    "tfds": ("kssl.data.readers.tfds_reader", "Tfds"),
    "shapes": ("kssl.data.readers.shapes", "Shapes"),
}
_REGISTRY: Dict[str, Union[Tuple[str, str], Callable]] = dict(_BUILTIN)


def register_reader(name: str, factory: Callable) -> None:
    """Makes `get_reader(name, ...)` call `factory(...)` (a Reader class or function)."""
    _REGISTRY[name.lower()] = factory


def reader_names() -> list:
    """The names `get_reader` knows, sorted."""
    return sorted(_REGISTRY)


def reader_class(name: str) -> Callable:
    """The class (or factory) registered under `name`."""
    entry = _REGISTRY.get(name.lower())
    if entry is None:
        raise ValueError(f"unknown dataset reader {name!r}; known: {', '.join(reader_names())}")
    if isinstance(entry, tuple):
        module_name, attribute = entry
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            raise ValueError(f"dataset reader {name!r} is unavailable: {error}") from None
        return getattr(module, attribute)
    return entry


def get_reader(name: str, **kwargs):
    """A reader by name with its constructor's keyword arguments, e.g.
    get_reader("voc", root="/data/VOC2012")."""
    return reader_class(name)(**kwargs)
