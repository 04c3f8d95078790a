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


def call_configured(fn, *args, **kwargs):
    """Calls a configurable, turning a late gin error (e.g. `@unknown()`) into one line."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, KeyError, TypeError) as error:
        if "gin" in type(error).__module__ or "configurable" in str(error).lower():
            raise ConfigError(_one_line(error)) from None
        raise


def save_operative_config(path: str) -> None:
    """Writes the bindings that were actually used, so a run can be rebuilt from it."""
    with open(path, "w") as f:
        f.write(gin.operative_config_str())
