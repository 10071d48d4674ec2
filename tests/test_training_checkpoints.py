"""Checkpoints: old files still act the same, bad metadata is refused before anything is built,
and `marl run --policy` refuses a controller beside it.

Real SUMO runs on traffic/2x2grid (4 agents) with 64-step episodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from marl.cli import main
from marl.core.errors import CheckpointError
from marl.training import load_checkpoint
from marl.training.checkpoint import _shorten
from marl.training.layout import TeamLayout

FIXTURE = Path(__file__).parent / "fixtures" / "ckpt-ippo-2x2grid-v1"
SCENARIO = "traffic/2x2grid"


def _rows(out: Path) -> list[list[str]]:
    return [r.split(",") for r in (out / "records.csv").read_text().splitlines()[1:]]


def test_checkpoint_written_before_the_split_still_acts_the_same(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", SCENARIO, "--set", "end=320", "--policy", str(FIXTURE), "--out", str(out)]) == 0
    delay = [float(r[-1]) for r in _rows(out) if r[7] == "delay"]
    assert delay == [75.35320312500001]  # what the old code scored with this file (README.md)


def test_policy_runs_on_the_scenario_options_it_was_trained_with(tmp_path, capsys):
    # The fixture was trained with --set end=320; marl run --policy applies that by itself...
    out = tmp_path / "run"
    assert main(["run", SCENARIO, "--policy", str(FIXTURE), "--out", str(out)]) == 0
    assert [float(r[-1]) for r in _rows(out) if r[7] == "delay"] == [75.35320312500001]
    # ...and the run's own --set wins key by key.
    out = tmp_path / "longer"
    assert main(["run", SCENARIO, "--set", "end=400", "--policy", str(FIXTURE), "--out", str(out)]) == 0
    manifest = json.loads(next((out / "manifests").glob("*.json")).read_text())
    assert manifest["scenario_config"]["end"] == 400


def _copy_with(tmp_path: Path, edit) -> Path:
    """The fixture's checkpoint with its state edited by ``edit(state, meta)``."""
    state = torch.load(FIXTURE / "checkpoints" / "update-000002.pt", weights_only=True)
    meta = json.loads(state["meta"])
    edit(state, meta)
    state["meta"] = json.dumps(meta)
    target = tmp_path / "edited.pt"
    torch.save(state, target)
    return target


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s, m: m["algo_config"].update(hidden_size=200_000), "bad hidden_size=200000; allowed: 1..4096"),
        (lambda s, m: m["algo_config"].update(hidden_size=32), "metadata says hidden_size=32"),
        (lambda s, m: m["layout"].update(agents=[]), "0 agents"),
        (lambda s, m: m.pop("layout"), "lacks layout"),
    ],
)
def test_bad_metadata_is_refused_before_building(tmp_path, capsys, edit, message):
    path = _copy_with(tmp_path, edit)
    with pytest.raises(CheckpointError, match="checkpoint"):
        load_checkpoint(path)
    assert main(["run", SCENARIO, "--policy", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_controller_beside_policy_is_refused(tmp_path, capsys):
    code = main(
        ["run", SCENARIO, "--controller", "max-pressure", "--policy", str(FIXTURE), "--out", str(tmp_path / "r")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "--controller max-pressure with --policy" in err and len(err.splitlines()) == 1


def test_long_errors_are_cut_between_words():
    text = " ".join(f"word{i}" for i in range(60)) + "\nsecond line"
    short = _shorten(text)
    assert len(short) <= 120 and short.endswith(" ...")
    assert all(w.startswith("word") for w in short.removesuffix(" ...").split())  # no cut word
    assert short.split()[-2] in text.split()


def test_layout_accepts_simulator_ids_of_old_checkpoints():
    env_layout = TeamLayout(agents=["tls_0", "tls_1"], obs_sizes=[3, 3], kind="discrete", action_sizes=[2, 2])
    old = TeamLayout(agents=["A0", "B7"], obs_sizes=[3, 3], kind="discrete", action_sizes=[2, 2])
    assert env_layout.fits(old, {"tls_0": "A0", "tls_1": "B7"})
    assert not env_layout.fits(old, None)
    assert not env_layout.fits(old, {"tls_0": "B7", "tls_1": "A0"})  # same ids, other order
    wider = TeamLayout(agents=["tls_0", "tls_1"], obs_sizes=[4, 3], kind="discrete", action_sizes=[2, 2])
    assert not wider.fits(TeamLayout(**env_layout.to_meta()))


def test_a_sampling_policy_plays_the_same_episode_for_the_same_seed():
    # warehouse-style presets evaluate with sampled actions; the samples come from a generator
    # seeded per episode, so marl run --policy repeats itself (it drew from torch's global one).
    from marl.core import registry
    from marl.episodes import run_episode
    from marl.training.policy import policy_from_checkpoint

    env = registry.make_scenario(SCENARIO, {"end": "200"})
    try:
        policy = policy_from_checkpoint(load_checkpoint(FIXTURE), env, SCENARIO)
        policy.deterministic = False
        first = run_episode(env, policy, None, seed=5)
        torch.rand(7)  # the global generator moves on; the policy's samples must not
        assert run_episode(env, policy, None, seed=5) == first
    finally:
        env.close()


def test_continuous_actions_reach_the_env_inside_their_box():
    # A Gaussian policy with a huge spread (std e^2 = 7.4) samples far outside [-1, 1]; what the
    # grid env receives must still lie in its action box.
    from marl.core import registry
    from marl.episodes import run_episode
    from marl.training import algorithm_config
    from marl.training.communication import Communication
    from marl.training.model import build_model
    from marl.training.policy import PolicyController
    from marl.training.request import algorithm_class

    env = registry.make_scenario("grid/ieee33", test=True)
    config = algorithm_config("ippo", {"init_logstd": 2.0})
    layout = TeamLayout.of(env, "grid/ieee33", need_state=False)
    comm = Communication("none", None, layout.agents, layout.obs_dim, 0, hidden_size=config.hidden_size)
    policy = PolicyController(build_model(algorithm_class("ippo"), config, layout, comm), layout, comm, "ippo", False)
    sent: list = []
    step = env.step
    env.step = lambda actions: (sent.append(actions), step(actions))[1]
    run_episode(env, policy, None, seed=0)
    box = env.action_space(env.possible_agents[0])
    values = np.concatenate([a for actions in sent for a in actions.values()])
    assert len(sent) == 8 and np.abs(values).max() == 1.0  # clipped: the spread reached the edges
    assert all(box.contains(a) for actions in sent for a in actions.values())
