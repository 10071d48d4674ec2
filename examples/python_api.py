"""Concord's Python API in one page: build a scenario, read it, run a baseline controller.

.venv/bin/python examples/python_api.py [traffic/grid4x4]
"""

from __future__ import annotations

import sys

import numpy as np

from marl.core.registry import controller_spec, load, make_scenario, scenario_spec


def main(scenario_id: str = "traffic/grid4x4") -> dict[str, float]:
    # Overrides are the same key=value pairs as `marl run --set` (strings or typed values).
    overrides = {"end": 600} if scenario_id.startswith("traffic/") else {}
    env = make_scenario(scenario_id, overrides)
    try:
        observations, infos = env.reset(seed=0)
        agent = env.possible_agents[0]
        print(f"{len(env.possible_agents)} agents, e.g. {agent} = simulator id {env.sim_ids[agent]!r}")
        print("groups:", {kind: len(members) for kind, members in env.group_map.items()})
        print("observation", env.observation_space(agent), "action", env.action_space(agent))
        print("state", env.state().shape, "in", env.state_space)
        mask = infos[agent].get("action_mask")  # int8, 1 = allowed (discrete scenarios)
        print("action mask of", agent, mask)
        print(
            "topology:", env.topology.number_of_edges(), "links, e.g.", next(iter(env.topology.edges(data=True)), None)
        )

        # The domain's default baseline, as `marl run` would pick it.
        spec = scenario_spec(scenario_id)
        cls = load(controller_spec(spec.domain, spec.default_controller).entry_point)
        controller = cls(env, None)
        controller.reset(env, seed=0)
        total = 0.0
        while env.agents:
            observations, rewards, *_ = env.step(controller.act(observations, env))
            total += float(np.mean(list(rewards.values()))) if rewards else 0.0
        kpis = env.episode_kpis()
        print(f"{spec.default_controller}: {type(env).main_kpi} = {kpis[type(env).main_kpi]:.3f}; all KPIs {kpis}")
        return kpis
    finally:
        env.close()


if __name__ == "__main__":
    main(*sys.argv[1:2])
