"""IDQN's guide (``--algo-set guide=max-wave``): exploring agents follow a classical controller.

Pure logic on hand-made arrays; the loop on SUMO's single-intersection with one short episode
(real SUMO, fixed seeds, deterministic). Budget: a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marl.algos.idqn import IDQNConfig, NStepAssembler, ReplayBuffer, margin_loss, select_actions
from marl.cli import main
from marl.core import registry
from marl.core.errors import ConfigError
from marl.core.seeding import train_env_episode_seed
from marl.episodes import run_episode
from marl.runner import build_controller
from marl.training import TrainRequest, load_checkpoint, train

SCENARIO = "traffic/single-intersection"
SHORT = {"end": "320"}  # 64 decisions of 5 s


def test_exploring_agents_take_the_guides_action_and_greedy_ones_ignore_it():
    rng = np.random.default_rng(0)
    mask = np.array([[True, True, True, False], [False, True, True, True]])
    q = np.array([[9.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])  # greedy: 0 and 3
    guide = np.array([2, 1])
    always = np.stack([select_actions(q, mask, 1.0, rng, guide, 1.0) for _ in range(50)])
    assert (always == guide).all()
    never = np.stack([select_actions(q, mask, 0.0, rng, guide, 1.0) for _ in range(50)])
    assert (never == [0, 3]).all()
    # guide_share 0: uniform random among valid actions, as without a guide
    mixed = np.stack([select_actions(q, mask, 1.0, rng, guide, 0.0) for _ in range(300)])
    assert set(mixed[:, 0]) == {0, 1, 2} and mask[np.arange(2), mixed].all()
    half = np.stack([select_actions(q, mask, 1.0, rng, guide, 0.5) for _ in range(400)])
    share = (half == guide).all(-1).mean()
    assert 0.25 < share < 0.6  # 0.5 from the guide, plus random picks that happen to agree


def test_without_a_guide_the_random_stream_is_unchanged():
    q, mask = np.zeros((3, 4)), None
    a = [select_actions(q, mask, 0.5, np.random.default_rng(3)) for _ in range(5)]
    b = [select_actions(q, mask, 0.5, np.random.default_rng(3), None, 0.3) for _ in range(5)]
    assert all((x == y).all() for x, y in zip(a, b, strict=True))


def test_a_fully_guided_training_episode_plays_the_guides_episode(tmp_path):
    """epsilon 1 with guide_share 1: every training decision is max-wave's, so the training
    episode's return equals max-wave's own episode on the same env seed, and every replayed
    transition carries the guide's action (the margin loss trains on it)."""
    result = train(
        TrainRequest(
            scenario=SCENARIO,
            algo="idqn",
            steps=64,
            seed=5,
            overrides=dict(SHORT),
            algo_overrides={
                "guide": "max-wave",
                "guide_margin": "0.5",
                "epsilon_start": "1",
                "epsilon_end": "1",
                "num_steps": "64",
                "learning_starts": "32",
                "batch_size": "8",
                "eval_every": "0",
            },
            eval_episodes=0,
            out=str(tmp_path / "guided"),
        )
    )
    env = registry.make_scenario(SCENARIO, dict(SHORT))
    try:
        kpis = run_episode(env, build_controller(SCENARIO, "max-wave", env), seed=train_env_episode_seed(5, 0, 0, 0))
    finally:
        env.close()
    assert len(result.train_returns) == 1
    assert result.train_returns[0] == pytest.approx(kpis["return"], rel=1e-9)
    replay = load_checkpoint(result.checkpoint)["replay"]  # the margin loss sees the guide's actions
    assert replay["size"] == 64 and torch.equal(replay["guide"], replay["action"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--algo-set", "guide=fixed-time"], "bad guide=fixed-time: it runs the net programme"),
        (["--algo-set", "guide=max-pressure-coordinated"], "bad guide=max-pressure-coordinated: it talks"),
        (["--algo-set", "guide=nope"], "unknown controller for traffic/single-intersection 'nope'"),
        (["--algo-set", "guide=max-wave", "--envs", "2"], "bad --envs 2 with guide=max-wave"),
        (["--algo-set", "guide_share=2"], "bad guide_share=2"),
    ],
)
def test_bad_guides_are_refused_in_one_line(args, message, capsys):
    assert main(["train", SCENARIO, "--algo", "idqn", "--steps", "64", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_margin_loss_is_zero_once_the_guide_leads_by_the_margin():
    q = torch.tensor([[[1.0, 0.5, 0.0], [0.0, 2.0, 1.9]]])  # [B=1, N=2, A=3]
    # agent 0's guide action leads by 0.5 (= margin): no loss; agent 1's guide (2) trails by 0.1
    loss = margin_loss(q, torch.tensor([[0, 2]]), 0.5)
    assert loss.item() == pytest.approx((0.0 + (2.0 + 0.5 - 1.9)) / 2)
    assert margin_loss(q, torch.tensor([[-1, -1]]), 0.5).item() == 0.0  # no guide: no loss
    q.requires_grad_(True)
    margin_loss(q, torch.tensor([[-1, 2]]), 0.5).backward()
    # the gradient lowers the rival and raises the guide's action, only where there is a guide
    assert q.grad[0, 1, 1] > 0 and q.grad[0, 1, 2] < 0 and (q.grad[0, 0] == 0).all()


def test_guide_actions_reach_the_replay_and_old_checkpoints_still_load():
    nstep, replay = NStepAssembler(2, 0.9), ReplayBuffer(8, 2, 3, 4)
    obs, mask = np.zeros((2, 3), np.float32), np.ones((2, 4), bool)
    for t in range(4):
        for tr in nstep.push(obs + t, np.array([t % 4, 0]), np.ones(2), obs, mask, np.array([3, t % 4])):
            replay.add(tr)
    assert replay.size == 3 and replay.guide[:3, 1].tolist() == [0, 1, 2]  # each transition's own step
    state = replay.state_dict()
    old = {k: v for k, v in state.items() if k != "guide"}  # written before the guide existed
    again = ReplayBuffer(8, 2, 3, 4)
    again.load_state_dict(old)
    assert (again.guide == -1).all() and np.array_equal(again.obs, replay.obs)
    pending = nstep.state_dict()
    restored = NStepAssembler(2, 0.9)
    restored.load_state_dict({k: v for k, v in pending.items() if k != "guides"})
    assert [g.tolist() for g in restored.guides] == [[-1, -1]]


def test_margin_needs_a_guide():
    with pytest.raises(ConfigError, match=r"bad guide_margin=0\.5 without a guide"):
        IDQNConfig(guide_margin=0.5)
