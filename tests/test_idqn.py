"""IDQN (marl/algos/idqn.py) and the off-policy loop (marl/training/offpolicy.py).

Pure logic (n-step returns, replay sampling, masks, the double-DQN target) is tested on hand-made
arrays; the loop on SUMO's single-intersection with short episodes (real SUMO, fixed seeds: every
run is deterministic, so no test can flake). Budget: ~40 s on a loaded 2-core machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from marl.algos.idqn import (
    IDQNConfig,
    NStepAssembler,
    QNetwork,
    ReplayBuffer,
    Transition,
    dqn_update,
    epsilon_at,
    masked_argmax,
    select_actions,
)
from marl.cli import main
from marl.core.errors import ConfigError
from marl.training import TrainRequest, load_checkpoint, train

SCENARIO = "traffic/single-intersection"
SHORT = {"end": "320"}  # 64 decisions of 5 s per episode
# One iteration = one episode, a checkpoint after each, learning from step 32 on.
FAST = {
    "num_steps": "64",
    "learning_starts": "32",
    "batch_size": "8",
    "target_update_every": "50",
    "eval_every": "0",
    "checkpoint_every": "1",
    "keep_checkpoints": "5",
}


def _request(tmp_path: Path, name: str, steps: int, algo_set: dict | None = None, **kw) -> TrainRequest:
    return TrainRequest(
        scenario=SCENARIO,
        algo="idqn",
        steps=steps,
        overrides=dict(SHORT),
        algo_overrides={**FAST, **(algo_set or {})},
        eval_episodes=0,
        out=str(tmp_path / name),
        **kw,
    )


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


# ---- pure logic ------------------------------------------------------------------------------------
def test_nstep_returns_bootstrap_at_truncation_not_at_termination():
    gamma = 0.5
    nstep = NStepAssembler(2, gamma)
    obs = [np.full((1, 1), float(t), np.float32) for t in range(5)]
    mask = np.ones((1, 2), bool)
    assert nstep.push(obs[0], np.array([0]), np.array([1.0]), obs[1], mask) == []
    (t0,) = nstep.push(obs[1], np.array([1]), np.array([2.0]), obs[2], mask)
    assert t0.reward[0] == 1.0 + gamma * 2.0 and t0.discount[0] == gamma**2 and t0.next_obs[0, 0] == 2.0
    # the episode ends after step 2: both pending steps flush onto the final state
    ends = nstep.end(obs[2], np.array([0]), np.array([4.0]), obs[3], mask, terminal=np.array([False]))
    assert [t.reward[0] for t in ends] == [2.0 + gamma * 4.0, 4.0]
    assert [t.discount[0] for t in ends] == [gamma**2, gamma]  # truncation: still bootstrap
    assert all(t.next_obs[0, 0] == 3.0 for t in ends)
    (term,) = nstep.end(obs[3], np.array([0]), np.array([1.0]), obs[4], mask, terminal=np.array([True]))
    assert term.discount[0] == 0.0 and nstep.obs == []


def _filled_buffer() -> ReplayBuffer:
    buf = ReplayBuffer(capacity=50, n_agents=2, obs_dim=3, n_actions=4)
    for i in range(70):  # wraps: the oldest 20 are overwritten
        buf.add(
            Transition(
                np.full((2, 3), i, np.float32),
                np.array([i % 4, 0]),
                np.array([float(i), 0.0]),
                np.zeros((2, 3), np.float32),
                np.ones((2, 4), bool),
                np.ones(2),
            )
        )
    return buf


def test_replay_sampling_is_deterministic_under_a_seed():
    buf = _filled_buffer()
    assert buf.size == 50 and buf.pos == 20 and buf.reward[:, 0].min() == 20.0  # ring kept the newest
    a = buf.sample(16, np.random.default_rng(7))
    b = buf.sample(16, np.random.default_rng(7))
    c = buf.sample(16, np.random.default_rng(8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["reward"], c["reward"])
    copy = ReplayBuffer(50, 2, 3, 4)
    copy.load_state_dict(buf.state_dict())
    assert torch.equal(copy.sample(16, np.random.default_rng(7))["obs"], a["obs"])


def test_masks_never_let_an_invalid_action_through():
    rng = np.random.default_rng(0)
    mask = np.array([[True, False, True, False], [False, False, False, True]])
    q = np.array([[0.0, 9.0, 1.0, 9.0], [5.0, 5.0, 5.0, -3.0]])  # invalid actions look best
    for eps in (0.0, 0.5, 1.0):
        picks = np.stack([select_actions(q, mask, eps, rng) for _ in range(300)])
        assert mask[np.arange(2), picks].all()
    picks = np.stack([select_actions(q, mask, 1.0, rng) for _ in range(300)])
    assert set(picks[:, 0]) == {0, 2}  # exploration covers every valid action
    assert list(select_actions(q, mask, 0.0, rng)) == [2, 3]
    # the network's greedy policy and the bootstrap's argmax respect the mask too
    net = QNetwork(2, 3, 4)
    qt = torch.tensor(q, dtype=torch.float32)[None]
    assert masked_argmax(qt, torch.from_numpy(mask)[None]).tolist() == [[2, 3]]
    dist, _ = net.actor(torch.zeros(1, 2, 3), None, torch.from_numpy(mask)[None])
    assert mask[np.arange(2), dist.logits.argmax(-1)[0].numpy()].all()


def test_epsilon_decays_linearly_then_stays():
    cfg = IDQNConfig(epsilon_start=1.0, epsilon_end=0.1, exploration_fraction=0.5)
    assert [round(epsilon_at(s, 1000, cfg), 6) for s in (0, 250, 500, 900)] == [1.0, 0.55, 0.1, 0.1]


def test_update_moves_towards_the_double_dqn_target_and_leaves_the_target_net():
    torch.manual_seed(0)
    cfg = IDQNConfig(learning_rate=1e-2)
    model, target = QNetwork(2, 3, 4), QNetwork(2, 3, 4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    batch = {
        "obs": torch.rand(8, 2, 3),
        "action": torch.randint(0, 4, (8, 2)),
        "reward": torch.ones(8, 2),
        "next_obs": torch.rand(8, 2, 3),
        "next_mask": torch.ones(8, 2, 4, dtype=torch.bool),
        "discount": torch.zeros(8, 2),
    }  # terminal: the target is exactly the reward, 1
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    losses = [dqn_update(model, target, opt, batch, cfg)["loss"] for _ in range(60)]
    assert losses[-1] < 0.1 * losses[0]
    assert _same(before, target.state_dict())


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("n_step", "0", "bad n_step=0"),
        ("batch_size", "20000", "bad batch_size=20000"),
        ("epsilon_end", "1.5", "bad epsilon_end=1.5"),
        ("buffer_size", "1e9", "bad buffer_size"),
    ],
)
def test_config_refuses_bad_values(key, value, message):
    from marl.training import algorithm_config

    with pytest.raises(ConfigError, match=message):
        algorithm_config("idqn", {key: value})


# ---- the loop on SUMO --------------------------------------------------------------------------------
def test_resume_is_bit_exact_with_the_replay_buffer(tmp_path):
    # Epsilon decays over --steps, which differs between the interrupted run (96) and the
    # straight one (160): a flat schedule makes them the same run.
    flat = {"epsilon_start": "0.3", "epsilon_end": "0.3"}
    straight = train(_request(tmp_path, "a", 160, flat))  # iterations of 64, 64, 32 steps
    train(_request(tmp_path, "b", 96, {**flat, "num_steps": "96"}))  # stops mid-episode and mid n-step window
    resumed = train(_request(tmp_path, "c", 160, flat, resume=str(tmp_path / "b")))
    assert resumed.env_steps == straight.env_steps == 160
    a, c = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    for key in ("model", "target"):
        assert _same(a[key], c[key]), key
    assert _same(a["replay"], c["replay"]) and _same(a["optimizer"]["state"][0], c["optimizer"]["state"][0])
    assert a["rng"] == c["rng"] and a["grad_steps"] == c["grad_steps"] > 0
    other = train(_request(tmp_path, "d", 64, seed=1))
    assert not _same(load_checkpoint(other.checkpoint)["model"], load_checkpoint(tmp_path / "b")["model"])


def test_resume_without_replay_warns(tmp_path, capsys):
    train(_request(tmp_path, "a", 64, {"save_replay": "false"}))
    assert "replay" not in load_checkpoint(tmp_path / "a")
    train(_request(tmp_path, "b", 128, {"save_replay": "false"}, resume=str(tmp_path / "a")))
    assert "holds no replay buffer" in capsys.readouterr().err


def test_target_network_is_copied_every_target_update_every_steps(tmp_path):
    # 128 steps: with target_update_every=128 the final target is the final online net; with
    # 1000 it is still the initial network.
    copied = load_checkpoint(train(_request(tmp_path, "a", 128, {"target_update_every": "128"})).checkpoint)
    assert _same(copied["model"], copied["target"])
    frozen = load_checkpoint(train(_request(tmp_path, "b", 128, {"target_update_every": "1000"})).checkpoint)
    assert not _same(frozen["model"], frozen["target"])
    first = load_checkpoint(tmp_path / "b" / "checkpoints" / "update-000001.pt")
    assert _same(first["target"], frozen["target"])


def test_short_training_improves_on_the_untrained_network(tmp_path):
    overrides = {"end": "400"}  # 80 decisions per episode
    algo_set = {"num_steps": "80", "learning_starts": "80", "target_update_every": "80", "eval_every": "0"}
    untrained = train(
        TrainRequest(
            scenario=SCENARIO,
            algo="idqn",
            steps=1,
            overrides=overrides,
            algo_overrides=algo_set,
            eval_episodes=4,
            out=str(tmp_path / "u"),
        )
    )
    trained = train(
        TrainRequest(
            scenario=SCENARIO,
            algo="idqn",
            steps=1600,
            overrides=overrides,
            algo_overrides=algo_set,
            eval_episodes=4,
            out=str(tmp_path / "t"),
        )
    )
    before, after = untrained.final_kpis["delay"], trained.final_kpis["delay"]
    print(f"greedy untrained delay {before:.2f} s, trained {after:.2f} s")
    assert after < 0.7 * before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--algo-set", "n_step=0"], "bad n_step=0"),
        (["--algo-set", "epsilon_star=1"], "did you mean 'epsilon_start'?"),
        (["--algo-set", "clip_coef=0.1"], "clip_coef"),
        (["--protocol", "tarmac"], "bad --protocol tarmac with --algo idqn"),
        (["--ranks", "2"], "bad --ranks 2 with --algo idqn"),
    ],
)
def test_cli_errors_for_bad_algorithm_options(args, message, capsys):
    assert main(["train", SCENARIO, "--algo", "idqn", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_policy_cli_roundtrip_with_messages(tmp_path):
    out = tmp_path / "cli"
    assert (
        main(
            [
                "train",
                "traffic/2x2grid",
                "--algo",
                "idqn",
                "--protocol",
                "neighbours",
                "--steps",
                "64",
                "--set",
                "end=320",
                "--algo-set",
                "num_steps=64",
                "--algo-set",
                "learning_starts=16",
                "--eval-episodes",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (
        main(["run", "traffic/2x2grid", "--policy", str(out), "--set", "end=320", "--out", str(tmp_path / "run")]) == 0
    )
    rows = [r.split(",") for r in (out / "records.csv").read_text().splitlines()[1:]]
    run_rows = [r.split(",") for r in (tmp_path / "run" / "records.csv").read_text().splitlines()[1:]]
    assert [r[-1] for r in rows if r[7] == "delay"] == [r[-1] for r in run_rows if r[7] == "delay"]
    assert any(r[2] == "idqn" and r[3] == "neighbours" for r in rows)
