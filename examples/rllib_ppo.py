"""RLlib PPO on a Concord scenario (one shared policy), two envs per env runner.

    pip install -c constraints.txt "ray[rllib]==2.60.0"   # needs gymnasium 1.2.2 (in our range)
    .venv/bin/python examples/rllib_ppo.py warehouse/small

RLlib builds its envs in worker processes from the registered creator; each copy of a traffic
env gets its own SUMO output folder and TraCI label when it starts. With more than one env per
env runner, RLlib keeps several simulations in ONE process: use ``use_libsumo=false`` for
traffic then (each env drives its own sumo process over TraCI), as below.
"""

from __future__ import annotations

import sys
from typing import Any

from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv
from ray.tune.registry import register_env

from marl.core.registry import make_scenario, scenario_spec


def build(scenario_id: str = "warehouse/small", *, test: bool = True) -> Any:
    overrides = {"use_libsumo": False} if scenario_spec(scenario_id).domain == "traffic" else {}
    register_env("concord", lambda _: ParallelPettingZooEnv(make_scenario(scenario_id, overrides, test=test)))
    config = (
        PPOConfig()
        .environment("concord")
        .env_runners(num_env_runners=1, num_envs_per_env_runner=2)
        .multi_agent(policies={"shared"}, policy_mapping_fn=lambda agent_id, *args, **kwargs: "shared")
        .training(train_batch_size=400, minibatch_size=100, num_epochs=1)
    )
    return config.build_algo()


if __name__ == "__main__":
    algo = build(sys.argv[1] if len(sys.argv) > 1 else "warehouse/small")
    result = algo.train()
    print("env steps sampled:", result["env_runners"]["num_env_steps_sampled_lifetime"])
    algo.stop()
