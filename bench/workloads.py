"""Workloads and running one cell (one workload against one system, once).

CPU is charged from /proc/<pid>/stat (utime + stime, all threads) of the system's proxy
processes, sampled when the generator opens and closes its measured window, divided by the
requests completed in that window.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.procs import cpu_of

Addr = tuple[str, int]
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Workload:
    """``rate`` > 0: open loop at that many requests/s; 0: closed loop (maximum)."""

    name: str
    conn: str  # keepalive | newconn
    rate: float
    connections: int
    title: str


def default_workloads(newconn_rate: float) -> tuple[Workload, ...]:
    """The issue's workloads, in run order."""
    return (
        Workload("ka-200", "keepalive", 200, 32, "keep-alive, 200 req/s open loop"),
        Workload("ka-1000", "keepalive", 1000, 32, "keep-alive, 1000 req/s open loop"),
        Workload("ka-3000", "keepalive", 3000, 32, "keep-alive, 3000 req/s open loop"),
        Workload("ka-max", "keepalive", 0, 32, "keep-alive, closed loop, 32 connections"),
        Workload(
            f"nc-{newconn_rate:g}",
            "newconn",
            newconn_rate,
            0,
            f"new connection per request, {newconn_rate:g}/s open loop",
        ),  # fmt: skip
        Workload("nc-max", "newconn", 0, 8, "new connection per request, closed loop, 8 slots"),
    )


@dataclass(frozen=True)
class Timing:
    """Seconds per cell phase."""

    warmup: float
    duration: float
    drain: float = 2.0


@dataclass(frozen=True)
class Cell:
    """The outcome of one cell."""

    system: str
    workload: str
    rep: int
    tool: str
    completed: int
    errors: int
    rate: float
    latency_us: dict[str, float]
    proxy_cpu_us: float  # both proxies, per completed request
    proxy_cpu_split_us: tuple[float, ...]
    nginx_cpu_us: float
    gen_cpu_us: float | None
    gen_lag_p99_us: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (e.g. nginx's worker)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def run_cell(
    system: str,
    workload: Workload,
    rep: int,
    target: Addr,
    proxy_pids: tuple[int, ...],
    nginx_pids: tuple[int, ...],
    timing: Timing,
    *,
    use_wrk: bool,
    gen: dict[str, object] | None = None,
) -> Cell:
    """Run ``workload`` against ``target`` once and charge CPU to ``proxy_pids``."""
    watched = tuple(proxy_pids) + tuple(nginx_pids)
    if workload.rate == 0 and use_wrk:
        before = cpu_of(watched)
        res = _run_wrk(target, workload, timing)
        after = cpu_of(watched)
    else:
        res, before, after = _run_python(target, workload, timing, watched, gen or {})
    n = max(1, res["completed"])
    split = tuple(1e6 * (after.get(p, 0.0) - before.get(p, 0.0)) / n for p in proxy_pids)
    ngx = sum(after.get(p, 0.0) - before.get(p, 0.0) for p in nginx_pids)
    gen_cpu = res.get("gen_cpu_s")
    return Cell(
        system=system, workload=workload.name, rep=rep, tool=res["tool"],
        # Requests the generator could not even start (too many in flight) failed too.
        completed=res["completed"], errors=res["errors"] + res.get("overflow", 0),
        rate=res["rate"],
        latency_us=res.get("latency_us", {}), proxy_cpu_us=sum(split),
        proxy_cpu_split_us=split, nginx_cpu_us=1e6 * ngx / n,
        gen_cpu_us=None if gen_cpu is None else 1e6 * gen_cpu / n,
        gen_lag_p99_us=res.get("gen_lag_us", {}).get("p99"),
    )  # fmt: skip


def _run_python(
    target: Addr, w: Workload, t: Timing, watched: tuple[int, ...], gen: dict[str, object]
) -> tuple[dict, dict[int, float], dict[int, float]]:
    cfg = {"host": target[0], "port": target[1], "conn": w.conn, "rate": w.rate,
           "connections": w.connections, "warmup": t.warmup, "duration": t.duration,
           "drain": t.drain, **gen}  # fmt: skip
    argv = [sys.executable, "-m", "bench.loadgen", json.dumps(cfg)]
    before: dict[int, float] = {}
    after: dict[int, float] = {}
    last = ""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO) as proc:
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:  # bounded: the generator stops itself at its hard end
                line = raw.strip()
                if line == "START":
                    before = cpu_of(watched)
                elif line == "END":
                    after = cpu_of(watched)
                elif line:
                    last = line
            proc.wait(timeout=t.warmup + t.duration + t.drain + 30)
        finally:
            if proc.poll() is None:
                proc.kill()
    if proc.returncode != 0 or not last:
        raise RuntimeError(f"load generator failed (exit {proc.returncode})")
    res = json.loads(last)
    res["tool"] = "python"
    return res, before, after


_WRK_REQS = re.compile(r"(\d+) requests in ([\d.]+)(\w+)")
_WRK_ERRS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def wrk_available() -> bool:
    """Whether the Debian ``wrk`` binary is installed."""
    return shutil.which("wrk") is not None


def _run_wrk(target: Addr, w: Workload, t: Timing) -> dict:
    argv = [
        "wrk",
        "-t1",
        f"-c{w.connections}",
        f"-d{math.ceil(t.warmup + t.duration)}s",
        "--timeout",
        "5s",
    ]
    if w.conn == "newconn":
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{target[0]}:{target[1]}/")
    out = subprocess.run(argv, capture_output=True, text=True, check=True,
                         timeout=t.warmup + t.duration + 30).stdout  # fmt: skip
    m = _WRK_REQS.search(out)
    if not m:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    secs = float(m.group(2)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}.get(m.group(3), 1.0)
    done = int(m.group(1))
    errs = sum(int(x) for x in m2.groups()) if (m2 := _WRK_ERRS.search(out)) else 0
    non2xx = int(m3.group(1)) if (m3 := _WRK_NON2XX.search(out)) else 0
    return {"completed": done - non2xx, "errors": errs + non2xx, "rate": (done - non2xx) / secs,
            "tool": "wrk"}  # fmt: skip
