"""NFR1 scale figures (issue 6, item 4): one agent against a catalog of 1000 services.

    python -m bench.scale                 # 1000 services / 3000 instances, ~4-5 min
    python -m bench.scale --quick         # 200 services / 600 instances, < 1 min
    python -m bench.scale --services 500 --instances 1500 --json rows.json

What it does, every step bounded in time and every process ended by PID on every path:

1. Starts its own ``consul agent -dev`` on free loopback ports (temporary directory) and
   registers N services / M instances (:mod:`bench.scale_consul`): external nodes through
   the catalog, plus a few *probe* instances on the dev agent with TTL checks.
2. For each scenario (one local service declaring 50 upstreams; one declaring all N, the
   worst case) starts the measured process (:mod:`bench.scale_agent`: the agent's real
   snapshot pipeline, ``serve_snapshots``, in a process of its own) and measures
   - time from process start and from pipeline start to the first complete snapshot;
   - RSS (``VmRSS``) and CPU seconds (``/proc/<pid>/stat``) after the first snapshot, and
     RSS and CPU share after an idle window (60 s; 10 s quick); peak RSS (``VmHWM``);
   - the build time of each snapshot inside the pipeline (``Reducer.build``, wrapped);
   - latency from a change in Consul to the first published snapshot that reflects it:
     a probe's TTL check failed (endpoint gone), passed again (endpoint back), a new
     instance registered (endpoint appears) and deregistered (endpoint gone); 20 samples
     each (10 quick), p50 / p99 / max.
3. Times the real :class:`meshd.snapshot.Reducer` in-process for the worst case: applying
   one endpoints event, the first full build, a rebuild after one endpoint change, and
   serialising the snapshot as the pipeline persists it.

For the lead: :func:`run_scale` returns rows ``{figure, value, unit, target, passed}`` and
:func:`markdown` renders them (e.g. into ``docs/performance.md`` with
``bench.report.replace_section(path, "scale", markdown(rows))``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.scale_consul import (
    BASE_PORT,
    INSTANCES_PER_NODE,
    Probe,
    TestConsul,
    node_address,
    service_name,
)
from bench.scale_fullagent import measure_full_agent
from bench.scale_proc import cpu_s, rss_mb
from meshd.snapshot.reducer import DEFAULT_MAX_WATCHED
from meshlab.devconsul import stop_process

REPO = Path(__file__).resolve().parents[1]
RSS_TARGET_MB = 80.0
ROUTING_TARGET_MS = 1000.0
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class Plan:
    """Sizes and time budgets of one run.

    Scenarios, each a fresh driver process with one local service declaring upstreams:
    ``typical`` (50), ``heavy`` (150: under Consul's default
    ``limits.http_max_conns_per_client`` of 200 with some headroom, since every watch
    holds one connection to the local Consul)
    and ``all`` (every service: the worst case, beyond ADR 004's bounded set).
    """

    services: int
    instances: int
    idle_s: float
    other_idle_s: float
    samples: int
    all_first_timeout_s: float
    first_snapshot_timeout_s: float = 60.0
    change_timeout_s: float = 10.0
    latency_budget_s: float = 60.0
    scenarios: tuple[tuple[str, int], ...] = (("typical", 50), ("heavy", 150), ("all", 0))
    consul_max_conns: int | None = None
    full_agent_s: float = 30.0

    def upstreams(self, scenario: str) -> int:
        """Upstreams the scenario's local service declares (0 in the table: all)."""
        wanted = dict(self.scenarios)[scenario]
        return self.services if wanted <= 0 else min(wanted, self.services)

    def runs(self) -> list[str]:
        """Scenario names to run, in order, without two of the same size."""
        seen: set[int] = set()
        out = []
        for name, _ in self.scenarios:
            if (n := self.upstreams(name)) not in seen:
                seen.add(n)
                out.append(name)
        return out

    def probe_services(self) -> list[int]:
        """Probed services: 5 among the first 50 (watched by every scenario), 5 spread."""
        typical = min(50, self.services)
        near = {i * typical // 5 for i in range(5)}
        far = {self.services * (2 * i + 1) // 10 for i in range(5)}
        return sorted(near | far)


FULL = Plan(
    services=1000,
    instances=3000,
    idle_s=60.0,
    other_idle_s=20.0,
    samples=20,
    all_first_timeout_s=60.0,
)
QUICK = Plan(
    services=200,
    instances=600,
    idle_s=5.0,
    other_idle_s=3.0,
    samples=8,
    all_first_timeout_s=10.0,
    change_timeout_s=5.0,
    latency_budget_s=8.0,
    full_agent_s=6.0,
)


# -- /proc ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# -- the measured process -----------------------------------------------------------------


class AgentProcess:
    """The driver process; its stdout lines are parsed into :attr:`events` by a thread."""

    def __init__(self, consul: str, upstreams: int, workdir: Path) -> None:
        state = workdir / "state"
        state.mkdir(mode=0o700)
        self.log = workdir / "agent.log"
        argv = [
            sys.executable,
            "-m",
            "bench.scale_agent",
            f"--consul={consul}",
            f"--upstreams={upstreams}",
            f"--state-dir={state}",
        ]
        self.spawned_at = time.monotonic()
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=REPO,
                start_new_session=True,
            )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.events.put(json.loads(raw))

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any] | None:
        """The first event satisfying *predicate* within *timeout* s, else None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.proc.poll() is not None and self.events.empty():
                raise RuntimeError(f"agent driver exited: {self.log.read_text()[-2000:]}")
            try:
                event = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if predicate(event):
                return event
        return None

    def drain(self) -> None:
        """Forget events received so far."""
        with contextlib.suppress(queue.Empty):
            for _ in range(100_000):
                self.events.get_nowait()

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """The driver's pipeline statistics ({} if it does not answer within *timeout*)."""
        self.command("stats")
        event = self.wait_for(lambda e: e["event"] == "stats", timeout)
        return event or {}

    def stop(self) -> None:
        """Ask it to quit, then SIGTERM / SIGKILL by PID."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.command("quit")
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                stop_process(self.proc, grace_s=STOP_GRACE_S)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.close()


# -- latency samples ----------------------------------------------------------------------


@dataclass
class Latencies:
    """Samples (ms) of one kind of change; timeouts counted apart."""

    samples: list[float] = field(default_factory=list)
    timeouts: int = 0


def _reflects(service: str, service_id: str, present: bool) -> Callable[[dict[str, Any]], bool]:
    def check(event: dict[str, Any]) -> bool:
        if event.get("event") != "snapshot":
            return False
        ids = event.get("changed", {}).get(service)
        return ids is not None and (service_id in ids) == present

    return check


def _timed_change(
    agent: AgentProcess,
    consul: TestConsul,
    change: Callable[[], None],
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float,
    into: Latencies,
) -> bool:
    agent.drain()
    change()
    start = consul.last_attempt_at  # a retried request counts from its last attempt
    event = agent.wait_for(predicate, timeout)
    if event is None:
        into.timeouts += 1
        return False
    into.samples.append(1e3 * (event["t"] - start))
    return True


def measure_latencies(
    agent: AgentProcess, consul: TestConsul, probes: list[Probe], plan: Plan
) -> dict[str, Latencies]:
    """Health fail / recover and register / deregister, *plan.samples* of each (bounded)."""
    out = {k: Latencies() for k in ("health_fail", "health_pass", "register", "deregister")}
    deadline = time.monotonic() + plan.latency_budget_s
    rng = random.Random(6)
    timeout = plan.change_timeout_s
    for i in range(plan.samples):
        if time.monotonic() > deadline:
            break
        probe = probes[i % len(probes)]
        sid = probe.service_id
        if _timed_change(
            agent,
            consul,
            functools.partial(consul.check, probe.check_id, "fail"),
            _reflects(probe.service, sid, False),
            timeout,
            out["health_fail"],
        ):
            _timed_change(
                agent,
                consul,
                functools.partial(consul.check, probe.check_id, "pass"),
                _reflects(probe.service, sid, True),
                timeout,
                out["health_pass"],
            )
        else:
            consul.check(probe.check_id, "pass")
        new_id = f"{probe.service}-new-{i}"
        port = 45_000 + i  # above the catalog ports (20000 + k) up to 25000 instances
        _timed_change(
            agent,
            consul,
            functools.partial(consul.register_probe, probe, service_id=new_id, port=port),
            _reflects(probe.service, new_id, True),
            timeout,
            out["register"],
        )
        _timed_change(
            agent,
            consul,
            functools.partial(consul.deregister, new_id),
            _reflects(probe.service, new_id, False),
            timeout,
            out["deregister"],
        )
        time.sleep(rng.uniform(0.05, 0.25))  # do not phase-lock with the coalesce window
    return out


# -- one scenario -------------------------------------------------------------------------


def run_scenario(
    consul: TestConsul, probes: list[Probe], plan: Plan, scenario: str, workdir: Path
) -> dict[str, Any]:
    """Start the driver for *scenario*, measure, stop it; return raw figures."""
    upstreams = plan.upstreams(scenario)
    # The agent watches at most DEFAULT_MAX_WATCHED services: the first by name among its
    # declared upstreams (svc-0000, svc-0001, ...). Probe only services it really watches.
    limit = min(upstreams, DEFAULT_MAX_WATCHED)
    watched = [p for p in probes if int(p.service.split("-")[1]) < limit]
    res: dict[str, Any] = {"scenario": scenario, "upstreams": upstreams}
    timeout = plan.all_first_timeout_s if scenario == "all" else plan.first_snapshot_timeout_s
    idle_s = plan.idle_s if scenario == plan.runs()[0] else plan.other_idle_s
    agent = AgentProcess(consul.address, upstreams, workdir)
    try:
        started = agent.wait_for(lambda e: e["event"] == "started", 30.0)
        first = agent.wait_for(lambda e: e.get("first", False), timeout)
        if started is None or first is None:
            res["error"] = f"no complete snapshot within {timeout:g} s"
            res["rss_end_mb"] = rss_mb(agent.pid)
            res["cpu_end_s"] = cpu_s(agent.pid)
            res["wall_end_s"] = time.monotonic() - agent.spawned_at
            res["stats"] = agent.stats(timeout=20.0)
            return res
        res["first_from_spawn_s"] = first["t"] - agent.spawned_at
        res["first_from_start_s"] = first["t"] - started["t"]
        res["first_endpoints"] = first["endpoints"]
        res["first_services"] = first["services"]
        res["rss_first_mb"] = rss_mb(agent.pid)
        res["cpu_first_s"] = cpu_s(agent.pid)
        cpu0, t0 = cpu_s(agent.pid), time.monotonic()
        consul_cpu0 = cpu_s(consul.pid) if consul.pid else 0.0
        time.sleep(idle_s)
        elapsed = time.monotonic() - t0
        res["idle_s"] = elapsed
        res["rss_idle_mb"] = rss_mb(agent.pid)
        res["cpu_idle_pct"] = 100 * (cpu_s(agent.pid) - cpu0) / elapsed
        if consul.pid:
            res["consul_cpu_idle_pct"] = 100 * (cpu_s(consul.pid) - consul_cpu0) / elapsed
        res["latency"] = measure_latencies(agent, consul, watched, plan)
        res["rss_peak_mb"] = rss_mb(agent.pid, "VmHWM")
        res["rss_end_mb"] = rss_mb(agent.pid)
        res["stats"] = agent.stats()
        return res
    finally:
        agent.stop()


# -- in-process reducer timing ------------------------------------------------------------


def reducer_timings(services: int, instances: int, repeats: int = 20) -> dict[str, float]:
    """Time the real Reducer with every service watched (ms, medians of *repeats*)."""
    from meshd.snapshot import (
        BundleChanged,
        Endpoint,
        EndpointsChanged,
        IntentionsChanged,
        LocalService,
        MeshConfigChanged,
        Reducer,
        to_json,
    )

    names = [service_name(i) for i in range(services)]
    nodes = max(1, math.ceil(instances / INSTANCES_PER_NODE))
    per_service: dict[str, list[Endpoint]] = {n: [] for n in names}
    for k in range(instances):
        name, node = names[k % services], k % nodes
        per_service[name].append(
            Endpoint(node_address(node), BASE_PORT + k, f"host-{node:04d}", f"{name}-{k}")
        )
    local = (LocalService("scale-client", "scale-client-1", 9000, "tcp", tuple(names)),)
    reducer = Reducer(local_services=local)
    for event in (MeshConfigChanged(None), BundleChanged(None), IntentionsChanged({})):
        reducer.apply(event, now=0.0)
    start = time.perf_counter()
    for index, name in enumerate(names, 1):
        reducer.apply(EndpointsChanged(name, tuple(per_service[name]), index), now=0.0)
    apply_us = 1e6 * (time.perf_counter() - start) / services
    start = time.perf_counter()
    snapshot = reducer.build(1.0)
    first_ms = 1e3 * (time.perf_counter() - start)
    rebuild, same, apply_one = [], [], []
    for i in range(repeats):
        name = names[(i * 37) % services]
        endpoints = tuple(per_service[name][: -1 if i % 2 == 0 else None])
        start = time.perf_counter()
        reducer.apply(EndpointsChanged(name, endpoints, services + i + 1), now=1.0)
        apply_one.append(time.perf_counter() - start)
        start = time.perf_counter()
        snapshot = reducer.build(1.0)
        rebuild.append(time.perf_counter() - start)
        start = time.perf_counter()
        reducer.build(1.0)
        same.append(time.perf_counter() - start)
    start = time.perf_counter()
    encoded = to_json(snapshot)
    json_ms = 1e3 * (time.perf_counter() - start)
    return {
        "apply_initial_us": apply_us,
        "apply_one_us": 1e6 * percentile(apply_one, 50),
        "first_build_ms": first_ms,
        "rebuild_ms": 1e3 * percentile(rebuild, 50),
        "same_content_ms": 1e3 * percentile(same, 50),
        "to_json_ms": json_ms,
        "snapshot_kb": len(encoded) / 1e3,
    }


# -- rows ---------------------------------------------------------------------------------


def _row(
    figure: str, value: float | int | str | None, unit: str, target: str = "", passed: Any = None
) -> dict[str, Any]:
    if isinstance(value, float):
        value = round(value, 3 if abs(value) < 10 else 1)
    return {"figure": figure, "value": value, "unit": unit, "target": target, "passed": passed}


def scenario_rows(res: dict[str, Any], total_services: int) -> list[dict[str, Any]]:
    """Rows of one scenario's raw figures."""
    watched = min(res["upstreams"], DEFAULT_MAX_WATCHED)
    label = f"[{res['upstreams']} of {total_services} declared, {watched} watched (cap)]"
    stats = res.get("stats", {})
    if "error" in res:
        rows = [
            _row(f"{label} first complete snapshot", res["error"], "", "a snapshot", False),
            _row(
                f"{label} RSS at that point",
                res["rss_end_mb"],
                "MB",
                f"<= {RSS_TARGET_MB:g}",
                res["rss_end_mb"] <= RSS_TARGET_MB,
            ),
            _row(
                f"{label} CPU until then ({res['wall_end_s']:.0f} s since start)",
                res["cpu_end_s"],
                "s",
            ),
        ]
        if not stats:
            rows.append(_row(f"{label} pipeline statistics", "no answer within 20 s", ""))
            return rows
        last = f" (last: {stats['last_error'][:120]})" if stats.get("last_error") else ""
        rows.append(
            _row(
                f"{label} inputs delivered at that point",
                f"{stats['delivered']} of {res['upstreams'] + 3}",
                "watches",
            )
        )
        rows.append(
            _row(
                f"{label} Consul watch errors{last}",
                stats["watch_errors"],
                "errors",
                "0",
                stats["watch_errors"] == 0,
            )
        )
        return rows
    rss = f"<= {RSS_TARGET_MB:g}"
    rows = [
        _row(
            f"{label} first complete snapshot, from process start", res["first_from_spawn_s"], "s"
        ),
        _row(
            f"{label} first complete snapshot, from pipeline start", res["first_from_start_s"], "s"
        ),
        _row(f"{label} endpoints in first snapshot", res["first_endpoints"], "endpoints"),
        _row(f"{label} CPU until first snapshot", res["cpu_first_s"], "s"),
        _row(
            f"{label} RSS after first snapshot",
            res["rss_first_mb"],
            "MB",
            rss,
            res["rss_first_mb"] <= RSS_TARGET_MB,
        ),
        _row(
            f"{label} RSS after {res['idle_s']:.0f} s idle",
            res["rss_idle_mb"],
            "MB",
            rss,
            res["rss_idle_mb"] <= RSS_TARGET_MB,
        ),
        _row(
            f"{label} peak RSS (VmHWM) over the run",
            res["rss_peak_mb"],
            "MB",
            rss,
            res["rss_peak_mb"] <= RSS_TARGET_MB,
        ),
        _row(f"{label} CPU while idle", res["cpu_idle_pct"], "% of a core"),
    ]
    if "consul_cpu_idle_pct" in res:
        rows.append(
            _row(f"{label} Consul CPU while idle", res["consul_cpu_idle_pct"], "% of a core")
        )
    if stats.get("builds"):
        rows.append(
            _row(
                f"{label} snapshot build in the pipeline p50 / max ({stats['builds']} builds)",
                f"{stats['build_p50_ms']:.1f} / {stats['build_max_ms']:.1f}",
                "ms",
            )
        )
    names = {
        "health_fail": "health check fails -> endpoint leaves routing",
        "health_pass": "health check passes -> endpoint back in routing",
        "register": "new instance registered -> in routing",
        "deregister": "instance deregistered -> out of routing",
    }
    for key, text in names.items():
        lat: Latencies = res["latency"][key]
        if not lat.samples:
            rows.append(_row(f"{label} {text}", "no sample", "", "", False))
            continue
        worst = max(lat.samples)
        ok = lat.timeouts == 0 and worst <= ROUTING_TARGET_MS
        value = (
            f"{percentile(lat.samples, 50):.0f} / {percentile(lat.samples, 99):.0f} / {worst:.0f}"
        )
        if lat.timeouts:
            value += f" ({lat.timeouts} timed out)"
        rows.append(
            _row(
                f"{label} {text}, p50 / p99 / max (n={len(lat.samples)})",
                value,
                "ms",
                f"max <= {ROUTING_TARGET_MS:g}" if key.startswith("health") else "",
                ok if key.startswith("health") else None,
            )
        )
    last = f" (last: {stats['last_error'][:160]})" if stats.get("last_error") else ""
    rows.append(
        _row(
            f"{label} Consul watch errors during the run{last}",
            stats.get("watch_errors"),
            "errors",
            "0",
            stats.get("watch_errors") == 0,
        )
    )
    return rows


def full_agent_rows(res: dict[str, Any], upstreams: int, services: int) -> list[dict[str, Any]]:
    """Rows of the ``meshd-agent run`` measurement."""
    label = f"[meshd-agent run, {upstreams} of {services} watched, no CA, no iptables]"
    events = ", ".join(f"{k} x{v}" for k, v in res.get("events", {}).items())
    if "error" in res:
        return [_row(f"{label} idle RSS", res["error"], "", f"<= {RSS_TARGET_MB:g} MB", False)]
    return [
        _row(
            f"{label} RSS after {res['idle_s']:.0f} s",
            res["rss_mb"],
            "MB",
            f"<= {RSS_TARGET_MB:g}",
            res["rss_mb"] <= RSS_TARGET_MB,
        ),
        _row(f"{label} CPU over those {res['idle_s']:.0f} s (start included)", res["cpu_s"], "s"),
        _row(f"{label} printed events", events or "none", ""),
    ]


def reducer_rows(timings: dict[str, float], services: int, instances: int) -> list[dict[str, Any]]:
    """Rows of the in-process Reducer timings."""
    label = f"[Reducer, {services} services / {instances} endpoints, in-process]"
    return [
        _row(f"{label} apply one endpoints event, initial fill", timings["apply_initial_us"], "µs"),
        _row(f"{label} apply one endpoints event, steady", timings["apply_one_us"], "µs"),
        _row(f"{label} first full build", timings["first_build_ms"], "ms"),
        _row(f"{label} build after one endpoint change (p50)", timings["rebuild_ms"], "ms"),
        _row(f"{label} build with nothing changed (p50)", timings["same_content_ms"], "ms"),
        _row(f"{label} serialise for persistence", timings["to_json_ms"], "ms"),
        _row(f"{label} persisted snapshot size", timings["snapshot_kb"], "kB"),
    ]


def run_scale(
    quick: bool = False,
    *,
    services: int | None = None,
    instances: int | None = None,
    consul_max_conns: int | None = None,
) -> list[dict[str, Any]]:
    """Run everything; return rows ``{figure, value, unit, target, passed}``."""
    plan = QUICK if quick else FULL
    if services is not None or instances is not None:
        n = services or plan.services
        plan = dataclasses.replace(plan, services=n, instances=instances or 3 * n)
    if consul_max_conns is not None:
        plan = dataclasses.replace(plan, consul_max_conns=consul_max_conns)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="meshd-scale-") as tmp:
        for number, scenario in enumerate(plan.runs()):
            # A fresh Consul per scenario: Consul 1.8 keeps counting a closed client
            # connection against http_max_conns_per_client until the blocking query on it
            # ends (up to wait + wait/16), so the previous driver's watches would linger.
            workdir = Path(tmp) / scenario
            workdir.mkdir()
            consul = TestConsul(workdir, http_max_conns_per_client=plan.consul_max_conns)
            try:
                consul.start()
                start = time.monotonic()
                probes = consul.populate(plan.services, plan.instances, plan.probe_services())
                populate_s = time.monotonic() - start
                if number == 0:
                    n_services, n_instances = consul.catalog_counts()
                    rows.append(_row("catalog: services registered", n_services, "services"))
                    rows.append(_row("catalog: instances registered", n_instances, "instances"))
                    rows.append(_row("catalog: time to register them", populate_s, "s"))
                res = run_scenario(consul, probes, plan, scenario, workdir)
                rows.extend(scenario_rows(res, plan.services))
                if consul.retries:
                    rows.append(
                        _row(
                            f"[{plan.upstreams(scenario)} watched] harness requests retried "
                            "(Consul closed the connection)",
                            consul.retries,
                            "requests",
                        )
                    )
                if number == 0 and plan.full_agent_s > 0:
                    upstreams = plan.upstreams(scenario)
                    full = measure_full_agent(
                        consul, workdir, upstreams=upstreams, idle_s=plan.full_agent_s
                    )
                    rows.extend(full_agent_rows(full, upstreams, plan.services))
            finally:
                consul.stop()
    rows.extend(
        reducer_rows(reducer_timings(plan.services, plan.instances), plan.services, plan.instances)
    )
    return rows


