"""`marl report` on the committed fixture: statistics checked against independent numpy/scipy
computations from the raw CSV, best-value marking, formats, figures, and bad input."""

from __future__ import annotations

import csv
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import scipy.stats as sps

from marl.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "report_small"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    """One report of the fixture, built once (figures included) and shared by the tests."""
    target = tmp_path_factory.mktemp("report") / "small"
    shutil.copytree(FIXTURE, target)
    assert main(["report", str(target), "--improvement", "neighbours,none", "--reps", "1000", "--quiet"]) == 0
    return target


def _seed_means() -> dict[tuple[str, str, str, str], dict[int, list[float]]]:
    """(method, protocol, channel, metric) -> {seed: [episode values]} read with the csv module."""
    out: dict = defaultdict(lambda: defaultdict(list))
    with (FIXTURE / "records.csv").open() as fh:
        for row in csv.DictReader(fh):
            out[(row["method"], row["protocol"], row["channel"], row["metric"])][int(row["seed"])].append(
                float(row["value"])
            )
    return out


def _summary(report_dir: Path) -> dict[tuple[str, str, str, str], dict[str, str]]:
    with (report_dir / "report" / "summary.csv").open() as fh:
        return {(r["method"], r["protocol"], r["channel"], r["metric"]): r for r in csv.DictReader(fh)}


def test_summary_matches_independent_computation(report_dir):
    summary = _summary(report_dir)
    raw = _seed_means()
    checked = 0
    for key, by_seed in raw.items():
        if key[3] not in ("delay", "return"):
            continue
        per_seed = np.array([np.mean(v) for _, v in sorted(by_seed.items())])
        row = summary[key]
        assert int(row["n_seeds"]) == len(per_seed)
        assert float(row["mean"]) == pytest.approx(per_seed.mean(), rel=1e-9)
        assert float(row["iqm"]) == pytest.approx(sps.trim_mean(per_seed, 0.25), rel=1e-9)
        if len(per_seed) >= 2:
            low, high = sps.t.interval(0.95, len(per_seed) - 1, loc=per_seed.mean(), scale=sps.sem(per_seed))
            assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((low, high), rel=1e-9)
            # 2-4 seeds: no IQM interval (a bootstrap of so few seeds is just their spread).
            assert len(per_seed) < 5 and row["iqm_low"] in ("", "nan") and row["iqm_high"] in ("", "nan")
        else:
            assert row["ci_low"] in ("", "nan") and row["iqm_low"] in ("", "nan")
        comms = raw.get((*key[:3], "bytes_per_agent_step"))
        if comms:
            expected = np.mean([np.mean(v) for v in comms.values()])
            assert float(row["bytes_per_agent_step"]) == pytest.approx(expected)
        else:
            assert row["bytes_per_agent_step"] in ("", "nan")
        checked += 1
    assert checked == 14  # 7 settings x 2 KPIs


