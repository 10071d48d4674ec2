"""The controller contract: non-learned baselines that run through the same path as policies.

A controller is built once per run as ``Controller(env, config)`` — ``config`` being an instance of
its own ``Config`` dataclass (or ``None`` when it has no parameters) — then, every episode,
``reset(env, seed)`` is called after ``env.reset`` and ``act`` once per step:

    actions = controller.act(observations, env, messages)

``messages`` is ``None`` unless the run has a communication protocol. With one, a controller
whose spec says ``uses_messages=True`` first gives the runner what each agent wants to say:

    payloads = controller.payload(observations, env)   # {agent: 1-D float array, fixed size}

the protocol sends it over the channel, and ``messages`` holds, for each agent, the fixed-size
vector the protocol made of what arrived. Controllers may read the simulator through ``env``
(they are baselines with full local sensing), but never another agent's data except through
``messages``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = ["Controller", "NoConfig"]


@dataclass
class NoConfig:
    """Config of a controller without parameters."""


class Controller:
    """Base class: subclasses implement :meth:`act` and, when they talk, :meth:`payload`."""

    Config: ClassVar[type] = NoConfig
    #: Size of the payload vector each agent sends (0: the controller does not talk).
    payload_size: int = 0

    def __init__(self, env: Any, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    def reset(self, env: Any, seed: int | None = None) -> None:
        """Called after every ``env.reset``; ``seed`` seeds any randomness the controller has."""

    def payload(self, observations: dict[str, np.ndarray], env: Any) -> dict[str, np.ndarray]:
        """What each agent sends this step; only called when the run has a protocol."""
        return {}

    def act(
        self,
        observations: dict[str, np.ndarray],
        env: Any,
        messages: dict[str, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        raise NotImplementedError
