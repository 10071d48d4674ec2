"""What ``marl run --protocol P --channel SPEC`` puts in the loop: a protocol over a channel.

:func:`build_comms` is called once per run by :mod:`marl.runner`; the returned
:class:`CommsRuntime` is reset at every episode start with the scenario's topology and asked,
every step, to carry each agent's payload (``controller.payload``) and return what the protocol
made of what arrived (``messages`` for ``controller.act``). Its :meth:`CommsRuntime.stats` are
the episode's channel totals, recorded as KPI rows next to the scenario's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import networkx as nx
import numpy as np

from comms.channel import Channel, ChannelSpec, parse_channel
from comms.protocols.base import Protocol
from marl.core import registry
from marl.core.errors import ConfigError

__all__ = ["CommsRuntime", "build_comms", "validate_comms", "validate_protocol"]


class CommsRuntime:
    """A protocol and a channel for a fixed list of agents and payload size."""

    def __init__(self, protocol: Protocol, channel: Channel, payload_size: int, seed: int = 0) -> None:
        self.protocol = protocol
        self.channel = channel
        self.payload_size = int(payload_size)
        self.output_size = protocol.output_size(self.payload_size)
        self.seed = seed
        self.episode = -1
        self.steps = 0  #: exchanges (environment steps) this episode

    @property
    def agents(self) -> list[str]:
        return self.channel.agents

    def reset(self, topology: nx.Graph | np.ndarray) -> None:
        """Start an episode: empty the channel, zero its counters, read the topology."""
        self.episode += 1
        self.channel.reset(seed=[self.channel.spec.seed, self.episode])
        self.channel.set_topology(topology)
        self.steps = 0
        self.protocol.reset(self.channel, seed=self.seed + self.episode)

    def exchange(
        self, payloads: Mapping[str, np.ndarray], topology: nx.Graph | np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """One step: agents in ``payloads`` send; every agent gets its fixed-size output.

        An agent missing from ``payloads`` (done, or a controller that does not talk) sends
        nothing this step but still receives.
        """
        if topology is not None:
            self.channel.set_topology(topology)
        n, p = self.channel.n, self.payload_size
        matrix = np.zeros((n, p))
        senders = np.zeros(n, dtype=bool)
        index = self.channel.index
        for agent, vector in payloads.items():
            row = np.asarray(vector, dtype=np.float64).reshape(-1)
            if row.size != p:
                raise ValueError(f"payload of {agent!r} has {row.size} values; the run was built for {p}")
            i = index[agent]
            matrix[i] = row
            senders[i] = True
        out, _ = self.protocol.step(matrix, self.channel, senders)
        self.steps += 1
        return {agent: out[i].astype(np.float32) for i, agent in enumerate(self.agents)}

    def stats(self) -> dict[str, float]:
        """Totals of the episode so far (see :meth:`comms.channel.Channel.totals`).

        ``bytes_per_agent_step`` is bytes sent / (agents x environment steps), crashed agents
        included; a multi-round protocol (consensus) sends several channel steps per env step.
        """
        totals = self.channel.totals()
        totals["bytes_per_agent_step"] = totals["bytes_sent"] / (self.channel.n * max(self.steps, 1))
        return totals


def validate_protocol(protocol: str) -> None:
    """Check that ``protocol`` names a rule-based protocol (learned ones need ``marl train``)."""
    spec = registry.protocol_spec(protocol)
    if spec.learned:
        raise ConfigError(
            f"protocol {protocol} is learned; use marl train (allowed in marl run: "
            + ", ".join(sorted(n for n, s in registry.protocols().items() if not s.learned))
            + ")"
        )


def validate_comms(protocol: str, channel: str) -> None:
    """Check a protocol name and channel spec before any simulator starts (agent ids in
    ``crash=`` are checked later, when the agents are known)."""
    validate_protocol(protocol)
    parse_channel(channel)


def build_comms(
    protocol: str, channel: str | ChannelSpec, agents: list[str], payload_size: int, seed: int
) -> CommsRuntime:
    """Build the runtime for a rule-based ``protocol`` over ``channel``.

    ``channel`` is a parsed :class:`ChannelSpec` (the CLI parses the user's text once, at the
    edge) or, for callers that hold only text, a spec string parsed here. The channel's
    randomness is seeded from ``seed`` unless the spec names its own ``seed=`` (``seed=0``
    included; a canonical spec keeps a given seed, see ChannelSpec.canonical).
    """
    validate_protocol(protocol)
    spec = registry.protocol_spec(protocol)
    if isinstance(channel, ChannelSpec):
        channel_spec = channel
    else:
        channel_spec = parse_channel(channel)
        if not channel_spec.seed_given:
            channel_spec = dataclasses.replace(channel_spec, seed=int(seed))
    cls: Any = registry.load(spec.entry_point)
    return CommsRuntime(cls(), Channel(list(agents), channel_spec), payload_size, seed)
