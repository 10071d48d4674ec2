"""The message-passing layer: channel (loss, delay, quantisation, bytes), protocols, consensus.

Submodules are imported on use: ``comms.channel``, ``comms.consensus``, ``comms.protocols``,
``comms.runtime`` (what ``marl run --protocol/--channel`` builds).
"""

__all__: list[str] = []
