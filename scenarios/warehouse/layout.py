"""Warehouse floors: the MovingAI ``.map`` format (plus two extension characters), a generator
for rack-and-aisle layouts, and the static tables every robot step reuses.

Map format (Sturtevant 2012, "Benchmarks for Grid-Based Pathfinding", movingai.com)::

    type octile
    height H
    width W
    map
    <H rows of exactly W characters>

Characters:

=========  ==========================================================================
``.`` G S  free floor (MovingAI: passable terrain, swamp)
``@`` O T W  obstacle (MovingAI: out of bounds, tree, water) — robots never enter it
``R``      *extension*: a shelf rack cell. An obstacle for movement and a task source:
           a pick at this rack is done from its **access cell**, the first free
           4-neighbour in the order up, down, left, right. Racks with no free
           neighbour are never used.
``P``      *extension*: a pick station, free floor where picked items are delivered.
=========  ==========================================================================

Movement is 4-connected (the "octile" header is kept for compatibility; diagonal moves are
not used). Only the largest 4-connected component of free cells is used for robots, access
cells and stations, so every task is reachable.

A malformed file raises :class:`~marl.core.errors.ConfigError` naming the file, line and column;
the header is checked against the rows before anything is allocated, and a floor is at most
:data:`MAX_CELLS` cells (its distance tables grow with cells x targets). A UTF-8 byte-order
mark at the start is ignored.

**Two ways to hold distances.** By default :func:`build_layout` precomputes a dense table of
shortest-path distances and first moves from every cell to every goal cell (``Layout.dist``,
``Layout.next_action``): fast to read for any robot and goal, but its memory grows as goals x
cells (93 GB for warehouse/xl's 498 x 500 floor with 75,030 goal cells). With a *distance-field cache*
(``dist_cache=K``, :class:`DistanceFields`) no table is built: the distance field of one goal
(one int32 per cell, from a BFS over the floor, about 10 ms on 250,000 cells) is computed when
first asked for and kept in a least-recently-used cache of at most ``K`` fields, so memory is
bounded by ``K x cells x 4`` bytes whatever the number of goals; floors up to
:data:`MAX_LAZY_CELLS` cells are allowed then. A field is a pure function of the floor and the
goal, so what the cache holds changes only the speed of a query, never its answer.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from marl.core.errors import ConfigError, closest, one_line, show

__all__ = [
    "FREE_CHARS",
    "OBSTACLE_CHARS",
    "RACK",
    "STATION",
    "MOVES",
    "Layout",
    "parse_map",
    "load_map",
    "resolve_map_path",
    "builtin_maps",
    "generate_warehouse",
    "UNREACHABLE",
    "MAX_CELLS",
    "MAX_TABLE_BYTES",
    "MAX_LAZY_CELLS",
    "MAX_FIELD_CACHE_BYTES",
    "DistanceFields",
]

FREE_CHARS = frozenset(".GS")
OBSTACLE_CHARS = frozenset("@OTW")
RACK = "R"
STATION = "P"
ALLOWED_CHARS = FREE_CHARS | OBSTACLE_CHARS | {RACK, STATION}

#: Action -> (d_row, d_col): 0 stay, 1 up, 2 down, 3 left, 4 right.
MOVES = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.int64)
#: Distance used for cells that cannot reach a target (never happens inside the used component).
UNREACHABLE = 1_000_000

MAPS_DIR = Path(__file__).parent / "maps"
#: Largest floor, in cells (height x width): 250 x 250 is 19x the built-in large map.
MAX_CELLS = 62_500
#: Largest static tables a floor may need (distance int32 + first move int8, per target and
#: cell), in bytes: a map with many racks can need far more than its cell count suggests.
MAX_TABLE_BYTES = 2 * 2**30
#: Largest floor with a distance-field cache (``dist_cache``), in cells: 1000 x 1000.
MAX_LAZY_CELLS = 1_000_000
#: Largest distance-field cache, in bytes (``dist_cache`` fields x cells x 4).
MAX_FIELD_CACHE_BYTES = 2**30


def builtin_maps() -> list[str]:
    """Names of the maps shipped with Concord (``scenarios/warehouse/maps/*.map``)."""
    return sorted(p.name for p in MAPS_DIR.glob("*.map"))


def resolve_map_path(map_file: str) -> Path:
    """A user path if it exists, else a built-in map of that name; ConfigError otherwise."""
    for path in (Path(map_file).expanduser(), MAPS_DIR / map_file):
        try:
            if path.is_file():
                return path
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte
            pass
    names = builtin_maps()
    hint = closest(map_file, names)
    did = f"; did you mean '{hint}'?" if hint else ";"
    raise ConfigError(
        f"map_file {show(map_file)} is neither a file nor a built-in map{did} built-in: {', '.join(names)}"
    )


def parse_map(text: str, source: str = "<map>", max_cells: int = MAX_CELLS) -> np.ndarray:
    """Parse MovingAI map text into an (H, W) array of single characters (dtype '<U1'); a floor
    of more than ``max_cells`` cells is refused before anything is allocated."""
    # Split on newlines only (str.splitlines also splits on \x1c, \x85 ... and would shift line
    # numbers); a leading byte-order mark is not part of the header.
    lines = [line.rstrip("\r") for line in text.removeprefix("\ufeff").split("\n")]
    if lines[-1] == "":  # the newline that ends the last line does not start another
        lines.pop()

    def err(line: int, col: int, msg: str) -> ConfigError:
        return ConfigError(f"{one_line(source)}:{line}:{col}: {msg}")

    header: dict[str, str] = {}
    expected = ("type", "height", "width", "map")
    i = 0
    for key in expected:
        # Skip blank lines between header entries.
        while i < len(lines) and not lines[i].strip():
            i += 1
        if i >= len(lines):
            raise err(i + 1, 1, f"missing header line '{key}'; a map starts with type/height/width/map")
        parts = lines[i].split()
        if parts[0].lower() != key:
            raise err(i + 1, 1, f"expected header '{key}', found {show(parts[0])}")
        if key == "map":
            if len(parts) != 1:
                raise err(i + 1, 5, "the 'map' line takes no value")
        else:
            if len(parts) != 2:
                raise err(i + 1, len(parts[0]) + 2, f"header '{key}' needs exactly one value")
            header[key] = parts[1]
        i += 1
    if header["type"].lower() != "octile":
        raise err(1, 6, f"map type {show(header['type'])} is not supported; allowed: octile")
    dims = {}
    for header_line, key in ((2, "height"), (3, "width")):
        try:
            dims[key] = int(header[key])
        except ValueError:
            raise err(header_line, len(key) + 2, f"{key} {show(header[key])} is not an integer") from None
        if dims[key] < 1:
            raise err(header_line, len(key) + 2, f"{key} must be >= 1, got {dims[key]}")
    height, width = dims["height"], dims["width"]
    rows = lines[i:]
    while rows and not rows[-1].strip():  # trailing blank lines are harmless
        rows.pop()
    if len(rows) < height:
        raise err(i + len(rows) + 1, 1, f"expected {height} map rows, found {len(rows)}")
    if len(rows) > height:
        raise err(i + height + 1, 1, f"expected {height} map rows, found {len(rows)} (extra rows)")
    if height * width > max_cells:
        more = " (more with a distance-field cache, --set dist_cache=N)" if max_cells == MAX_CELLS else ""
        raise err(
            i - 1, 1, f"the map is {height} x {width} = {height * width} cells; allowed: at most {max_cells}{more}"
        )
    # Check every row against the header before allocating the grid.
    for r, row in enumerate(rows):
        line_no = i + r + 1
        for c, ch in enumerate(row[:width]):
            if ch not in ALLOWED_CHARS:
                raise err(
                    line_no,
                    c + 1,
                    f"unknown map character {show(ch)}; allowed: . G S (free) @ O T W (obstacle) R (rack) P (station)",
                )
        if len(row) != width:
            raise err(line_no, min(len(row), width) + 1, f"row has {len(row)} characters, expected {width}")
    grid = np.empty((height, width), dtype="<U1")
    for r, row in enumerate(rows):
        grid[r] = list(row)
    return grid


def load_map(path: str | Path, max_cells: int = MAX_CELLS) -> np.ndarray:
    """Read and parse a ``.map`` file (see :func:`parse_map`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is dropped
    except OSError as exc:
        raise ConfigError(f"cannot read map file {show(str(path))}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"map file {show(str(path))} is not UTF-8 text (byte {exc.start})") from None
    return parse_map(text, source=str(path), max_cells=max_cells)


def grid_to_text(grid: np.ndarray) -> str:
    """Render a character grid as a MovingAI ``.map`` file."""
    height, width = grid.shape
    rows = ["".join(row) for row in grid]
    return f"type octile\nheight {height}\nwidth {width}\nmap\n" + "\n".join(rows) + "\n"


def generate_warehouse(block_rows: int, block_cols: int, block_width: int, aisle_width: int = 1) -> str:
    """A Kiva-style floor as ``.map`` text.

    Rack blocks are two racks deep (each rack reachable from the aisle above or below it) and
    ``block_width`` racks long, separated by one-cell horizontal aisles and ``aisle_width``-cell
    vertical aisles, inside a two-cell corridor ring. Pick stations sit in the outer wall
    columns (left and right), one every third row, as one-cell bays robots drive into.
    """
    height = 3 * block_rows + 3
    width = 3 + block_cols * block_width + (block_cols - 1) * aisle_width + 3
    grid = np.full((height, width), ".", dtype="<U1")
    grid[:, 0] = "@"
    grid[:, -1] = "@"
    for r in range(2, height - 2, 3):
        grid[r, 0] = STATION
        grid[r, -1] = STATION
    for b in range(block_rows):
        r0 = 2 + 3 * b
        for c in range(block_cols):
            c0 = 3 + c * (block_width + aisle_width)
            grid[r0 : r0 + 2, c0 : c0 + block_width] = RACK
    return grid_to_text(grid)


class DistanceFields:
    """Shortest-path distance fields to goal cells, computed on demand and kept in a bounded LRU.

    ``get(cell)`` returns the (H*W,) int32 field of steps from every cell to ``cell`` over the
    static floor (:data:`UNREACHABLE` outside the used component), from one BFS (scipy's
    ``breadth_first_order``, then depths by pointer jumping over the BFS tree). At most
    ``capacity`` fields are held; asking for another evicts the least recently used one, so the
    cache never holds more than ``capacity x cells x 4`` bytes (checked against
    :data:`MAX_FIELD_CACHE_BYTES` before anything is computed). ``hits``, ``misses`` and
    ``evictions`` count queries since construction. A pickled copy starts with an empty cache
    (fields are recomputed on demand, the answers are the same).
    """

    def __init__(self, graph: Any, n_cells: int, capacity: int, source: str = "<map>") -> None:
        check_dist_cache(capacity, n_cells, source)
        self.graph = graph
        self.n_cells = n_cells
        self.capacity = capacity
        self._fields: OrderedDict[int, np.ndarray] = OrderedDict()
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._fields)

    def __contains__(self, cell: int) -> bool:
        return cell in self._fields

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached fields now (at most ``capacity x cells x 4``)."""
        return sum(f.nbytes for f in self._fields.values())

    def get(self, cell: int) -> np.ndarray:
        """The distance field of goal ``cell`` (read-only; computed and cached when missing)."""
        field_ = self._fields.get(cell)
        if field_ is not None:
            self.hits += 1
            self._fields.move_to_end(cell)
            return field_
        self.misses += 1
        field_ = bfs_field(self.graph, cell, self.n_cells)
        field_.flags.writeable = False
        self._fields[cell] = field_
        if len(self._fields) > self.capacity:
            self._fields.popitem(last=False)
            self.evictions += 1
        return field_

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fields"] = OrderedDict()  # a copy recomputes on demand: answers do not change
        return state


def check_dist_cache(capacity: Any, n_cells: int, source: str = "<map>") -> None:
    """ConfigError unless ``capacity`` fields of ``n_cells`` int32 fit :data:`MAX_FIELD_CACHE_BYTES`."""
    most = max(1, MAX_FIELD_CACHE_BYTES // (4 * n_cells))
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= most:
        raise ConfigError(
            f"bad dist_cache {show(str(capacity))} for {one_line(source)} ({n_cells} cells, "
            f"{4 * n_cells / 2**20:.1f} MiB per field); allowed: an integer 1..{most} "
            f"(at most {MAX_FIELD_CACHE_BYTES / 2**30:.0f} GiB of fields)"
        )


def bfs_field(graph: Any, source: int, n_cells: int) -> np.ndarray:
    """(n_cells,) int32 steps from ``source`` over the undirected ``graph`` (UNREACHABLE elsewhere).

    BFS order and tree from scipy (C); each node's depth is then found by pointer jumping on the
    tree in positions of the BFS order (about log2(depth) vectorised rounds), not a Python loop.
    """
    from scipy.sparse.csgraph import breadth_first_order

    order, pred = breadth_first_order(graph, source, directed=False, return_predecessors=True)
    m = order.size
    position = np.empty(n_cells, dtype=np.int64)
    position[order] = np.arange(m)
    up = position[np.maximum(pred[order], 0)]  # parent's position; the root points to itself
    up[0] = 0
    depth = np.ones(m, dtype=np.int32)
    depth[0] = 0
    while True:  # depth[i] = steps from i to up[i]; jump until every pointer reaches the root
        if not up.any():
            break
        depth += depth[up]
        up = up[up]
    out = np.full(n_cells, UNREACHABLE, dtype=np.int32)
    out[order] = depth
    return out


@dataclass
class Layout:
    """A parsed floor plus the static tables the env and the planners reuse every step.

    Cells are numbered row-major, ``cell = row * width + col``. Built once per map (and cached
    by content hash), so creating many envs on the same map is cheap. With a distance-field
    cache (``fields`` set) the dense ``dist``/``next_action`` tables are ``None``.
    """

    grid: np.ndarray  #: (H, W) characters
    height: int
    width: int
    passable: np.ndarray  #: (H*W,) bool: free floor in the used component (incl. stations)
    neighbours: np.ndarray  #: (H*W, 5) int64: cell reached by each action; invalid moves stay
    action_valid: np.ndarray  #: (H*W, 5) bool: action does not bump into an obstacle/edge
    rack_cells: np.ndarray  #: (n_racks,) cells of usable racks
    access_cells: np.ndarray  #: (n_racks,) aisle cell from which each rack is picked
    station_cells: np.ndarray  #: (n_stations,) station cells
    target_cells: np.ndarray  #: (T,) distinct goal cells: access cells then stations
    target_index: np.ndarray  #: (H*W,) index into target_cells, -1 elsewhere
    dist: np.ndarray | None  #: (T, H*W) int32 shortest-path steps from every cell to each target
    spawn_cells: np.ndarray  #: passable non-station cells robots may start on
    next_action: np.ndarray | None  #: (T, H*W) int8: first move of a shortest path to each target (0 there)
    digest: str = ""
    fields: DistanceFields | None = None  #: the distance-field cache instead of dist/next_action
    _dist_lists: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @property
    def n_cells(self) -> int:
        return self.height * self.width

    @property
    def lazy(self) -> bool:
        """True when distances come from the bounded field cache, not dense tables."""
        return self.fields is not None

    def field(self, target: int) -> np.ndarray:
        """(H*W,) steps from every cell to target index ``target`` (a dense row or a cached field)."""
        if self.dist is not None:
            return self.dist[target]
        assert self.fields is not None
        return self.fields.get(int(self.target_cells[target]))

    def dist_list(self, target: int) -> list[int]:
        """Row ``target`` of :attr:`dist` as a Python list (fast scalar reads for the planner)."""
        row = self._dist_lists.get(target)
        if row is None:
            row = self.field(target).tolist()
            if self.fields is None:  # dense maps keep every list; lazy maps would grow without bound
                self._dist_lists[target] = row
        return row

    def text(self) -> str:
        return grid_to_text(self.grid)


_CACHE: dict[tuple[str, int | None], Layout] = {}


def build_layout(grid: np.ndarray, source: str = "<map>", dist_cache: int | None = None) -> Layout:
    """Precompute neighbour tables, rack access cells and BFS distances (cached by content).

    ``dist_cache=None``: dense distance and first-move tables for every goal (refused past
    :data:`MAX_TABLE_BYTES`); ``dist_cache=K``: no tables, a :class:`DistanceFields` cache of at
    most ``K`` fields instead (one per layout object, shared by the envs built on it).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components, shortest_path

    height, width = grid.shape
    n = height * width
    if dist_cache is not None:
        check_dist_cache(dist_cache, n, source)  # before anything of the floor's size is built
    digest = hashlib.sha1(grid_to_text(grid).encode()).hexdigest()
    if (digest, dist_cache) in _CACHE:
        return _CACHE[digest, dist_cache]
    flat = grid.reshape(-1)
    free = np.isin(flat, list(FREE_CHARS | {STATION}))
    rows, cols = np.divmod(np.arange(n), width)

    # Neighbour table: the cell each action leads to, or the same cell when it is blocked.
    nr = rows[:, None] + MOVES[None, :, 0]
    nc = cols[:, None] + MOVES[None, :, 1]
    inside = (nr >= 0) & (nr < height) & (nc >= 0) & (nc < width)
    target = np.where(inside, nr * width + nc, np.arange(n)[:, None])
    ok = inside & free[target] & free[:, None]

    # Largest 4-connected free component: robots, access cells and stations must lie in it.
    src = np.repeat(np.arange(n), 4)
    dst = target[:, 1:].reshape(-1)
    edge = ok[:, 1:].reshape(-1)
    graph = coo_matrix((np.ones(int(edge.sum())), (src[edge], dst[edge])), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    free_labels = labels[free]
    if free_labels.size == 0:
        raise ConfigError(f"{source}: the map has no free cell")
    main = np.bincount(free_labels).argmax()
    passable = free & (labels == main)
    ok &= passable[:, None]
    ok[:, 0] = True  # staying is always allowed
    neighbours = np.where(ok, target, np.arange(n)[:, None])

    # Access cell of each rack: its first free neighbour, up, down, left, right (vectorised).
    rack_all = np.flatnonzero(flat == RACK)
    reach = inside[rack_all, 1:] & passable[target[rack_all, 1:]]
    usable = reach.any(axis=1)
    first = np.argmax(reach, axis=1)
    racks = rack_all[usable]
    access_cells = target[racks, 1 + first[usable]].astype(np.int64)
    stations = np.flatnonzero((flat == STATION) & passable)
    if racks.size == 0:
        raise ConfigError(f"{source}: the map has no rack 'R' next to reachable free floor")
    if stations.size == 0:
        raise ConfigError(f"{source}: the map has no reachable pick station 'P'")
    targets = np.unique(np.concatenate([access_cells, stations]))
    target_index = np.full(n, -1, dtype=np.int64)
    target_index[targets] = np.arange(targets.size)
    spawn = np.flatnonzero(passable & (flat != STATION))
    dist: np.ndarray | None = None
    next_action: np.ndarray | None = None
    fields = None
    if dist_cache is not None:
        fields = DistanceFields(graph, n, dist_cache, source)
    else:
        # Peak bytes per (target, cell) below: float64 distances, int32 copy, the (T, n, 4) int32
        # neighbour distances, int64 argmin, int8 first moves.
        table_bytes = targets.size * n * 48
        if table_bytes > MAX_TABLE_BYTES:
            raise ConfigError(
                f"{one_line(source)}: {targets.size} pick targets on {n} cells need "
                f"{table_bytes / 2**30:.1f} GiB of distance tables; allowed: at most "
                f"{MAX_TABLE_BYTES / 2**30:.0f} GiB (fewer racks, a smaller floor, or a distance-field "
                "cache: --set dist_cache=N)"
            )
        # One BFS per goal cell over the static floor (the graph is undirected, so distance *from*
        # a target equals distance *to* it). Computed once per map and reused by env and planners.
        d = shortest_path(graph, method="D", unweighted=True, indices=targets)
        dist = np.where(np.isfinite(d), d, UNREACHABLE).astype(np.int32)
        # First move of a shortest path from every cell to every target: the first of up, down,
        # left, right that lowers the distance (0 = stay, at the target or where unreachable).
        nb_dist = dist[:, neighbours[:, 1:]]  # (T, n, 4)
        best = np.argmin(nb_dist, axis=2)
        improves = np.take_along_axis(nb_dist, best[..., None], axis=2)[..., 0] < dist
        next_action = np.where(improves, best + 1, 0).astype(np.int8)
    layout = Layout(
        grid=grid,
        height=height,
        width=width,
        passable=passable,
        neighbours=neighbours.astype(np.int64),
        action_valid=ok,
        rack_cells=racks.astype(np.int64),
        access_cells=access_cells,
        station_cells=stations.astype(np.int64),
        target_cells=targets.astype(np.int64),
        target_index=target_index,
        dist=dist,
        spawn_cells=spawn.astype(np.int64),
        next_action=next_action,
        digest=digest,
        fields=fields,
    )
    _CACHE[digest, dist_cache] = layout
    return layout


def layout_from_file(map_file: str, dist_cache: int | None = None) -> Layout:
    """Resolve, parse and precompute a map named by the ``map_file`` config field (with a
    distance-field cache of ``dist_cache`` fields, floors up to :data:`MAX_LAZY_CELLS` cells)."""
    path = resolve_map_path(map_file)
    max_cells = MAX_CELLS if dist_cache is None else MAX_LAZY_CELLS
    return build_layout(load_map(path, max_cells), source=str(path), dist_cache=dist_cache)