# -- output -------------------------------------------------------------------------------


def _passed(value: Any) -> str:
    return "" if value is None else ("yes" if value else "**NO**")


def markdown(rows: list[dict[str, Any]], command: str = "python -m bench.scale") -> str:
    """A markdown table of *rows* with the machine, date and the command that made them."""
    lines = [
        f"Scale (NFR1), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"Consul 1.8.7 -dev. Command: `{command}`.",
        "",
        "| figure | value | unit | target | met |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        met = _passed(r["passed"])
        lines.append(f"| {r['figure']} | {r['value']} | {r['unit']} | {r['target']} | {met} |")
    return "\n".join(lines) + "\n"


def table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table for the terminal."""
    width = min(96, max(len(r["figure"]) for r in rows))
    out = []
    for r in rows:
        met = _passed(r["passed"]).strip("*")
        target = f"  (target {r['target']}: {met})" if r["target"] else ""
        figure = r["figure"] if len(r["figure"]) <= width else r["figure"] + "\n" + " " * width
        out.append(f"{figure:<{width}}  {r['value']!s:>16} {r['unit']}{target}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Command line: run, print the table, optionally write the rows as JSON."""
    parser = argparse.ArgumentParser(description="meshd NFR1 scale figures (issue 6, item 4)")
    parser.add_argument("--quick", action="store_true", help="200 services, short idle")
    parser.add_argument("--services", type=int)
    parser.add_argument("--instances", type=int)
    parser.add_argument(
        "--consul-max-conns",
        type=int,
        help="set the test Consul's limits.http_max_conns_per_client (default: Consul's, 200)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--markdown", action="store_true", help="print markdown instead")
    parser.add_argument(
        "--write", action="store_true", help="also write the 'scale' section of docs/performance.md"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "docs" / "performance.md",
        help="the markdown file --write updates",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows = run_scale(
        args.quick,
        services=args.services,
        instances=args.instances,
        consul_max_conns=args.consul_max_conns,
    )
    command = "python -m bench.scale" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    print(markdown(rows, command) if args.markdown else table(rows))
    print(f"\n(run took {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    if args.write:
        from bench.report import replace_section

        replace_section(args.output, "scale", markdown(rows, command))
    return 0 if all(r["passed"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
