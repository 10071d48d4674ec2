"""Every registered controller of every domain, through the runner's own episode loop.

One env per domain is shared by all its controllers (as ``marl compare`` and notebooks do), so
these tests also catch a controller leaving state behind in the env: a controller's KPIs must
not depend on which controller ran on the env before it (the fixed-time controller used to
switch the traffic env into programme mode for good). Episodes use the scenarios' short test
presets.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

from marl.core import registry
from marl.runner import build_controller, run_episode

#: The scenario each domain's controllers run on (test presets: short episodes).
SCENARIOS = {"traffic": "traffic/grid4x4", "grid": "grid/ieee33", "warehouse": "warehouse/small"}
SEED = 3

CONTROLLERS = sorted(k for k in registry.controllers() if k[0] in SCENARIOS)


def _scenario(domain: str, name: str) -> str:
    """The scenario a controller is tested on: its own when it names one, else its domain's."""
    return (registry.controller_spec(domain, name).scenarios or (SCENARIOS[domain],))[0]


@pytest.fixture(scope="module")
def envs() -> Iterator[dict[str, Any]]:
    """One env per domain, built on first use and closed at the end of the module (libsumo
    allows one live simulation per process, so the traffic env must not outlive it)."""
    made: dict[str, Any] = {}
    yield made
    for env in made.values():
        env.close()


def _env(envs: dict[str, Any], scenario: str) -> Any:
    if scenario not in envs:
        envs[scenario] = registry.make_scenario(scenario, test=True)
    return envs[scenario]


def _episode(domain: str, name: str, env: Any) -> dict[str, float]:
    """A freshly built controller ``name`` through ``run_episode``, with comms if it talks."""
    controller = build_controller(_scenario(domain, name), name, env)
    comms = None
    spec = registry.controller_spec(domain, name)
    if spec.uses_messages:
        from comms.runtime import build_comms

        comms = build_comms(
            protocol=spec.protocol if spec.protocol != "none" else "neighbours",
            channel="",
            agents=list(env.possible_agents),
            payload_size=controller.payload_size,
            seed=0,
        )
    kpis = run_episode(env, controller, comms, seed=SEED)
    if domain == "traffic":  # the episode ran in the mode the controller declares
        runs_program = getattr(controller, "runs_program", False)
        assert env.control == ("program" if runs_program else "agents"), name
    return kpis


def test_every_domain_has_controllers() -> None:
    assert {d for d, _ in CONTROLLERS} == set(SCENARIOS)


@pytest.mark.parametrize(("domain", "name"), CONTROLLERS, ids=[f"{d}/{n}" for d, n in CONTROLLERS])
def test_controller_runs_and_leaves_no_state_in_the_env(envs: dict[str, Any], domain: str, name: str) -> None:
    scenario = _scenario(domain, name)
    env = _env(envs, scenario)
    first = _episode(domain, name, env)
    assert first["env_steps"] >= 1
    bad = {k: v for k, v in first.items() if not math.isfinite(v)}
    assert not bad, f"non-finite KPIs {bad}"
    assert registry.load(registry.scenario_spec(scenario).entry_point).main_kpi in first
    # another controller of the scenario on the same env, then this one again: same seeded KPIs
    others = [n for n in registry.controllers_for(scenario) if n != name]
    _episode(domain, others[0], env)
    assert _episode(domain, name, env) == first


def test_max_pressure_after_fixed_time_is_max_pressure(envs: dict[str, Any]) -> None:
    """The reviewer's sequence: max-pressure, fixed-time, max-pressure on one traffic env."""
    env = _env(envs, SCENARIOS["traffic"])
    pressure = _episode("traffic", "max-pressure", env)
    fixed = _episode("traffic", "fixed-time", env)
    again = _episode("traffic", "max-pressure", env)
    assert again == pressure
    assert fixed["delay"] != pressure["delay"]  # fixed-time really ran the programme
    assert _episode("traffic", "fixed-time", env) == fixed


def test_a_controller_is_refused_on_a_scenario_it_does_not_work_on() -> None:
    # volt-var sets inverters' reactive power; the demand-response feeder has none to set, and the
    # battery controllers have no inverters to drive on a voltage scenario.
    from marl.core.errors import ConcordError

    with pytest.raises(ConcordError, match=r"unknown controller for grid/demand-response 'volt-var'.*local-rule"):
        registry.scenario_controller("grid/demand-response", "volt-var")
    with pytest.raises(ConcordError, match="unknown controller for grid/ieee33 'lp-optimum'"):
        registry.scenario_controller("grid/ieee33", "lp-optimum")
    assert set(registry.controllers_for("grid/demand-response")) == {
        "no-control",
        "local-rule",
        "lp-optimum",
        "consensus",
    }
    assert "volt-var" in registry.controllers_for("grid/ieee33")
