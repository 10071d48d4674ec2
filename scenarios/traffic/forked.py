"""libsumo simulations in forked children of a clean "zygote" process (reproducible and fast).

SUMO's traffic depends on where its objects lie in memory. A process's first libsumo simulation
allocates them from fresh heap and is reproducible; a later one reuses the heap holes of earlier
ones, whose layout varies from run to run, and its traffic diverged (see the env card,
"Reproducibility"). So every simulation after a process's first runs here: in a child forked
from a zygote that imported libsumo but never simulated, so each child's simulation is a first
one, while the env talks to it with one batched round trip per decision.

Processes and lifetimes:

* **zygote** (one per env process, started by :func:`zygote` with ``subprocess.Popen``, i.e.
  fork + exec: a clean interpreter, never a fork of a process whose heap a simulation used).
  It imports libsumo, then waits on its control socket. Per episode the env sends it one end of a
  new socket pair (``SCM_RIGHTS``); it forks a child that serves the episode on that end and
  replies with the child's pid. It ignores ``SIGCHLD`` so the kernel reaps its children (no
  zombies) and exits on end-of-file of its control socket (the env process closed it at exit
  or died).
* **child** (one per episode): ``libsumo.start(cmd)``, then serves requests until the env asks
  it to close (it closes SUMO, which writes the tripinfo and statistics files, and exits) or
  its socket reaches end-of-file (the env closed it or died: it exits at once, no orphan).
  SUMO's console output goes to a file the env names (its text becomes the error if the
  child dies).
* Both ignore ``SIGINT`` (Ctrl-C stops the env process, whose exit then ends them).

Protocol on an episode socket, every message framed by a 4-byte little-endian length: the env
sends ``pickle((ops, want_out))`` where ``ops`` are queued writes (``(SET, light, state)``,
``(STEP, time)``, ``(CLOSE,)``); the child runs them and replies ``b"K"`` + 7 pad bytes + the
float64 values of :class:`Reading` (little-endian, native order), or ``b"E"`` + the error text.
The first message is the :class:`EpisodeSpec` (pickled) and its reply the start's values.

This module imports only the standard library at the top (the zygote runs it), and numpy and
the project's errors inside the env-side functions.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import weakref
from array import array
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["EpisodeSpec", "ForkedSimulation", "Getters", "Reading", "available", "measure", "zygote"]

#: Request opcodes (first item of each op tuple).
SET, STEP, CLOSE = 0, 1, 2

_LEN = struct.Struct("<I")
_PID = struct.Struct("<i")
_OK = b"K" + bytes(7)  # 8 bytes so that the float64 values after it are aligned


def available() -> bool:
    """Whether this platform can fork and pass sockets (POSIX with ``socket.send_fds``)."""
    return hasattr(os, "fork") and hasattr(socket, "send_fds") and hasattr(socket, "AF_UNIX")


@dataclass(frozen=True)
class EpisodeSpec:
    """What a child needs to run one episode and compute the values the env reads.

    ``lanes`` are read every decision (vehicles, halting vehicles, and waiting time in s if
    ``wait``); ``out_lanes`` (vehicles, halting) only once the env asked for them (``want_out``);
    ``lights`` give their programme phase index; ``far`` are local sensing's ``(k, lane,
    start_m)``: per lane ``lanes[k]``, the vehicles whose front lies before ``start_m`` m
    from the lane's start, and how many of them are slower than ``halting_speed`` m/s.
    """

    cmd: tuple[str, ...]
    lanes: tuple[str, ...]
    out_lanes: tuple[str, ...]
    lights: tuple[str, ...]
    far: tuple[tuple[int, str, float], ...]
    wait: bool
    halting_speed: float
    errors_path: str
    verbose: bool


class Reading:
    """One reply's values as numpy views (no copies): per ``spec.lanes`` ``count``, ``halt``,
    ``wait`` (None unless ``spec.wait``); ``phase`` per light; ``far``, ``far_halt`` per far
    lane; ``out_count``, ``out_halt`` per out lane (None unless asked for)."""

    __slots__ = ("count", "far", "far_halt", "halt", "out_count", "out_halt", "phase", "wait")

    count: Any
    halt: Any
    wait: Any
    phase: Any
    far: Any
    far_halt: Any
    out_count: Any
    out_halt: Any

    def __init__(self, spec: EpisodeSpec, values: Any, with_out: bool) -> None:
        n, t, f, o = len(spec.lanes), len(spec.lights), len(spec.far), len(spec.out_lanes)
        at = 0

        def take(k: int) -> Any:
            nonlocal at
            at += k
            return values[at - k : at]

        self.count, self.halt = take(n), take(n)
        self.wait = take(n) if spec.wait else None
        self.phase = take(t)
        self.far, self.far_halt = take(f), take(f)
        self.out_count, self.out_halt = (take(o), take(o)) if with_out else (None, None)


class Getters(NamedTuple):
    """The simulator calls :func:`measure` makes: libsumo's C entry points in a child, the env's
    own (libsumo's or TraCI's subscription results) in the env process."""

    vehicles: Any  #: lane -> vehicles on it
    halting: Any  #: lane -> vehicles on it slower than 0.1 m/s
    waiting: Any  #: lane -> summed waiting time of its vehicles, s
    phase: Any  #: light -> its programme's current phase index
    ids_on: Any  #: lane -> ids of the vehicles on it
    position: Any  #: vehicle -> its front's distance from its lane's start, m
    speed: Any  #: vehicle -> its speed, m/s


def measure(spec: EpisodeSpec, get: Getters, with_out: bool) -> array:
    """One decision's values in :class:`Reading`'s layout (float64), read through ``get``: the
    forked child sends them as its reply, the env reads them in-process with the same call, so
    both backends fold one layout (``TrafficSignalEnv._sample``)."""
    data = array("d", map(get.vehicles, spec.lanes))  # the lanes' counts first: beyond_range reads them
    data.extend(map(get.halting, spec.lanes))
    if spec.wait:
        data.extend(map(get.waiting, spec.lanes))
    data.extend(map(get.phase, spec.lights))
    far, halted = beyond_range(spec.far, data, get.ids_on, get.position, get.speed, spec.halting_speed)
    data.extend(far)
    data.extend(halted)
    if with_out:
        data.extend(map(get.vehicles, spec.out_lanes))
        data.extend(map(get.halting, spec.out_lanes))
    return data


# ====================================================================== env side
class _Zygote:
    """The env process's handle on its zygote."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The same module search path as this process, so that it imports the same libsumo.
        boot = (
            "import json, runpy, sys; sys.path[:] = json.loads(sys.argv[3]); "
            "runpy.run_path(sys.argv[1], run_name='__main__')"
        )
        paths = json.dumps([p for p in sys.path if p])
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot, os.path.abspath(__file__), str(theirs.fileno()), paths],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.sock = ours
        self.owner = os.getpid()
        self.forks = 0  #: children forked so far
        self._lock = threading.Lock()  # one fork request at a time on the control socket

    def fork(self) -> tuple[int, socket.socket]:
        """A new child and the env's end of its socket (raises OSError if the zygote is gone)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # with this process's current stdout and stderr (they may have been redirected since
        # the zygote started): SUMO's verbose output goes where this process's would
        null = -1
        outputs = []
        for fd in (1, 2):
            try:
                os.fstat(fd)
            except OSError:  # closed (a daemon): the child writes to /dev/null instead
                null = os.open(os.devnull, os.O_WRONLY) if null < 0 else null
                fd = null
            outputs.append(fd)
        with self._lock:
            try:
                socket.send_fds(self.sock, [b"F"], [theirs.fileno(), *outputs])
                self.forks += 1
            finally:
                theirs.close()
                if null >= 0:
                    os.close(null)
            reply = _recv_exact(self.sock, _PID.size)
        if reply is None:
            ours.close()
            raise ConnectionError("the libsumo zygote process exited")
        return _PID.unpack(reply)[0], ours

    def shutdown(self) -> None:
        """Close the control socket and reap the zygote: it exits on the end-of-file once its
        children have (each exits on the end-of-file of its own socket). One that never forked
        (started after a process's only simulation) may still be importing libsumo: killed."""
        self.sock.close()
        if not self.forks:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_ZYGOTE: _Zygote | None = None
#: Live episodes of this process (closed in forked children of it, which must not use them).
_EPISODES: weakref.WeakSet[ForkedSimulation] = weakref.WeakSet()


def zygote() -> _Zygote:
    """This process's zygote, started at the first call (non-blocking: it imports libsumo in the
    background, and the first fork request waits for it). It lives until the process exits
    (:func:`shutdown`), for the process's later simulations."""
    global _ZYGOTE
    if _ZYGOTE is None or _ZYGOTE.owner != os.getpid():
        _ZYGOTE = _Zygote()
        # multiprocessing's workers end with os._exit (no atexit) after running its finalizers
        from multiprocessing import util

        util.Finalize(None, shutdown, exitpriority=0)
    return _ZYGOTE


def _fork_child() -> tuple[int, socket.socket]:
    global _ZYGOTE
    try:
        return zygote().fork()
    except OSError:  # the zygote died (killed, or its start failed): one fresh try
        if _ZYGOTE is not None:
            _ZYGOTE.sock.close()
            if _ZYGOTE.proc.poll() is None:
                _ZYGOTE.proc.kill()
            _ZYGOTE.proc.wait()
            _ZYGOTE = None
        return zygote().fork()


def _after_fork_in_child() -> None:
    """A forked copy of the env process inherits the sockets of its parent's zygote and live
    episodes: close its copies (the parent keeps using them; its own zygote starts on use)."""
    global _ZYGOTE
    if _ZYGOTE is not None:
        _ZYGOTE.sock.close()
        _ZYGOTE.proc.returncode = 0  # not our child: never wait for or kill it
        _ZYGOTE = None
    for episode in list(_EPISODES):
        episode._sock.close()
        episode._dead = "this process was forked from the one running the simulation"


def shutdown() -> None:
    """End this process's episodes (their children exit without writing files) and its zygote,
    and reap it; idempotent. Runs at interpreter exit (and at a multiprocessing worker's end)."""
    global _ZYGOTE
    for episode in list(_EPISODES):
        episode._sock.close()
        episode._dead = "the process is shutting its simulations down"
    zyg, _ZYGOTE = _ZYGOTE, None
    if zyg is not None and zyg.owner == os.getpid():
        zyg.shutdown()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(shutdown)


class ForkedSimulation:
    """One libsumo simulation in a forked child, driven with one round trip per read.

    Writes (:meth:`set_state`, :meth:`step`) are queued and sent with the next read
    (:meth:`read`), whose reply carries every value of :class:`Reading`; reads without writes in
    between reuse the last reply. Errors are :class:`~marl.core.errors.SimulatorError` (a child
    that died, a failed operation); a start SUMO refused raises :class:`StartError` (the env
    names the rejected file from its text).
    """

    def __init__(self, spec: EpisodeSpec) -> None:
        import numpy as np

        self._np = np
        self.spec = spec
        self._ops: list[tuple[Any, ...]] = []
        self._dead = ""
        self._want_out = False
        self._stale = False
        try:
            self.pid, self._sock = _fork_child()
        except OSError as exc:
            raise self._error(f"could not start a libsumo process from the zygote: {exc}") from None
        _EPISODES.add(self)
        self._light = {tl: i for i, tl in enumerate(spec.lights)}
        self._reading = self._exchange(spec)

    # -- writes (queued)
    def set_state(self, light: str, state: str) -> None:
        """``trafficlight.setRedYellowGreenState(light, state)``, sent with the next read."""
        self._ops.append((SET, light, state))

    def step(self, time: float) -> None:
        """``simulationStep(time)``, sent with the next read."""
        self._ops.append((STEP, float(time)))

    # -- reads
    def read(self) -> Reading:
        """The values after all queued writes (one round trip if there are any)."""
        if self._ops or self._stale or (self._want_out and self._reading.out_count is None):
            self._stale = False
            self._reading = self._exchange((self._ops, self._want_out, None))
        return self._reading

    def want_out(self) -> None:
        """Include the out lanes' values in this and every later reply of the episode."""
        self._want_out = True

    def __getattr__(self, domain: str) -> _Domain:
        """libsumo's API by domain, remotely: ``sim.lane.getLastStepVehicleIDs(lane)`` runs the
        queued writes, then the call in the child (one round trip per call: for tests and
        debugging; the env's own reads go through :meth:`read`)."""
        if domain.startswith("_"):
            raise AttributeError(domain)
        return _Domain(self, domain)

    def call(self, domain: str, name: str, *args: Any) -> Any:
        """``libsumo.<domain>.<name>(*args)`` in the child, after the queued writes."""
        reply = self._exchange((self._ops, False, (domain, name, args)))
        self._stale = True  # the writes ran: the next read() asks for fresh values
        return reply

    def phase(self, light: str) -> int:
        """The programme phase index of ``light``."""
        return int(self.read().phase[self._light[light]])

    def close(self) -> None:
        """Run the queued writes, close SUMO (it writes its output files) and let the child
        exit; idempotent. Raises SimulatorError if the child died before it could close (its
        files are then incomplete); after an earlier error it only closes the socket."""
        if self._sock.fileno() < 0:
            return
        try:
            if not self._dead:
                self._exchange(([*self._ops, (CLOSE,)], False, None))
        finally:
            self._ops = []
            self._sock.close()

    # -- transport
    def _exchange(self, request: Any) -> Any:
        if self._dead:
            raise self._error(f"its simulation process is unusable ({self._dead}); reset() starts a new one")
        # the spec as a dict: the child's EpisodeSpec class lives in its __main__ module
        data = dict(request.__dict__) if isinstance(request, EpisodeSpec) else request
        payload = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        self._ops = []
        try:
            _send_message(self._sock, payload)
            reply = _recv_message(self._sock)
        except OSError:
            reply = None
        except BaseException:  # e.g. KeyboardInterrupt mid-reply: the stream is out of step
            self._dead = "interrupted during a request"
            self._sock.close()
            raise
        if reply is None:
            self._dead = "it exited"
            self._sock.close()
            if isinstance(request, EpisodeSpec):  # while loading: SUMO's words if it wrote any
                raise StartError(self._errors() or f"the libsumo process (pid {self.pid}) exited while loading")
            raise self._error(self._died())
        if reply[:1] == b"E":
            text = reply[1:].decode(errors="replace")
            if isinstance(request, EpisodeSpec):
                self._dead = "its start failed"
                self._sock.close()
                raise StartError(text)
            raise self._error(f"SUMO failed: {' '.join(text.split())}")
        if reply[:1] == b"P":  # a call's result
            return pickle.loads(reply[1:])
        values = self._np.frombuffer(reply, dtype=self._np.float64, offset=len(_OK))
        return Reading(self.spec, values, with_out=bool(not isinstance(request, EpisodeSpec) and request[1]))

    def _errors(self) -> str:
        """What SUMO wrote to its console output, on one line."""
        try:
            with open(self.spec.errors_path, errors="replace") as f:
                return " ".join(f.read().split())
        except OSError:
            return ""

    def _died(self) -> str:
        text = self._errors()
        detail = f": {text}" if text else " (killed, or SUMO crashed without a message)"
        return f"the libsumo process running this episode (pid {self.pid}) exited{detail}; reset() starts a new one"

    @staticmethod
    def _error(text: str) -> Exception:
        from marl.core.errors import SimulatorError

        return SimulatorError(text)


class _Domain:
    """One libsumo domain (``lane``, ``vehicle``...) of a :class:`ForkedSimulation`."""

    def __init__(self, sim: ForkedSimulation, domain: str) -> None:
        self._sim, self._domain = sim, domain

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args: self._sim.call(self._domain, name, *args)


class StartError(RuntimeError):
    """The child could not start the simulation: libsumo's message (SUMO refused the net or
    route file), or SUMO's console output if the child died while loading."""


def beyond_range(
    far_lanes: tuple[tuple[int, str, float], ...], counts: Any, ids_on: Any, position: Any, speed: Any, slow: float
) -> tuple[list[int], list[int]]:
    """Local sensing: per far lane ``(k, lane, start_m)``, the vehicles whose front lies before
    ``start_m`` m from the lane's start (beyond the detector's range) and how many of them are
    slower than ``slow`` m/s. ``counts[k]`` is the lane's vehicle count: an empty lane (most of
    them, most of the time) costs no call. Two simulator calls per vehicle on the other lanes;
    called by :func:`measure`."""
    far, halted = [0] * len(far_lanes), [0] * len(far_lanes)
    for j, (k, lane, start) in enumerate(far_lanes):
        if not counts[k]:
            continue
        for vehicle in ids_on(lane):
            if position(vehicle) < start:
                far[j] += 1
                halted[j] += speed(vehicle) < slow
    return far, halted


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None at end-of-file."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            return None
        got += k
    return bytes(buf)


def _recv_message(sock: socket.socket) -> bytes | None:
    head = _recv_exact(sock, _LEN.size)
    if head is None:
        return None
    return _recv_exact(sock, _LEN.unpack(head)[0])


def _send_message(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LEN.pack(len(payload)) + payload)


# ====================================================================== zygote and child side
def _zygote_main(fd: int) -> None:
    """Import libsumo, then fork one child per request until the control socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl = socket.socket(fileno=fd)
    import libsumo  # noqa: F401  (loaded once here: every child starts with it, unused)

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps exited children
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(ctl, 16, 3)
        except OSError:
            break
        if not msg:
            break  # the env process closed its end or died
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            continue
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ctl.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for fd, target in ((fds[1], 1), (fds[2], 2)):  # the env process's stdout, stderr
                    os.dup2(fd, target)
                    os.close(fd)
                _serve_episode(socket.socket(fileno=fds[0]))
                code = 0
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        ctl.sendall(_PID.pack(pid))
    # Leave only once every child has exited (they do on the end-of-file of their sockets), so
    # that none outlives its zygote: an orphan would be left to an init that may never reap it.
    with contextlib.suppress(ChildProcessError):
        while True:
            os.wait()  # with SIGCHLD ignored: blocks until all children are gone, then ECHILD


def _serve_episode(sock: socket.socket) -> None:
    """Run one episode's simulation for the env on ``sock`` (see the module's protocol)."""
    import libsumo
    from libsumo import _libsumo as c

    head = _recv_message(sock)
    if head is None:
        return
    spec = EpisodeSpec(**pickle.loads(head))
    if not spec.verbose:  # SUMO's console output to the env's file, as the TraCI path does
        out = os.open(spec.errors_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
    try:
        libsumo.start(list(spec.cmd))
    except Exception as exc:  # libsumo's TraCIException/FatalTraCIError: SUMO refused the input
        _send_message(sock, b"E" + str(exc).encode())
        return
    get = Getters(
        c.lane_getLastStepVehicleNumber, c.lane_getLastStepHaltingNumber, c.lane_getWaitingTime,
        c.trafficlight_getPhase, c.lane_getLastStepVehicleIDs, c.vehicle_getLanePosition, c.vehicle_getSpeed,
    )  # fmt: skip
    set_state, step_to = c.trafficlight_setRedYellowGreenState, c.simulation_step

    def values(with_out: bool) -> bytes:
        return _OK + measure(spec, get, with_out).tobytes()

    _send_message(sock, values(False))
    while True:
        msg = _recv_message(sock)
        if msg is None:
            return  # the env closed its end or died: leave without writing its files
        ops, with_out, call = pickle.loads(msg)
        try:
            for op in ops:
                if op[0] == SET:
                    set_state(op[1], op[2])
                elif op[0] == STEP:
                    step_to(op[1])
                else:
                    libsumo.close()
                    _send_message(sock, _OK)
                    return
            if call is not None:
                domain, name, args = call
                reply = b"P" + pickle.dumps(getattr(getattr(libsumo, domain), name)(*args))
            else:
                reply = values(with_out)
        except Exception as exc:
            reply = b"E" + f"{type(exc).__name__}: {exc}".encode()
        _send_message(sock, reply)


if __name__ == "__main__":
    _zygote_main(int(sys.argv[2]))
