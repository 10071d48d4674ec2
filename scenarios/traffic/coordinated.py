"""Coordinated max-pressure: downstream loads come from the neighbours' messages.

Sensing model. Plain max-pressure (:class:`~scenarios.traffic.controllers.MaxPressure`) reads the
load of every outgoing lane itself. Here an intersection senses only its *own incoming* lanes
(stop-line detectors) plus outgoing lanes that end at no other light (network exits, which
nobody else measures). An outgoing lane that is another light's incoming lane belongs to that
light: its load is known only from that light's messages. So the pressure
(:func:`~scenarios.traffic.controllers.phase_pressure`, reused unchanged) is computed with
downstream loads substituted from what arrived; with a perfect channel and the ``neighbours``
protocol the decisions equal plain max-pressure exactly, and loss, delay, quantisation or silence
(``--protocol none``) degrade them.

Payload (fixed size ``P`` = number of *internal* lanes of the net, i.e. incoming lanes of one light
that are outgoing lanes of another; 144 on grid4x4). Each light writes ``load + 1`` into the slots
of its own internal incoming lanes and 0 elsewhere, so supports of different senders never
overlap. With the summary protocols (``neighbours``, ``gossip``, ``broadcast``: mean, max,
count of what arrived) the element-wise *max* block therefore holds, per slot, exactly the
owner's ``load + 1`` when its message arrived and 0 when it did not (the ``+1`` tells "no message"
from "empty lane"; 8-bit quantisation keeps 0 exact and errs by < 0.5 while loads stay < 255).

Fallback when a message is missing: the light's own estimate is the last value it received for
that lane, used for up to ``max_age`` decisions; after that (or before any message) the lane is
taken as empty, i.e. the phase is scored by its upstream load alone. Protocols whose output is
not a ``2P + 1`` summary (``consensus``, ``none``) always fall back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scenarios.traffic.controllers import MaxPressureConfig, SignalController, _best, phase_pressure

__all__ = ["CoordinatedMaxPressure", "CoordinatedConfig"]


@dataclass
class CoordinatedConfig(MaxPressureConfig):
    max_age: int = field(
        default=3,
        metadata={"help": "decisions a neighbour's last reported lane load stays usable"},
    )


@dataclass
class _Plan:
    """Static wiring of one light: which payload slots it writes and which it reads."""

    send_slots: np.ndarray  #: payload slots of its internal incoming lanes
    send_lanes: list[str]  #: those lanes (same order)
    recv_pos: np.ndarray  #: positions in ``out_lanes`` whose load comes from messages
    recv_slots: np.ndarray  #: their payload slots
    local_pos: np.ndarray  #: positions in ``out_lanes`` the light measures itself (exits)
    local_lanes: list[str]


class CoordinatedMaxPressure(SignalController):
    """Max-pressure with downstream loads taken from neighbours' messages (see module doc)."""

    Config = CoordinatedConfig

    def __init__(self, env: Any, config: Any = None) -> None:
        super().__init__(env, config)
        signals = env.signals
        owner = {lane: a for a, sig in signals.items() for lane in sig.in_lanes}
        internal = sorted({lane for a, sig in signals.items() for lane in sig.out_lanes if owner.get(lane, a) != a})
        slot = {lane: i for i, lane in enumerate(internal)}
        self.payload_size = len(internal)
        self._plans: dict[str, _Plan] = {}
        for agent, sig in signals.items():
            mine = [lane for lane in sig.in_lanes if lane in slot]
            recv = [k for k, lane in enumerate(sig.out_lanes) if lane in slot]
            local = [k for k, lane in enumerate(sig.out_lanes) if lane not in slot]
            self._plans[agent] = _Plan(
                send_slots=np.array([slot[lane] for lane in mine], dtype=np.int64),
                send_lanes=mine,
                recv_pos=np.array(recv, dtype=np.int64),
                recv_slots=np.array([slot[sig.out_lanes[k]] for k in recv], dtype=np.int64),
                local_pos=np.array(local, dtype=np.int64),
                local_lanes=[sig.out_lanes[k] for k in local],
            )
        self._clear()

    def reset(self, env: Any, seed: int | None = None) -> None:
        super().reset(env, seed)  # the lights follow this controller, not the net's programme
        self._clear()

    def _clear(self) -> None:
        # Per light: last load heard for each downstream slot and its age in decisions.
        self._last = {a: np.zeros(len(p.recv_slots)) for a, p in self._plans.items()}
        self._age = {a: np.full(len(p.recv_slots), np.inf) for a, p in self._plans.items()}
        self.heard = 0  #: downstream lane values received this episode
        self.missing = 0  #: downstream lane values that fell back to the estimate

    def _read(self, env: Any) -> Any:
        return env.halting if self.config.measure == "halting" else env.vehicles

    def payload(self, observations: dict[str, np.ndarray], env: Any) -> dict[str, np.ndarray]:
        read = self._read(env)
        out = {}
        for agent in env.agents:
            plan = self._plans[agent]
            vec = np.zeros(self.payload_size, dtype=np.float32)
            if plan.send_lanes:
                vec[plan.send_slots] = read(plan.send_lanes) + 1.0
            out[agent] = vec
        return out

    def _downstream(self, agent: str, env: Any, message: np.ndarray | None) -> np.ndarray:
        sig = env.signals[agent]
        plan = self._plans[agent]
        down = np.zeros(len(sig.out_lanes))
        if plan.local_lanes:
            down[plan.local_pos] = self._read(env)(plan.local_lanes)
        p = self.payload_size
        heard = np.zeros(len(plan.recv_slots))
        if message is not None and len(message) == 2 * p + 1:
            heard = np.asarray(message[p : 2 * p], dtype=np.float64)[plan.recv_slots]
        present = heard > 0.5
        last, age = self._last[agent], self._age[agent]
        last[present] = heard[present] - 1.0
        age[present] = 0
        age[~present] += 1
        self.heard += int(present.sum())
        self.missing += int((~present).sum())
        down[plan.recv_pos] = np.where(age <= self.config.max_age, last, 0.0)
        return down

    def act(self, observations: dict[str, np.ndarray], env: Any, messages: Any = None) -> dict[str, Any]:
        read = self._read(env)
        actions = {}
        for agent in env.agents:
            sig = env.signals[agent]
            message = messages.get(agent) if messages else None
            down = self._downstream(agent, env, message)
            scores = phase_pressure(sig, read(sig.in_lanes), down)
            actions[agent] = _best(scores, env.current_phase(agent))
        return actions
