"""Stable-Baselines3 PPO on a Concord scenario through SuperSuit, two copies in two processes.

    pip install -c constraints.txt -e '.[ecosystem]'
    .venv/bin/python examples/sb3_supersuit.py traffic/grid4x4 20000

Every agent of every copy is one row of SB3's vector env (parameter sharing across agents).
Each copy runs in its own worker process with its own SUMO output folder, so two libsumo
simulations never meet in one process.
"""

from __future__ import annotations

import sys
from typing import Any

import supersuit as ss
from stable_baselines3 import PPO

from marl.core.registry import make_scenario


def train(scenario_id: str = "traffic/grid4x4", timesteps: int = 20_000, *, test: bool = False) -> Any:
    """Train PPO for ``timesteps`` agent-steps; ``test=True`` uses the short test episodes."""
    env = make_scenario(scenario_id, test=test)
    vec = ss.pettingzoo_env_to_vec_env_v1(env)
    vec = ss.concat_vec_envs_v1(vec, 2, num_cpus=2, base_class="stable_baselines3")
    try:
        # no seed= here: SuperSuit's process vector env has no seed(); seed through reset()
        model = PPO("MlpPolicy", vec, n_steps=64, batch_size=128, n_epochs=2, verbose=0)
        model.learn(total_timesteps=timesteps)
        return model
    finally:
        vec.close()


if __name__ == "__main__":
    scenario = sys.argv[1] if len(sys.argv) > 1 else "traffic/grid4x4"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
    trained = train(scenario, steps)
    print(f"trained PPO on {scenario}: {trained.num_timesteps} agent-steps")
