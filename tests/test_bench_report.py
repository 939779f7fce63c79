"""The benchmark's target table: medians and the spread of each ratio over repetitions.

Hand-made cells (the report is pure arithmetic over them); the benchmark itself runs as
``bench/run``, not in the test suite.
"""

from __future__ import annotations

from bench import report
from bench.workloads import Cell, default_workloads


def cell(system: str, workload: str, rep: int, *, cpu: float = 0.0, rate: float = 1000.0,
         p50: float | None = None) -> Cell:  # fmt: skip
    latency = {} if p50 is None else {p: p50 for p in report.PCTS}
    return Cell(system=system, workload=workload, rep=rep, tool="python", completed=1000,
                errors=0, rate=rate, latency_us=latency, proxy_cpu_us=cpu,
                proxy_cpu_split_us=(cpu / 2, cpu / 2), nginx_cpu_us=0.0,
                gen_cpu_us=None)  # fmt: skip


def ka1000(rep: int, consul_cpu: float, meshd_cpu: float, direct: float, consul: float,
           meshd: float) -> list[Cell]:  # fmt: skip
    return [
        cell("direct", "ka-1000", rep, p50=direct),
        cell("consul", "ka-1000", rep, cpu=consul_cpu, p50=consul),
        cell("meshd", "ka-1000", rep, cpu=meshd_cpu, p50=meshd),
    ]


CELLS = [
    *ka1000(0, consul_cpu=100, meshd_cpu=120, direct=100, consul=200, meshd=220),
    *ka1000(1, consul_cpu=150, meshd_cpu=200, direct=130, consul=230, meshd=300),
    *ka1000(2, consul_cpu=125, meshd_cpu=150, direct=90, consul=190, meshd=80),
    cell("consul", "ka-max", 0, rate=30000),
    cell("meshd", "ka-max", 0, rate=27000),
    cell("consul", "ka-max", 1, rate=20000),
    cell("meshd", "ka-max", 1, rate=15000),
]


def test_each_repetition_is_paired_with_consul_of_the_same_repetition() -> None:
    assert report.rep_ratios(CELLS, "meshd", "ka-1000", "cpu") == [1.2, 200 / 150, 1.2]
    assert report.rep_ratios(CELLS, "meshd", "ka-max", "rate") == [0.9, 0.75]


def test_added_latency_is_paired_with_direct_and_non_positive_ones_are_left_out() -> None:
    # rep 2: meshd's p50 is below direct's (not distinguishable from direct): no ratio.
    assert report.rep_ratios(CELLS, "meshd", "ka-1000", "added-p50") == [1.2, 1.7]


def test_a_missing_system_or_workload_gives_no_ratios() -> None:
    assert report.rep_ratios(CELLS, "meshd-w2", "ka-1000", "cpu") == []
    assert report.rep_ratios(CELLS, "meshd", "nc-50", "added-p50") == []


def test_targets_show_the_median_and_how_many_repetitions_were_within_the_limit() -> None:
    keys = report.keys_for(default_workloads(50))
    ts = {t.name: t for t in report.targets(report.aggregate(CELLS), keys, "meshd", CELLS)}
    cpu = ts["CPU per request @ka-1000"]
    assert cpu.measured == "1.20x (150 vs 125)"  # medians: 120/150/200 vs 100/125/150
    assert cpu.per_rep == "1.20x to 1.33x (2 of 3 within)"
    assert cpu.passed is True and not cpu.inconclusive
    tput = ts["max throughput (keep-alive)"]
    assert tput.per_rep == "0.75x to 0.90x (1 of 2 within)"
    # The median (21,000 vs 25,000 = 0.84) passes, but not most repetitions: no finding.
    assert tput.passed is True and tput.inconclusive
    p99 = ts["added p99 @ka-1000"]  # 120, 170 and -10 µs over direct
    assert (p99.measured, p99.per_rep) == ("120 µs", "-10 to 170 µs (3 of 3 within)")
    assert ts["new-connection added p50 @nc-50"].passed is None  # not measured
    assert ts["new-connection added p50 @nc-50"].per_rep == "-"
    table = report.targets_table(list(ts.values()), "meshd")
    assert "| ≥ 0.8x | inconclusive (median: PASS) |" in table
    assert (
        "| CPU per request @ka-1000 | 1.20x (150 vs 125) | 1.20x to 1.33x (2 of 3 within) |"
        in table
    )


def test_a_verdict_stands_only_where_most_repetitions_agree_with_the_median() -> None:
    # 1.10, 1.30 and 1.40: the medians' ratio (130 vs 100) fails, and so do 2 of 3.
    cells = [
        *ka1000(0, consul_cpu=100, meshd_cpu=110, direct=100, consul=200, meshd=200),
        *ka1000(1, consul_cpu=100, meshd_cpu=130, direct=100, consul=200, meshd=200),
        *ka1000(2, consul_cpu=100, meshd_cpu=140, direct=100, consul=200, meshd=200),
    ]
    keys = report.keys_for(default_workloads(50))
    ts = {t.name: t for t in report.targets(report.aggregate(cells), keys, "meshd", cells)}
    cpu = ts["CPU per request @ka-1000"]
    assert cpu.passed is False and not cpu.inconclusive
    # 1.20, 1.30 and 1.20 against medians of 120 and 100 would pass; 2 of 3 within too.
    cells[2] = cell("meshd", "ka-1000", 0, cpu=120, p50=200)
    cells[5] = cell("meshd", "ka-1000", 1, cpu=130, p50=200)
    cells[8] = cell("meshd", "ka-1000", 2, cpu=120, p50=200)
    ts = {t.name: t for t in report.targets(report.aggregate(cells), keys, "meshd", cells)}
    assert ts["CPU per request @ka-1000"].passed is True
    assert not ts["CPU per request @ka-1000"].inconclusive


def test_failed_requests_fail_the_target_whatever_the_ratio() -> None:
    cells = list(CELLS)
    cells[2] = Cell(**{**cells[2].__dict__, "errors": 3})  # meshd's ka-1000, repetition 0
    keys = report.keys_for(default_workloads(50))
    ts = {t.name: t for t in report.targets(report.aggregate(cells), keys, "meshd", cells)}
    cpu = ts["CPU per request @ka-1000"]
    assert cpu.passed is False and cpu.measured.endswith("3 failed requests")
    assert ts["added p99 @ka-1000"].passed is False
