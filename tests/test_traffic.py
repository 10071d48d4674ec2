"""Traffic scenarios on real SUMO (libsumo): masks, controllers, one-sim rule, KPIs, topology.

The registry-wide API/determinism/CLI checks live in test_conformance.py; these tests cover what
is specific to the SUMO envs. Episodes are shortened with ``end`` (a few hundred simulated s).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from marl.core import registry
from marl.core.errors import ConcordError, ConfigError, SimulatorError
from marl.runner import build_controller, run_episode
from scenarios.traffic.controllers import phase_pressure
from scenarios.traffic.env import TrafficSignalEnv, parse_tripinfo, sumo_command
from scenarios.traffic.nets import Signal, import_sumo, resolve_path


def make(scenario: str, **overrides: object) -> TrafficSignalEnv:
    return registry.make_scenario(scenario, dict(overrides))


def run_all(env: TrafficSignalEnv, seed: int, action: int | None = None) -> dict[str, float]:
    env.reset(seed=seed)
    while env.agents:
        env.step({} if action is None else dict.fromkeys(env.agents, action))
    return env.episode_kpis()


def test_heterogeneous_map_pads_and_masks() -> None:
    env = make("traffic/cologne3", end=25200 + 120)
    try:
        obs, infos = env.reset(seed=0)
        n_phases = {a: env.signals[a].n_phases for a in env.possible_agents}
        assert len(set(n_phases.values())) > 1, "cologne3's lights differ in phase count"
        P = max(n_phases.values())
        for agent in env.possible_agents:
            assert env.action_space(agent).n == P
            mask = infos[agent]["action_mask"]
            assert mask.dtype == np.int8 and mask.sum() == n_phases[agent] and mask[: n_phases[agent]].all()
            assert obs[agent].shape == env.observation_space(agent).shape
            # padding of the lane blocks is zero for lights with fewer lanes
            n_lanes = len(env.signals[agent].in_lanes)
            L = env.n_max_lanes
            assert not obs[agent][P + 1 + n_lanes : P + 1 + L].any()
        small = min(n_phases, key=n_phases.get)
        seen: dict[str, set[int]] = {a: set() for a in env.possible_agents}
        while env.agents:
            before = env.current_phase(small)
            # a masked (padding) action keeps the phase; the others cycle through their phases
            actions = {a: (env.current_phase(a) + 1) % n_phases[a] for a in env.agents}
            actions[small] = P - 1
            obs, _, _, _, infos = env.step(actions)
            assert env.current_phase(small) == before
            for agent in env.possible_agents:
                seen[agent].add(env.current_phase(agent))
            for agent in obs:
                assert env.observation_space(agent).contains(obs[agent])
                assert infos[agent]["action_mask"].sum() == n_phases[agent]
        for agent in env.possible_agents:
            expected = {0} if agent == small else set(range(n_phases[agent]))
            assert seen[agent] == expected, "allowed actions change phases, masked ones do not"
    finally:
        env.close()


def test_max_pressure_beats_random_on_grid4x4() -> None:
    # Verified over seeds 0-4 at end=600: max-pressure 15-20 s of delay, random 73-82 s.
    env = make("traffic/grid4x4", end=600)
    try:
        delays = {}
        for name in ("random", "max-pressure"):
            controller = build_controller("traffic/grid4x4", name, env)
            delays[name] = [run_episode(env, controller, seed=s)["delay"] for s in (0, 1)]
        for mp, rnd in zip(delays["max-pressure"], delays["random"]):
            assert mp < 0.6 * rnd, delays
    finally:
        env.close()


def test_second_live_env_raises_and_closing_frees_the_slot() -> None:
    first = make("traffic/single-intersection", end=30)
    second = make("traffic/single-intersection", end=30)
    try:
        first.reset(seed=0)
        with pytest.raises(SimulatorError, match="one simulation per process"):
            second.reset(seed=0)
        first.step({})  # the first simulation is unharmed
        first.close()
        obs, _ = second.reset(seed=0)  # after close, a new one may start
        assert set(obs) == set(second.possible_agents)
    finally:
        first.close()
        second.close()


def test_kpis_are_sane_and_from_tripinfo() -> None:
    env = make("traffic/grid4x4", end=600)
    try:
        kpis = run_all(env, seed=0)
        folder = env._tmp  # the env's own output folder, made by reset()
        assert folder is not None and not list(folder.glob("*")), "tripinfo files are deleted"
    finally:
        env.close()
    assert kpis["delay"] > 0 and kpis["waiting_time"] >= 0
    assert 0 < kpis["throughput"] <= kpis["trips"]
    assert kpis["queue"] >= 0 and kpis["teleports"] >= 0
    assert kpis["delay"] >= kpis["waiting_time"], "waiting is part of time loss"
    assert folder is not None and not folder.exists(), "close() removes the output folder"


def test_parse_tripinfo_charges_undeparted_vehicles(tmp_path: Path) -> None:
    path = tmp_path / "t.xml"
    path.write_text(
        "<tripinfos>"
        '<tripinfo id="a" depart="1" departDelay="2" arrival="50" timeLoss="10" waitingTime="4"/>'
        '<tripinfo id="b" depart="5" departDelay="0" arrival="-1.00" timeLoss="6" waitingTime="2"/>'
        '<tripinfo id="c" depart="-1" departDelay="30" arrival="-1.00" timeLoss="0" waitingTime="0"/>'
        "</tripinfos>"
    )
    kpis = parse_tripinfo(path)
    assert kpis["delay"] == pytest.approx((12 + 6 + 30) / 3)
    assert kpis["waiting_time"] == pytest.approx(2.0)
    assert kpis["throughput"] == 1 and kpis["trips"] == 3


def test_topology_edges_are_roads_with_distance() -> None:
    env = make("traffic/grid4x4")
    graph = env.topology
    env.close()
    assert set(graph.nodes) == set(env.possible_agents)
    assert graph.number_of_edges() == 24, "a 4x4 lattice has 24 neighbour pairs"
    for a, b, data in graph.edges(data=True):
        sa, sb = env.signals[a], env.signals[b]
        shared = (set(sa.out_lanes) & set(sb.in_lanes)) | (set(sb.out_lanes) & set(sa.in_lanes))
        assert shared, f"{a}-{b} must be joined by a lane"
        lengths = [sa.lane_length.get(l, sb.lane_length.get(l)) for l in shared]
        assert data["distance"] == pytest.approx(min(lengths))
    # on a real map, lights joined through unsignalised junctions are neighbours too
    real = make("traffic/cologne8").topology
    assert real.number_of_edges() >= 7 and all(d["distance"] > 0 for *_, d in real.edges(data=True))


def test_fixed_time_env_equals_raw_sumo() -> None:
    begin, end = 25200, 25200 + 300
    env = make("traffic/cologne3", end=end)
    controller = build_controller("traffic/cologne3", "fixed-time", env)
    try:
        kpis = run_episode(env, controller, seed=4)
    finally:
        env.close()
    libsumo = import_sumo(True)
    with tempfile.TemporaryDirectory() as tmp:
        tripinfo, stats = Path(tmp) / "t.xml", Path(tmp) / "s.xml"
        net = resolve_path(env.config.net_file, "net")
        route = resolve_path(env.config.route_file, "route")
        libsumo.start(sumo_command(net, route, begin, end, 4, tripinfo=tripinfo, statistics=stats))
        for _ in range(end - begin):
            libsumo.simulationStep()
        libsumo.close()
        raw = parse_tripinfo(tripinfo, stats)
    assert raw["trips"] > 0
    for key, value in raw.items():
        assert kpis[key] == value, (key, kpis[key], value)


def test_seeds_change_sumo_randomness() -> None:
    env = make("traffic/grid4x4", end=600, control="program")
    try:
        a, b, a_again = run_all(env, 0), run_all(env, 1), run_all(env, 0)
    finally:
        env.close()
    assert a == a_again
    assert a["delay"] != b["delay"]


def test_sumo_is_quiet_unless_verbose(capfd: pytest.CaptureFixture[str]) -> None:
    env = make("traffic/single-intersection", end=30)
    try:
        run_all(env, 0)
    finally:
        env.close()
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    loud = make("traffic/single-intersection", end=30, verbose=True)
    try:
        run_all(loud, 0)
    finally:
        loud.close()
    out, _ = capfd.readouterr()
    assert "Loading net-file" in out


def test_traci_mode_matches_libsumo() -> None:
    kpis = {}
    for use_libsumo in (True, False):
        env = make("traffic/single-intersection", end=60, use_libsumo=use_libsumo)
        try:
            kpis[use_libsumo] = run_all(env, 2, action=1)
        finally:
            env.close()
    assert kpis[True] == kpis[False]


def test_bad_config_and_missing_sumo_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="end"):
        make("traffic/grid4x4", end=-5)
    with pytest.raises(ConfigError, match=r"nope\.net\.xml"):
        make("traffic/grid4x4", net_file="nope.net.xml")
    with pytest.raises(ConcordError, match="did you mean 'delta_time'"):
        make("traffic/grid4x4", delta_tim=5)

    import importlib

    real = importlib.import_module

    def no_libsumo(name: str, *args: object) -> object:
        if name == "libsumo":
            raise ImportError("No module named 'libsumo'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_libsumo)
    with pytest.raises(SimulatorError, match="pip install eclipse-sumo libsumo") as info:
        import_sumo(True)
    assert "\n" not in str(info.value)


def test_phase_pressure_arithmetic() -> None:
    # two phases over three links: in lanes a, b; out lanes x, y
    signal = Signal(
        id="t",
        phases=["GGr", "rrG"],
        program=[("GGr", 30.0), ("rrG", 30.0)],
        links=[("a", "x"), ("a", "y"), ("b", "x")],
        in_lanes=["a", "b"],
        out_lanes=["x", "y"],
        link_in=np.array([0, 0, 1]),
        link_out=np.array([0, 1, 0]),
        phase_links=np.array([[True, True, False], [False, False, True]]),
        lane_length={},
    )
    pressure = phase_pressure(signal, np.array([5.0, 2.0]), np.array([1.0, 3.0]))
    np.testing.assert_allclose(pressure, [(5 - 1) + (5 - 3), 2 - 1])
    # a coordinated controller substitutes downstream queues from messages
    np.testing.assert_allclose(phase_pressure(signal, [5, 2], [0, 0]), [10, 2])


def test_bench_command_runs(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from marl.bench.traffic import command

    result = CliRunner().invoke(command, ["traffic/2x2grid", "--horizon", "120", "--repeat", "1", "--skip-sumo-rl"])
    assert result.exit_code == 0, result.output
    # the env drives exactly the traffic of bare libsumo, with the programme and with agents
    output = " ".join(result.output.split())
    assert "identical traffic, fixed-time (tripinfo KPIs env == raw): yes" in output
    assert "identical traffic, random phases (tripinfo KPIs env == raw): yes" in output


def test_bench_later_times_each_backend_and_checks_reproducibility() -> None:
    from click.testing import CliRunner

    from marl.bench.traffic import command

    result = CliRunner().invoke(command, ["traffic/2x2grid", "--horizon", "120", "--later", "3"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    for backend in ("libsumo in-process", "forked libsumo", "fresh sumo over TraCI"):
        assert backend in output
    # the default backend's later episodes are fresh processes' (TraCI's) traffic
    assert "delays equal a fresh sumo's in every episode, default: later ones in forked libsumo: yes" in output
    bad = CliRunner().invoke(command, ["traffic/2x2grid", "--later", "1"])
    assert "bad --later 1; expected an integer from 3 to 100" in str(bad.exception)


def _finish(env: TrafficSignalEnv) -> dict[str, float]:
    while env.agents:
        env.step({})  # agent mode: keep the current phase
    return env.episode_kpis()


def test_set_control_picks_the_mode_of_the_current_episode_only() -> None:
    program = make("traffic/grid4x4", end=300, control="program")
    try:
        plain = run_all(program, seed=0)  # the net's programme from the config
        program.reset(seed=0)
        program.set_control("agents")  # ... and the other way round, for one episode
        held_from_program = _finish(program)
        program.reset(seed=0)
        assert program.control == "program", "reset returns to config.control"
    finally:
        program.close()
    env = make("traffic/grid4x4", end=300)
    try:
        env.reset(seed=0)
        env.set_control("program")
        assert env.control == "program"
        assert _finish(env) == plain  # exactly the plain programme run
        env.reset(seed=0)
        assert env.control == "agents"
        held = _finish(env)
        assert held == held_from_program and held != plain
        env.reset(seed=0)
        env.step({})
        with pytest.raises(SimulatorError, match="before the first step"):
            env.set_control("program")
        with pytest.raises(ConcordError, match="did you mean 'program'"):
            env.set_control("programme")
    finally:
        env.close()


def _phases_per_decision(env: TrafficSignalEnv, controller: Any = None) -> list[dict[str, int]]:
    """The green phase of every light at every decision of one episode (seed 0)."""
    shown = []
    while env.agents:
        shown.append({a: env.current_phase(a) for a in env.agents})
        env.step(controller.act({}, env) if controller else {})
    return shown


def test_program_replay_follows_the_programme_sumo_runs() -> None:
    """``fixed-time-actions`` is a guide only if it shows what SUMO's programme would show.
    ingolstadt21: 21 programmes of 3-4 greens, yellows of 3 and 5 s, 65-90 s cycles."""
    env = make("traffic/ingolstadt21", end=57600 + 400)
    try:
        env.reset(seed=0)
        env.set_control("program")
        t0 = env.sim_time
        for _ in range(30):
            env.step({})
            for agent in env.agents:
                sig = env.signals[agent]
                # SUMO runs a switch due at t in the step that follows t, so after stepping to t
                # (1 s steps) the light still shows the phase of t - 1.
                expected = sig.program_to_green[sig.program_index_at(env.sim_time - 1)]
                assert env.current_phase(agent) == expected, (agent, env.sim_time)
        assert env.sim_time == t0 + 300
        env.reset(seed=0)
        env.set_control("program")
        programme = _phases_per_decision(env)
        env.reset(seed=0)
        replayed = _phases_per_decision(env, build_controller("traffic/ingolstadt21", "fixed-time-actions", env))
        env.reset(seed=0)
        held = _phases_per_decision(env)  # agents mode, no actions: every light keeps phase 0
    finally:
        env.close()

    def agreement(shown: list[dict[str, int]]) -> float:
        same = [p[a] == q[a] for p, q in zip(programme, shown, strict=True) for a in p]
        return sum(same) / len(same)

    # Changes land on decision boundaries (10 s), so a few decisions differ (0.954 measured).
    assert agreement(replayed) >= 0.9
    assert agreement(held) < 0.6


def test_phase_clock_appends_the_seconds_in_phase() -> None:
    """``phase_clock=true`` adds one value, seconds in phase / 120, and changes nothing else."""
    plain, clocked = make("traffic/grid4x4", end=200), make("traffic/grid4x4", end=200, phase_clock=True)
    try:
        a = plain.possible_agents[0]
        assert clocked.observation_space(a).shape[0] == plain.observation_space(a).shape[0] + 1
        obs_p, _ = plain.reset(seed=0)
        seen = [obs_p[a]]
        for phase in (0, 0, 1, 1, 1, 0):
            obs_p, *_ = plain.step(dict.fromkeys(plain.agents, phase))
            seen.append(obs_p[a])
        plain.close()  # libsumo runs one simulation per process
        obs_c, _ = clocked.reset(seed=0)
        clocks = [obs_c[a][-1]]
        for k, phase in enumerate((0, 0, 1, 1, 1, 0)):
            assert np.array_equal(obs_c[a][:-1], seen[k])
            obs_c, *_ = clocked.step(dict.fromkeys(clocked.agents, phase))
            clocks.append(obs_c[a][-1])
    finally:
        plain.close()
        clocked.close()
    d, y, g = 10, 3, 5  # RESCO: 10 s decisions, 3 s yellow, 5 s min green; a light starts as if it had
    # just passed min green (yellow + min green seconds in phase)
    expected = np.array([y + g, y + g + d, y + g + 2 * d, d, 2 * d, 3 * d, d]) / 120
    assert np.allclose(clocks, expected)


def test_sumo_load_errors_name_the_rejected_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.rou.xml"
    bad.write_text("not a route file\n")
    env = make("traffic/grid4x4", end=60, route_file=str(bad))
    try:
        with pytest.raises(ConfigError, match="bad route_file") as info:
            env.reset(seed=0)
    finally:
        env.close()
    message = str(info.value)
    assert str(bad) in message and "invalid document structure" in message
    assert "install" not in message and "\n" not in message
    # routes of another net: SUMO names no file, so both are named, still no install hint
    other = make("traffic/grid4x4", end=60, route_file="RESCO/cologne1/cologne1.rou.xml")
    try:
        with pytest.raises(SimulatorError, match="is not known") as info:
            other.reset(seed=0)
    finally:
        other.close()
    assert "cologne1.rou.xml" in str(info.value) and "install" not in str(info.value)


def test_bench_rejects_other_domains() -> None:
    from click.testing import CliRunner

    from marl.bench.traffic import command
    from marl.core.errors import UnknownNameError

    result = CliRunner().invoke(command, ["grid/ieee33"])
    assert isinstance(result.exception, UnknownNameError)
    assert "unknown traffic scenario 'grid/ieee33'" in str(result.exception)
    assert "traffic/grid4x4" in str(result.exception)


def test_agents_are_light_ids_with_sumo_ids_kept() -> None:
    env = make("traffic/grid4x4", end=60)
    try:
        assert env.possible_agents == [f"light_{i}" for i in range(16)]
        sumo = list(env.sim_ids.values())
        assert sumo == sorted(sumo) and sumo[0] == "A0", "SUMO ids in their sorted order"
        assert env.group_map == {"light": env.possible_agents}
        assert all(env.signals[a].id == env.sim_ids[a] for a in env.possible_agents)
        assert set(env.topology.nodes) == set(env.possible_agents)
    finally:
        env.close()


@pytest.mark.parametrize(("key", "value"), [("begin", -100), ("neighbour_max_m", -1)])
def test_negative_times_and_distances_are_refused(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"bad {key} {value}"):
        make("traffic/grid4x4", **{key: value})


def test_copies_get_their_own_folder_and_label_at_start() -> None:
    import pickle

    env = make("traffic/single-intersection", end=60)
    assert env._tmp is None, "nothing is created at construction"
    try:
        env.reset(seed=1)
        copy = pickle.loads(pickle.dumps(env))
        assert copy._tmp is None and copy._sim is None and copy.agents == []
        first = (env._tmp, env._traci_label)
        kpis = run_all(env, seed=1)
        env.close()
        assert run_all(copy, seed=1) == kpis, "the copy runs the same episode"
        assert copy._tmp not in (None, first[0]) and copy._traci_label != first[1]
    finally:
        env.close()
        copy.close()


def test_traci_copies_run_side_by_side_in_one_process() -> None:
    """With use_libsumo=false two copies are live at once (each its own sumo and label)."""
    a = make("traffic/single-intersection", end=60, use_libsumo=False)
    b = make("traffic/single-intersection", end=60, use_libsumo=False)
    try:
        a.reset(seed=2)
        b.reset(seed=2)
        while a.agents:
            a.step({})
            b.step({})
        assert a.episode_kpis() == b.episode_kpis()
        assert a._tmp != b._tmp and a._traci_label != b._traci_label
    finally:
        a.close()
        b.close()


def test_forked_child_of_a_live_simulation_refuses_libsumo() -> None:
    """A fork inherits libsumo's live simulation and its open files: the child must not touch
    them (it would write the parent's tripinfo), and the parent's episode stays intact."""
    import multiprocessing as mp

    env = make("traffic/single-intersection", end=60)
    try:
        env.reset(seed=3)
        ctx = mp.get_context("fork")
        with ctx.Pool(1) as pool:
            message = pool.apply(_reset_in_child, (env,))
        assert "forked while a traffic env's libsumo simulation was live" in message
        while env.agents:
            env.step({})
        assert env.episode_kpis()["trips"] > 0  # tripinfo still parses
    finally:
        env.close()


def _reset_in_child(env: TrafficSignalEnv) -> str:
    try:
        env.reset(seed=3)
    except SimulatorError as exc:
        return str(exc)
    return "reset worked"


def test_vector_env_steps_copies_in_worker_processes() -> None:
    from scenarios.vector import SubprocVectorEnv

    vec = SubprocVectorEnv("traffic/single-intersection", 2, overrides={"end": 50})
    try:
        obs, infos = vec.reset(seed=4)
        assert obs.shape == (2, 11) and vec.num_envs == 2 and infos[0]["action_mask"].dtype == np.int8
        finished = []
        for _ in range(12):  # 10 decisions per episode: every copy ends once and restarts
            obs, _rewards, terms, truncs, infos = vec.step(np.zeros(2, dtype=np.int64))
            finished += [i["episode_kpis"]["delay"] for i in infos if "episode_kpis" in i]
        assert len(finished) == 2 and finished[0] != finished[1], "copies play different seeds"
        assert obs.shape == (2, 11) and not (terms | truncs).all()
    finally:
        vec.close()
