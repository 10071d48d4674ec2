"""Baseline controllers for the warehouse: ``random``, ``greedy`` and ``prioritized`` (WHCA*).

All three read the simulator through the env (full local sensing, as baselines may) and return
one action per robot; the env's collision rule (see :mod:`scenarios.warehouse.env`) settles any
conflict they leave.

* ``random`` — a uniform choice among the moves the static floor allows.
* ``greedy`` — every robot takes the first move of a shortest path over the static floor
  (distances precomputed once per map by BFS) and ignores the others; conflicts make it wait.
  After ``patience`` blocked steps it side-steps at random once (pure greedy, ``patience=0``,
  locks up as soon as two robots meet head-on in a one-cell aisle or a station bay).
* ``prioritized`` — Windowed Hierarchical Cooperative A* (WHCA*, D. Silver, "Cooperative
  Pathfinding", AIIDE 2005). Robots plan one after another in priority order in space-time
  ``(cell, t)``, each avoiding the cells (vertex conflicts) and cell swaps (edge conflicts) that
  higher-priority robots reserved in a shared reservation table, with a search depth limited
  to ``window`` steps. The heuristic is the exact shortest-path distance over the static floor
  ignoring other robots — Silver's "Reverse Resumable A*" abstract distance, which we
  precompute for every goal cell by BFS rather than resume lazily. As in WHCA*, the partial
  path is cut at the window's end, where the remaining distance is estimated by that heuristic;
  we replan every step (the window slides by one). Priorities change every step, as Silver
  suggests for breaking deadlocks: robots whose search failed last step (no conflict-free path
  through the whole window) go first, then robots that have waited longest, then robot index
  rotated by the step counter.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from marl.core.controller import Controller
from marl.core.errors import ConfigError

__all__ = ["RandomController", "GreedyController", "GreedyConfig", "PrioritizedController", "PrioritizedConfig"]


def _as_dict(env: Any, actions: np.ndarray) -> dict[str, int]:
    return dict(zip(env.possible_agents, actions.tolist()))


class RandomController(Controller):
    """Uniform random among the moves the static floor allows (seeded per episode)."""

    def __init__(self, env: Any, config: Any = None) -> None:
        super().__init__(env, config)
        self._rng = np.random.default_rng(0)

    def reset(self, env: Any, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(seed)

    def act(self, observations: dict[str, np.ndarray], env: Any, messages: Any = None) -> dict[str, int]:
        valid = env.layout.action_valid[env.pos]
        scores = self._rng.random(valid.shape) * valid  # argmax of uniform scores = uniform choice
        return _as_dict(env, np.argmax(scores, axis=1))


@dataclass
class GreedyConfig:
    patience: int = field(
        default=3, metadata={"help": "steps a blocked robot waits before one random side-step (0: never)"}
    )

    def __post_init__(self) -> None:
        if self.patience < 0:
            raise ConfigError(f"bad patience {self.patience}; expected an integer >= 0")


class GreedyController(Controller):
    """Each robot steps along its own shortest path and waits when the collision rule says so.

    A robot that has waited ``patience`` steps in a row while holding a task takes one random
    allowed move instead (seeded), which undoes many head-on standoffs; ``patience=0`` is pure
    greedy, which locks up as soon as two robots meet head-on in a one-cell aisle.
    """

    Config = GreedyConfig

    def __init__(self, env: Any, config: GreedyConfig | None = None) -> None:
        super().__init__(env, config)
        self._rng = np.random.default_rng(0)
        self._waited = np.zeros(env.n, dtype=np.int64)

    def reset(self, env: Any, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(seed)
        self._waited[:] = 0

    def act(self, observations: dict[str, np.ndarray], env: Any, messages: Any = None) -> dict[str, int]:
        actions = env.shortest_path_actions()
        self._waited = np.where(env.last_moved | (env.task < 0), 0, self._waited + 1)
        patience = self.config.patience
        if patience > 0:
            escape = self._waited >= patience
            if escape.any():
                valid = env.layout.action_valid[env.pos[escape]].copy()
                valid[:, 0] = False  # a side-step, not another wait
                scores = self._rng.random(valid.shape) * valid
                actions[escape] = np.argmax(scores, axis=1)
                self._waited[escape] = 0
        return _as_dict(env, actions)


@dataclass
class PrioritizedConfig:
    window: int = field(default=16, metadata={"help": "WHCA* search depth in steps"})
    max_expansions: int = field(default=600, metadata={"help": "node budget of one robot's search"})

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError(f"bad window {self.window}; expected an integer >= 1")
        if self.max_expansions < 1:
            raise ConfigError(f"bad max_expansions {self.max_expansions}; expected an integer >= 1")


class PrioritizedController(Controller):
    """WHCA* (Silver 2005) with a space-time reservation table; see the module docstring."""

    Config = PrioritizedConfig

    def __init__(self, env: Any, config: PrioritizedConfig | None = None) -> None:
        super().__init__(env, config)
        lay = env.layout
        self._n_cells = lay.n_cells
        self._width = lay.width
        # Python lists: the search reads them per node, where list indexing beats numpy scalars.
        self._moves = [
            sorted(set(row), key=s.__ne__) for s, row in enumerate(lay.neighbours.tolist())
        ]  # own cell first
        self._failed = np.zeros(env.n, dtype=bool)
        self._waited = np.zeros(env.n, dtype=np.int64)
        self._steps = 0
        self.stats = {"searches": 0, "failures": 0}

    def reset(self, env: Any, seed: int | None = None) -> None:
        self._failed[:] = False
        self._waited[:] = 0
        self._steps = 0

    def act(self, observations: dict[str, np.ndarray], env: Any, messages: Any = None) -> dict[str, int]:
        n = env.n
        lay = env.layout
        self._waited = np.where(env.last_moved | (env.task < 0), 0, self._waited + 1)
        goals = env.goal_targets()
        idle = goals < 0
        rotation = (np.arange(n) - self._steps) % n
        # np.lexsort: the last key is the primary one. Idle robots plan last (they only dodge).
        order = np.lexsort((rotation, -self._waited, ~self._failed, idle))
        self._steps += 1

        N = self._n_cells
        W = self.config.window
        vres: set[int] = set()
        eres: set[int] = set()
        pos = env.pos.tolist()
        goal_list = goals.tolist()
        actions = np.zeros(n, dtype=np.int64)
        failed = np.zeros(n, dtype=bool)
        width = self._width
        delta_to_action = {0: 0, -width: 1, width: 2, -1: 3, 1: 4}
        for i in order.tolist():
            start = pos[i]
            g = goal_list[i]
            dl = lay.dist_list(g) if g >= 0 else None
            path, reached, ok = self._search(start, dl, vres, eres, W, N)
            self.stats["searches"] += 1
            if not ok:
                failed[i] = True
                self.stats["failures"] += 1
            for t in range(1, len(path)):
                vres.add(t * N + path[t])
                if path[t] != path[t - 1]:
                    eres.add((t * N + path[t - 1]) * N + path[t])
            if reached and len(path) <= W:  # hold the goal cell one step after arriving
                vres.add(len(path) * N + path[-1])
            if len(path) > 1:
                actions[i] = delta_to_action[path[1] - start]
        self._failed = failed
        return _as_dict(env, actions)

    def _search(
        self, start: int, dl: list[int] | None, vres: set[int], eres: set[int], W: int, N: int
    ) -> tuple[list[int], bool, bool]:
        """Space-time A* from ``start`` to the goal of distance list ``dl`` (None: idle robot,
        which only has to stay clear of reservations, preferring to stand still).

        Returns ``(path, reached_goal, ok)``: ``path[t]`` is the cell at step ``t``; ``ok`` is
        False when no conflict-free path through the whole window (or to the goal) was found, in
        which case ``path`` is the one that survives longest.
        """
        moves = self._moves

        def h(cell: int) -> int:
            if dl is None:
                return 0 if cell == start else 1
            return dl[cell]

        h0 = h(start)
        heap: list[tuple[int, int, int, int]] = [(h0, h0, 0, start)]
        parent: dict[int, int] = {start: -1}
        best_key, best_t, best_h = start, 0, h0
        expansions = 0
        budget = self.config.max_expansions
        while heap:
            _, hc, neg_t, cell = heapq.heappop(heap)
            t = -neg_t
            key = t * N + cell
            if (dl is not None and hc == 0 and t > 0) or t == W:
                return self._path(parent, key, N), dl is not None and hc == 0, True
            if t > best_t or (t == best_t and hc < best_h):
                best_key, best_t, best_h = key, t, hc
            expansions += 1
            if expansions > budget:
                break
            nt = t + 1
            base = nt * N
            for nc in moves[cell]:
                nk = base + nc
                if nk in parent or nk in vres:
                    continue
                if nc != cell and (base + nc) * N + cell in eres:
                    continue  # someone moves nc -> cell in this step: a swap
                parent[nk] = key
                hn = h(nc)
                heapq.heappush(heap, (nt + hn, hn, -nt, nc))
        return self._path(parent, best_key, N), False, False

    @staticmethod
    def _path(parent: dict[int, int], key: int, N: int) -> list[int]:
        cells = []
        while key != -1:
            cells.append(key % N)
            key = parent[key]
        cells.reverse()
        return cells
