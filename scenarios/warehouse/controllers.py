"""Baseline controllers for the warehouse: ``random``, ``greedy``, ``prioritized`` (WHCA*) and
``rolling`` (prioritized planning in a time budget with a rule-based fallback, for 10,000 robots).

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
* ``rolling`` — the same space-time search, but a robot keeps its plan for up to ``window``
  steps (a rolling horizon), only robots without a valid plan are planned, and only as many as
  fit in ``budget_ms`` per step; the rest follow a rule (see :class:`RollingController`). Its
  cost per step is bounded by the budget whatever the number of robots.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from marl.core.controller import Controller
from marl.core.errors import ConfigError

__all__ = [
    "RandomController",
    "GreedyController",
    "GreedyConfig",
    "PrioritizedController",
    "PrioritizedConfig",
    "RollingController",
    "RollingConfig",
]


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
        self._moves = self._move_lists(lay)
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

        def h(cell: int) -> int:
            if dl is None:
                return 0 if cell == start else 1
            return dl[cell]

        return space_time_astar(start, h, dl is not None, 0, vres, eres, set(), self._moves, W, N,
                                self.config.max_expansions)  # fmt: skip

    @staticmethod
    def _move_lists(lay: Any) -> list[list[int]]:
        """Cells reachable from each cell in one step, own cell first (Python lists: the search
        reads them per node, where list indexing beats numpy scalars)."""
        return [sorted(set(row), key=s.__ne__) for s, row in enumerate(lay.neighbours.tolist())]

    @staticmethod
    def _path(parent: dict[int, int], key: int, N: int) -> list[int]:
        cells = []
        while key != -1:
            cells.append(key % N)
            key = parent[key]
        cells.reverse()
        return cells


@dataclass
class RollingConfig:
    window: int = field(default=16, metadata={"help": "steps each robot's plan covers (rolling horizon)"})
    budget_ms: float = field(
        default=200.0, metadata={"help": "wall-clock planning time per step in ms (0: no time limit)"}
    )
    max_plans: int = field(
        default=0, metadata={"help": "robots planned per step at most (0: no limit; set it for reproducible runs)"}
    )
    max_expansions: int = field(default=600, metadata={"help": "node budget of one robot's search"})
    new_fields: int = field(
        default=4,
        metadata={"help": "distance fields a step may compute for planning on a lazy floor (BFS, ~10 ms each)"},
    )
    patience: int = field(
        default=3, metadata={"help": "steps an unplanned robot waits before one random side-step (0: never)"}
    )
    yield_head_on: bool = field(
        default=True, metadata={"help": "in a head-on pair of unplanned robots the higher index gives way at once"}
    )

    def __post_init__(self) -> None:
        for name, least in (("window", 1), ("max_plans", 0), ("max_expansions", 1), ("new_fields", 0),
                            ("patience", 0)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"bad {name} {value}; expected an integer >= {least}")
        if not 0.0 <= self.budget_ms <= 600_000.0:
            raise ConfigError(f"bad budget_ms {self.budget_ms}; expected a number of ms in 0..600000 (0: no limit)")


class RollingController(Controller):
    """Rolling-horizon prioritized planning in a time budget, with a rule-based fallback.

    Built for thousands of robots (``warehouse/xl``: 10,000), where planning every robot every
    step as ``prioritized`` does is out of reach. Each step:

    1. **Keep plans.** A robot keeps the space-time path it got earlier (``window`` steps) while
       it is where the plan says, its goal is unchanged and the plan has a next move; the kept
       plans' future cells and moves form the reservation table (absolute steps).
    2. **Plan in the budget.** Robots with a goal and no plan are planned one after another,
       highest priority first (search failed last time, then waited longest, then index rotated
       by the step), by the same space-time A* as ``prioritized`` (vertex and swap conflicts
       against the table; the cells of robots without a plan are blocked for the next step),
       until ``budget_ms`` of wall-clock time or ``max_plans`` robots are spent. The heuristic is
       the exact distance field of the robot's goal (the layout's cache; a BFS on a miss, charged
       to the budget).
    3. **Fallback.** Every other robot follows a rule: one step down the exact distance field
       when its goal's field is at hand (dense table, or cached on a lazy floor), else the
       Manhattan hint (``env.manhattan_actions()``); it waits instead of entering a cell or
       taking a swap reserved for the next step, and after ``patience`` waits it side-steps at
       random once (seeded). Of two such robots meeting head-on (each wanting the other's
       cell), the higher index gives way at once to a free neighbouring cell
       (``yield_head_on``). The env's collision rule settles what is left; a planned robot
       that was held back drops its plan and is planned again.

    With ``budget_ms=0`` and ``max_plans=0`` every robot without a plan is planned each step (a
    rolling WHCA*); with a time budget the number of robots planned depends on the machine, so
    runs are reproducible only with ``budget_ms=0`` and a ``max_plans`` count.
    """

    Config = RollingConfig

    def __init__(self, env: Any, config: RollingConfig | None = None) -> None:
        super().__init__(env, config)
        lay = env.layout
        self._n_cells = lay.n_cells
        self._moves = PrioritizedController._move_lists(lay)
        self._plans: dict[int, tuple[int, list[int], int]] = {}  # robot -> (start step, cells, goal)
        self._on_plans = np.zeros(lay.n_cells, dtype=bool)  # cells some plan enters after this step
        # Fallback on a lazy floor: the Manhattan rule's detour around a rack block (0: none).
        self._detour = np.zeros(env.n, dtype=np.int64)  # the side move being repeated
        self._blocked = np.zeros(env.n, dtype=np.int64)  # the move it waits to become possible
        self._last_goal = np.full(env.n, -1, dtype=np.int64)
        self._failed = np.zeros(env.n, dtype=bool)
        self._waited = np.zeros(env.n, dtype=np.int64)
        self._rng = np.random.default_rng(0)
        self._steps = 0
        self.stats = {"planned": 0, "failures": 0, "fallback": 0, "kept": 0}

    def reset(self, env: Any, seed: int | None = None) -> None:
        self._plans.clear()
        self._detour[:] = 0
        self._last_goal[:] = -1
        self._failed[:] = False
        self._waited[:] = 0
        self._rng = np.random.default_rng(seed)
        self._steps = 0
        self.stats = dict.fromkeys(self.stats, 0)

    def act(self, observations: dict[str, np.ndarray], env: Any, messages: Any = None) -> dict[str, int]:
        import time

        cfg = self.config
        n, N, t = env.n, self._n_cells, env.t
        lay = env.layout
        self._waited = np.where(env.last_moved | (env.task < 0), 0, self._waited + 1)
        goals = env.goal_targets()
        pos = env.pos.tolist()
        goal_list = goals.tolist()

        # 1. Keep the plans that still hold; their future cells and moves are reserved.
        vres: set[int] = set()
        eres: set[int] = set()
        plans = self._plans
        for i, (t0, cells, g) in list(plans.items()):
            j = t - t0
            if j >= len(cells) - 1 or cells[j] != pos[i] or goal_list[i] != g:
                del plans[i]
        # A robot without a plan may stay where it is: a kept plan entering its cell next step
        # would be held back, so it is dropped too, and so on along the chain.
        still = {pos[i] for i in range(n) if i not in plans}
        dropped = True
        while dropped:
            dropped = False
            for i, (t0, cells, _) in list(plans.items()):
                if cells[t - t0 + 1] in still:
                    del plans[i]
                    still.add(pos[i])
                    dropped = True
        for t0, cells, _ in plans.values():
            self._reserve(cells, t0, t - t0, vres, eres)
        self.stats["kept"] += len(self._plans)

        # 2. Plan robots without a plan, highest priority first, inside the budget.
        planned = np.zeros(n, dtype=bool)
        planned[list(self._plans)] = True
        rotation = (np.arange(n) - self._steps) % n
        self._steps += 1
        order = np.lexsort((rotation, -self._waited, ~self._failed))
        order = order[~planned[order] & (goals[order] >= 0)]
        blocked_next = {(t + 1) * N + pos[i] for i in np.flatnonzero(~planned).tolist()}
        start = time.perf_counter()
        budget = cfg.budget_ms / 1000.0
        count = misses = 0
        fields = lay.fields
        for i in order.tolist():
            if (cfg.max_plans and count >= cfg.max_plans) or (budget and time.perf_counter() - start > budget):
                break
            if fields is not None and int(lay.target_cells[goal_list[i]]) not in fields:
                if misses >= cfg.new_fields:
                    continue  # its goal's field would cost a BFS: the fallback moves it this step
                misses += 1
            count += 1
            blocked_next.discard((t + 1) * N + pos[i])  # its own cell is free to stay in
            h = lay.field(goal_list[i]).item
            path, ok = self._search(pos[i], h, t, vres, eres, blocked_next)
            self._failed[i] = not ok
            self.stats["planned"] += 1
            self.stats["failures"] += int(not ok)
            if len(path) > 1:
                self._plans[i] = (t, path, goal_list[i])
                planned[i] = True
                self._reserve(path, t, 0, vres, eres)
            else:
                blocked_next.add((t + 1) * N + pos[i])

        # 3. Actions: planned robots follow their plans, the others the fallback rule.
        self._on_plans[:] = False
        for t0, cells, _ in self._plans.values():
            self._on_plans[cells[t - t0 + 1 :]] = True
        actions = self._fallback(env, goals, ~planned, vres, eres, t)
        width = lay.width
        delta_to_action = {0: 0, -width: 1, width: 2, -1: 3, 1: 4}
        for i, (t0, cells, _) in self._plans.items():
            j = t - t0
            actions[i] = delta_to_action[cells[j + 1] - cells[j]]
        return _as_dict(env, actions)

    def _reserve(self, cells: list[int], t0: int, j: int, vres: set[int], eres: set[int]) -> None:
        """Reserve the cells and moves of a plan started at step ``t0`` after its index ``j``, and
        its last cell one step longer (the robot is still there when it is planned again)."""
        N = self._n_cells
        for k in range(j + 1, len(cells)):
            key = (t0 + k) * N + cells[k]
            vres.add(key)
            if cells[k] != cells[k - 1]:
                eres.add((key - cells[k] + cells[k - 1]) * N + cells[k])
        vres.add((t0 + len(cells)) * N + cells[-1])

    def _fallback(
        self, env: Any, goals: np.ndarray, mask: np.ndarray, vres: set[int], eres: set[int], t: int
    ) -> np.ndarray:
        """Rule-based moves of the robots in ``mask`` (see the class docstring); others get 0."""
        lay = env.layout
        N = self._n_cells
        robots = np.flatnonzero(mask)
        self.stats["fallback"] += int(robots.size)
        actions = np.zeros(env.n, dtype=np.int64)
        if robots.size == 0:
            return actions
        self._detour[(goals != self._last_goal) | ~mask] = 0  # a new goal or a plan ends a detour
        self._last_goal = goals
        if lay.lazy:  # a step down the exact field where the goal's field is already cached
            cells = lay.target_cells[np.maximum(goals, 0)]
            fields = lay.fields
            cached = np.fromiter((g >= 0 and c in fields for g, c in zip(goals.tolist(), cells.tolist())), bool, env.n)
            exact = env.field_actions(np.where(cached & mask, goals, -1))
            wanted = np.where(cached, exact, self._manhattan_detour(env, goals, mask & ~cached))
        else:
            wanted = env.shortest_path_actions()
        acts = wanted[robots]
        here = env.pos[robots]
        waited = self._waited[robots]
        if self.config.patience > 0:
            escape = waited >= self.config.patience
            if escape.any():
                valid = lay.action_valid[here[escape]].copy()
                valid[:, 0] = False  # a side-step, not another wait
                scores = self._rng.random(valid.shape) * valid
                acts[escape] = np.argmax(scores, axis=1)
        nxt = lay.neighbours[here, acts]
        if self.config.yield_head_on:
            acts, nxt = self._yield(env, robots, here, acts, nxt)
        # Never into a cell or across an edge a plan holds for the next step.
        base = (t + 1) * N
        keys = (base + nxt).tolist()
        edges = ((base + nxt) * N + here).tolist()  # someone moving nxt -> here: a swap
        clash = np.fromiter((k in vres or e in eres for k, e in zip(keys, edges)), dtype=bool, count=robots.size)
        # Nor into a cell a plan passes through later: a robot parked there would hold it back.
        clash |= self._on_plans[nxt] & (nxt != here)
        acts[clash] = 0
        actions[robots] = acts
        return actions

    def _yield(
        self, env: Any, robots: np.ndarray, here: np.ndarray, acts: np.ndarray, nxt: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Head-on pairs of fallback robots (each wants the other's cell; the env's swap rule
        would hold both): the higher-index one gives way at once, to a free cell other than the
        one it wanted (a side aisle if there is one, else back), chosen at random (seeded)."""
        lay = env.layout
        target = env.pos.copy()  # where every robot wants to be next (planned ones: unknown, stay)
        target[robots] = nxt
        fallback = np.zeros(env.n, dtype=bool)
        fallback[robots] = True
        occ = env.occupant[nxt]
        safe = np.maximum(occ, 0)
        head_on = (occ >= 0) & (occ != robots) & fallback[safe] & (target[safe] == here) & (robots > occ)
        if head_on.any():
            cells = here[head_on]
            options = lay.action_valid[cells].copy()
            options[:, 0] = False
            options[np.arange(cells.size), acts[head_on]] = False
            options &= env.occupant[lay.neighbours[cells]] < 0  # only into free cells
            scores = self._rng.random(options.shape) * options
            acts = acts.copy()
            acts[head_on] = np.argmax(scores, axis=1)  # 0 (stay) when no cell is free
            nxt = lay.neighbours[here, acts]
        return acts, nxt

    def _manhattan_detour(self, env: Any, goals: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Moves of the Manhattan rule with a detour (robots in ``mask``; others get 0).

        The rule's hint (``env.manhattan_actions()``) lowers the Manhattan distance; where every
        such move bumps into a rack, the robot picks a side move (seeded) and repeats it until
        the blocked move is possible (the end of the rack block), takes that, and the hint
        resumes: a bug algorithm, enough on rack-and-aisle floors with straight aisles.
        """
        lay = env.layout
        width = lay.width
        hint = env.manhattan_actions()
        pos = env.pos
        cell = lay.target_cells[np.maximum(goals, 0)]
        dr = cell // width - pos // width
        dc = cell % width - pos % width
        valid = lay.action_valid[pos]
        idx = np.arange(env.n)
        out = np.where(mask, hint, 0)
        # Start a detour where the hint finds no move although the goal is elsewhere.
        stuck = mask & (goals >= 0) & (hint == 0) & ((dr != 0) | (dc != 0)) & (self._detour == 0)
        if stuck.any():
            vertical = dr[stuck] != 0
            blocked = np.where(vertical, np.where(dr[stuck] < 0, 1, 2), np.where(dc[stuck] < 0, 3, 4))
            side = np.where(vertical, 3, 1) + (self._rng.random(int(stuck.sum())) < 0.5)  # left/right or up/down
            self._blocked[stuck] = blocked
            self._detour[stuck] = side
        on = mask & (self._detour > 0)
        if on.any():
            blocked, side = self._blocked[on], self._detour[on]
            free_blocked = valid[idx[on], blocked]
            free_side = valid[idx[on], side]
            opposite = np.array([0, 2, 1, 4, 3])[side]
            turn = ~free_blocked & ~free_side  # the aisle ends: go the other way
            side = np.where(turn, opposite, side)
            self._detour[on] = np.where(free_blocked, 0, side)
            out[on] = np.where(free_blocked, blocked, np.where(valid[idx[on], side], side, 0))
        return out

    def _search(
        self, start: int, h: Any, t: int, vres: set[int], eres: set[int], blocked_next: set[int]
    ) -> tuple[list[int], bool]:
        """:func:`space_time_astar` from ``start`` at step ``t`` with this controller's window."""
        cfg = self.config
        path, _, ok = space_time_astar(
            start, h, True, t, vres, eres, blocked_next, self._moves, cfg.window, self._n_cells, cfg.max_expansions
        )
        return path, ok


def space_time_astar(
    start: int,
    h: Any,
    has_goal: bool,
    t0: int,
    vres: set[int],
    eres: set[int],
    blocked_next: set[int],
    moves: list[list[int]],
    window: int,
    N: int,
    max_expansions: int,
) -> tuple[list[int], bool, bool]:
    """Space-time A* from ``start`` at step ``t0`` towards the cell where ``h(cell)`` (steps to
    the goal, a callable) is 0, at most ``window`` steps deep (``has_goal=False``: an idle robot,
    which only stays clear of reservations, ``h`` preferring to stand still).

    Reservations use absolute keys: ``vres`` holds ``step * N + cell`` (vertex), ``eres`` holds
    ``(step * N + from) * N + to`` (a move made in ``step``); ``blocked_next`` holds vertex keys
    blocked for the first step only. Returns ``(path, reached_goal, ok)``: ``path[k]`` is the
    cell at step ``t0 + k``; ``ok`` is False when no conflict-free path through the whole window
    (or to the goal) was found in ``max_expansions`` nodes, and ``path`` is then the one that
    survives longest.
    """
    h0 = h(start)
    heap: list[tuple[int, int, int, int]] = [(h0, h0, 0, start)]
    parent: dict[int, int] = {start: -1}
    best_key, best_t, best_h = start, 0, h0
    expansions = 0
    while heap:
        _, hc, neg_t, cell = heapq.heappop(heap)
        rel = -neg_t
        key = rel * N + cell
        if (has_goal and hc == 0 and rel > 0) or rel == window:
            return PrioritizedController._path(parent, key, N), has_goal and hc == 0, True
        if rel > best_t or (rel == best_t and hc < best_h):
            best_key, best_t, best_h = key, rel, hc
        expansions += 1
        if expansions > max_expansions:
            break
        nrel = rel + 1
        base = nrel * N
        abs_base = (t0 + nrel) * N
        for nc in moves[cell]:
            nk = base + nc
            if nk in parent or abs_base + nc in vres or (nrel == 1 and abs_base + nc in blocked_next):
                continue
            if nc != cell and (abs_base + nc) * N + cell in eres:
                continue  # someone moves nc -> cell in this step: a swap
            parent[nk] = key
            hn = h(nc)
            heapq.heappush(heap, (nrel + hn, hn, -nrel, nc))
    return PrioritizedController._path(parent, best_key, N), False, False
