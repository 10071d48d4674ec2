"""Warehouse: hundreds of robots doing lifelong pickup and delivery on a grid floor.

Env card
--------
**Description.** A grid floor of shelf racks (``R``), aisles and pick stations (``P``), read from
a MovingAI ``.map`` file (see :mod:`scenarios.warehouse.layout` for the format and its two
extension characters). Robots move one cell per step. A lifelong stream of tasks — *pick* at a
rack, then *deliver* to a station — is handed to robots as they become free. The simulator is
plain vectorised numpy: one step costs a fixed number of array operations, not a Python loop
over robots.

**Agents.** ``robot_0 … robot_{n-1}`` (``n_robots``), homogeneous; ``sim_ids`` is the identity
(records use the same ids).

**Actions.** ``Discrete(5)``: 0 stay, 1 up, 2 down, 3 left, 4 right. A move into a rack, an
obstacle or off the map leaves the robot where it is; ``infos[agent]["action_mask"]`` (int8, one
entry per action) marks those moves 0 (static obstacles only, not other robots).

**Tasks.** A task names a rack and a station. The robot *picks* when it ends a step on the
rack's access cell (the aisle cell next to the rack, see layout) and *delivers* when it ends a
step on the station while carrying. Released, unassigned tasks wait in a FIFO queue that is kept
``backlog`` long (default: a quarter of the robots, at least 1): whenever a task is assigned a
new one is released (rack and station uniform at random from the env's seeded generator), so
robots are never starved. At reset and after every step each queued task, oldest first, goes to
the **nearest free robot** by shortest-path distance to its pick cell (ties: lowest robot index)
until no free robot is left (on a lazy floor, see below: nearest by Manhattan distance).
``service_time`` therefore includes the time a task waits in the queue.

**Collisions** (resolved every step, vectorised; priority = robot index, lower wins):

1. *Vertex conflict*: when several robots want the same cell, the highest-priority one may
   move; the others wait.
2. *Swap conflict*: two robots that want each other's cells both wait (the lower-priority one
   waits, which blocks the other).
3. *Following*: a robot may enter a cell that another robot leaves in the same step; whole
   chains move together. A robot whose target is held by a waiting robot waits too, found by
   fixed-point iteration over arrays.
4. *Rotations*: a cycle of three or more robots each entering the next one's cell moves (nobody
   shares a cell and nobody swaps); only two-robot swaps are forbidden.

**Observation** (``Box(float32)``, size ``2*(2r+1)^2 + 9`` with ``r = view_radius``):
egocentric window of obstacles (racks, walls, off-map = 1) and of other robots (1), flattened
row-major; then goal offset ``(d_row / H, d_col / W)`` in [-1, 1]; shortest-path distance to the
goal divided by the longest distance on the floor, in [0, 1]; carrying flag; has-task flag; and a
one-hot hint of the shortest-path move (up, down, left, right; all 0 at the goal or without a
task). The goal is the pick cell before picking and the station after. ``infos[agent]`` is a
dict shared by every robot whose cell allows the same moves: read it, do not write to it.

**Lazy floors** (``dist_cache=K``, warehouse/xl). Dense distance tables grow as goals x cells
(xl's 498 x 500 floor has 75,030 goal cells: about 93 GB), so with ``dist_cache`` set the layout
builds none and keeps at most ``K`` exact distance fields, computed by BFS when first needed
(:class:`~scenarios.warehouse.layout.DistanceFields`, least recently used evicted). Reading an
exact distance for 10,000 different goals every step would need a BFS per goal and step, so on a
lazy floor the observation's distance is the **Manhattan** distance divided by ``H + W - 2``,
its hint the first of up, down, left, right that lowers the Manhattan distance without bumping
into a rack or wall (:meth:`WarehouseEnv.manhattan_actions`), the shaping potential uses
Manhattan lengths and tasks go to the nearest free robot by Manhattan distance. Collisions,
tasks, KPIs and the state are as on any floor. ``shortest_path_actions()`` stays exact (one
field per distinct goal, from the cache). Floors up to 1,000,000 cells are allowed then.

**State** (``state()``, ``state_space``): for every robot its row/H, col/W, goal row/H, goal
col/W, carrying, has-task; then the elapsed share of the horizon. Size ``6*n + 1``.

**Rendering.** ``render_mode="ansi"``: ``render()`` returns the floor as text, one line per row:
``#`` obstacle or rack, ``P`` station, ``.`` aisle, a robot as ``r`` (``R`` when carrying).

**Reward** per robot and step: ``+1`` for a delivery, ``-step_cost`` always, ``-wait_cost`` more
when it has a task and did not move (by choice or blocked). With ``shaping = w > 0`` each robot
also gets the potential-based term ``w * (shaping_gamma * phi(s') - phi(s))`` (Ng, Harada &
Russell 1999, "Policy invariance under reward transformations"), where ``phi`` is minus the
remaining shortest-path length of the robot's task in cells (:meth:`WarehouseEnv.potential`:
to the pick cell plus pick cell to station before picking, to the station when carrying, 0
without a task), ``s`` the state before the step and ``s'`` after it (after delivery and the new
assignment). Each step along a shortest path pays about ``w``; the new task handed out at a
delivery costs ``w`` times its length at once, so over a whole task the term sums to about zero
and, with ``shaping_gamma`` equal to the learner's discount, the optimal policies are unchanged.
KPIs never include it.

**KPIs** (``episode_kpis``): ``throughput`` deliveries per step (main, higher is better);
``deliveries``; ``service_time`` mean steps from release to delivery over delivered tasks
(the episode length when nothing was delivered); ``wait_share`` share of robot-steps in which a
robot with a task did not move; ``conflicts`` moves refused by the collision rule;
``deadlock_steps`` steps in which no robot moved although some robot had a task.

**Topology.** Robots within ``comm_radius`` cells (Euclidean) of each other; it changes every
step. :meth:`WarehouseEnv.topology_edges` gives the (E, 2) index pairs without building a graph.

**Episode end.** Truncation after ``horizon`` steps; no termination.

**For baselines and learners.** Arrays over robots: ``pos`` (cell = row * width + col),
``task``, ``carrying``, ``last_moved``, ``last_refused``; ``layout`` (static tables, BFS
distances: ``layout.field(target)`` on any floor); ``goal_targets()``, ``goal_cells()``,
``shortest_path_actions()``, ``field_actions(goals)``, ``manhattan_actions()``; ``step_array``
(the vectorised step without dicts); ``task_table()``.

**Arguments**: see :class:`WarehouseConfig`.

**Version history.** v0: first version; lazy floors (``dist_cache``) and warehouse/xl added
without changing anything on dense floors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import networkx as nx
import numpy as np
from gymnasium import spaces

from marl.core.errors import ConfigError, SimulatorError
from scenarios.base import Scenario
from scenarios.warehouse.layout import UNREACHABLE, Layout, layout_from_file, resolve_map_path

__all__ = ["WarehouseConfig", "WarehouseEnv", "resolve_moves", "N_ACTIONS"]

N_ACTIONS = 5


@dataclass
class WarehouseConfig:
    """Parameters of the warehouse scenario (``--set key=value``)."""

    map_file: str = field(
        default="small.map",
        metadata={"help": "MovingAI .map file (path) or built-in map name (small.map, medium.map, large.map)"},
    )
    n_robots: int = field(default=10, metadata={"help": "number of robots (agents)"})
    horizon: int = field(default=500, metadata={"help": "steps per episode"})
    view_radius: int = field(default=2, metadata={"help": "observation window radius in cells"})
    comm_radius: float = field(default=5.0, metadata={"help": "robots within this many cells can talk"})
    backlog: int | None = field(
        default=None, metadata={"help": "released unassigned tasks kept waiting (None: a quarter of n_robots, >= 1)"}
    )
    step_cost: float = field(default=0.001, metadata={"help": "reward subtracted from every robot every step"})
    wait_cost: float = field(default=0.01, metadata={"help": "extra cost when a robot with a task does not move"})
    shaping: float = field(
        default=0.0,
        metadata={"help": "weight per cell of potential-based shaping on the task's remaining path (0: off)"},
    )
    shaping_gamma: float = field(
        default=0.99, metadata={"help": "discount in the shaping term; set it to the learner's gamma"}
    )
    dist_cache: int | None = field(
        default=None,
        metadata={
            "help": "none: dense distance tables for every goal (small floors); K: no tables, at most K "
            "distance fields cached on demand (LRU; floors up to 1,000,000 cells, K x cells x 4 bytes <= 1 GiB)"
        },
    )

    def __post_init__(self) -> None:
        if self.n_robots < 1:
            raise ConfigError(f"bad n_robots {self.n_robots}; expected an integer >= 1")
        if self.horizon < 1:
            raise ConfigError(f"bad horizon {self.horizon}; expected an integer >= 1")
        if not 0 <= self.view_radius <= 10:
            raise ConfigError(f"bad view_radius {self.view_radius}; expected 0..10")
        if self.comm_radius < 0:
            raise ConfigError(f"bad comm_radius {self.comm_radius}; expected a number >= 0")
        if self.backlog is not None and self.backlog < 1:
            raise ConfigError(f"bad backlog {self.backlog}; expected an integer >= 1 or none")
        if self.step_cost < 0 or self.wait_cost < 0:
            raise ConfigError("bad step_cost/wait_cost; expected numbers >= 0 (they are subtracted)")
        if self.shaping < 0:
            raise ConfigError(f"bad shaping {self.shaping}; expected a number >= 0 (0 turns shaping off)")
        if not 0.0 < self.shaping_gamma <= 1.0:
            raise ConfigError(f"bad shaping_gamma {self.shaping_gamma}; expected a number in (0, 1]")
        if self.dist_cache is not None and (isinstance(self.dist_cache, bool) or self.dist_cache < 1):
            raise ConfigError(f"bad dist_cache {self.dist_cache}; expected an integer >= 1 or none")
        resolve_map_path(self.map_file)  # a missing file fails with the config, before any run


def resolve_moves(
    pos: np.ndarray, want: np.ndarray, occupant: np.ndarray, claim: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the collision rule of the env card; returns ``(new_pos, refused)``.

    ``pos``/``want``: (n,) current and requested cells (``want == pos`` means stay);
    ``occupant``: (n_cells,) robot index in each cell or -1 (consistent with ``pos``);
    ``claim``: (n_cells,) scratch array filled with ``n`` (restored on return).
    Priority is the robot index: lower wins. ``refused`` marks robots that asked to move and
    were kept in place.
    """
    n = pos.shape[0]
    idx = np.arange(n)
    moving = want != pos
    mv = idx[moving]
    tgt = want[mv]
    # 1. Vertex conflicts: the lowest index claiming a cell wins it.
    np.minimum.at(claim, tgt, mv)
    stopped = ~moving
    stopped[mv] = claim[tgt] != mv
    claim[tgt] = n
    # 2. Swaps: i wants j's cell and j wants i's cell -> both wait.
    occ_t = occupant[want]  # robot currently in each wanted cell (self for stayers)
    has_occ = moving & (occ_t >= 0)
    occ_safe = np.where(has_occ, occ_t, 0)
    swap = has_occ & (want[occ_safe] == pos)
    stopped |= swap
    # 3. Following: a mover whose target is held by a stopped robot stops; iterate to a fixed
    # point (each round extends every blocked chain by one robot). Rotations of >= 3 robots
    # never meet a stopped robot, so they move.
    while True:
        blocked = has_occ & ~stopped & stopped[occ_safe]
        if not blocked.any():
            break
        stopped |= blocked
    new_pos = np.where(stopped, pos, want)
    return new_pos, moving & stopped


