"""The simple rule-based protocols: none, neighbours, broadcast, gossip.

All but ``none`` deliver each agent the same fixed-size summary of what arrived this step —
element-wise mean and max of the received payloads plus how many arrived (``2P + 1`` values, see
:func:`comms.protocols.base.summarise`) — and differ in whom a message goes to:

* ``neighbours``: every topology neighbour (one message per link direction per step);
* ``broadcast``: every other agent, ignoring the topology (``N - 1`` messages per agent);
* ``gossip``: one neighbour drawn uniformly at random per agent per step (Boyd et al. 2006).
"""

from __future__ import annotations

import numpy as np

from comms.channel import Channel
from comms.protocols.base import Protocol, step_stats, summarise

__all__ = ["NoComms", "Neighbours", "Broadcast", "Gossip"]


class NoComms(Protocol):
    """Nobody talks; the output is empty. Channel steps still advance (delayed messages land)."""

    name = "none"

    def output_size(self, payload_size: int) -> int:
        return 0

    def step(self, payloads, channel, senders=None):
        channel.idle(payloads.shape[1])
        return np.zeros((channel.n, 0)), step_stats(channel)


class Neighbours(Protocol):
    """Each agent sends its payload to every topology neighbour; receivers get mean/max/count."""

    name = "neighbours"

    def output_size(self, payload_size: int) -> int:
        return 2 * payload_size + 1

    def step(self, payloads, channel, senders=None):
        delivery = channel.send_neighbours(payloads, senders)
        return summarise(delivery), step_stats(channel)


class Broadcast(Protocol):
    """Each agent sends its payload to every other agent; receivers get mean/max/count."""

    name = "broadcast"

    def output_size(self, payload_size: int) -> int:
        return 2 * payload_size + 1

    def step(self, payloads, channel, senders=None):
        delivery = channel.send_broadcast(payloads, senders)
        return summarise(delivery), step_stats(channel)


class Gossip(Protocol):
    """Each agent sends its payload to one neighbour chosen at random; mean/max/count out."""

    name = "gossip"

    def output_size(self, payload_size: int) -> int:
        return 2 * payload_size + 1

    def step(self, payloads, channel: Channel, senders=None):
        _src, dst = channel.edges  # sorted by src: each agent's links are one contiguous run
        deg = channel.degree()
        start = np.r_[0, np.cumsum(deg)[:-1]]
        talk = deg > 0
        if senders is not None:
            talk &= np.asarray(senders, dtype=bool)
        who = np.flatnonzero(talk)
        pick = start[who] + (self.rng.random(len(who)) * deg[who]).astype(np.int64)
        delivery = channel.send(who, dst[pick], payloads[who])
        return summarise(delivery), step_stats(channel)
