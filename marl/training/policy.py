"""A trained policy behind the controller interface: what ``marl run --policy`` and the evaluation
after training act with."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marl.core.controller import Controller
from marl.core.errors import CheckpointError
from marl.policies import ActorCritic
from marl.training.checkpoint import checked_config, load_checkpoint
from marl.training.communication import Communication
from marl.training.layout import TeamLayout
from marl.training.model import act, build_model
from marl.training.request import algorithm_class, method_name

__all__ = ["PolicyController", "policy_controller", "policy_from_checkpoint"]


class PolicyController(Controller):
    """A trained policy as a controller; it talks through its own :class:`Communication`."""

    payload_size = 0  # talks through its own channel, not the runner's

    def __init__(
        self, model: ActorCritic, layout: TeamLayout, comm: Communication, method: str, deterministic: bool = True
    ) -> None:
        super().__init__(None)
        self.model, self.layout, self.comm = model, layout, comm
        self.method_name = method
        self.deterministic = deterministic
        #: Sampled actions draw from here, seeded by each episode's seed: evaluations repeat.
        self.generator = torch.Generator()

    def reset(self, env: Any, seed: int | None = None) -> None:
        self.comm.reset(env, 0 if seed is None else int(seed))
        self.generator.manual_seed(0 if seed is None else int(seed))

    def act(
        self, observations: dict[str, np.ndarray], env: Any, messages: dict[str, np.ndarray] | None = None
    ) -> dict[str, Any]:
        obs = self.comm.augment(self.layout.obs_array(observations), env)
        delivered = self.comm.delivered(env)
        amask = self.layout.action_masks(getattr(env, "infos", None), env)
        action, _, cout, _ = act(self.model, obs, delivered, amask, self.deterministic, generator=self.generator)
        if cout is not None:
            self.comm.count_bytes(cout.bytes_sent)
        action = self.model.clip_action(action)
        return self.layout.actions_dict(action.numpy())

    def episode_stats(self) -> dict[str, float]:
        """Channel totals of the episode (bytes per agent step etc.), for records."""
        return self.comm.stats()


def policy_from_checkpoint(
    state: dict[str, Any], env: Any, scenario_id: str, seed: int = 0, channel: Any = None
) -> PolicyController:
    """The policy of a loaded checkpoint on ``env``; ``channel`` (a parsed ChannelSpec) replaces
    the channel it was trained with. A checkpoint written before agents had Concord ids (saved
    agents = the simulator's ids, ``env.sim_ids``) still loads."""
    meta = state["meta"]
    algo_cls = algorithm_class(meta["algo"])
    config = checked_config(state)
    layout = TeamLayout.of(env, scenario_id, need_state=False)  # acting needs no global state
    saved = TeamLayout(**meta["layout"])
    if not layout.fits(saved, getattr(env, "sim_ids", None)):
        raise CheckpointError(
            f"checkpoint {state['path']} was trained on {meta['scenario']} ({saved.n} agents, obs "
            f"{saved.obs_dim}, actions {saved.action_dim}); {scenario_id} has {layout.n} agents, obs "
            f"{layout.obs_dim}, actions {layout.action_dim}"
        )
    # The env's agent names (they may differ from old saved ones); the critic's size as saved.
    layout = dataclasses.replace(layout, state_size=saved.state_size)
    if channel is None and meta["channel"]:
        from comms.channel import parse_channel

        channel = parse_channel(meta["channel"])
    comm = Communication(
        meta["protocol"],
        channel,
        layout.agents,
        layout.obs_dim,
        seed,
        mode=getattr(config, "comm_mode", "neighbours"),
        hidden_size=config.hidden_size,
    )
    model = build_model(algo_cls, config, layout, comm)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {state['path']} does not fit the model: {str(exc).splitlines()[0]}"
        ) from None
    model.eval()
    return PolicyController(
        model, layout, comm, method_name(meta["algo"], meta["protocol"]), deterministic=config.deterministic_eval
    )


def policy_controller(
    path: str | Path | dict[str, Any], env: Any, scenario_id: str, channel: Any = None
) -> PolicyController:
    """The trained policy saved at ``path`` (or a checkpoint :func:`load_checkpoint` returned) as a
    controller for ``env`` (``marl run --policy``).

    It evaluates under ``channel`` (a ChannelSpec, or a spec string), by default the channel it was
    trained with (stored in the checkpoint), with the most likely action unless the config said
    otherwise.
    """
    torch.set_num_threads(1)
    if isinstance(channel, str):
        from comms.channel import parse_channel

        channel = parse_channel(channel)
    state = path if isinstance(path, dict) else load_checkpoint(path)
    return policy_from_checkpoint(state, env, scenario_id, channel=channel)