class WarehouseEnv(Scenario):
    __doc__ = __doc__

    Config: ClassVar[type] = WarehouseConfig
    main_kpi: ClassVar[str] = "throughput"
    kpi_goals: ClassVar[dict[str, Literal["min", "max"]]] = {
        "throughput": "max",
        "deliveries": "max",
        "service_time": "min",
        "wait_share": "min",
        "conflicts": "min",
        "deadlock_steps": "min",
    }
    metadata: dict[str, Any] = {"name": "concord_warehouse_v0", "render_modes": ["ansi"], "is_parallelizable": True}

    def __init__(
        self, config: WarehouseConfig | None = None, layout: Layout | None = None, render_mode: str | None = None
    ) -> None:
        self.config = config if config is not None else WarehouseConfig()
        self._set_render_mode(render_mode)
        cfg = self.config
        self.layout = layout if layout is not None else layout_from_file(cfg.map_file, cfg.dist_cache)
        lay = self.layout
        n = cfg.n_robots
        if n > lay.spawn_cells.size:
            raise ConfigError(f"bad n_robots {n}; the map '{cfg.map_file}' has only {lay.spawn_cells.size} free cells")
        self.n = n
        self.possible_agents = [f"robot_{i}" for i in range(n)]
        self._agent_index = {a: i for i, a in enumerate(self.possible_agents)}
        self.agents: list[str] = []
        self.backlog = cfg.backlog if cfg.backlog is not None else max(1, n // 4)
        self._idx = np.arange(n)

        # Observation geometry: a padded occupancy grid lets one fancy index read every window.
        r = cfg.view_radius
        self._r = r
        side = 2 * r + 1
        self._k = side * side
        H, W = lay.height, lay.width
        self._pw = W + 2 * r
        pad_static = np.ones((H + 2 * r, W + 2 * r), dtype=np.float32)
        pad_static[r : r + H, r : r + W] = ~lay.passable.reshape(H, W)
        rows, cols = np.divmod(np.arange(H * W), W)
        dr, dc = np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1), indexing="ij")
        self._offsets = (dr * self._pw + dc).reshape(-1)
        # int8 padded grids (a quarter of a MB on a 500 x 500 floor) stay in cache while one
        # gather reads every robot's window; a per-cell window table would be 25 MB there.
        self._static_pad = pad_static.reshape(-1).astype(np.int8)
        self._robot_pad = np.zeros(pad_static.size, dtype=np.int8)
        self._hint_codes = np.arange(1, 5)[None, :]
        # A cell's mask is one of at most 32 patterns (5 moves allowed or not): one read-only
        # int8 array (what Discrete.sample(mask) takes) and one info dict per pattern, shared by
        # every robot on a cell with that pattern at any step. Building 10,000 dicts a step cost
        # more than the simulation step, and 32 shared objects stay in the CPU cache.
        self._mask_code = (lay.action_valid * np.array([1, 2, 4, 8, 16])).sum(axis=1).astype(np.int8)
        self._mask_rows: list[np.ndarray] = []
        for code in range(32):
            row = np.array([(code >> a) & 1 for a in range(N_ACTIONS)], dtype=np.int8)
            row.flags.writeable = False
            self._mask_rows.append(row)
        self._info_rows = [{"action_mask": row} for row in self._mask_rows]
        # Bits of the moves the floor allows (1 up, 2 down, 4 left, 8 right) and, for each 4-bit
        # set of wanted moves, its first one as an action (0: none): the lazy-floor hint.
        self._valid_bits = (lay.action_valid[:, 1:] * np.array([1, 2, 4, 8])).sum(axis=1).astype(np.int8)
        self._first_move = np.array([0] + [(b & -b).bit_length() for b in range(1, 16)], dtype=np.int64)
        self._rows = rows
        self._cols = cols
        if lay.dist is not None:
            finite = lay.dist[lay.dist < UNREACHABLE]
            self._max_dist = float(max(1, finite.max() if finite.size else 1))
        else:  # lazy floors: the goal features are Manhattan distances (env card)
            self._max_dist = float(max(1, H + W - 2))
        self.obs_size = 2 * self._k + 9
        box = spaces.Box(low=-1.0, high=1.0, shape=(self.obs_size,), dtype=np.float32)
        self._observation_spaces = dict.fromkeys(self.possible_agents, box)
        act = spaces.Discrete(N_ACTIONS)
        self._action_spaces = dict.fromkeys(self.possible_agents, act)
        self.state_space = spaces.Box(low=-1.0, high=1.0, shape=(6 * n + 1,), dtype=np.float32)
        self._rng = np.random.default_rng()
        self._topology_cache: tuple[int, nx.Graph] | None = None
        self._edges_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self.t = 0

    # -- PettingZoo API -------------------------------------------------------------------------
    def observation_space(self, agent: str) -> spaces.Box:
        return self._observation_spaces[agent]

    def action_space(self, agent: str) -> spaces.Discrete:
        return self._action_spaces[agent]

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        lay = self.layout
        n = self.n
        self.t = 0
        self.agents = list(self.possible_agents)
        self.pos = self._rng.choice(lay.spawn_cells, size=n, replace=False).astype(np.int64)
        self.occupant = np.full(lay.n_cells, -1, dtype=np.int64)
        self.occupant[self.pos] = self._idx
        self._claim = np.full(lay.n_cells, n, dtype=np.int64)
        self.task = np.full(n, -1, dtype=np.int64)  # task id held by each robot
        self.carrying = np.zeros(n, dtype=bool)
        # Task table (grows): pick target index, station target index, release/pick/deliver step.
        cap = 4 * n + 16
        self._task_pick = np.zeros(cap, dtype=np.int64)
        self._task_drop = np.zeros(cap, dtype=np.int64)
        self._task_release = np.zeros(cap, dtype=np.int64)
        self._task_picked = np.full(cap, -1, dtype=np.int64)
        self._task_delivered = np.full(cap, -1, dtype=np.int64)
        self._task_robot = np.full(cap, -1, dtype=np.int64)
        self.n_tasks = 0
        self._queue: list[int] = []
        self._release(self.backlog)
        # Episode counters behind the KPIs.
        self.deliveries = 0
        self.conflicts = 0
        self.wait_steps = 0
        self.deadlock_steps = 0
        self._service_sum = 0
        self.last_moved = np.zeros(n, dtype=bool)
        self.last_refused = np.zeros(n, dtype=bool)
        self._assign()
        self._pickup()
        self._invalidate_topology()
        obs = self._observations()
        return obs, self._infos()

    def step(
        self, actions: dict[str, Any]
    ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, bool], dict[str, bool], dict[str, dict[str, Any]]]:
        if not self.agents:
            raise SimulatorError("step() called after the episode ended; call reset() first")
        try:  # map() over dict.__getitem__ runs in C; a missing agent falls back to "stay"
            act = np.fromiter(map(actions.__getitem__, self.possible_agents), dtype=np.int64, count=self.n)
        except KeyError:
            act = np.fromiter((actions.get(a, 0) for a in self.possible_agents), dtype=np.int64, count=self.n)
        rewards = self.step_array(act)
        obs = self._observations()
        agents = self.possible_agents
        rew = dict(zip(agents, rewards.tolist()))
        term = dict.fromkeys(agents, False)
        done = self.t >= self.config.horizon
        trunc = dict.fromkeys(agents, done)
        infos = self._infos()
        if done:
            self.agents = []
        return obs, rew, term, trunc, infos

    def step_array(self, actions: np.ndarray) -> np.ndarray:
        """Advance the simulation by one step from an (n,) action array; returns (n,) rewards.

        The vectorised core behind :meth:`step` (which adds the PettingZoo dicts and the episode
        end: this method never ends an episode); benchmarks and array-based learners may call it
        directly.
        """
        lay = self.layout
        act = np.asarray(actions, dtype=np.int64)
        if act.shape != (self.n,) or (act.min() < 0) or (act.max() >= N_ACTIONS):
            raise ConfigError(f"bad actions; expected {self.n} integers in 0..{N_ACTIONS - 1}")
        cfg = self.config
        phi_before = self.potential() if cfg.shaping else None
        self.t += 1
        old = self.pos
        want = lay.neighbours[old, act]
        new, refused = resolve_moves(old, want, self.occupant, self._claim)
        moved = new != old
        self.occupant[old[moved]] = -1
        self.occupant[new[moved]] = self._idx[moved]
        self.pos = new
        self.last_moved = moved
        self.last_refused = refused
        has_task = self.task >= 0
        waiting = has_task & ~moved
        self.conflicts += int(refused.sum())
        self.wait_steps += int(waiting.sum())
        if not moved.any() and has_task.any():
            self.deadlock_steps += 1
        self._pickup()
        delivered = self._deliver()
        self._assign()
        self._pickup()  # a robot assigned while standing on its pick cell picks at once
        self._invalidate_topology()
        reward = delivered.astype(np.float64) - cfg.step_cost - cfg.wait_cost * waiting
        if phi_before is not None:
            reward += cfg.shaping * (cfg.shaping_gamma * self.potential() - phi_before)
        return reward

    # -- tasks ----------------------------------------------------------------------------------
    def _release(self, count: int) -> None:
        """Append ``count`` new tasks (random rack, random station) to the queue."""
        if count <= 0:
            return
        lay = self.layout
        start = self.n_tasks
        end = start + count
        if end > self._task_pick.size:
            grow = max(end, 2 * self._task_pick.size) - self._task_pick.size
            for name in ("_task_pick", "_task_drop", "_task_release"):
                setattr(self, name, np.concatenate([getattr(self, name), np.zeros(grow, np.int64)]))
            for name in ("_task_picked", "_task_delivered", "_task_robot"):
                setattr(self, name, np.concatenate([getattr(self, name), np.full(grow, -1, np.int64)]))
        racks = self._rng.integers(0, lay.access_cells.size, size=count)
        stations = self._rng.integers(0, lay.station_cells.size, size=count)
        self._task_pick[start:end] = lay.target_index[lay.access_cells[racks]]
        self._task_drop[start:end] = lay.target_index[lay.station_cells[stations]]
        self._task_release[start:end] = self.t
        self.n_tasks = end
        self._queue.extend(range(start, end))

    def _assign(self) -> None:
        """Each free robot gets a task: oldest queued task first, to the nearest free robot.

        Every assignment releases a replacement task first, so the queue holds ``backlog`` tasks
        after this call and free robots are never starved.
        """
        free = np.flatnonzero(self.task < 0)
        if free.size == 0:
            return
        k = free.size
        self._release(k)
        tasks = self._queue[:k]
        del self._queue[:k]
        dist = self.layout.dist
        if dist is None:
            self._assign_manhattan(free, tasks)
            return
        free_pos = self.pos[free]
        # One loop iteration per task handed out this step (a few per step in steady state).
        for task in tasks:
            d = dist[self._task_pick[task], free_pos]
            j = int(np.argmin(d))  # first minimum = lowest robot index among the nearest
            robot = int(free[j])
            self.task[robot] = task
            self._task_robot[task] = robot
            free = np.delete(free, j)
            free_pos = np.delete(free_pos, j)

    def _assign_manhattan(self, free: np.ndarray, tasks: list[int]) -> None:
        """:meth:`_assign` on lazy floors: nearest free robot by Manhattan distance to the pick
        cell (ties: lowest robot index); one vectorised pass over the free robots per task."""
        lay = self.layout
        rows, cols = self._rows[self.pos[free]], self._cols[self.pos[free]]
        taken = np.zeros(free.size, dtype=np.int64)
        far = self.layout.n_cells  # more than any Manhattan distance: a taken robot is never nearest
        for task in tasks:
            cell = lay.target_cells[self._task_pick[task]]
            d = np.abs(rows - self._rows[cell]) + np.abs(cols - self._cols[cell]) + taken
            j = int(np.argmin(d))
            robot = int(free[j])
            self.task[robot] = task
            self._task_robot[task] = robot
            taken[j] = far

    def _pickup(self) -> None:
        lay = self.layout
        has = (self.task >= 0) & ~self.carrying
        if not has.any():
            return
        ids = self.task[has]
        at = lay.target_cells[self._task_pick[ids]] == self.pos[has]
        if at.any():
            robots = np.flatnonzero(has)[at]
            self.carrying[robots] = True
            self._task_picked[self.task[robots]] = self.t

    def _deliver(self) -> np.ndarray:
        lay = self.layout
        delivered = self.carrying & (lay.target_cells[self._task_drop[np.maximum(self.task, 0)]] == self.pos)
        if delivered.any():
            ids = self.task[delivered]
            self._task_delivered[ids] = self.t
            self._service_sum += int((self.t - self._task_release[ids]).sum())
            self.deliveries += int(ids.size)
            self.task[delivered] = -1
            self.carrying[delivered] = False
        return delivered

    # -- views ----------------------------------------------------------------------------------
    def goal_targets(self) -> np.ndarray:
        """(n,) target index of each robot's current goal (pick or station), -1 without a task."""
        task = self.task
        safe = np.maximum(task, 0)
        goal = np.where(self.carrying, self._task_drop[safe], self._task_pick[safe])
        return np.where(task >= 0, goal, -1)

    def goal_cells(self) -> np.ndarray:
        """(n,) cell of each robot's current goal; its own cell without a task."""
        goal = self.goal_targets()
        return np.where(goal >= 0, self.layout.target_cells[np.maximum(goal, 0)], self.pos)

    def potential(self) -> np.ndarray:
        """(n,) shaping potential: minus the remaining shortest-path length of each robot's task,
        in cells (to the pick cell and on to the station before picking, to the station when
        carrying; 0 without a task). Other robots are ignored (static floor only)."""
        task = self.task
        safe = np.maximum(task, 0)
        dist = self.layout.dist
        pick, drop = self._task_pick[safe], self._task_drop[safe]
        if dist is None:  # lazy floors: Manhattan lengths (env card)
            cells = self.layout.target_cells
            to_goal = self._manhattan(np.where(self.carrying, cells[drop], cells[pick]), self.pos)
            leg = np.where(self.carrying, 0, self._manhattan(cells[drop], cells[pick]))
            return np.where(task >= 0, -(to_goal + leg), 0).astype(np.float64)
        to_goal = np.where(self.carrying, dist[drop, self.pos], dist[pick, self.pos])
        leg = np.where(self.carrying, 0, dist[drop, self.layout.target_cells[pick]])
        return np.where(task >= 0, -(to_goal + leg), 0).astype(np.float64)

    def shortest_path_actions(self) -> np.ndarray:
        """(n,) the first action of a shortest path to each robot's goal (0 at the goal / idle).

        Ties go to the first action in the order up, down, left, right (a table per map).
        """
        goal = self.goal_targets()
        lay = self.layout
        if lay.next_action is None:
            return self.field_actions(goal)
        act = lay.next_action[np.maximum(goal, 0), self.pos].astype(np.int64)
        return np.where(goal >= 0, act, 0)

    def field_actions(self, goal: np.ndarray) -> np.ndarray:
        """(n,) first moves of shortest paths to the target indices ``goal`` (-1: none, action
        0) from the distance fields: one field per distinct goal (on a lazy floor a BFS for each
        one not in the cache), the same tie rule as the dense table."""
        lay = self.layout
        out = np.zeros(self.n, dtype=np.int64)
        has = np.flatnonzero(goal >= 0)
        targets, inverse = np.unique(goal[has], return_inverse=True)
        for k, target in enumerate(targets.tolist()):
            robots = has[inverse == k]
            here = self.pos[robots]
            field_ = lay.field(target)
            nb = field_[lay.neighbours[here, 1:]]  # (m, 4) distances after up, down, left, right
            best = np.argmin(nb, axis=1)
            out[robots] = np.where(nb[np.arange(robots.size), best] < field_[here], best + 1, 0)
        return out

    def manhattan_actions(self) -> np.ndarray:
        """(n,) the observation's hint on a lazy floor: the first of up, down, left, right that
        lowers the Manhattan distance to the goal and does not bump into a rack or wall (0 at
        the goal, without a task, or when no such move exists). No distance field is read."""
        goal = self.goal_targets()
        cell = np.where(goal >= 0, self.layout.target_cells[np.maximum(goal, 0)], self.pos)
        return self._lazy_hint(cell, self.pos)

    def _manhattan(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Manhattan distance in cells between cell arrays ``a`` and ``b``."""
        return np.abs(self._rows[a] - self._rows[b]) + np.abs(self._cols[a] - self._cols[b])

    def _lazy_hint(
        self, goal_cell: np.ndarray, pos: np.ndarray, dr: np.ndarray | None = None, dc: np.ndarray | None = None
    ) -> np.ndarray:
        """(n,) first of up, down, left, right that lowers the Manhattan distance to the goal and
        does not bump into a rack or wall (0 when none does, or at the goal); ``dr``/``dc``: the
        goal's row/column offsets when already known."""
        if dr is None or dc is None:
            dr = self._rows[goal_cell] - self._rows[pos]
            dc = self._cols[goal_cell] - self._cols[pos]
        wants = (dr < 0) + 2 * (dr > 0) + 4 * (dc < 0) + 8 * (dc > 0)
        return self._first_move[wants & self._valid_bits[pos]]

    def _observations(self) -> dict[str, np.ndarray]:
        lay = self.layout
        n, k = self.n, self._k
        pos = self.pos
        obs = np.empty((n, self.obs_size), dtype=np.float32)
        robots = self._robot_pad
        # Rows and columns by arithmetic, not by gathers from per-cell tables: on a 500 x 500
        # floor those tables are megabytes, and 10,000 random reads a step miss the cache.
        prow, pcol = np.divmod(pos, lay.width)
        centre = (prow + self._r) * self._pw + (pcol + self._r)
        window = centre[:, None] + self._offsets[None, :]
        obs[:, :k] = self._static_pad[window]
        robots[centre] = 1
        win = robots[window]
        robots[centre] = 0  # keep the scratch grid empty between steps
        win[:, k // 2] = 0  # the robot itself is not an "other robot"
        obs[:, k : 2 * k] = win
        goal = self.goal_targets()
        has = goal >= 0
        gcell = np.where(has, lay.target_cells[np.maximum(goal, 0)], pos)
        grow, gcol = np.divmod(gcell, lay.width)
        dr, dc = grow - prow, gcol - pcol
        if lay.dist is None or lay.next_action is None:  # lazy floors: Manhattan features
            d = np.abs(dr) + np.abs(dc)
            hint = np.where(has, self._lazy_hint(gcell, pos, dr, dc), 0)
        else:
            d = lay.dist[np.maximum(goal, 0), pos]
            hint = np.where(has, lay.next_action[np.maximum(goal, 0), pos], 0)
        # The 9 goal features are built as a small (9, n) block, row by row (contiguous), and
        # copied in once: nine strided column writes into the wide array cost more.
        tail = np.empty((9, n), dtype=np.float32)
        tail[0] = dr / lay.height
        tail[1] = dc / lay.width
        tail[2] = np.where(has, np.minimum(d / self._max_dist, 1.0), 0.0)
        tail[3] = self.carrying
        tail[4] = has
        tail[5:] = hint[None, :] == self._hint_codes.T
        obs[:, 2 * k :] = tail.T
        return dict(zip(self.possible_agents, obs))

    def action_mask(self, agent: str) -> np.ndarray:
        """int8 vector over ``Discrete(5)`` for ``agent`` now: 0 for moves into racks, walls or off
        the map (the same read-only row as ``infos[agent]["action_mask"]``). Policies acting through
        ``marl run --policy`` read masks here, since that loop does not pass infos on."""
        return self._mask_rows[int(self._mask_code[self.pos[self._agent_index[agent]]])]

    def _infos(self) -> dict[str, dict[str, Any]]:
        # Shared per-cell dicts of read-only views: nothing is built per agent and step.
        codes = self._mask_code[self.pos].tolist()
        return dict(zip(self.possible_agents, map(self._info_rows.__getitem__, codes)))

    def state(self) -> np.ndarray:
        lay = self.layout
        gcell = self.goal_cells()
        s = np.empty(6 * self.n + 1, dtype=np.float32)
        parts = (
            self._rows[self.pos] / lay.height,
            self._cols[self.pos] / lay.width,
            self._rows[gcell] / lay.height,
            self._cols[gcell] / lay.width,
            self.carrying,
            self.task >= 0,
        )
        for i, part in enumerate(parts):
            s[i * self.n : (i + 1) * self.n] = part
        s[-1] = min(self.t / self.config.horizon, 1.0)
        return s

    def render(self) -> str | None:
        """The floor as text (``render_mode="ansi"``, see the env card); else warn, return None."""
        if self.render_mode != "ansi":
            return super().render()
        lay = self.layout
        floor = np.where(lay.passable, ".", "#").astype("<U1")
        floor[lay.station_cells] = "P"
        if hasattr(self, "pos"):  # robots exist once reset() has placed them
            floor[self.pos] = np.where(self.carrying, "R", "r")
        rows = floor.reshape(lay.height, lay.width)
        return "\n".join("".join(row) for row in rows)

    # -- topology -------------------------------------------------------------------------------
    def _invalidate_topology(self) -> None:
        self._edges_cache = None
        self._topology_cache = None

    def _edges(self) -> tuple[np.ndarray, np.ndarray]:
        if self._edges_cache is None:
            from scipy.spatial import cKDTree

            # A k-d tree finds the close pairs in O(n log n) (a full distance matrix would take
            # n^2 floats: 800 MB at 10,000 robots); sorted as np.nonzero(np.triu(...)) gave them.
            rc = np.stack([self._rows[self.pos], self._cols[self.pos]], axis=1).astype(np.float64)
            pairs = cKDTree(rc).query_pairs(self.config.comm_radius, output_type="ndarray").astype(np.int64)
            pairs.sort(axis=1)
            pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
            diff = rc[pairs[:, 0]] - rc[pairs[:, 1]]
            self._edges_cache = (self.t, pairs.reshape(-1, 2), np.sqrt((diff * diff).sum(-1)))
        return self._edges_cache[1], self._edges_cache[2]

    def topology_edges(self) -> np.ndarray:
        """(E, 2) int64 index pairs ``i < j`` of robots within ``comm_radius`` of each other now."""
        return self._edges()[0]

    def topology_distances(self) -> np.ndarray:
        """(E,) Euclidean distance in cells of each pair in :meth:`topology_edges`."""
        return self._edges()[1]

    @property
    def topology(self) -> nx.Graph:
        """Who can talk now: robots within ``comm_radius`` cells; edge attribute ``distance``."""
        if self._topology_cache is None:
            edges, dist = self._edges()
            g = nx.Graph()
            g.add_nodes_from(self.possible_agents)
            names = self.possible_agents
            g.add_edges_from(
                (names[i], names[j], {"distance": float(d)}) for (i, j), d in zip(edges.tolist(), dist.tolist())
            )
            self._topology_cache = (self.t, g)
        return self._topology_cache[1]

    # -- KPIs -----------------------------------------------------------------------------------
    def episode_kpis(self) -> dict[str, float]:
        steps = max(self.t, 1)
        return {
            "throughput": self.deliveries / steps,
            "deliveries": float(self.deliveries),
            "service_time": self._service_sum / self.deliveries if self.deliveries else float(self.t),
            "wait_share": self.wait_steps / (steps * self.n),
            "conflicts": float(self.conflicts),
            "deadlock_steps": float(self.deadlock_steps),
        }

    def task_table(self) -> dict[str, np.ndarray]:
        """Every task released so far: pick/station cells and release/pick/deliver steps (-1: not yet)."""
        m = self.n_tasks
        lay = self.layout
        return {
            "pick_cell": lay.target_cells[self._task_pick[:m]],
            "station_cell": lay.target_cells[self._task_drop[:m]],
            "released": self._task_release[:m].copy(),
            "picked": self._task_picked[:m].copy(),
            "delivered": self._task_delivered[:m].copy(),
            "robot": self._task_robot[:m].copy(),
        }
