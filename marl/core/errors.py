"""Typed, user-facing errors.

Every error a user can cause (a bad scenario id, an unknown option, a malformed ``--set`` value,
a corrupt checkpoint) is raised as a :class:`ConcordError`. The CLI prints its message on one line
and exits with code 2, with no traceback. Messages name the bad value, what is allowed, and the
closest match when there is one (the Gymnasium/PettingZoo registry style).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ConcordError",
    "UnknownNameError",
    "ConfigError",
    "SimulatorError",
    "CheckpointError",
    "closest",
    "unknown",
    "show",
    "one_line",
]


class ConcordError(Exception):
    """Base of every error caused by user input or by the user's environment (exit code 2)."""

    exit_code: int = 2


class UnknownNameError(ConcordError, KeyError):
    """A registry id or option name that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(ConcordError, ValueError):
    """A value that has the wrong type or lies outside its allowed range."""


class SimulatorError(ConcordError, RuntimeError):
    """A simulator that is missing, broken, or used in a way it does not allow."""


class CheckpointError(ConcordError, RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


def _escape(text: str) -> str:
    """``text`` with every non-printable character (controls, NUL, ESC, a BOM, line breaks)
    written as a Python escape, so what a terminal shows is exactly what the input held."""
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


def show(value: object) -> str:
    """A user-supplied value as it goes into an error message: in single quotes, control
    characters escaped repr-style (``'a\\x00b'``), never a raw NUL, escape sequence or newline.

    Every ConcordError message that echoes user input passes the input through here.

    >>> show("grid\x1b[31m")
    "'grid\\\\x1b[31m'"
    """
    return "'" + _escape(str(value)) + "'"


def one_line(message: str) -> str:
    """``message`` made safe to print as one terminal line: control characters escaped.

    The CLI's last line of defence for messages that did not use :func:`show`.
    """
    return _escape(message)


def closest(name: str, allowed: Iterable[str]) -> str | None:
    """The allowed value most similar to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown(kind: str, name: str, allowed: Iterable[str]) -> UnknownNameError:
    """Build the standard one-line error for an unknown ``kind`` called ``name``.

    >>> str(unknown("scenario", "traffic/grid4", ["traffic/grid4x4"]))
    "unknown scenario 'traffic/grid4'; did you mean 'traffic/grid4x4'? allowed: traffic/grid4x4"
    >>> str(unknown("scenario", "nodomain", ["a/b"]))
    "unknown scenario 'nodomain'; allowed: a/b"
    """
    allowed = sorted(allowed)
    hint = closest(name, allowed)
    did_you_mean = f"; did you mean {show(hint)}?" if hint else ";"
    listing = ", ".join(allowed) if allowed else "(none)"
    return UnknownNameError(f"unknown {kind} {show(name)}{did_you_mean} allowed: {listing}")
