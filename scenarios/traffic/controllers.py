"""Baseline signal controllers for the SUMO traffic scenarios.

* :class:`FixedTime` — the net's own signal programme, run by SUMO unchanged (the env's
  ``"program"`` mode, chosen per episode in :meth:`SignalController.reset`); the traffic is
  exactly that of a plain SUMO run.
* :class:`ProgramReplay` — the same programme replayed through actions: each decision, the green
  phase the programme shows (or changes to) halfway through the coming interval. Traffic differs
  a little from ``FixedTime`` (the env's yellow time, changes on decision boundaries), but the
  programme can now guide a learner (``--algo-set guide=fixed-time-actions``).
* :class:`MaxPressure` — every decision, the green phase with the largest pressure: the sum over
  the links it serves of vehicles upstream minus vehicles downstream (Varaiya 2013, as in
  RESCO's max-pressure).
* :class:`MaxWave` — greedy: the phase whose green lanes hold the most approaching vehicles
  (RESCO's "greedy"/max-wave baseline).
* :class:`RandomPhases` — a uniformly random allowed phase (respects ``action_mask``).

The pressure arithmetic lives in :func:`phase_pressure` alone, so a coordinated variant can call
it with the downstream counts its neighbours sent instead of the measured ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from marl.core.controller import Controller

__all__ = [
    "phase_pressure",
    "SignalController",
    "FixedTime",
    "ProgramReplay",
    "MaxPressure",
    "MaxWave",
    "RandomPhases",
]


def phase_pressure(signal: Any, upstream: np.ndarray, downstream: np.ndarray) -> np.ndarray:
    """Pressure of each green phase of ``signal`` (a :class:`~scenarios.traffic.nets.Signal`).

    ``upstream[j]`` is the load of ``signal.in_lanes[j]`` and ``downstream[k]`` that of
    ``signal.out_lanes[k]`` (vehicles or halting vehicles). Phase ``p``'s pressure is
    Σ over links ``i`` green in ``p`` of ``upstream[link_in[i]] - downstream[link_out[i]]``.
    Returns a float array of length ``signal.n_phases``.
    """
    valid = signal.link_in >= 0
    up = np.zeros(len(signal.link_in))
    down = np.zeros(len(signal.link_in))
    up[valid] = np.asarray(upstream, dtype=np.float64)[signal.link_in[valid]]
    down[valid] = np.asarray(downstream, dtype=np.float64)[signal.link_out[valid]]
    return signal.phase_links.astype(np.float64) @ (up - down)


def _best(scores: np.ndarray, current: int) -> int:
    """Argmax with ties broken in favour of the current phase (no needless yellow)."""
    best = float(scores.max())
    return current if scores[current] >= best else int(np.argmax(scores))


class SignalController(Controller):
    """Base of the traffic controllers: declares who drives the lights.

    ``runs_program`` says whether the controller runs the net's own signal programme (True) or
    sets phases through its actions (False). :meth:`reset`, called by the runner right after
    every ``env.reset``, puts the env in that mode for the episode (``env.set_control``), so a
    controller never inherits the mode of one that ran before it on the same env.
    """

    runs_program: ClassVar[bool] = False

    def reset(self, env: Any, seed: int | None = None) -> None:
        env.set_control("program" if self.runs_program else "agents")


class FixedTime(SignalController):
    """The net's signal programme, run by SUMO unchanged; actions are ignored."""

    runs_program = True

    def act(self, observations: dict[str, np.ndarray], env: Any, messages: Any = None) -> dict[str, Any]:
        return {agent: env.current_phase(agent) for agent in env.agents}


class ProgramReplay(SignalController):
    """The net's programme replayed through actions, on the env's decision clock.

    A decision at ``t`` governs ``[t, t + delta_time)``; it asks for the green the programme
    shows, or is changing to, at the middle of that interval, so each change lands within half
    an interval of the programme's (yellow included)."""

    def act(self, observations: dict[str, np.ndarray], env: Any, messages: Any = None) -> dict[str, Any]:
        mid = env.sim_time + env.config.delta_time / 2
        return {agent: env.signals[agent].program_next_green(mid) for agent in env.agents}


@dataclass
class MaxPressureConfig:
    measure: Literal["vehicles", "halting"] = field(
        default="vehicles", metadata={"help": "lane load used for pressure"}
    )


class MaxPressure(SignalController):
    """Green to the phase of largest pressure (see :func:`phase_pressure`)."""

    Config = MaxPressureConfig

    def act(self, observations: dict[str, np.ndarray], env: Any, messages: Any = None) -> dict[str, Any]:
        actions = {}
        for agent in env.agents:
            scores = env.phase_pressures(agent, self.config.measure)
            actions[agent] = _best(scores, env.current_phase(agent))
        return actions


class MaxWave(SignalController):
    """Green to the phase whose green incoming lanes hold the most vehicles."""

    def act(self, observations: dict[str, np.ndarray], env: Any, messages: Any = None) -> dict[str, Any]:
        actions = {}
        for agent in env.agents:
            sig = env.signals[agent]
            load = env.vehicles(sig.in_lanes)
            served = np.zeros((sig.n_phases, len(sig.in_lanes)), dtype=bool)
            for p in range(sig.n_phases):
                served[p, sig.link_in[sig.phase_links[p]]] = True  # each lane counted once
            actions[agent] = _best(served.astype(np.float64) @ load, env.current_phase(agent))
        return actions


class RandomPhases(SignalController):
    """A uniformly random allowed phase per light per decision, seeded by ``reset``."""

    def __init__(self, env: Any, config: Any = None) -> None:
        super().__init__(env, config)
        self._rng = np.random.default_rng(0)

    def reset(self, env: Any, seed: int | None = None) -> None:
        super().reset(env, seed)
        self._rng = np.random.default_rng(seed)

    def act(self, observations: dict[str, np.ndarray], env: Any, messages: Any = None) -> dict[str, Any]:
        return {a: int(self._rng.choice(np.flatnonzero(env.action_mask(a)))) for a in env.agents}
