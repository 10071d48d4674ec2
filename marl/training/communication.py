"""Communication as a trained policy sees it, in training and in evaluation alike.

* ``none``: no messages;
* rule-based (``neighbours``, ``broadcast``, ``gossip``, ``consensus``): each agent sends its
  observation through :func:`comms.runtime.build_comms`; the protocol's summary of what arrived is
  appended to the receiver's observation (``message_size`` extra values);
* learned (``commnet``, ``tarmac``, ``ic3net``): a :class:`comms.channel.Channel` draws, every
  step, the ``[N, N]`` delivery mask (receiver, sender) the torch module reads; its ``delay``
  does not apply (:meth:`comms.channel.Channel.delivery_mask`) and its ``bits`` set the module's
  quantiser (:func:`marl.training.model.build_model`).

Unless the channel spec names its own ``seed=``, the channel is seeded with the ``seed`` given here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from marl.core import registry

__all__ = ["Communication"]


class Communication:
    """The protocol/channel pair of a policy; ``channel`` is a parsed ChannelSpec or None
    (a perfect channel)."""

    @classmethod
    def for_policy(cls, protocol: str, channel: Any, layout: Any, seed: int, config: Any) -> Communication:
        """The pair for a policy over ``layout`` with the algorithm ``config``'s comm settings."""
        return cls(protocol, channel, layout.agents, layout.obs_dim, seed, config.comm_mode, config.hidden_size)

    def __init__(
        self,
        protocol: str,
        channel: Any,
        agents: list[str],
        obs_dim: int,
        seed: int,
        mode: str = "neighbours",
        hidden_size: int = 64,
    ) -> None:
        self.protocol, self.mode = protocol, mode
        self._args = (protocol, channel, list(agents), obs_dim, seed, mode, hidden_size)
        self.learned = registry.protocol_spec(protocol).learned
        self.runtime: Any = None
        self.channel: Any = None
        self.message_size = 0  #: extra observation values (rule-based protocols)
        self.payload_size = 0  #: learned payload length used for the channel's byte model
        if protocol != "none" or channel:
            from comms.channel import Channel, ChannelSpec

            spec = channel or ChannelSpec()
            if not spec.seed_given:
                spec = dataclasses.replace(spec, seed=int(seed))
            if self.learned:
                self.channel = Channel(list(agents), spec)
                self.payload_size = hidden_size
            else:
                from comms.runtime import build_comms

                self.runtime = build_comms(
                    protocol=protocol, channel=spec, agents=list(agents), payload_size=obs_dim, seed=seed
                )
                self.message_size = int(self.runtime.output_size)
        self.bytes_module = 0.0  #: learned: bytes the module reported this episode
        self.steps = 0  #: message exchanges this episode

    def copy(self) -> Communication:
        """A fresh pair with the same settings (another env's: ``marl train --envs``); the channel
        has the same seed, and draws per episode from (that seed, the episode's seed)."""
        twin = Communication(*self._args)
        twin.payload_size = self.payload_size  # set by build_model for a learned module
        return twin

    @property
    def bits(self) -> int:
        return int(self.channel.spec.bits) if self.channel is not None else 32

    def reset(self, env: Any, seed: int) -> None:
        """Start an episode: the channel's randomness is re-seeded from (its seed, ``seed``)."""
        self.steps, self.bytes_module = 0, 0.0
        if self.channel is not None:
            self.channel.reset(seed=[self.channel.spec.seed, seed])
            self.channel.set_topology(env.topology)
        if self.runtime is not None:
            self.runtime.reset(env.topology)

    def delivered(self, env: Any) -> np.ndarray | None:
        """This step's [N, N] mask (receiver, sender) for a learned protocol, else None."""
        if self.channel is None:
            return None
        self.channel.set_topology(env.topology)
        self.steps += 1
        return self.channel.delivery_mask(self.payload_size, mode=self.mode)

    def count_bytes(self, bytes_sent: Any) -> None:
        """Add a learned module's bytes for this step; a crashed agent, or one without any
        link in neighbours mode, puts nothing on the channel."""
        sends = self.channel.alive.copy()
        if self.mode == "neighbours":
            sends &= self.channel.degree() > 0
        self.bytes_module += float((bytes_sent.reshape(-1).numpy() * sends).sum())

    def augment(self, obs: np.ndarray, env: Any) -> np.ndarray:
        """Append what a rule-based protocol delivered to each agent's observation."""
        if self.runtime is None:
            return obs
        payloads = {a: obs[i] for i, a in enumerate(self.runtime.agents)}
        msgs = self.runtime.exchange(payloads, env.topology)
        self.steps += 1
        extra = np.stack([msgs[a] for a in self.runtime.agents]).astype(np.float32)
        return np.concatenate([obs, extra], axis=1)

    def stats(self) -> dict[str, float]:
        """The episode's channel statistics (bytes per agent step, delivery rate, ...)."""
        if self.runtime is not None:
            return {k: float(v) for k, v in self.runtime.stats().items()}
        if self.channel is not None:
            totals = {k: float(v) for k, v in self.channel.totals().items()}
            # The learned module's own count (an IC3Net agent that stays silent sends nothing);
            # the channel's totals count every link the mask was drawn for.
            totals["channel_bytes_per_agent_step"] = totals.pop("bytes_per_agent_step")
            totals["bytes_per_agent_step"] = self.bytes_module / (self.channel.n * max(self.steps, 1))
            return totals
        return {}
