"""The ``consensus`` protocol: each step, ``rounds`` rounds of Metropolis average consensus on
the agents' payloads; each agent's output is its estimate of the network average (``P`` values).

Each round is one channel step (so ``rounds`` times the messages and bytes of ``neighbours``).
Exchanges are acknowledged (``symmetric``): lost messages slow the estimate down but do not bias
it (see :func:`comms.consensus.metropolis_step`).
"""

from __future__ import annotations

import numpy as np

from comms.channel import Channel
from comms.consensus import metropolis_step
from comms.protocols.base import Protocol

__all__ = ["Consensus"]


class Consensus(Protocol):
    name = "consensus"

    def __init__(self, rounds: int = 3, symmetric: bool = True) -> None:
        super().__init__(rounds=rounds, symmetric=symmetric)
        self.rounds = int(rounds)
        self.symmetric = symmetric

    def output_size(self, payload_size: int) -> int:
        return payload_size

    def step(self, payloads, channel: Channel, senders=None):
        x = np.array(payloads, dtype=np.float64)
        totals = np.zeros(5)
        for _ in range(self.rounds):
            # Agents that do not send keep their value and receive nothing new.
            x_new = metropolis_step(x, channel, symmetric=self.symmetric, senders=senders)
            x = x_new if senders is None else np.where(np.asarray(senders, bool)[:, None], x_new, x)
            totals += np.array(channel.step_log[-1], dtype=float)
        keys = ("messages_sent", "messages_delivered", "messages_dropped", "bytes_sent", "bytes_delivered")
        return x, dict(zip(keys, map(float, totals)))
