"""K copies of a scenario, each in its own worker process, behind one vector-env interface.

Why: libsumo runs one simulation per process, and a traffic episode spends nearly all its time
inside SUMO. Stepping K simulations in K processes lets one training rank roll out K episodes at
once (``marl bench traffic --vector K`` measures the gain).

:class:`SubprocVectorEnv` is a ``gymnasium.vector.VectorEnv`` in SuperSuit's convention (what
``supersuit.concat_vec_envs_v1`` produces): every agent of every copy is one sub-env, so
``num_envs = K * N``, row ``k * N + i`` is agent ``possible_agents[i]`` of copy ``k``;
``observation_space``/``action_space`` are the spaces of one row (as in SuperSuit, unlike
gymnasium's batched spaces; ``single_observation_space`` is the same); episodes
restart on their own in the step that ends them (the last observation is in that row's info as
``"terminal_observation"``, the copy's KPIs as ``"episode_kpis"``); infos are a list of dicts.
Stable-Baselines3 takes it through SuperSuit's ``SB3VecEnvWrapper``; Concord's own loops reshape
the rows to ``(K, N, ...)``.

All agents must share one observation space and one action space (true of every registered
scenario: traffic pads to the largest light). Seeds: ``reset(seed=s)`` gives copy ``k`` the
episode seed ``marl.core.seeding.episode_seed(s, k)``; each later episode of a copy continues
its own seeded generator, so the whole run is reproducible.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from marl.core import registry
from marl.core.errors import ConfigError, SimulatorError
from marl.core.seeding import episode_seed

__all__ = ["ProcessEnv", "SubprocVectorEnv"]


class _MakeScenario:
    """A picklable factory for a registered scenario (lambdas do not cross 'spawn')."""

    def __init__(self, scenario_id: str, overrides: Mapping[str, Any] | None, test: bool) -> None:
        self.scenario_id, self.overrides, self.test = scenario_id, dict(overrides or {}), test

    def __call__(self) -> Any:
        return registry.make_scenario(self.scenario_id, self.overrides, test=self.test)


def _rows(env: Any, observations: Mapping[str, Any], obs_shape: tuple[int, ...]) -> np.ndarray:
    """Observations of ``possible_agents`` stacked in order; an absent agent gets zeros."""
    out = np.zeros((len(env.possible_agents), *obs_shape), dtype=np.float32)
    for i, agent in enumerate(env.possible_agents):
        if agent in observations:
            out[i] = observations[agent]
    return out


def _extras(env: Any, wanted: tuple[str, ...]) -> dict[str, Any]:
    """``agents`` and the attributes in ``wanted`` (``state`` is called) after a call."""
    out: dict[str, Any] = {"agents": list(env.agents)}
    for name in wanted:
        out[name] = env.state() if name == "state" else getattr(env, name)
    return out


def _worker(conn: Connection, make_env: Callable[[], Any]) -> None:
    """Run one env: answer ``(command, argument)`` messages until ``close``."""
    env = None
    try:
        env = make_env()
        agents = list(env.possible_agents)
        obs_shape = env.observation_space(agents[0]).shape
        conn.send(("ok", (agents, env.observation_space(agents[0]), env.action_space(agents[0]))))
        infos_of: dict[str, Any] = {}
        while True:
            command, arg = conn.recv()
            if command == "reset":
                observations, infos_of = env.reset(seed=arg)
                conn.send(("ok", (_rows(env, observations, obs_shape), [dict(infos_of.get(a, {})) for a in agents])))
            elif command == "step":
                actions = {a: arg[i] for i, a in enumerate(agents) if a in env.agents}
                observations, rewards, terms, truncs, infos_of = env.step(actions)
                obs = _rows(env, observations, obs_shape)
                rew = np.array([rewards.get(a, 0.0) for a in agents], dtype=np.float64)
                term = np.array([terms.get(a, True) for a in agents], dtype=bool)
                trunc = np.array([truncs.get(a, False) for a in agents], dtype=bool)
                infos = [dict(infos_of.get(a, {})) for a in agents]
                if not env.agents:  # episode over: report it, start the next one (same step)
                    kpis = env.episode_kpis()
                    for i, info in enumerate(infos):
                        info["terminal_observation"] = obs[i]
                        info["episode_kpis"] = kpis
                    observations, reset_infos = env.reset()
                    obs = _rows(env, observations, obs_shape)
                    for a, info in zip(agents, infos):
                        info.update({k: v for k, v in reset_infos.get(a, {}).items() if k == "action_mask"})
                conn.send(("ok", (obs, rew, term, trunc, infos)))
            elif command == "call":  # ProcessEnv: a method, then the attributes asked for
                method, args, kwargs, wanted = arg
                result = getattr(env, method)(*args, **kwargs)
                conn.send(("ok", (result, _extras(env, wanted))))
            elif command == "attr":
                conn.send(("ok", getattr(env, arg)))
            elif command == "cpu":
                conn.send(("ok", time.process_time()))
            elif command == "close":
                conn.send(("ok", None))
                return
    except (KeyboardInterrupt, EOFError):
        return
    except Exception as exc:  # the parent re-raises it with the worker's traceback
        conn.send(("error", (type(exc).__name__, str(exc), traceback.format_exc())))
    finally:
        if env is not None:
            env.close()


class SubprocVectorEnv(gymnasium.vector.VectorEnv):
    """``num_copies`` copies of a scenario in as many worker processes (see the module doc).

    ``scenario`` is a registered id (built with ``overrides`` and, with ``test=True``, its short
    test presets) or a picklable zero-argument factory. ``context`` is the multiprocessing start
    method; ``"forkserver"`` (default) starts workers from a clean process, so a parent with a
    live libsumo simulation or torch threads is never forked.
    """

    metadata: dict[str, Any] = {"render_modes": [], "autoreset_mode": gymnasium.vector.AutoresetMode.SAME_STEP}

    def __init__(
        self,
        scenario: str | Callable[[], Any],
        num_copies: int,
        *,
        overrides: Mapping[str, Any] | None = None,
        test: bool = False,
        context: str = "forkserver",
    ) -> None:
        if num_copies < 1:
            raise ConfigError(f"bad num_copies {num_copies}; expected an integer >= 1")
        make_env = _MakeScenario(scenario, overrides, test) if isinstance(scenario, str) else scenario
        ctx: Any = mp.get_context(context)
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        self._closed = False
        for _ in range(num_copies):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, make_env), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        answers = self._gather()
        self.possible_agents: list[str] = answers[0][0]
        obs_space, act_space = answers[0][1], answers[0][2]
        if not isinstance(obs_space, spaces.Box):
            self.close()
            raise ConfigError(f"SubprocVectorEnv needs Box observations, got {obs_space}")
        self.num_copies = num_copies
        self.num_agents = len(self.possible_agents)
        self.num_envs = num_copies * self.num_agents
        self.single_observation_space = obs_space
        self.single_action_space = act_space
        # SuperSuit's convention (which SB3VecEnvWrapper reads): the spaces of ONE row, not batched
        self.observation_space = obs_space
        self.action_space = act_space
        self.render_mode = None
        self._seed: int | None = None
        self._actions: np.ndarray | None = None

    # ------------------------------------------------------------------ plumbing
    def _send(self, command: str, args: list[Any]) -> None:
        for conn, arg in zip(self._conns, args):
            conn.send((command, arg))

    def _gather(self) -> list[Any]:
        results, error = [], None
        for conn in self._conns:
            try:
                status, payload = conn.recv()
            except EOFError:
                status, payload = "error", ("EOFError", "a worker process died", "")
            if status == "error" and error is None:
                error = payload
            results.append(payload)
        if error is not None:
            name, message, trace = error
            self.close()
            raise SimulatorError(f"a vector-env worker failed: {name}: {message}\n{trace}".rstrip())
        return results

    # ------------------------------------------------------------------ gymnasium / SuperSuit API
    def seed(self, seed: int | None = None) -> None:
        """Use ``seed`` at the next :meth:`reset` without a seed (SB3's ``VecEnv.seed``)."""
        self._seed = seed

    def reset(  # type: ignore[override]  # SuperSuit's convention: infos are a list of dicts
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Reset every copy; copy ``k`` gets ``episode_seed(seed, k)`` (random when None)."""
        seed = self._seed if seed is None else seed
        self._seed = None
        seeds = [None if seed is None else episode_seed(int(seed), k) for k in range(self.num_copies)]
        self._send("reset", seeds)
        results = self._gather()
        obs = np.concatenate([r[0] for r in results])
        infos = [info for r in results for info in r[1]]
        return obs, infos

    def step_async(self, actions: Any) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        if self._actions is None:
            raise SimulatorError("step_wait() without step_async()")
        actions = self._actions.reshape(self.num_copies, self.num_agents, *(self.single_action_space.shape or ()))
        self._actions = None
        self._send("step", list(actions))
        results = self._gather()
        obs, rew, term, trunc = (np.concatenate([r[j] for r in results]) for j in range(4))
        infos = [info for r in results for info in r[4]]
        return obs, rew, term, trunc, infos

    def step(  # type: ignore[override]  # (infos: a list, as in reset)
        self, actions: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """One decision in every copy at once; rows are ``copy * num_agents + agent``."""
        self.step_async(actions)
        return self.step_wait()

    def get_attr(self, name: str) -> list[Any]:
        """Attribute ``name`` of each copy's env (picklable values only)."""
        self._send("attr", [name] * self.num_copies)
        return self._gather()

    def worker_cpu_seconds(self) -> list[float]:
        """CPU seconds each worker process has used so far (its simulation included)."""
        self._send("cpu", [None] * self.num_copies)
        return [float(t) for t in self._gather()]

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False] * self.num_envs

    def render(self) -> None:
        return None

    def close(self, **kwargs: Any) -> None:
        """Stop the workers (each closes its simulation); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(("close", None))
        for conn, proc in zip(self._conns, self._procs):
            try:
                if conn.poll(30):
                    conn.recv()
            except (EOFError, OSError):
                pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
            conn.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class ProcessEnv:
    """One scenario in its own worker process, driven like the PettingZoo ``ParallelEnv`` it
    holds; any call can be split into :meth:`send` and :meth:`receive` so several copies step
    (or reset) at once. Concord's training (``marl train --envs K``) runs env 0 in its own
    process and envs 1..K-1 behind this proxy.

    ``wanted`` names attributes copied back with every ``reset``/``step`` answer, so reading them
    costs no extra round trip: ``"topology"`` (read when messages flow) and ``"state"``
    (``env.state()``, for a centralised critic); ``agents`` is always copied. Other calls
    (``episode_kpis``) are one round trip each. The worker starts at construction; the first
    call waits for it, so several copies start in parallel.
    """

    def __init__(
        self,
        scenario: str,
        overrides: Mapping[str, Any] | None = None,
        *,
        test: bool = False,
        wanted: tuple[str, ...] = (),
        context: str = "forkserver",
    ) -> None:
        ctx: Any = mp.get_context(context)
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(child, _MakeScenario(scenario, overrides, test)), daemon=True)
        self._proc.start()
        child.close()
        self.wanted = tuple(wanted)
        self._started = False
        self._closed = False
        self._pending = False
        self.possible_agents: list[str] = []
        self.agents: list[str] = []
        self._extras: dict[str, Any] = {}

    def _receive(self) -> Any:
        try:
            status, payload = self._conn.recv()
        except EOFError:
            status, payload = "error", ("EOFError", "the worker process died", "")
        if status == "error":
            name, message, trace = payload
            self.close()
            raise SimulatorError(f"an env worker failed: {name}: {message}\n{trace}".rstrip())
        return payload

    def _ready(self) -> None:
        if not self._started:
            self.possible_agents = list(self._receive()[0])
            self._started = True

    def send(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Ask the worker to call ``env.<method>(*args, **kwargs)``; :meth:`receive` returns the
        result. The worker runs while the caller does other work (other copies step meanwhile)."""
        if self._pending:
            raise SimulatorError(f"send({method!r}) before the previous answer was received")
        self._ready()
        self._conn.send(("call", (method, args, kwargs, self.wanted)))
        self._pending = True

    def receive(self) -> Any:
        """The result of the call sent last (the attributes in ``wanted`` are refreshed too)."""
        if not self._pending:
            raise SimulatorError("receive() without send()")
        self._pending = False
        result, self._extras = self._receive()
        self.agents = self._extras["agents"]
        return result

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self.send(method, *args, **kwargs)
        return self.receive()

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        return self._call("reset", seed=seed, options=options)

    def step(self, actions: Mapping[str, Any]) -> Any:
        return self._call("step", dict(actions))

    @property
    def topology(self) -> Any:
        """The topology after the last reset/step (fetched then if ``"topology"`` is wanted)."""
        if "topology" in self._extras:
            return self._extras["topology"]
        if self._pending:
            raise SimulatorError("topology read while a call is in flight")
        self._ready()
        self._conn.send(("attr", "topology"))
        return self._receive()

    def state(self) -> Any:
        if "state" in self._extras:
            return self._extras["state"]
        return self._call("state")

    def episode_kpis(self) -> dict[str, float]:
        return dict(self._call("episode_kpis"))

    def cpu_seconds(self) -> float:
        """CPU seconds the worker process has used so far (its simulation included)."""
        if self._pending:
            raise SimulatorError("cpu_seconds() while a call is in flight")
        self._ready()
        self._conn.send(("cpu", None))
        return float(self._receive())

    def close(self) -> None:
        """Stop the worker (it closes its simulation); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(BrokenPipeError, OSError):
            self._conn.send(("close", None))
        try:
            # drain unread answers (a step in flight, the hello) until the worker exits (EOF)
            while self._conn.poll(30):
                self._conn.recv()
        except (EOFError, OSError):
            pass
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.terminate()
        self._conn.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
