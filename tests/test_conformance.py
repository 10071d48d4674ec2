"""Conformance over the registry: a scenario is tested by being registered.

For every registered scenario (with its short ``test_kwargs`` presets) this checks PettingZoo's
own ``parallel_api_test``, the Concord extras of ``scenarios/base.py`` (topology over the agents,
KPIs named by ``main_kpi``/``kpi_goals``, ``state()``, action masks), determinism under a seed,
and a ``marl run`` through the CLI that writes records and a manifest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import networkx as nx
import numpy as np
import pytest
from pettingzoo.test import parallel_api_test

from marl.core import registry
from marl.cli import main
from marl.results.records import COLUMNS, read_records

SCENARIOS = sorted(registry.scenarios())


def make(scenario_id: str) -> Any:
    return registry.make_scenario(scenario_id, test=True)


def sample_actions(env: Any, infos: dict[str, dict], rng: np.random.Generator) -> dict[str, Any]:
    """A random legal action per live agent, respecting ``action_mask`` when the env gives one."""
    actions = {}
    for agent in env.agents:
        space = env.action_space(agent)
        mask = infos.get(agent, {}).get("action_mask")
        if mask is not None:
            actions[agent] = int(rng.choice(np.flatnonzero(mask)))
        else:
            space.seed(int(rng.integers(2**31)))
            actions[agent] = space.sample()
    return actions


def rollout(env: Any, seed: int) -> Iterator[tuple[dict, dict]]:
    """Yield (observations, rewards) of a seeded random-action episode."""
    rng = np.random.default_rng(seed)
    observations, infos = env.reset(seed=seed)
    yield observations, {}
    while env.agents:
        observations, rewards, _, _, infos = env.step(sample_actions(env, infos, rng))
        yield observations, rewards


def test_registry_is_not_empty() -> None:
    domains = {registry.scenario_spec(s).domain for s in SCENARIOS}
    assert "traffic" in domains, f"traffic scenarios must be registered, found {SCENARIOS}"


@pytest.mark.parametrize("scenario_id", SCENARIOS)
def test_parallel_api(scenario_id: str) -> None:
    env = make(scenario_id)
    try:
        parallel_api_test(env, num_cycles=20)
    finally:
        env.close()


@pytest.mark.parametrize("scenario_id", SCENARIOS)
def test_concord_contract(scenario_id: str) -> None:
    spec = registry.scenario_spec(scenario_id)
    env = make(scenario_id)
    try:
        observations, infos = env.reset(seed=3)
        agents = list(env.possible_agents)
        if spec.n_agents is not None:
            assert len(agents) == spec.n_agents, "ScenarioSpec.n_agents must match the env"
        graph = env.topology
        assert isinstance(graph, nx.Graph)
        assert set(graph.nodes) <= set(agents), "topology nodes must be agent ids"
        state = env.state()
        assert state.ndim == 1 and state.dtype == np.float32 and np.all(np.isfinite(state))
        for agent in env.agents:
            assert env.observation_space(agent).contains(observations[agent])
            mask = infos.get(agent, {}).get("action_mask")
            if mask is not None:
                assert mask.dtype == bool and mask.any(), "an action mask must allow some action"
                assert len(mask) == env.action_space(agent).n
        for _ in rollout_rest(env, infos):
            pass
        kpis = env.episode_kpis()
        assert type(env).main_kpi in kpis, f"main_kpi {type(env).main_kpi!r} missing from {kpis}"
        assert set(type(env).kpi_goals) <= set(kpis) | {"return"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in kpis.values()), kpis
    finally:
        env.close()


def rollout_rest(env: Any, infos: dict) -> Iterator[None]:
    rng = np.random.default_rng(0)
    while env.agents:
        *_, infos = env.step(sample_actions(env, infos, rng))
        yield None


@pytest.mark.parametrize("scenario_id", SCENARIOS)
def test_same_seed_same_episode(scenario_id: str) -> None:
    def trace(seed: int) -> tuple[list[np.ndarray], dict[str, float]]:
        env = make(scenario_id)
        try:
            obs = [np.concatenate([np.ravel(o[a]) for a in sorted(o)]) for o, _ in rollout(env, seed)]
            return obs, env.episode_kpis()
        finally:
            env.close()

    first_obs, first_kpis = trace(7)
    again_obs, again_kpis = trace(7)
    assert len(first_obs) == len(again_obs)
    for a, b in zip(first_obs, again_obs):
        np.testing.assert_array_equal(a, b)
    assert first_kpis == again_kpis


@pytest.mark.parametrize("scenario_id", SCENARIOS)
def test_cli_run_writes_records_and_manifest(scenario_id: str, tmp_path: Any) -> None:
    spec = registry.scenario_spec(scenario_id)
    sets = [arg for k, v in spec.test_kwargs.items() for arg in ("--set", f"{k}={v}")]
    out = tmp_path / "run"
    code = main(["run", scenario_id, "--episodes", "1", "--seed", "1", "--out", str(out), *sets])
    assert code == 0
    frame = read_records(out)
    assert tuple(frame.columns) == COLUMNS
    assert set(frame["scenario"]) == {scenario_id}
    assert set(frame["method"]) == {spec.default_controller}
    main_kpi = registry.load(spec.entry_point).main_kpi
    assert main_kpi in set(frame["metric"])
    manifests = list((out / "manifests").glob("*.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    assert manifest["episodes_completed"] == 1 and manifest["end_time"]
    assert manifest["request"]["scenario"] == scenario_id
    assert "numpy" in manifest["versions"] and manifest["world_size"] == 1
