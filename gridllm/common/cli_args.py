"""Command-line flags declared once, on the config dataclasses.

A field declared with ``option(...)`` becomes ``--field-name`` (or the ``flag`` it names):
its type comes from the annotation (``int | None`` is an optional int, ``bool`` gives
``--x/--no-x``, ``list[str]`` a repeatable flag), its help from the declaration, and the help
shows its default. ``from_args`` builds the dataclass back from a parsed namespace;
``to_argv`` renders an instance as the flags that reproduce it (how ``gridllm up`` passes
settings on to the services it starts). Byte sizes take units: ``1GiB``, ``512MB``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Iterable
from typing import Any

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_METAVARS = {"size": "SIZE", int: "N", float: "X"}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def option(default: Any = dataclasses.MISSING, *, help: str,  # noqa: A002 - argparse's name
           default_factory: Any = dataclasses.MISSING, flag: str | None = None,
           choices: Iterable[Any] | None = None, is_size: bool = False,
           metavar: str | None = None, default_help: str | None = None) -> Any:
    """A dataclass field that is also a command-line flag.

    Args:
        default, default_factory: as for ``dataclasses.field`` (neither: a required flag).
        help: what the field holds, shown by ``--help``.
        flag: the flag's name when it is not ``--`` plus the field's name with dashes.
        choices: the values allowed.
        is_size: a byte count: the flag accepts units (``1GiB``) and help shows them.
        metavar: the value's name in the usage line.
        default_help: how help shows the default (e.g. ``the model's`` for None).
    """
    metadata = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None,
                "is_size": is_size, "metavar": metavar, "default_help": default_help}
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"cli": metadata})


def parse_size(text: str | int, name: str = "size") -> int:
    """Bytes from ``1073741824``, ``1GiB``, ``1.5GB`` or ``512MiB`` (ValueError naming ``name``)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{name} must be a byte count such as 1073741824, 1GiB or 512MB "
                         f"(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {text!r}.")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def format_size(num_bytes: int) -> str:
    """The shortest exact spelling: ``1GiB``, ``512MiB``, ``1500000000``."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = _SIZE_UNITS[unit.lower()]
        if num_bytes >= scale and num_bytes % scale == 0:
            return f"{num_bytes // scale}{unit}"
    return str(num_bytes)


def size_type(name: str):
    """An argparse ``type`` for a byte size with units (errors name ``name``)."""

    def parse(text: str) -> int:
        try:
            return parse_size(text, name)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = "size"
    return parse


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` declared with ``option``."""
    return [f for f in dataclasses.fields(cls) if "cli" in f.metadata]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata["cli"]["flag"] or "--" + f.name.replace("_", "-")


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``(base type, is_list)`` of a field annotation; ``X | None`` is X (None is a default)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else str
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _shown_default(f: dataclasses.Field, default: Any) -> str:
    meta = f.metadata["cli"]
    if meta["default_help"] is not None:
        return meta["default_help"]
    if meta["is_size"] and isinstance(default, int):
        return format_size(default)
    if default is None or default == []:
        return "none"
    return str(default)


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                  only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                  defaults: dict[str, Any] | None = None) -> None:
    """Add a flag for each ``option`` field of the dataclass ``cls``.

    Args:
        parser: a parser or an argument group.
        only: add just these fields (default: every option field).
        exclude: leave these fields out.
        defaults: a different default for some fields (shown by ``--help`` too).
    """
    hints = typing.get_type_hints(cls)
    names = set(only) if only is not None else None
    excluded = set(exclude)
    for f in cli_fields(cls):
        if (names is not None and f.name not in names) or f.name in excluded:
            continue
        meta = f.metadata["cli"]
        base, is_list = _unwrap(hints[f.name])
        default = (defaults or {}).get(f.name, _default_of(f))
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"].replace("%", "%%")}
        if base is not bool and not meta["choices"]:
            kwargs["metavar"] = meta["metavar"] or _METAVARS.get(
                "size" if meta["is_size"] else base, flag_of(f)[2:].upper().replace("-", "_"))
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        elif base is bool and not is_list:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = default
        else:
            # A repeated flag appends to its default: start from None, from_args fills in.
            kwargs["default"] = None if is_list else default
        if "action" not in kwargs:
            kwargs["type"] = size_type(f.name) if meta["is_size"] else base
            if is_list:
                kwargs["action"] = "append"
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
        action = parser.add_argument(flag_of(f), **kwargs)
        # BooleanOptionalAction shows the default itself on some Python versions.
        if default is not dataclasses.MISSING and "%(default)" not in (action.help or ""):
            shown = _shown_default(f, default).replace("%", "%%")
            action.help = f"{action.help} (default: {shown})"


def args_dict(cls: type, namespace: argparse.Namespace, *, only: Iterable[str] | None = None,
              exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The values the ``option`` fields of ``cls`` have in ``namespace``, by field name
    (fields with no flag there, and repeatable flags never given, are left out)."""
    names = set(only) if only is not None else None
    excluded = set(exclude)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in cli_fields(cls):
        if ((names is not None and f.name not in names) or f.name in excluded
                or not hasattr(namespace, f.name)):
            continue
        value = getattr(namespace, f.name)
        if value is None and _unwrap(hints[f.name])[1]:
            continue  # a repeatable flag never given: the field's own default
        values[f.name] = value
    return values


def from_args(cls: type, namespace: argparse.Namespace, *, only: Iterable[str] | None = None,
              exclude: Iterable[str] = (), **overrides: Any) -> Any:
    """Build ``cls`` from its flags in ``namespace`` (``args_dict``); the other fields keep
    their defaults, and ``overrides`` win over both."""
    return cls(**{**args_dict(cls, namespace, only=only, exclude=exclude), **overrides})


def to_argv(instance: Any, *, only: Iterable[str] | None = None,
            exclude: Iterable[str] = ()) -> list[str]:
    """The flags that reproduce ``instance``'s values that differ from their defaults.

    Raises:
        ValueError: a field differs from its default in a way no flag can express (None
            where the default is not None).
    """
    names = set(only) if only is not None else None
    excluded = set(exclude)
    argv: list[str] = []
    for f in cli_fields(type(instance)):
        if (names is not None and f.name not in names) or f.name in excluded:
            continue
        value = getattr(instance, f.name)
        default = _default_of(f)
        if value == default:
            continue
        flag = flag_of(f)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        elif value is None:
            raise ValueError(f"{f.name}=None cannot be passed as {flag} (its default is "
                             f"{default!r}).")
        else:
            argv += [flag, str(value)]
    return argv
