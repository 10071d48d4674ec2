"""Typed configuration: dataclasses are the single source of types, defaults and help.

Every configurable object in Concord (a scenario, a controller, an algorithm) declares a
``@dataclass`` whose fields carry the type, the default and, in ``field(metadata={"help": ...})``,
the help text. This module turns user input into those dataclasses:

* :func:`parse_sets` reads ``--set key=value`` pairs from the CLI;
* :func:`build_config` merges defaults, registry presets and user overrides, coerces strings to
  the field types and rejects unknown keys with the closest match;
* :func:`describe_config` renders a config for ``--show-config`` style output.

Presets are plain Python mappings registered beside each scenario (``ScenarioSpec.kwargs``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from marl.core.errors import ConfigError, show, unknown

__all__ = [
    "parse_sets",
    "build_config",
    "coerce",
    "describe_config",
    "config_help",
    "to_dict",
    "check_local_processes",
    "PROCESSES_PER_CORE",
    "PROCESS_MEMORY_BYTES",
]

C = TypeVar("C")


def parse_sets(pairs: Iterable[str], option: str = "--set") -> dict[str, str]:
    """Split ``["a=1", "b=x"]`` into ``{"a": "1", "b": "x"}``.

    A pair without '=' or with an empty key is an error, and so is a key given twice
    (``a=1 a=2`` would otherwise silently keep the last). ``option`` names the flag in messages.
    """
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"bad {option} value {show(pair)}; expected key=value, e.g. {option} horizon=600")
        if key in out:
            raise ConfigError(f"bad {option} {show(key)}: given twice; allowed: each key once")
        out[key] = value.strip()
    return out


_KIND = {int: "an integer", float: "a number"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def coerce(name: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` (often a CLI string) to ``annotation``; raise ConfigError naming ``name``."""
    if isinstance(annotation, str):  # postponed annotations that were not resolved
        raise TypeError(f"unresolved annotation {annotation!r} for {name}")
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if (value is None or (isinstance(value, str) and value.lower() in {"none", "null", ""})) and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(name, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"bad value for {name}: {show(value)}")
    if origin is typing.Literal:
        allowed = [str(a) for a in args]
        if str(value) not in allowed:
            raise ConfigError(f"bad value for {name}: {show(value)}; allowed: {', '.join(allowed)}")
        return args[allowed.index(str(value))]
    if origin in (tuple, list):
        items = value.split(",") if isinstance(value, str) else list(value)
        items = [i for i in (x.strip() if isinstance(x, str) else x for x in items) if i != ""]
        item_type = args[0] if args else str
        coerced = [coerce(name, i, item_type) for i in items]
        return tuple(coerced) if origin is tuple else coerced
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"bad value for {name}: {show(value)}; expected true or false")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"bad value for {name}: {show(value)}; expected {_KIND[annotation]}")
        try:
            number = annotation(value) if annotation is float else _to_int(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"bad value for {name}: {show(value)}; expected {_KIND[annotation]}") from None
        if not math.isfinite(number):
            raise ConfigError(f"bad value for {name}: {show(value)}; expected a finite number")
        return number
    if annotation is str:
        return str(value)
    if annotation is Any:
        return value
    raise TypeError(f"config field {name} has unsupported type {annotation!r}")


def _to_int(value: Any) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    text = str(value).strip().replace("_", "")
    if "e" in text.lower():  # 1e3 is a fine way to write 1000; 2.5e0 is not an integer
        number = float(text)
        if not number.is_integer():
            raise ValueError(value)
        return int(number)
    return int(text)


def build_config(cls: type[C], *layers: Mapping[str, Any] | None, what: str = "option", owner: str | None = None) -> C:
    """Instantiate dataclass ``cls`` from ``layers`` of overrides (later layers win).

    Unknown keys raise :class:`~marl.core.errors.UnknownNameError` with the closest field name; values
    are coerced to the field's type. The dataclass's ``__post_init__`` may validate ranges.
    ``owner`` is how messages name what is configured (``"controller 'random'"``); default: the
    class name.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if key not in fields:
                if not fields:  # say so plainly instead of listing "(none)"
                    raise ConfigError(f"bad {what} {show(key)}: {owner or cls.__name__} takes no parameters")
                raise unknown(f"{what} for {owner or cls.__name__}", key, fields)
            merged[key] = coerce(key, value, hints[key])
    try:
        return cls(**merged)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(config)


def config_help(cls: type) -> list[tuple[str, str, str, str]]:
    """Rows of (name, type, default, help) for every field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        type_name = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        rows.append((f.name, type_name, repr(default), f.metadata.get("help", "")))
    return rows


def describe_config(config: Any) -> str:
    """``name = value  # help`` lines for a config instance, for ``--show-config``."""
    helps = {name: text for name, _, _, text in config_help(type(config))}
    lines = []
    for key, value in to_dict(config).items():
        comment = f"  # {helps[key]}" if helps.get(key) else ""
        lines.append(f"{key} = {value!r}{comment}")
    return "\n".join(lines)


#: Processes per core one machine may be asked to run (``--ranks``, ``--jobs``): beyond this a
#: 2-core machine only queues work, and every process holds its own simulator and libraries.
PROCESSES_PER_CORE = 4
#: Memory one Concord process needs at least (Python, numpy/torch, a simulator), in bytes: the
#: bound that still holds with ``--oversubscribe``.
PROCESS_MEMORY_BYTES = 300 * 2**20


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_local_processes(
    option: str,
    count: int,
    *,
    oversubscribe: bool = False,
    cores: int | None = None,
    memory: int | None = None,
) -> None:
    """Refuse to start ``count`` processes on this machine when it cannot hold them.

    Without ``oversubscribe`` the limit is :data:`PROCESSES_PER_CORE` per core; with it, what
    the available memory holds at :data:`PROCESS_MEMORY_BYTES` each. ``cores`` and ``memory``
    (bytes) default to this machine's. Raises a ConfigError naming ``option`` and the limit.
    """
    cores = cores if cores is not None else (os.cpu_count() or 1)
    if not oversubscribe:
        limit = PROCESSES_PER_CORE * cores
        if count > limit:
            raise ConfigError(
                f"bad {option} {count}; allowed: 1..{limit} on this machine ({cores} cores x "
                f"{PROCESSES_PER_CORE}); add --oversubscribe to go beyond, up to what memory holds"
            )
        return
    memory = memory if memory is not None else _available_memory()
    if memory is None:
        return
    limit = max(1, memory // PROCESS_MEMORY_BYTES)
    if count > limit:
        raise ConfigError(
            f"bad {option} {count}; allowed: 1..{limit} even with --oversubscribe "
            f"({memory / 2**30:.1f} GiB available, {PROCESS_MEMORY_BYTES // 2**20} MiB per process)"
        )
