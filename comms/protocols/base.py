"""The rule-based protocol contract.

A protocol decides what each agent sends and how it merges what arrives; the
:class:`comms.channel.Channel` decides what arrives. Its output has a size fixed by the payload
size alone (:meth:`Protocol.output_size`), so a policy or controller can be built before the
episode starts. Learned protocols (torch modules, ``learned=True`` in the registry) follow their
own contract in ``marl.policies`` and use :meth:`Channel.delivery_mask` instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from comms.channel import Channel, Delivery

__all__ = ["Protocol", "step_stats", "summarise"]


def step_stats(channel: Channel) -> dict[str, float]:
    """Messages/bytes of the channel's last step (sent, delivered, dropped)."""
    if not channel.step_log:
        return {
            "messages_sent": 0.0,
            "messages_delivered": 0.0,
            "messages_dropped": 0.0,
            "bytes_sent": 0.0,
            "bytes_delivered": 0.0,
        }
    sent, delivered, dropped, bytes_sent, bytes_delivered = channel.step_log[-1]
    return {
        "messages_sent": float(sent),
        "messages_delivered": float(delivered),
        "messages_dropped": float(dropped),
        "bytes_sent": float(bytes_sent),
        "bytes_delivered": float(bytes_delivered),
    }


def summarise(delivery: Delivery) -> np.ndarray:
    """(N, 2P + 1): mean and element-wise max of the payloads that arrived, then their count.

    An agent that received nothing gets zeros and a count of 0, so the receiver can tell a
    missing message from a zero-valued one.
    """
    return np.hstack([delivery.mean(), delivery.max(), delivery.count()[:, None].astype(float)])


class Protocol:
    """Base class of rule-based protocols: numpy in, numpy out, one channel step per call
    (or ``rounds`` steps for multi-round protocols)."""

    name: str = "base"

    def __init__(self, **options: Any) -> None:
        self.options = options

    def output_size(self, payload_size: int) -> int:
        """Length of each agent's output vector for payloads of ``payload_size`` values."""
        raise NotImplementedError

    def reset(self, channel: Channel, seed: int = 0) -> None:
        """Start of an episode; ``seed`` seeds any randomness of the protocol itself."""
        self.rng = np.random.default_rng(seed)

    def step(
        self, payloads: np.ndarray, channel: Channel, senders: np.ndarray | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Send ``payloads`` (N x P; row i from agent i; only rows with ``senders[i]`` are sent)
        and return each agent's output (N x output_size(P)) and this step's message stats."""
        raise NotImplementedError
