"""Gin configuration: parsing files and bindings with one-line errors, saving what ran."""

from __future__ import annotations

import io
import os
import re

import gin


class ConfigError(ValueError):
    """A config file or binding that cannot be used; the message is one line."""


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


_INCLUDE = re.compile(r"""^\s*include\s+(['"])(.+)\1\s*(#.*)?$""")


def resolve_include(name: str, including_file: str) -> str:
    """The file that `include 'name'` in `including_file` means.

    A relative name is looked up next to the including file, then in each folder above
    it (so `include 'configs/x.gin'` in `configs/y.gin` works from any directory), then
    in the current directory. Raises ConfigError when none holds it.
    """
    if os.path.isabs(name):
        folders = [""]
    else:
        folders = []
        folder = os.path.dirname(os.path.abspath(including_file))
        while folder not in folders:
            folders.append(folder)
            folder = os.path.dirname(folder)
        folders.append(os.getcwd())
    for folder in folders:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise ConfigError(f"{including_file}: included file {name!r} not found next to it, in "
                      f"a folder above it or in the current directory ({os.getcwd()})")


def _parse_file(path: str, including=(), skip_unknown=False) -> None:
    """Parses one config file, each `include` resolved by `resolve_include`.

    Gin itself looks for an included file in the current directory only, so the file is
    handed to gin in pieces between its include lines, each piece padded with empty
    lines so that gin's error locations keep the file's name and line numbers.
    """
    if path in including:
        raise ConfigError(f"{path} includes itself (through {' -> '.join(including)})")
    with open(path) as f:
        lines = f.read().split("\n")
    start = 0

    def parse_lines(end):
        if any(line.strip() for line in lines[start:end]):
            piece = io.StringIO("\n" * start + "\n".join(lines[start:end]))
            piece.name = path
            gin.parse_config(piece, skip_unknown=skip_unknown)

    for number, line in enumerate(lines):
        match = _INCLUDE.match(line)
        if match:
            parse_lines(number)
            start = number + 1
            _parse_file(resolve_include(match.group(2), path), including + (path,),
                        skip_unknown)
    parse_lines(len(lines))


# The driver's own configurable: a saved run's config.gin binds it, and the tools that
# rebuild the run's network (evaluate, export, predict, compare) never read it, so they
# need not import the driver to read the file.
DRIVER_CONFIGURABLES = ("train",)


def parse(config_files=(), bindings=(), skip_unknown=False) -> None:
    """Parses gin files then `--gin_param` bindings (later ones win).

    Every configurable must already be registered (import `kssl.configured`, and
    `kssl.training` for `train.*`), so a mistyped parameter or an unknown dataset is
    caught here, before anything is built. Includes are resolved relative to the
    including file (see `resolve_include`). `skip_unknown`: names of configurables whose
    bindings are dropped when nothing registered them (gin's `skip_unknown`).
    """
    for path in config_files:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
    try:
        for path in config_files:
            _parse_file(os.path.abspath(path), skip_unknown=skip_unknown)
        gin.parse_config(list(bindings), skip_unknown=skip_unknown)
    except Exception as error:  # gin raises ValueError, KeyError, SyntaxError, ...
        raise ConfigError(_one_line(error)) from None


_STAGE_SCOPE = re.compile(r"^stage_(\d+)/", re.MULTILINE)


def parse_saved_run(path: str, bindings=(), stage=None) -> None:
    """Parses a training run's saved config.gin, then `bindings` (e.g. `--gin_param`).

    A staged method runs stage N in the gin scope `stage_N`, so the config.gin of its
    stages (and the copy at the top of the run) binds everything under `stage_1/`,
    `stage_2/`, ... The bindings of stage `stage` (default: the last stage in the file)
    are bound again without the scope, so the tools build that stage's reader and network
    by the plain names. They are replayed in file order together with the unscoped ones:
    gin writes an unscoped block before the scoped blocks of the same name (the stage's
    wins), and lines appended after the operative config (the ResNet layout `train`
    records) still win over it. The driver's `train.*` bindings are read only where the
    driver is imported (see `DRIVER_CONFIGURABLES`).
    """
    skip = list(DRIVER_CONFIGURABLES)
    parse([path], skip_unknown=skip)
    with open(path) as f:
        text = f.read()
    stages = [int(n) for n in _STAGE_SCOPE.findall(text)]
    if stages:
        scope = f"stage_{max(stages) if stage is None else int(stage)}"
        try:
            for statement in gin.config_parser.ConfigParser(text, gin.config.ParserDelegate()):
                if not isinstance(statement, gin.config_parser.BindingStatement):
                    continue
                if not statement.arg_name:  # a macro: used where it was bound, as parsed
                    continue
                if gin.config._should_skip(statement.selector, skip):  # not registered
                    continue
                if statement.scope == scope or statement.scope.startswith(scope + "/"):
                    inner = statement.scope[len(scope) + 1:]
                elif statement.scope == "":
                    inner = ""
                else:  # another stage's
                    continue
                gin.bind_parameter((inner, statement.selector, statement.arg_name),
                                   statement.value)
        except Exception as error:  # the file parsed above, so this is unexpected
            raise ConfigError(f"{path}: {_one_line(error)}") from None
    parse([], bindings, skip_unknown=skip)


_GIN_SUFFIX = "\n  In call to configurable"


def without_gin_context(message: str) -> str:
    """`message` without the "In call to configurable ..." lines gin appends to an error
    raised inside a configurable."""
    return str(message).split(_GIN_SUFFIX)[0]


_GIN_MESSAGES = ("No configurable matching", "doesn't have a parameter", "Required bindings",
                 "is not a configurable", "Could not find configurable")


def call_configured(fn, *args, **kwargs):
    """Calls a configurable; a gin error inside it (e.g. `@unknown()` used at call time)
    becomes a one-line ConfigError, a ConfigError or DataError loses gin's "In call to
    configurable" suffix, and every other error passes through untouched with its
    traceback."""
    from kssl.data.readers.base import DataError

    try:
        return fn(*args, **kwargs)
    except (ConfigError, DataError) as error:
        # Not type(error): gin re-raises a subclass of it that takes other arguments.
        kind = ConfigError if isinstance(error, ConfigError) else DataError
        raise kind(without_gin_context(error)) from None
    except (ValueError, KeyError, TypeError) as error:
        message = str(error).split(_GIN_SUFFIX)[0]
        if any(pattern in message for pattern in _GIN_MESSAGES):
            raise ConfigError(_one_line(message)) from None
        raise


def save_operative_config(path: str) -> None:
    """Writes the bindings that were actually used, so a run can be rebuilt from it."""
    with open(path, "w") as f:
        f.write(gin.operative_config_str())
