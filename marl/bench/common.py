"""Helpers shared by the ``marl bench <domain>`` commands.

Kept import-light (the registry only), since ``marl --help`` imports every bench module.
"""

from __future__ import annotations

from marl.core.registry import ScenarioSpec, scenarios

__all__ = ["require_domain"]


def require_domain(scenario_id: str, domain: str) -> ScenarioSpec:
    """The spec of ``scenario_id`` if it is a registered scenario of ``domain``.

    Otherwise raises :class:`~marl.core.errors.UnknownNameError` (a ConfigError-style one-liner via
    :func:`marl.core.errors.unknown`) naming the bad id, the closest match and the allowed ids of
    ``domain``, e.g. ``unknown traffic scenario 'grid/ieee33'; ... allowed: traffic/2x2grid, ...``.
    """
    table = scenarios(domain)
    if scenario_id not in table:
        from marl.core.errors import unknown

        raise unknown(f"{domain} scenario", scenario_id, table)
    return table[scenario_id]