def _md_rows(markdown: str, heading: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## ") and heading in line)
    rows = []
    for line in lines[start + 4 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_markdown_marks_best_by_goal_and_shows_na(report_dir):
    markdown = (report_dir / "report" / "report.md").read_text()
    raw = _seed_means()
    for metric, pick in (("delay", min), ("return", max)):  # delay: fallback min; return: generic max
        means = {k[:3]: np.mean([np.mean(v) for v in s.values()]) for k, s in raw.items() if k[3] == metric}
        best = pick(means, key=means.get)
        rows = _md_rows(markdown, f"— {metric} (")
        assert len(rows) == len(means)
        bold = [tuple(r[:3]) for r in rows if r[4].startswith("**")]
        label = (best[0], best[1], best[2] or "perfect")
        assert bold == [label]
    gamma = next(r for r in _md_rows(markdown, "— delay (") if r[0] == "gamma")
    assert gamma[3] == "1" and "[n/a]" in gamma[4] and "[n/a]" in gamma[5]
    assert "single seed" in markdown and "assumed lower is better" in markdown
    # 3 seeds: the mean has its t-interval; the IQM is shown without an interval, and a note says why.
    alpha = next(r for r in _md_rows(markdown, "— delay (") if r[:3] == ["alpha", "none", "perfect"])
    assert "[n/a]" not in alpha[4] and alpha[5].endswith("[n/a]") and "IQM interval is n/a" in markdown
    # Lowest bytes among cells with a channel: neighbours (48) beats broadcast (160).
    neighbours = [r for r in _md_rows(markdown, "— delay (") if r[1] == "neighbours"]
    assert all(r[6] == "**48**" for r in neighbours)
    # Provenance footer from the manifests.
    assert "commit: 0123abc" in markdown and "world size: 1, 2" in markdown and "seeds: 0, 1, 2" in markdown


def test_probability_of_improvement_in_report(report_dir):
    raw = _seed_means()
    # delay is lower-is-better: P(neighbours better than none) = P(-x_n > -x_0), ties one half.
    xn = np.array([np.mean(v) for v in raw[("alpha", "neighbours", "", "delay")].values()])
    x0 = np.array([np.mean(v) for v in raw[("alpha", "none", "", "delay")].values()])
    expected = np.mean([(a < b) + 0.5 * (a == b) for a in xn for b in x0])
    markdown = (report_dir / "report" / "report.md").read_text()
    line = next(ln for ln in markdown.splitlines() if "P(neighbours > none)" in ln and "| delay |" in ln)
    assert f"= {expected:.4g} [" in line and "method=alpha, channel=perfect" in line
    # none ran on the perfect channel only: at drop=0.3 neighbours is compared with that baseline.
    xd = np.array([np.mean(v) for v in raw[("alpha", "neighbours", "drop=0.3", "delay")].values()])
    expected = np.mean([(a < b) + 0.5 * (a == b) for a in xd for b in x0])
    line = next(
        ln for ln in markdown.splitlines() if "P(neighbours > none)" in ln and "drop=0.3" in ln and "| delay |" in ln
    )
    assert "channel=drop=0.3 (none: perfect-channel baseline)" in line and f"= {expected:.4g} [" in line
    assert "none's perfect-channel run of the same method" in markdown


def test_latex_csv_and_figures(report_dir):
    tex = (report_dir / "report" / "report.tex").read_text()
    assert tex.count(r"\toprule") == 3 and tex.count(r"\bottomrule") == 3  # 2 KPIs + improvement
    assert r"\textbf{48}" in tex and "drop=0.3" in tex
    figures = report_dir / "report" / "figures"
    pngs = sorted(p.name for p in figures.glob("*.png"))
    assert pngs == ["fixture_toy_delay_vs_bytes.png", "fixture_toy_delay_vs_drop.png"]
    for png in figures.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 100_000
        assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    assert not list((report_dir / "report").rglob("*.tmp"))


def test_metric_selection_and_format(tmp_path, capsys):
    target = tmp_path / "r"
    shutil.copytree(FIXTURE, target)
    assert main(["report", str(target), "--metric", "return", "--format", "csv", "--no-figures", "--quiet"]) == 0
    assert not (target / "report" / "report.md").exists()
    with (target / "report" / "summary.csv").open() as fh:
        assert {r["metric"] for r in csv.DictReader(fh)} == {"return"}


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert "no records.csv" in capsys.readouterr().err

    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "records.csv").write_text("run_id,scenario,algorithm,seed,step,metric,value\nr,s,a,0,0,x,1\n")
    assert main(["report", str(mixed)]) == 2
    assert "expected" in capsys.readouterr().err

    header_only = tmp_path / "header"
    header_only.mkdir()
    (header_only / "records.csv").write_text((FIXTURE / "records.csv").read_text().splitlines()[0] + "\n")
    assert main(["report", str(header_only)]) == 2
    assert "no result rows" in capsys.readouterr().err

    ok = tmp_path / "ok"
    shutil.copytree(FIXTURE, ok)
    assert main(["report", str(ok), "--metric", "dely"]) == 2
    err = capsys.readouterr().err
    assert "unknown metric 'dely'" in err and "did you mean 'delay'" in err and len(err.strip().splitlines()) == 1
    assert main(["report", str(ok), "--format", "html"]) == 2
    assert "unknown report format 'html'" in capsys.readouterr().err
    assert main(["report", str(ok), "--improvement", "neighbours,nobody"]) == 2
    assert "nobody" in capsys.readouterr().err


def test_goals_come_from_the_registry():
    from marl.core import registry
    from marl.results.aggregate import scenario_goals

    sid = next(iter(registry.scenarios()), None)
    if sid is None:
        pytest.skip("no scenario registered yet")
    cls = registry.load(registry.scenario_spec(sid).entry_point)
    goals = scenario_goals(sid)
    assert goals.goals == dict(cls.kpi_goals) and goals.main_kpi == cls.main_kpi
    for metric, goal in cls.kpi_goals.items():
        assert goals.goal(metric) == goal
    assert goals.goal("unheard_of") == "min" and any("unheard_of" in n for n in goals.notes)


def test_fault_tolerance_rows_are_training_logs_not_kpis():
    """``rank_failure_<r>``/``rank_rejoin_<r>`` rows (world size after a death or a rejoin) sit
    beside the training curves: never a KPI of a table, and a resumed run may log them again."""
    import pandas as pd

    from marl.results.aggregate import kpi_metrics

    frame = pd.DataFrame({"metric": ["delay", "train_return", "rank_failure_1", "rank_rejoin_1", "throughput"]})
    assert kpi_metrics(frame) == ["delay", "throughput"]
