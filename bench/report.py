"""Aggregate cells into figures, check the issue's targets, render the table.

Every figure is a median over repetitions. Added latency is paired: in repetition *r* the
system's percentile minus ``direct``'s percentile in the same repetition (cells of one
repetition run back to back, interleaved), then the median over *r*.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.workloads import Cell, Workload

PCTS = ("p50", "p90", "p99", "p99.9")
REFERENCE = "consul"
CANDIDATE = "meshd"
WORKERS = "meshd-w2"  # meshd with [proxy] workers = 2: two processes per proxy
BEGIN = "<!-- bench:{name}:begin -->"
END = "<!-- bench:{name}:end -->"


def _median(xs: Iterable[float]) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return statistics.median(vals) if vals else float("nan")


@dataclass(frozen=True)
class Figures:
    """Medians for one (system, workload)."""

    reps: int
    rate: float
    errors: int
    latency: dict[str, float]
    added: dict[str, float]
    cpu_us: float
    cpu_split_us: tuple[float, ...]
    gen_cpu_us: float
    gen_lag_p99_us: float


def aggregate(cells: Sequence[Cell]) -> dict[tuple[str, str], Figures]:
    """Figures per (system, workload)."""
    by: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        by.setdefault((c.system, c.workload), []).append(c)
    direct = {(c.workload, c.rep): c for c in cells if c.system == "direct"}
    out: dict[tuple[str, str], Figures] = {}
    for key, cs in by.items():
        added = {}
        for p in PCTS:
            diffs = [
                c.latency_us.get(p, float("nan")) - direct[(c.workload, c.rep)].latency_us[p]
                for c in cs
                if (c.workload, c.rep) in direct and c.latency_us
            ]
            added[p] = _median(diffs)
        width = max(len(c.proxy_cpu_split_us) for c in cs)
        split = tuple(
            _median(c.proxy_cpu_split_us[i] for c in cs if len(c.proxy_cpu_split_us) > i)
            for i in range(width)
        )
        out[key] = Figures(
            reps=len(cs),
            rate=_median(c.rate for c in cs),
            errors=sum(c.errors for c in cs),
            latency={p: _median(c.latency_us.get(p, float("nan")) for c in cs) for p in PCTS},
            added=added,
            cpu_us=_median(c.proxy_cpu_us for c in cs),
            cpu_split_us=split,
            gen_cpu_us=_median(c.gen_cpu_us for c in cs if c.gen_cpu_us is not None),
            gen_lag_p99_us=_median(c.gen_lag_p99_us for c in cs if c.gen_lag_p99_us is not None),
        )
    return out


def _fmt(x: float, digits: int = 0) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:,.{digits}f}"


def _ratio(x: float, ref: float) -> str:
    # A non-positive added latency means "not distinguishable from direct": no ratio.
    if math.isnan(x) or math.isnan(ref) or ref <= 0 or x < 0:
        return "-"
    return f"{x / ref:.2f}x"


@dataclass(frozen=True)
class Keys:
    """Which workloads feed the summary columns."""

    steady: str  # keep-alive at 1000 req/s
    max_ka: str
    newconn: str
    max_nc: str


def keys_for(workloads: Sequence[Workload]) -> Keys:
    names = [w.name for w in workloads]
    nc = next((w.name for w in workloads if w.conn == "newconn" and w.rate > 0), "")
    return Keys(
        steady="ka-1000" if "ka-1000" in names else names[0],
        max_ka="ka-max",
        newconn=nc,
        max_nc="nc-max",
    )


def summary_table(figs: dict[tuple[str, str], Figures], systems: Sequence[str], k: Keys) -> str:
    """The one table: key figures per system, then each as a ratio to Consul's proxy."""
    nan = float("nan")
    empty = Figures(0, nan, 0, {}, {}, nan, (), nan, nan)

    def f(s: str, w: str) -> Figures:
        return figs.get((s, w), empty)

    def key_figures(s: str) -> list[float]:
        st, nc = f(s, k.steady), f(s, k.newconn)
        return [
            st.cpu_us if s != "direct" else nan,
            *(st.added.get(p, nan) for p in PCTS),
            f(s, k.max_ka).rate,
            nc.added.get("p50", nan),
            f(s, k.max_nc).rate,
        ]

    names = ["CPU µs/req", "added p50 µs", "p90", "p99", "p99.9", "max req/s",
             "new-conn added p50 µs", "max new conn/s"]  # fmt: skip
    ratio_of = (0, 1, 3, 5, 6, 7)  # which figures also get a "vs consul" column
    ref = key_figures(REFERENCE)
    head = ["system", *names, *(f"{names[i].split(' µs')[0]} ÷ consul" for i in ratio_of)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in systems:
        vals = key_figures(s)
        if s == "direct":
            cells = ["direct", "-", "0", "0", "0", "0", _fmt(vals[5]), "0", _fmt(vals[7])]
            cells += ["-", "-", "-", _ratio(vals[5], ref[5]), "-", _ratio(vals[7], ref[7])]
        else:
            cells = [s, *(_fmt(v) for v in vals), *(_ratio(vals[i], ref[i]) for i in ratio_of)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def detail_table(
    figs: dict[tuple[str, str], Figures], systems: Sequence[str], workloads: Sequence[Workload]
) -> str:
    """Every (workload, system): rate, latency, added latency, CPU per proxy process."""
    rows = [
        "| workload | system | reps | req/s | errors | p50 | p90 | p99 | p99.9 | added p50 "
        "| added p99 | CPU µs/req (out + in) | generator CPU µs/req | generator lag p99 µs |",
        "|" + "---|" * 14,
    ]
    for w in workloads:
        for s in systems:
            fg = figs.get((s, w.name))
            if fg is None:
                continue
            split = _split(fg.cpu_split_us)
            rows.append(
                "| "
                + " | ".join(
                    [
                        w.name,
                        s,
                        str(fg.reps),
                        _fmt(fg.rate),
                        str(fg.errors),
                        *(_fmt(fg.latency[p]) for p in PCTS),
                        _fmt(fg.added["p50"]) if s != "direct" else "-",
                        _fmt(fg.added["p99"]) if s != "direct" else "-",
                        f"{_fmt(fg.cpu_us, 1)} ({split})" if fg.cpu_split_us else "-",
                        _fmt(fg.gen_cpu_us, 1),
                        _fmt(fg.gen_lag_p99_us),
                    ]
                )  # fmt: skip
                + " |"
            )
    return "\n".join(rows)


def _split(cpu: tuple[float, ...]) -> str:
    """Per-process CPU as "out + in"; several processes per side (launchers return the
    inbound side's PIDs first) as "out1+out2 + in1+in2"."""
    if len(cpu) <= 2 or len(cpu) % 2:
        return " + ".join(_fmt(x, 1) for x in reversed(cpu)) or "-"
    half = len(cpu) // 2
    return " + ".join("+".join(_fmt(x, 1) for x in side) for side in (cpu[half:], cpu[:half]))


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    limit: str
    passed: bool | None  # None: not measured
    per_rep: str = "-"  # the ratio in each repetition: range, and how many were within
    # The median and most repetitions disagree: neither PASS nor FAIL is a finding.
    inconclusive: bool = False


def _verdict(ok: bool, values: Sequence[float], limit: float, le: bool) -> tuple[bool, bool]:
    """(passed, inconclusive): the median's verdict stands when most repetitions agree."""
    if not values:
        return ok, False
    within = sum(1 for v in values if (v <= limit if le else v >= limit))
    return ok, (2 * within > len(values)) != ok


def _direct(cells: Sequence[Cell], workload: str) -> dict[int, Cell]:
    """``direct``'s cell of *workload* in each repetition."""
    return {c.rep: c for c in cells if c.system == "direct" and c.workload == workload}


def _added(c: Cell, direct: dict[int, Cell], pct: str) -> float:
    """*c*'s *pct* minus ``direct``'s in the same repetition (µs); NaN when either is missing."""
    d = direct.get(c.rep)
    if d is None or pct not in c.latency_us or pct not in d.latency_us:
        return float("nan")
    return c.latency_us[pct] - d.latency_us[pct]


def rep_added(cells: Sequence[Cell], who: str, workload: str, pct: str) -> list[float]:
    """``who``'s *pct* minus ``direct``'s in each repetition of *workload* (µs)."""
    direct = _direct(cells, workload)
    added = (_added(c, direct, pct) for c in cells if c.system == who and c.workload == workload)
    return [a for a in added if not math.isnan(a)]


def _errors(cells: Sequence[Cell], who: str, workload: str) -> int:
    return sum(c.errors for c in cells if c.system == who and c.workload == workload)


def rep_ratios(cells: Sequence[Cell], who: str, workload: str, metric: str) -> list[float]:
    """``who`` ÷ Consul's pair for ``metric`` in each repetition of ``workload``.

    The two cells of one repetition ran back to back, so each ratio sees the same state of
    the machine. ``metric``: ``cpu`` (per request), ``rate``, or ``added-p50`` (paired with
    ``direct`` of the same repetition). Repetitions where either value is missing,
    non-positive (added latency not distinguishable from direct) or NaN are left out.
    """
    direct = _direct(cells, workload)

    def value(c: Cell) -> float:
        if metric == "cpu":
            return c.proxy_cpu_us
        if metric == "rate":
            return c.rate
        return _added(c, direct, "p50")

    mine = {c.rep: value(c) for c in cells if c.system == who and c.workload == workload}
    ref = {c.rep: value(c) for c in cells if c.system == REFERENCE and c.workload == workload}
    return [
        mine[r] / ref[r]
        for r in sorted(mine.keys() & ref.keys())
        if ref[r] > 0 and mine[r] > 0  # NaN compares false: left out too
    ]


def _spread(ratios: Sequence[float], limit: float, le: bool) -> str:
    if not ratios:
        return "-"
    within = sum(1 for r in ratios if (r <= limit if le else r >= limit))
    return f"{min(ratios):.2f}x to {max(ratios):.2f}x ({within} of {len(ratios)} within)"


def targets(
    figs: dict[tuple[str, str], Figures],
    k: Keys,
    who: str = CANDIDATE,
    cells: Sequence[Cell] = (),
) -> list[Target]:
    """The issue's acceptance ratios for ``who`` against Consul's proxy (medians over
    repetitions), each with its spread over repetitions when ``cells`` are given."""

    def get(s: str, w: str) -> Figures | None:
        return figs.get((s, w))

    out: list[Target] = []

    def ratio(name: str, a: float | None, b: float | None, limit: float, le: bool,
              workload: str, metric: str) -> None:  # fmt: skip
        bound = f"{'≤' if le else '≥'} {limit}x"
        if a is None or b is None or math.isnan(a) or math.isnan(b) or b <= 0:
            out.append(Target(name, "not measured", bound, None))
            return
        r = a / b
        per_rep = rep_ratios(cells, who, workload, metric)
        ok, unsure = _verdict(r <= limit if le else r >= limit, per_rep, limit, le)
        measured = f"{r:.2f}x ({a:,.0f} vs {b:,.0f})"
        if errors := _errors(cells, who, workload):  # requests it failed cannot pass
            ok, unsure, measured = False, False, f"{measured}, {errors:,} failed requests"
        out.append(Target(name, measured, bound, ok, _spread(per_rep, limit, le), unsure))

    m, c = get(who, k.steady), get(REFERENCE, k.steady)
    ratio(f"CPU per request @{k.steady}", m and m.cpu_us, c and c.cpu_us, 1.25, True,
          k.steady, "cpu")  # fmt: skip
    ratio(f"added p50 @{k.steady}", m and m.added["p50"], c and c.added["p50"], 1.25, True,
          k.steady, "added-p50")  # fmt: skip
    if m is None or math.isnan(m.added["p99"]):
        out.append(Target(f"added p99 @{k.steady}", "not measured", "≤ 1000 µs", None))
    else:
        p99 = m.added["p99"]
        each = rep_added(cells, who, k.steady, "p99")
        ok, unsure = _verdict(p99 <= 1000, each, 1000, True)
        spread = (
            f"{min(each):,.0f} to {max(each):,.0f} µs"
            f" ({sum(1 for v in each if v <= 1000)} of {len(each)} within)"
            if each
            else "-"
        )
        measured = f"{p99:,.0f} µs"
        if errors := _errors(cells, who, k.steady):
            ok, unsure, measured = False, False, f"{measured}, {errors:,} failed requests"
        out.append(Target(f"added p99 @{k.steady}", measured, "≤ 1000 µs", ok, spread, unsure))
    m, c = get(who, k.max_ka), get(REFERENCE, k.max_ka)
    ratio("max throughput (keep-alive)", m and m.rate, c and c.rate, 0.8, False,
          k.max_ka, "rate")  # fmt: skip
    m, c = get(who, k.newconn), get(REFERENCE, k.newconn)
    ratio(f"new-connection added p50 @{k.newconn}", m and m.added["p50"],
          c and c.added["p50"], 0.5, True, k.newconn, "added-p50")  # fmt: skip
    return out


def noise_note(figs: dict[tuple[str, str], Figures], k: Keys) -> str:
    """A warning when the generator's own scheduling lag says the machine was busy."""
    lag = _median(fg.gen_lag_p99_us for (_, w), fg in figs.items() if w == k.steady)
    if math.isnan(lag) or lag < 250:
        return ""
    return (
        f"**Noise:** at {k.steady} the load generator itself started requests up to {lag:,.0f} µs"
        " late at p99 (run-queue delay on a busy machine). Added p99/p99.9 figures smaller than"
        " that are within noise; negative ones mean 'not distinguishable from direct'."
    )


def targets_table(ts: Sequence[Target], who: str) -> str:
    rows = [
        f"| target ({who} vs consul) | measured (median) | each repetition | limit | result |",
        "|---|---|---|---|---|",
    ]
    for t in ts:
        if t.passed is None:
            res = "not measured"
        elif t.inconclusive:
            res = f"inconclusive (median: {'PASS' if t.passed else 'FAIL'})"
        else:
            res = "PASS" if t.passed else "**FAIL**"
        rows.append(f"| {t.name} | {t.measured} | {t.per_rep} | {t.limit} | {res} |")
    return "\n".join(rows)


def _version(argv: Sequence[str], pattern: str) -> str:
    if not shutil.which(argv[0]):
        return "not installed"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else "unknown"


def machine() -> dict[str, str]:
    """Machine and versions for the report header."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{os.cpu_count()} x {model}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "consul": _version(["consul", "version"], r"Consul (v[\d.]+)"),
        "haproxy": _version(["haproxy", "-v"], r"version ([\w.+~-]+)"),
        "nginx": _version(["nginx", "-v"], r"nginx/([\d.]+)"),
        "wrk": _version(["wrk", "-v"], r"wrk ([\w/.+~-]+)"),
        "load average at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def replace_section(path: Path, name: str, body: str, preamble: str = "") -> None:
    """Write ``body`` between this section's markers in ``path``, keeping everything else.

    Other measurements (e.g. the scale figures of issue 6 item 4) own their own sections, so
    one run never erases another's figures.
    """
    begin, end = BEGIN.format(name=name), END.format(name=name)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else preamble
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
