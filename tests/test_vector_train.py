"""``marl train --envs K``: one rank rolls out K episodes at once (env 0 here, envs 1..K-1 in worker
processes). K=2 runs complete, record every key once and reproduce under a seed; each env plays its
own held-out episode stream; per-env reward scaling and GAE reduce to the one-env code for K=1
and never mix envs; IDQN with K=2 reproduces and keeps its gradient-step cadence in env steps;
a resumed K=2 run (PPO and IDQN) is bit-exact; bad K values and --resume with another K fail with
one line.

Real SUMO runs: traffic/single-intersection (1 agent), 64-step episodes (end=320, 5 s decisions).
Budget: ~25 s on a loaded 2-core machine.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from marl.algos.ppo import RewardScaler, compute_gae
from marl.cli import main
from marl.core import registry
from marl.core.seeding import episode_seed, periodic_eval_seed, train_env_episode_seed, train_episode_seed
from marl.training import TrainRequest, load_checkpoint, train
from marl.training.buffer import EnvRewardScaler, env_advantages

SCENARIO = "traffic/single-intersection"
SHORT = {"end": "320"}
# 32-step rollouts of 2 envs: 64 env steps per update, an episode of each env ends every 2 updates.
SMALL = {"num_steps": "32", "num_minibatches": "2", "update_epochs": "2", "eval_every": "0", "checkpoint_every": "1"}


def _request(out: Path, steps: int, **kw) -> TrainRequest:
    kw.setdefault("envs", 2)
    kw.setdefault("eval_episodes", 0)
    kw.setdefault("algo_overrides", dict(SMALL))
    return TrainRequest(scenario=SCENARIO, steps=steps, overrides=dict(SHORT), out=str(out), **kw)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


# ---------------------------------------------------------------------------------- pure logic
def test_env_seed_streams_are_distinct_held_out_and_env0_is_the_one_env_stream():
    assert [train_env_episode_seed(3, 1, 0, k) for k in range(5)] == [train_episode_seed(3, 1, k) for k in range(5)]
    train_seeds = [
        train_env_episode_seed(s, r, j, k) for s in range(3) for r in range(3) for j in range(4) for k in range(20)
    ]
    assert len(set(train_seeds)) == len(train_seeds)  # every (seed, rank, env, episode) its own episode
    held_out = {episode_seed(s, e) for s in range(3) for e in range(50)}
    held_out |= {periodic_eval_seed(s, u, e) for s in range(3) for u in range(10) for e in range(3)}
    assert held_out.isdisjoint(train_seeds)


def test_env_reward_scaling_and_gae_match_the_one_env_code_and_keep_envs_apart():
    rng = np.random.default_rng(0)
    t, n = 12, 3
    rewards, values, last = rng.normal(size=(t, 2, n)), rng.normal(size=(t, 2, n)), rng.normal(size=(2, n))
    ended = np.zeros((t, 2), bool)
    ended[4, 0] = ended[9, 1] = True  # the envs' episodes end at different steps
    # K=1 is the one-env arithmetic bit for bit
    one, mine = RewardScaler(n, 0.9), EnvRewardScaler(n, 0.9, 1)
    for _ in range(2):  # the running state carries over between rollouts
        assert np.array_equal(
            one.scale_rollout(rewards[:, 0], ended[:, 0]), mine.scale_rollout(rewards[:, :1], ended[:, :1])[:, 0]
        )
    assert np.array_equal(one.returns, mine.returns)
    adv1, ret1 = compute_gae(rewards[:, 0], values[:, 0], ended[:, 0], last[0], 0.9, 0.95)
    adv, ret = env_advantages(rewards[:, :1], values[:, :1], ended[:, :1], last[:1], 0.9, 0.95)
    assert np.array_equal(adv[:, 0], adv1) and np.array_equal(ret[:, 0], ret1)
    # K=2: each env is cut at its own episode end; changing env 1 leaves env 0 alone
    adv, _ = env_advantages(rewards, values, ended, last, 0.9, 0.95)
    for k in range(2):
        assert np.allclose(adv[:, k], compute_gae(rewards[:, k], values[:, k], ended[:, k], last[k], 0.9, 0.95)[0])
    changed = rewards.copy()
    changed[:, 1] += 5.0
    adv_changed, _ = env_advantages(changed, values, ended, last, 0.9, 0.95)
    assert np.array_equal(adv_changed[:, 0], adv[:, 0]) and not np.allclose(adv_changed[:, 1], adv[:, 1])
    # the scaler's running return is reset per env: env 0 restarts after step 4, env 1 does not
    scaler = EnvRewardScaler(n, 0.9, 2)
    scaler.scale_rollout(np.ones((5, 2, n)), ended[:5])
    assert np.all(scaler.returns.reshape(2, n)[0] == 0) and np.all(scaler.returns.reshape(2, n)[1] > 4)


@pytest.mark.parametrize("protocol", ["none", "ic3net"])
def test_one_env_batch_acts_exactly_as_the_unbatched_team(protocol):
    # --envs 1 feeds the policy [1, N, ...] arrays: same draws, same actions, values and gates
    from marl.training import algorithm_class, algorithm_config
    from marl.training.communication import Communication
    from marl.training.layout import TeamLayout
    from marl.training.model import act, build_model

    layout = TeamLayout(["a_0", "a_1", "a_2"], [5, 5, 5], "discrete", [3, 3, 3])
    comm = Communication(protocol, None, layout.agents, layout.obs_dim, 0)
    torch.manual_seed(0)
    model = build_model(algorithm_class("ippo"), algorithm_config("ippo"), layout, comm)
    obs = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    delivered = np.ones((3, 3), bool) if comm.learned else None
    mask = np.ones((3, 3), bool)
    outs = []
    for batched in (False, True):
        torch.manual_seed(7)
        args = (
            (obs, delivered, mask)
            if not batched
            else (obs[None], None if delivered is None else delivered[None], mask[None])
        )
        action, logprob, cout, value = act(model, *args, False, args[0])
        gate = None if cout is None or cout.gate is None else cout.gate.reshape(-1)
        outs.append((action.reshape(-1), logprob.reshape(-1), value.reshape(-1), gate))
    for one, many in zip(*outs):
        assert (one is None and many is None) or torch.equal(one, many)
    assert (outs[0][3] is not None) == (protocol == "ic3net")


# ------------------------------------------------------------------------------ real SUMO runs
def test_process_env_steps_exactly_as_the_env_in_this_process():
    from scenarios.vector import ProcessEnv

    remote = ProcessEnv(SCENARIO, SHORT, wanted=("topology",))
    local = registry.make_scenario(SCENARIO, SHORT)
    try:
        obs_r, _ = remote.reset(seed=5)
        obs_l, _ = local.reset(seed=5)
        assert all(np.array_equal(obs_r[a], obs_l[a]) for a in obs_l)
        assert remote.agents == list(local.agents) and sorted(remote.topology.nodes) == sorted(local.topology.nodes)
        steps = 0
        while local.agents:
            actions = dict.fromkeys(local.agents, steps % 2)
            remote.send("step", actions)  # split: the worker steps while this process steps its own env
            answer_l = local.step(actions)
            answer_r = remote.receive()
            assert all(np.array_equal(answer_r[0][a], answer_l[0][a]) for a in answer_l[0])
            assert answer_r[1] == answer_l[1]
            steps += 1
        assert remote.agents == [] and steps == 64
        assert remote.episode_kpis() == local.episode_kpis()
    finally:
        remote.close()
        local.close()


def test_two_envs_train_record_once_and_reproduce(tmp_path):
    a = train(_request(tmp_path / "a", 192, eval_episodes=1))  # 3 updates of 2 x 32 steps
    assert a.updates == 3 and a.env_steps == 192
    # update 2 ends one 64-step episode in each env; their seeds differ, so do their returns
    assert len(a.train_returns) == 2 and a.train_returns[0] != a.train_returns[1]
    rows = list(csv.DictReader((tmp_path / "a" / "records.csv").open()))
    keys = Counter(
        (r["scenario"], r["method"], r["protocol"], r["channel"], r["seed"], r["episode"], r["metric"]) for r in rows
    )
    assert keys and max(keys.values()) == 1
    steps = {int(r["episode"]): float(r["value"]) for r in rows if r["metric"] == "train_env_steps"}
    assert steps == {1: 64.0, 2: 128.0, 3: 192.0}  # K x num_steps env steps per update
    assert any(r["metric"] == "delay" and r["episode"] == "0" for r in rows)  # final evaluation on env 0
    manifest = json.loads(next((tmp_path / "a" / "manifests").glob("*.json")).read_text())
    assert manifest["request"]["envs"] == 2 and manifest["rollout_steps_per_second"] > 0
    assert load_checkpoint(a.checkpoint)["envs"] == 2
    b = train(_request(tmp_path / "b", 192))
    assert _same(load_checkpoint(a.checkpoint)["model"], load_checkpoint(b.checkpoint)["model"])
    assert a.train_returns == b.train_returns
    # another seed gives other parameters (so the check above can fail)
    c = train(_request(tmp_path / "c", 64, seed=1))
    assert not _same(
        load_checkpoint(c.checkpoint)["model"],
        load_checkpoint(tmp_path / "b" / "checkpoints" / "update-000001.pt")["model"],
    )


def test_idqn_with_two_envs_reproduces_and_counts_env_steps(tmp_path):
    sets = {"num_steps": "32", "learning_starts": "40", "batch_size": "16", "train_every": "3", "eval_every": "0"}
    runs = [
        train(_request(tmp_path / name, 128, algo="idqn", envs=envs, algo_overrides=sets))
        for name, envs in (("a", 2), ("b", 2), ("one", 1))
    ]
    a, b, one = (load_checkpoint(r.checkpoint) for r in runs)
    assert _same(a["model"], b["model"]) and runs[0].train_returns == runs[1].train_returns
    assert len(runs[0].train_returns) == 2  # one 64-step episode per env
    # a gradient step per train_every env steps after learning_starts, whatever K: (128 - 40) // 3
    assert a["grad_steps"] == one["grad_steps"] == 29
    assert not _same(a["model"], one["model"])  # the envs' extra episodes are learned from


@pytest.mark.parametrize(
    "args, message",
    [
        (["--envs", "0"], "bad --envs 0; expected an integer >= 1"),
        (["--envs", "100000"], "bad --envs 100000; allowed: 1.."),
        (["--envs", "100000", "--oversubscribe"], "bad --envs 100000; allowed: 1.."),
    ],
)
def test_bad_envs_fail_with_one_line(args, message, capsys):
    assert main(["train", SCENARIO, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_resume_with_two_envs_is_bit_exact(tmp_path):
    # 32-step rollouts of 64-step episodes: the checkpoint after update 1 is mid-episode in both envs
    straight = train(_request(tmp_path / "a", 192))
    train(_request(tmp_path / "b", 64))
    saved = load_checkpoint(tmp_path / "b")
    assert saved["episode"]["actions"].shape[0] == 32 and saved["env_episodes"][0]["actions"].shape[0] == 32
    resumed = train(_request(tmp_path / "b", 192, resume=str(tmp_path / "b")))
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert _same(a["model"], b["model"]) and _same(a["reward_scaler"], b["reward_scaler"])
    assert straight.train_returns == resumed.train_returns  # both envs' episodes span the resume


def test_idqn_resume_with_two_envs_is_bit_exact(tmp_path):
    # a flat epsilon: its schedule decays over --steps, which differs between the two runs
    sets = {"num_steps": "16", "learning_starts": "20", "batch_size": "8", "n_step": "3", "eval_every": "0"}
    sets |= {"epsilon_start": "0.3", "epsilon_end": "0.3"}
    straight = train(_request(tmp_path / "a", 96, algo="idqn", algo_overrides=sets))
    train(_request(tmp_path / "b", 32, algo="idqn", algo_overrides=sets))
    assert load_checkpoint(tmp_path / "b")["env_nsteps"][0]["obs"].shape[0] > 0  # env 1's pending n-step
    resumed = train(_request(tmp_path / "b", 96, algo="idqn", algo_overrides=sets, resume=str(tmp_path / "b")))
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert _same(a["model"], b["model"]) and a["grad_steps"] == b["grad_steps"] > 0


def test_resume_keeps_the_checkpoints_envs(tmp_path, capsys):
    base = ["train", SCENARIO, "--set", "end=320", "--algo-set", "num_steps=32", "--eval-episodes", "0"]
    assert main([*base, "--steps", "64", "--envs", "2", "--out", str(tmp_path / "two")]) == 0
    capsys.readouterr()
    for envs in ("3", "1"):  # a run keeps its number of envs
        assert main([*base, "--steps", "128", "--envs", envs, "--resume", str(tmp_path / "two")]) == 2
        err = capsys.readouterr().err.strip()
        assert f"cannot resume with --envs {envs}" in err and "(written with --envs 2)" in err
        assert "allowed: --envs 2" in err and len(err.splitlines()) == 1
    # without --envs, --resume continues with the checkpoint's K
    assert main([*base, "--steps", "128", "--resume", str(tmp_path / "two"), "--out", str(tmp_path / "two")]) == 0
    assert load_checkpoint(tmp_path / "two")["envs"] == 2 and load_checkpoint(tmp_path / "two")["env_steps"] == 128
