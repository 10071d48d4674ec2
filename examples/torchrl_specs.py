"""TorchRL: wrap a Concord scenario and check its specs (what BenchMARL builds on).

    .venv/bin/python examples/torchrl_specs.py grid/ieee33

``group_map=env.group_map`` gives one group per kind of agent (``light``, ``pv``, ``robot``);
with ``return_state=True`` the global ``state()`` appears as ``"state"``, bounded by ``env.state_space``.
"""

from __future__ import annotations

import sys
from typing import Any

from torchrl.envs.libs.pettingzoo import PettingZooWrapper
from torchrl.envs.utils import check_env_specs

from marl.core.registry import make_scenario


def check(scenario_id: str = "grid/ieee33", steps: int = 5) -> tuple[Any, Any]:
    """Check the specs of the wrapped scenario; return its state spec and a short random rollout."""
    env = make_scenario(scenario_id, test=True)
    wrapped = PettingZooWrapper(env, group_map=env.group_map, return_state=True, use_mask=False)
    try:
        check_env_specs(wrapped, seed=0)
        return wrapped.observation_spec["state"], wrapped.rollout(steps)
    finally:
        wrapped.close()


if __name__ == "__main__":
    state_spec, rollout = check(sys.argv[1] if len(sys.argv) > 1 else "grid/ieee33")
    print(state_spec)
    print(rollout)
