"""Protocol registry entries. Importing this module is cheap: entry points load on use.

Rule-based protocols (numpy, :class:`comms.protocols.base.Protocol`) run in ``marl run``;
learned ones (torch modules that read the channel's delivery mask) are used by ``marl train``.
"""

from __future__ import annotations

from marl.core.registry import ProtocolSpec, register_protocol

__all__: list[str] = []

for _spec in (
    ProtocolSpec("none", "comms.protocols.simple:NoComms", "no messages"),
    ProtocolSpec(
        "neighbours",
        "comms.protocols.simple:Neighbours",
        "payload to every topology neighbour; receiver gets mean, max and count",
    ),
    ProtocolSpec(
        "broadcast",
        "comms.protocols.simple:Broadcast",
        "payload to every agent (ignores the topology); mean, max and count",
    ),
    ProtocolSpec(
        "gossip",
        "comms.protocols.simple:Gossip",
        "payload to one random neighbour per step; mean, max and count",
    ),
    ProtocolSpec(
        "consensus",
        "comms.protocols.consensus:Consensus",
        "3 rounds of Metropolis average consensus per step; output: the estimate",
    ),
    ProtocolSpec(
        "commnet",
        "comms.protocols.commnet:CommNet",
        "CommNet: learned continuous messages averaged over neighbours (Sukhbaatar 2016)",
        learned=True,
    ),
    ProtocolSpec(
        "tarmac",
        "comms.protocols.tarmac:TarMAC",
        "TarMAC: learned targeted messages with signature-key attention (Das 2019)",
        learned=True,
    ),
    ProtocolSpec(
        "ic3net",
        "comms.protocols.ic3net:IC3NetGate",
        "IC3Net: CommNet with a learned gate deciding when to talk (Singh 2019)",
        learned=True,
    ),
):
    register_protocol(_spec)
