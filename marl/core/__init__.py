"""The contracts: the only part of ``marl`` that ``scenarios/`` and ``comms/`` may import.

* :mod:`marl.core.errors` — :class:`ConcordError` and its kinds (one-line message, exit code 2);
* :mod:`marl.core.config` — typed config dataclasses built from presets and ``--set`` strings;
* :mod:`marl.core.registry` — the one registry of scenarios, controllers, protocols, algorithms;
* :mod:`marl.core.controller` — the controller contract (``act``, ``payload``, ``reset``);
* :mod:`marl.core.protocol` — the learned-protocol contract (``CommsOutput``, quantiser helpers);
* :mod:`marl.core.seeding` — how every command derives episode seeds.

Nothing here imports the runner, training, results, commands, bench, algorithms or distributed
code; ``tests/test_architecture.py`` checks that direction for the whole tree.
"""
