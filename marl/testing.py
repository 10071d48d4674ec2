"""Concord's conformance kit: check any scenario against the contract, as ``pettingzoo.test`` does.

    from marl.testing import check_scenario
    check_scenario("traffic/grid4x4")              # a registered id (short test presets)
    check_scenario(lambda: MyEnv(MyEnv.Config()))  # any env factory, from any package

:func:`check_scenario` runs every check below and raises ``AssertionError`` naming the first
broken rule. Each check is also a function of its own:

* :func:`check_parallel_api` — PettingZoo's ``parallel_api_test``;
* :func:`check_aec_api` — PettingZoo's ``api_test`` on ``parallel_to_aec(env)`` (what AEC
  clients and SuperSuit's AEC wrappers see);
* :func:`check_state` — PettingZoo's ``state_test`` (a ``state_space`` that holds ``state()``);
* :func:`check_contract` — the Concord extras of :mod:`scenarios.base`: ``<kind>_<i>`` ids,
  ``sim_ids``, ``group_map``, ``render_mode``, topology over the agents, int8 action masks,
  observations and state inside their spaces, KPIs named by ``main_kpi``/``kpi_goals``;
* :func:`check_determinism` — two fresh envs, same seed, the whole (short) episode: same
  observations, rewards and KPIs. PettingZoo's ``parallel_seed_test`` stops after one step;
* :func:`check_seed_test` — PettingZoo's ``parallel_seed_test`` itself (it keeps two envs live at
  once, so a traffic env needs ``use_libsumo=false`` there);
* :func:`check_copies` — a pickled copy of a live env runs the same episode as the original
  and shares nothing with it.

This module imports only ``marl.core``, ``pettingzoo.test`` and ``scenarios.base``, never the
runner or training code.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import networkx as nx
import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv
from pettingzoo.test import api_test, parallel_api_test, parallel_seed_test, state_test
from pettingzoo.utils.conversions import parallel_to_aec

from marl.core import registry

__all__ = [
    "EnvFactory",
    "factory",
    "check_scenario",
    "check_parallel_api",
    "check_aec_api",
    "check_state",
    "check_contract",
    "check_determinism",
    "check_seed_test",
    "check_copies",
    "sample_actions",
    "rollout",
]

#: Something that builds a fresh env: ``factory("traffic/grid4x4")`` or your own callable.
EnvFactory = Callable[[], ParallelEnv]

#: Agent ids ``<kind>_<i>``: TorchRL and BenchMARL group agents by the part before ``_<i>``.
AGENT_ID = re.compile(r"^[A-Za-z][A-Za-z0-9-]*_\d+$")


def factory(scenario: str | EnvFactory, overrides: Mapping[str, Any] | None = None) -> EnvFactory:
    """A factory for a registered id (with its short test presets and ``overrides``) or a callable."""
    if callable(scenario):
        return scenario
    scenario_id = scenario
    return lambda: registry.make_scenario(scenario_id, overrides, test=True)


def sample_actions(env: Any, infos: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """A random action per live agent, drawn from ``rng``; only allowed ones where a mask is given."""
    actions: dict[str, Any] = {}
    for agent in env.agents:
        mask = (infos.get(agent) or {}).get("action_mask")
        if mask is not None:
            actions[agent] = int(rng.choice(np.flatnonzero(mask)))
        else:
            space = env.action_space(agent)
            space.seed(int(rng.integers(2**31)))
            actions[agent] = space.sample()
    return actions


def rollout(env: Any, seed: int) -> Iterator[tuple[dict, dict, dict]]:
    """Yield (observations, rewards, infos) of a seeded random-action episode, reset included."""
    rng = np.random.default_rng(seed)
    observations, infos = env.reset(seed=seed)
    yield observations, {}, infos
    while env.agents:
        observations, rewards, _, _, infos = env.step(sample_actions(env, infos, rng))
        yield observations, rewards, infos


def _trace(env: Any, seed: int) -> tuple[list[np.ndarray], list[dict], dict[str, float]]:
    """Flattened observations, rewards and KPIs of one seeded episode."""
    obs, rewards = [], []
    for o, r, _ in rollout(env, seed):
        obs.append(np.concatenate([np.ravel(o[a]) for a in sorted(o)]) if o else np.zeros(0))
        rewards.append(dict(r))
    return obs, rewards, env.episode_kpis()


def _same_trace(first: Any, again: Any, what: str) -> None:
    obs_a, rew_a, kpi_a = first
    obs_b, rew_b, kpi_b = again
    assert len(obs_a) == len(obs_b), f"{what}: episode lengths differ ({len(obs_a)} vs {len(obs_b)})"
    for t, (a, b) in enumerate(zip(obs_a, obs_b)):
        assert np.array_equal(a, b), f"{what}: observations differ at step {t}"
    assert rew_a == rew_b, f"{what}: rewards differ"
    assert kpi_a == kpi_b, f"{what}: KPIs differ: {kpi_a} vs {kpi_b}"


def _closing(make_env: EnvFactory) -> Any:
    """Context manager: a fresh env, closed at the end."""
    import contextlib

    @contextlib.contextmanager
    def managed() -> Iterator[Any]:
        env = make_env()
        try:
            yield env
        finally:
            env.close()

    return managed()


def check_parallel_api(make_env: EnvFactory, num_cycles: int = 20) -> None:
    """PettingZoo's ``parallel_api_test``."""
    with _closing(make_env) as env:
        parallel_api_test(env, num_cycles=num_cycles)


def check_aec_api(make_env: EnvFactory, num_cycles: int = 20) -> None:
    """PettingZoo's ``api_test`` on the AEC view of the env (``parallel_to_aec``)."""
    with _closing(make_env) as env:
        api_test(parallel_to_aec(env), num_cycles=num_cycles)


