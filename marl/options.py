"""Click options shared by ``marl run``, ``marl train`` and ``marl compare``.

They live here, not in ``marl.cli``, so command modules can import them without importing the
CLI that mounts those same modules (``python -m marl.cli`` would otherwise import itself twice).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

__all__ = [
    "set_option",
    "protocol_option",
    "channel_option",
    "channels_option",
    "seed_option",
    "out_option",
    "check_out_value",
    "CHANNEL_HELP",
]

F = TypeVar("F", bound=Callable[..., Any])

# One definition each, so names and help never drift apart between commands.
set_option = click.option(
    "--set",
    "set_",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a scenario parameter (repeatable); the scenario's env card lists the keys.",
)
protocol_option = click.option("--protocol", default="none", help="Communication protocol (see 'marl list protocols').")
#: What a channel spec looks like (comms.channel.parse_channel); shared by --channel's two forms.
CHANNEL_HELP = "Channel spec, e.g. drop=0.1,delay=1,bits=8,budget=256,crash=3; empty is a perfect channel."
channel_option = click.option("--channel", default="", help=CHANNEL_HELP)
#: The repeatable form (``marl compare``): each --channel is one setting of the grid.
channels_option = click.option(
    "--channel",
    "channels",
    multiple=True,
    metavar="SPEC",
    help=CHANNEL_HELP + " Repeatable: one setting each (--channel drop=0 --channel drop=0.3); default: perfect.",
)
seed_option = click.option("--seed", type=int, default=0, help="Seed (episode e of a run uses seed+e).")


def check_out_value(ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> str | None:
    """Click callback of ``--out``: an empty or blank path is refused (it used to fall back to
    the default directory silently); None (option not given) passes through."""
    from marl.core.errors import ConfigError

    if value is not None and not value.strip():
        raise ConfigError(f"bad --out {value!r}; expected a directory path, e.g. --out results/NAME")
    return value


def out_option(help_text: str, *, required: bool = False) -> Callable[[F], F]:
    """``--out DIR`` with the empty-path check; ``help_text`` says what the default is."""
    return click.option("--out", default=None, required=required, callback=check_out_value, help=help_text)
