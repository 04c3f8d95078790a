"""Gin configuration: parsing files and bindings with one-line errors, saving what ran."""

from __future__ import annotations

import os

import gin


class ConfigError(ValueError):
    """A config file or binding that cannot be used; the message is one line."""


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def parse(config_files=(), bindings=()) -> None:
    """Parses gin files then `--gin_param` bindings (later ones win).

    Every configurable must already be registered (import `kssl.training` first), so a
    mistyped parameter or an unknown dataset is caught here, before anything is built.
    """
    for path in config_files:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
    try:
        gin.parse_config_files_and_bindings(list(config_files), list(bindings),
                                            finalize_config=False)
    except Exception as error:  # gin raises ValueError, KeyError, SyntaxError, ...
        raise ConfigError(_one_line(error)) from None


_GIN_SUFFIX = "\n  In call to configurable"
_GIN_MESSAGES = ("No configurable matching", "doesn't have a parameter", "Required bindings",
                 "is not a configurable", "Could not find configurable")


def call_configured(fn, *args, **kwargs):
    """Calls a configurable; a gin error inside it (e.g. `@unknown()` used at call time)
    becomes a one-line ConfigError, a DataError loses gin's "In call to configurable"
    suffix, and every other error passes through untouched with its traceback."""
    from kssl.data.readers.base import DataError

    try:
        return fn(*args, **kwargs)
    except DataError as error:
        raise DataError(str(error).split(_GIN_SUFFIX)[0]) from None
    except (ValueError, KeyError, TypeError) as error:
        message = str(error).split(_GIN_SUFFIX)[0]
        if any(pattern in message for pattern in _GIN_MESSAGES):
            raise ConfigError(_one_line(message)) from None
        raise


def save_operative_config(path: str) -> None:
    """Writes the bindings that were actually used, so a run can be rebuilt from it."""
    with open(path, "w") as f:
        f.write(gin.operative_config_str())