def check_state(make_env: EnvFactory, num_cycles: int = 10) -> None:
    """PettingZoo's ``state_test``: ``state_space`` is a Box that holds every ``state()``.

    ``state_test`` wants an AEC and a parallel env at once; both views share one env here (the
    parallel part runs after the AEC part), so a one-simulation-per-process env passes too.
    """
    with _closing(make_env) as env:
        state_test(parallel_to_aec(env), env, num_cycles=num_cycles)


def check_contract(make_env: EnvFactory, seed: int = 3) -> None:
    """The Concord extras of ``scenarios/base.py`` over one seeded episode (see the module doc)."""
    with _closing(make_env) as env:
        kind = type(env)
        agents = list(env.possible_agents)
        assert agents, "possible_agents is empty"
        for agent in agents:
            assert AGENT_ID.match(agent), f"agent id '{agent}' is not of the form <kind>_<i>"
        for name in ("sim_ids", "group_map", "topology", "episode_kpis", "state"):
            assert hasattr(kind, name), f"{name} missing: subclass scenarios.base.Scenario (see its contract)"
        assert hasattr(env, "state_space"), "state_space missing: set a gymnasium Box in __init__"
        sim_ids = env.sim_ids
        assert list(sim_ids) == agents, "sim_ids must map every possible agent, in order"
        assert all(isinstance(v, str) and v for v in sim_ids.values()), "sim_ids values must be str"
        assert len(set(sim_ids.values())) == len(agents), "sim_ids must be one-to-one"
        groups = env.group_map
        assert sorted(a for members in groups.values() for a in members) == sorted(agents), (
            "group_map must put every agent in exactly one group"
        )
        assert hasattr(env, "render_mode"), "render_mode attribute missing (SuperSuit reads it)"
        if env.render_mode is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert env.render() is None, "render() without a render_mode must return None"
        state_space = env.state_space
        assert isinstance(state_space, spaces.Box), "state_space must be a gymnasium Box"

        for t, (observations, rewards, infos) in enumerate(rollout(env, seed)):
            if t == 0:
                graph = env.topology
                assert isinstance(graph, nx.Graph), "topology must be a networkx Graph"
                assert set(graph.nodes) <= set(agents), "topology nodes must be agent ids"
            state = env.state()
            assert state.ndim == 1 and state.dtype == np.float32, "state() must be flat float32"
            assert state_space.contains(state), f"state() outside state_space at step {t}"
            for agent, obs in observations.items():
                assert env.observation_space(agent).contains(obs), f"{agent}: observation outside its space"
            assert all(isinstance(r, (float, int)) and math.isfinite(r) for r in rewards.values()), rewards
            for agent, info in infos.items():
                mask = info.get("action_mask")
                if mask is None:
                    continue
                assert isinstance(mask, np.ndarray) and mask.dtype == np.int8, (
                    f"{agent}: action_mask must be np.int8 (Discrete.sample(mask) wants it), got "
                    f"{getattr(mask, 'dtype', type(mask))}"
                )
                assert mask.shape == (env.action_space(agent).n,), f"{agent}: one mask entry per action"
                assert set(np.unique(mask)) <= {0, 1} and mask.any(), f"{agent}: mask must be 0/1, some 1"
        kpis = env.episode_kpis()
        assert kind.main_kpi in kpis, f"main_kpi {kind.main_kpi!r} missing from {sorted(kpis)}"
        assert set(kind.kpi_goals) <= set(kpis) | {"return"}, "kpi_goals names a KPI never reported"
        assert all(isinstance(v, float) and math.isfinite(v) for v in kpis.values()), kpis


def check_determinism(make_env: EnvFactory, seed: int = 7) -> None:
    """Two fresh envs, one after the other, same seed: the same whole episode and KPIs."""
    traces = []
    for _ in range(2):
        with _closing(make_env) as env:
            traces.append(_trace(env, seed))
    _same_trace(traces[0], traces[1], f"seed {seed}, two fresh envs")


def check_seed_test(make_env: EnvFactory, num_cycles: int = 10) -> None:
    """PettingZoo's ``parallel_seed_test`` (two envs live at once; one step compared)."""
    parallel_seed_test(make_env, num_cycles=num_cycles)


def check_copies(make_env: EnvFactory, seed: int = 5) -> None:
    """A pickled copy of a live env (what SuperSuit's and RLlib's workers receive) plays the
    same seeded episode as the original, and the original is unharmed by copying."""
    with _closing(make_env) as env:
        env.reset(seed=seed)
        blob = pickle.dumps(env)  # mid-episode: the copy must not take the live simulator
        original = _trace(env, seed)
    copy = pickle.loads(blob)
    try:
        _same_trace(original, _trace(copy, seed), "pickled copy")
    finally:
        copy.close()


def check_scenario(
    scenario: str | EnvFactory,
    *,
    overrides: Mapping[str, Any] | None = None,
    seed_test_overrides: Mapping[str, Any] | None = None,
    num_cycles: int = 20,
) -> None:
    """Run every check of this module on a registered id or an env factory.

    ``overrides`` go to every env built from a registered id; ``seed_test_overrides`` only to
    the two envs of PettingZoo's seed test (``{"use_libsumo": False}`` for traffic).
    """
    make_env = factory(scenario, overrides)
    check_parallel_api(make_env, num_cycles)
    check_aec_api(make_env, num_cycles)
    check_state(make_env)
    check_contract(make_env)
    check_determinism(make_env)
    check_copies(make_env)
    seed_env = make_env
    if seed_test_overrides and not callable(scenario):
        seed_env = factory(scenario, {**(overrides or {}), **seed_test_overrides})
    check_seed_test(seed_env)
