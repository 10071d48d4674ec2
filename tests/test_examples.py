"""The scripts in examples/ work as the README shows them (short runs).

SB3 through SuperSuit trains PPO on two traffic copies in two processes (the case that used to
collide on SUMO's output files); TorchRL's ``check_env_specs`` passes with ``env.group_map``;
RLlib runs only where ``ray[rllib]`` is installed (it needs gymnasium 1.2.2, see README).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_api_example_runs_the_default_controller() -> None:
    kpis = example("python_api").main("warehouse/small")
    assert kpis["deliveries"] > 0, "the prioritized baseline delivers in a full episode"


def test_sb3_supersuit_example_trains_ppo_on_two_traffic_copies() -> None:
    pytest.importorskip("supersuit")
    model = example("sb3_supersuit").train("traffic/grid4x4", 512, test=True)
    # 16 lights x 2 copies = 32 rows; PPO rounds up to whole rollouts of n_steps per row
    assert model.num_timesteps >= 512 and model.num_timesteps % (32 * model.n_steps) == 0
    obs = np.zeros((1, *model.observation_space.shape), dtype=np.float32)
    action, _ = model.predict(obs, deterministic=True)
    assert 0 <= int(action[0]) < model.action_space.n


@pytest.mark.parametrize(("scenario_id", "group"), [("warehouse/small", "robot"), ("traffic/grid4x4", "light")])
def test_torchrl_example_passes_check_env_specs(scenario_id: str, group: str) -> None:
    pytest.importorskip("torchrl")
    from torchrl.data import Bounded

    state_spec, rollout = example("torchrl_specs").check(scenario_id, steps=3)
    assert isinstance(state_spec, Bounded), "state_space gives TorchRL a bounded state spec"
    assert rollout.batch_size[0] == 3
    assert (group, "observation") in rollout.keys(include_nested=True), "one group per kind of agent"
    assert "state" in rollout.keys(), "the global state reaches TorchRL"  # noqa: SIM118  (TensorDict refuses `in`)
    assert rollout["state"].min() >= 0 and rollout["state"].max() <= 1, "inside state_space"


def test_rllib_example_samples_steps() -> None:
    pytest.importorskip("ray.rllib", reason="ray[rllib] is not installed (optional extra 'rllib')")
    algo = example("rllib_ppo").build("warehouse/small")
    try:
        result = algo.train()
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] >= 400
    finally:
        algo.stop()
