"""Learning algorithms, one readable file each; registered here without importing torch."""

from marl.core.registry import AlgorithmSpec, register_algorithm

register_algorithm(
    AlgorithmSpec(
        name="ippo",
        entry_point="marl.algos.ippo:IPPO",
        description="Independent PPO, shared parameters + agent id (or per-agent), optional learned comms",
    )
)
register_algorithm(
    AlgorithmSpec(
        name="mappo",
        entry_point="marl.algos.mappo:MAPPO",
        description="MAPPO: PPO with a centralised critic on env.state() (Yu et al. 2022)",
    )
)
register_algorithm(
    AlgorithmSpec(
        name="idqn",
        entry_point="marl.algos.idqn:IDQN",
        description="Independent double DQN, n-step, shared parameters + agent id (RESCO's IDQN)",
    )
)
