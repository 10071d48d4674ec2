"""Conformance over the registry, through the shipped kit (:mod:`marl.testing`).

A scenario is tested by being registered: for every registered scenario (short test presets)
this runs PettingZoo's ``parallel_api_test``, ``api_test`` on the AEC view, ``state_test`` and
``parallel_seed_test``, Concord's contract (ids, masks, state, topology, KPIs), a full-episode
determinism check, a pickled-copy check, and a ``marl run`` through the CLI. A tiny scenario
defined in this file proves that the kit works on scenarios from outside the repository, and a
SuperSuit vector-env smoke test runs each domain the way SB3 users build it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import networkx as nx
import numpy as np
import pytest
from gymnasium import spaces

from marl import testing
from marl.cli import main
from marl.core import registry
from marl.results.records import COLUMNS, read_records
from scenarios.base import Scenario

SCENARIOS = sorted(registry.scenarios())
#: PettingZoo's seed test keeps two envs live at once: libsumo allows one per process, so traffic
#: runs it over TraCI (a sumo process each, ~5 s a map), on one map of each kind: single light,
#: regular grid, heterogeneous lights. Full-episode determinism runs on every map.
SEED_TEST_OVERRIDES = {"traffic": {"use_libsumo": False}}
SEED_TEST_SCENARIOS = [
    s for s in SCENARIOS
    if not s.startswith("traffic/") or s in {"traffic/single-intersection", "traffic/grid4x4", "traffic/cologne3"}
]  # fmt: skip


def make_factory(scenario_id: str, **overrides: Any) -> testing.EnvFactory:
    return testing.factory(scenario_id, overrides)


def test_registry_is_not_empty() -> None:
    domains = {registry.scenario_spec(s).domain for s in SCENARIOS}
    assert {"traffic", "grid", "warehouse"} <= domains, f"every domain must be registered, found {SCENARIOS}"


@pytest.mark.parametrize("scenario_id", SCENARIOS)
def test_parallel_api(scenario_id: str) -> None:
    testing.check_parallel_api(make_factory(scenario_id))


@pytest.mark.parametrize("scenario_id", SCENARIOS)
def test_aec_api(scenario_id: str) -> None:
    testing.check_aec_api(make_factory(scenario_id))


@pytest.mark.parametrize("scenario_id", SCENARIOS)
def test_state(scenario_id: str) -> None:
    testing.check_state(make_factory(scenario_id))


@pytest.mark.parametrize("scenario_id", SCENARIOS)
def test_concord_contract(scenario_id: str) -> None:
    testing.check_contract(make_factory(scenario_id))
    spec = registry.scenario_spec(scenario_id)
    env = make_factory(scenario_id)()
    try:
        if spec.n_agents is not None:
            assert len(env.possible_agents) == spec.n_agents, "ScenarioSpec.n_agents must match the env"
    finally:
        env.close()


@pytest.mark.parametrize("scenario_id", SCENARIOS)
def test_same_seed_same_episode(scenario_id: str) -> None:
    testing.check_determinism(make_factory(scenario_id))


@pytest.mark.parametrize("scenario_id", SEED_TEST_SCENARIOS)
def test_pettingzoo_seed_test(scenario_id: str) -> None:
    overrides = SEED_TEST_OVERRIDES.get(registry.scenario_spec(scenario_id).domain, {})
    testing.check_seed_test(make_factory(scenario_id, **overrides))


@pytest.mark.parametrize("scenario_id", SCENARIOS)
def test_pickled_copy_is_independent(scenario_id: str) -> None:
    testing.check_copies(make_factory(scenario_id))


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


# ---------------------------------------------------------------- a scenario from outside


@dataclass
class TinyConfig:
    n: int = 3  #: agents on a ring
    horizon: int = 6  #: steps per episode


class TinyScenario(Scenario):
    """Agents on a ring each pick 0..2 (2 forbidden to agent 0); reward = -|choice - target|."""

    Config = TinyConfig
    main_kpi = "hits"
    kpi_goals: ClassVar[dict[str, Literal["min", "max"]]] = {"hits": "max"}
    metadata = {"name": "tiny_v0", "render_modes": [], "is_parallelizable": True}

    def __init__(self, config: TinyConfig | None = None, render_mode: str | None = None) -> None:
        self.config = config or TinyConfig()
        self._set_render_mode(render_mode)
        self.possible_agents = [f"dot_{i}" for i in range(self.config.n)]
        self.agents: list[str] = []
        self.state_space = spaces.Box(0.0, 2.0, (self.config.n,), np.float32)
        # one space object per env, returned on every call (PettingZoo's API and seed tests)
        self._obs_space = spaces.Box(0.0, 2.0, (1,), np.float32)
        self._act_space = spaces.Discrete(3)
        self._rng = np.random.default_rng()
        self._target = np.zeros(self.config.n, dtype=np.int64)
        self._t = self._hits = 0

    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Discrete:
        return self._act_space

    def _obs(self) -> dict[str, np.ndarray]:
        return {a: np.array([self._target[i]], np.float32) for i, a in enumerate(self.possible_agents)}

    def _infos(self) -> dict[str, dict[str, Any]]:
        masks = {a: np.array([1, 1, int(i != 0)], np.int8) for i, a in enumerate(self.possible_agents)}
        return {a: {"action_mask": masks[a]} for a in self.agents}

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.agents = list(self.possible_agents)
        self._target = self._rng.integers(0, 2, self.config.n)
        self._t = self._hits = 0
        return self._obs(), self._infos()

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        choice = np.array([int(actions.get(a, 0)) for a in self.possible_agents])
        rewards = dict(zip(self.possible_agents, (-np.abs(choice - self._target)).astype(float).tolist()))
        self._hits += int((choice == self._target).sum())
        self._t += 1
        self._target = self._rng.integers(0, 2, self.config.n)
        done = self._t >= self.config.horizon
        agents = self.agents
        infos = self._infos()
        if done:
            self.agents = []
        return self._obs(), rewards, dict.fromkeys(agents, False), dict.fromkeys(agents, done), infos

    def state(self) -> np.ndarray:
        return self._target.astype(np.float32)

    @property
    def topology(self) -> nx.Graph:
        return nx.cycle_graph(self.possible_agents)

    def episode_kpis(self) -> dict[str, float]:
        return {"hits": float(self._hits)}


def test_kit_checks_a_scenario_from_outside_the_repository() -> None:
    testing.check_scenario(TinyScenario)


def test_kit_runs_on_a_registered_outside_scenario(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = registry.ScenarioSpec(
        id="tiny/ring", entry_point=f"{__name__}:TinyScenario", description="test ring",
        simulator="numpy", n_agents=3, test_kwargs={"horizon": 4},
    )  # fmt: skip
    monkeypatch.setitem(registry._SCENARIOS, spec.id, spec)  # removed again after the test
    testing.check_scenario("tiny/ring")
    assert registry.make_scenario("tiny/ring", test=True).config.horizon == 4


def test_kit_catches_a_broken_rule() -> None:
    class BoolMask(TinyScenario):
        def _infos(self) -> dict[str, dict[str, Any]]:
            return {a: {"action_mask": np.ones(3, dtype=bool)} for a in self.agents}

    with pytest.raises(AssertionError, match=r"np\.int8"):
        testing.check_contract(BoolMask)

    class Nondeterministic(TinyScenario):
        def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
            return super().reset(seed=None, options=options)

    with pytest.raises(AssertionError, match="differ"):
        testing.check_determinism(Nondeterministic)


# ---------------------------------------------------------------- ecosystem: SuperSuit + SB3


@pytest.mark.parametrize("scenario_id", ["traffic/single-intersection", "warehouse/small", "grid/ieee33"])
def test_supersuit_vector_env_steps_every_copy(scenario_id: str) -> None:
    """SuperSuit's vec env over two worker processes: every row steps and episodes restart."""
    ss = pytest.importorskip("supersuit")
    env = registry.make_scenario(scenario_id, test=True)
    n = len(env.possible_agents)
    vec = ss.concat_vec_envs_v1(ss.pettingzoo_env_to_vec_env_v1(env), 2, num_cpus=2)
    try:
        obs, _ = vec.reset(seed=0)
        assert obs.shape == (2 * n, *env.observation_space(env.possible_agents[0]).shape)
        space = env.action_space(env.possible_agents[0])
        space.seed(0)
        ended = 0
        for _ in range(12):
            obs, rewards, terms, truncs, _ = vec.step(np.stack([space.sample() for _ in range(2 * n)]))
            assert obs.shape[0] == 2 * n and np.all(np.isfinite(rewards))
            ended += int(np.sum(terms | truncs))
        if scenario_id == "grid/ieee33":  # test horizon 8: every row ended once
            assert ended == 2 * n
    finally:
        vec.close()
        env.close()
