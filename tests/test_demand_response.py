"""grid/demand-response: battery and feeder physics, held-out days, the baselines, the CLI.

One env (SimBench 1-LV-semiurb4, 41 households, lightsim2grid) is built per module; the
conformance kit runs on the scenario through tests/test_conformance.py.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from comms.runtime import build_comms
from marl.cli import main
from marl.core import registry
from marl.core.errors import ConfigError
from marl.episodes import run_episode
from marl.runner import build_controller
from scenarios.grid.dr_controllers import peak_target
from scenarios.grid.env import HOURS_PER_STEP

SCENARIO = "grid/demand-response"
WINTER_EVAL_DAY = 339  # 5 December: a held-out day with a clear evening peak


@pytest.fixture(scope="module")
def env() -> Iterator[Any]:
    made = registry.make_scenario(SCENARIO, {"split": "eval"})
    yield made
    made.close()


def _play(env: Any, name: str, day: int, protocol: str = "none", channel: str = "", **options: Any) -> dict:
    env.config.day = day
    controller = build_controller(SCENARIO, name, env, options or None)
    comms = None
    if protocol != "none":
        comms = build_comms(protocol, channel, list(env.possible_agents), controller.payload_size, seed=0)
    try:
        return run_episode(env, controller, comms, seed=0)
    finally:
        env.config.day = -1


def test_idle_feeder_import_is_the_households_net_load_plus_losses(env: Any) -> None:
    env.reset(seed=1, options={"day": WINTER_EVAL_DAY})
    idle = {a: np.zeros(1, np.float32) for a in env.possible_agents}
    for _ in range(20):
        load, pv = env.interval_kw()
        env.step(idle)
        gap = env.import_kw - float((load - pv).sum())
        # the slack supplies the households and the feeder's losses (a few %), nothing else
        assert 0.0 < gap < 0.1 * abs(env.import_kw) + 1.0, gap


def test_battery_energy_efficiency_and_limits(env: Any) -> None:
    c = env.config
    env.reset(seed=2, options={"day": 4})
    full = {a: np.ones(1, np.float32) for a in env.possible_agents}
    before = env.energy.copy()
    env.step(full)
    gained = env.energy - before
    np.testing.assert_allclose(gained, c.efficiency * c.battery_kw * HOURS_PER_STEP)
    for _ in range(20):  # far more than it takes to fill: energy stops at the capacity
        env.step(full)
    np.testing.assert_allclose(env.energy, c.battery_kwh)
    empty = {a: -np.ones(1, np.float32) for a in env.possible_agents}
    for _ in range(30):
        env.step(empty)
        assert env.energy.min() >= c.soc_min * c.battery_kwh - 1e-9
    assert np.all(env.battery > -c.battery_kw)  # the last discharge was limited by the energy left
    np.testing.assert_allclose(env.energy, c.soc_min * c.battery_kwh)


def test_held_out_days_and_bad_values() -> None:
    from scenarios.grid.demand_response import DRConfig

    with pytest.raises(ConfigError, match="pv_share"):
        DRConfig(pv_share=1.5)
    with pytest.raises(ConfigError, match="LV code"):
        DRConfig(feeder="1-MV-rural--0-sw")
    with pytest.raises(ConfigError, match="soc_init"):
        DRConfig(soc_init=0.05, soc_min=0.1)


def test_eval_split_plays_only_held_out_days(env: Any) -> None:
    assert set(env.days % env.config.holdout_every) == {env.config.holdout_every - 1}
    days = {env.reset(seed=s)[1]["house_0"]["day"] for s in range(8)}
    assert days <= set(env.days.tolist()) and len(days) > 1
    with pytest.raises(ConfigError, match="bad reset day"):
        env.reset(seed=0, options={"day": 3})


def test_peak_target_levels_a_two_level_profile() -> None:
    # 4 steps at 10 kW then 4 at 30 kW, lossless, ample power and room: the flat level is 20 kW
    loads = np.array([[10.0] * 4 + [30.0] * 4])
    fleet = (100.0, 0.0, 100.0, 50.0, 1.0)
    peak, valley = peak_target(loads, np.array([50.0]), fleet)
    assert abs(peak[0] - 20.0) < 0.2 and abs(valley[0] - 20.0) < 0.2
    # a battery that starts full and may end anywhere shaves deeper, without charging at all
    peak2, valley2 = peak_target(loads, np.array([100.0]), (100.0, 0.0, 100.0, 0.0, 1.0))
    assert peak2[0] < 8.0 and valley2[0] <= 10.0
    # weak batteries (5 kW) cannot do better than 30 - 5
    peak3, _ = peak_target(loads, np.array([50.0]), (5.0, 0.0, 100.0, 50.0, 1.0))
    assert abs(peak3[0] - 25.0) < 0.2


def test_baselines_rank_as_expected_on_a_held_out_day(env: Any) -> None:
    none = _play(env, "no-control", WINTER_EVAL_DAY)
    lp = _play(env, "lp-optimum", WINTER_EVAL_DAY)
    consensus = _play(env, "consensus", WINTER_EVAL_DAY, protocol="consensus", forecast="perfect")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alone = _play(env, "consensus", WINTER_EVAL_DAY, forecast="perfect")
    assert any("--protocol consensus" in str(w.message) for w in caught)
    assert none["throughput_kwh"] == 0.0 and none["soc_change_kwh"] == 0.0
    assert lp["soc_change_kwh"] > -1e-3  # the LP returns every battery at least as full
    cut_lp = none["peak_kw"] - lp["peak_kw"]
    cut_consensus = none["peak_kw"] - consensus["peak_kw"]
    assert cut_lp > 10.0
    assert lp["peak_kw"] <= consensus["peak_kw"] + 0.5  # the bound (its LP ignores losses: + a little)
    assert cut_consensus > 0.6 * cut_lp, (none["peak_kw"], lp["peak_kw"], consensus["peak_kw"])
    assert alone["peak_kw"] > consensus["peak_kw"]  # agreeing on the aggregate is what helps
    assert lp["ramping_kw"] < none["ramping_kw"]


def test_consensus_degrades_gracefully_with_loss(env: Any) -> None:
    none = _play(env, "no-control", WINTER_EVAL_DAY)
    lossy = _play(env, "consensus", WINTER_EVAL_DAY, protocol="consensus", channel="drop=0.3", forecast="perfect")
    assert 0.6 < lossy["delivery_rate"] < 0.8
    assert lossy["peak_kw"] < none["peak_kw"] - 5.0


def test_cli_run_consensus_over_a_lossy_channel(tmp_path: Any) -> None:
    out = tmp_path / "dr"
    args = ["run", SCENARIO, "--controller", "consensus", "--protocol", "consensus", "--channel", "drop=0.3"]
    args += ["--set", "horizon=12", "--out", str(out)]
    assert main(args) == 0
    rows = (out / "records.csv").read_text().splitlines()
    metrics = {r.split(",")[7] for r in rows[1:]}
    assert {"peak_kw", "cost_eur", "delivery_rate", "throughput_kwh"} <= metrics
    manifest = json.loads(next((out / "manifests").glob("*.json")).read_text())
    assert manifest["request"]["channel"] == "drop=0.3"


def test_bench_grid_compares_the_env_with_runpp(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from marl.bench.grid import command

    out = tmp_path / "bench.json"
    args = [SCENARIO, "--steps", "30", "--ref-steps", "4", "--rounds", "1", "--set", "pv_share=1", "--out", str(out)]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert figures["agents"] == 41 and figures["max_abs_dv_pu"] <= 1e-6  # batteries and PV reach both solvers alike
    assert figures["env_step_ratio"] > 1


def test_the_issue_command_talks_through_consensus_and_voltage_controllers_are_refused(tmp_path, capsys) -> None:
    # `marl run grid/demand-response --controller consensus --channel drop=0.3`: with no --protocol the
    # controller's own (consensus) carries its averaging rounds, so the lossy channel is really used.
    out = tmp_path / "dr"
    argv = ["run", "grid/demand-response", "--controller", "consensus", "--channel", "drop=0.3"]
    assert main([*argv, "--set", "horizon=8", "--out", str(out)]) == 0
    rows = (out / "records.csv").read_text().splitlines()[1:]
    assert {tuple(r.split(",")[2:5]) for r in rows} == {("consensus", "consensus", "drop=0.3")}
    delivered = [float(r.split(",")[-1]) for r in rows if r.split(",")[7] == "delivery_rate"]
    assert delivered and 0.5 < delivered[0] < 0.9  # messages went over the lossy channel
    capsys.readouterr()
    assert main(["run", "grid/demand-response", "--controller", "volt-var", "--out", str(tmp_path / "v")]) == 2
    assert "allowed: consensus, local-rule, lp-optimum, no-control" in capsys.readouterr().err
