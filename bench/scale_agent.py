"""The measured process of the scale benchmark: the agent's snapshot pipeline, alone.

Runs :func:`agent.snapshots.serve_snapshots` exactly as ``meshd-agent`` does (one Consul
client, one local service whose declared upstreams are the first ``--upstreams`` services,
a state directory so every snapshot is persisted) and reports on stdout, one JSON object a
line, for the harness in :mod:`bench.scale`:

- ``{"event": "started", "t": ...}`` when the pipeline task has started;
- ``{"event": "snapshot", "t": ..., "version": ..., "changed": {service: [ids]}}`` each
  time a new snapshot is published (``t``: ``time.monotonic()``, the system-wide
  CLOCK_MONOTONIC, read as soon as the holder hands the snapshot to a reader); the first
  one carries ``"first": true`` and counts instead of ids;
- ``{"event": "stats", ...}`` in answer to a ``stats`` line on stdin.

The only instrumentation: :meth:`meshd.snapshot.Reducer.build` is wrapped to time each build.
Run: ``python -m bench.scale_agent --consul http://127.0.0.1:8500 --upstreams 50 --state-dir D``
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

from agent.snapshots import SnapshotPipeline, serve_snapshots
from bench.scale_consul import service_name
from meshd.consul import ConsulSettings, open_consul
from meshd.snapshot import LocalService, Reducer, Snapshot

BUILD_TIMES: list[float] = []
_original_build = Reducer.build


def _timed_build(self: Reducer, now: float, *, created_at: float | None = None) -> Snapshot:
    start = time.perf_counter()
    try:
        return _original_build(self, now, created_at=created_at)
    finally:
        BUILD_TIMES.append(time.perf_counter() - start)


Reducer.build = _timed_build  # type: ignore[method-assign]


def emit(obj: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _diff(old: Snapshot | None, new: Snapshot) -> dict[str, list[str]]:
    if old is None:
        return {}
    changed: dict[str, list[str]] = {}
    for name, upstream in new.upstreams.items():
        before = old.upstreams.get(name)
        if before is upstream or (before is not None and before.endpoints == upstream.endpoints):
            continue
        changed[name] = sorted(e.service_id for e in upstream.endpoints)
    return changed


async def observe(pipeline: SnapshotPipeline) -> None:
    """Report every snapshot the holder publishes, as a proxy would see it."""
    previous: Snapshot | None = None
    while True:
        snapshot = await pipeline.holder.wait_newer(None if previous is None else previous.version)
        now = time.monotonic()
        line: dict[str, Any] = {"event": "snapshot", "t": now, "version": snapshot.version}
        if previous is None:
            line["first"] = True
            line["services"] = len(snapshot.upstreams)
            line["endpoints"] = sum(len(u.endpoints) for u in snapshot.upstreams.values())
        else:
            line["changed"] = _diff(previous, snapshot)
        emit(line)
        previous = snapshot


def _stats(pipeline: SnapshotPipeline) -> dict[str, Any]:
    s = pipeline.statistics()
    builds = sorted(BUILD_TIMES)
    return {
        "event": "stats",
        "t": time.monotonic(),
        "version": s.holder.version,
        "published": s.holder.published,
        "watched": len(s.reducer.watched),
        "delivered": len(s.reducer.delivered),
        "upstream_watches": len(s.upstream_watches),
        "watch_requests": sum(w.requests for w in s.watches),
        "watch_errors": sum(w.errors for w in s.watches),
        "last_error": next((w.last_error for w in s.watches if w.last_error), None),
        "watches_failing": sum(1 for w in s.watches if w.consecutive_errors),
        "persisted": s.persisted,
        "persist_errors": s.persist_errors,
        "builds": len(builds),
        "build_p50_ms": 1e3 * statistics.median(builds) if builds else None,
        "build_max_ms": 1e3 * builds[-1] if builds else None,
    }


async def commands(pipeline: SnapshotPipeline, cancel: trio.CancelScope) -> None:
    """Answer ``stats`` lines on stdin; end the run on ``quit`` or end of input."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    async with stream:
        while True:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip() == b"stats":
                    emit(_stats(pipeline))
                elif line.strip() == b"quit":
                    cancel.cancel()
                    return
    cancel.cancel()


async def main(args: argparse.Namespace) -> None:
    """Run the pipeline, the observer and the command reader until told to stop."""
    upstreams = tuple(service_name(i) for i in range(args.upstreams))
    local = (LocalService("scale-client", "scale-client-1", 9000, "tcp", upstreams),)
    settings = ConsulSettings(address=args.consul)
    async with open_consul(settings) as consul, trio.open_nursery() as nursery:
        pipeline = await nursery.start(
            lambda task_status: serve_snapshots(
                consul, local_services=local, state_dir=args.state_dir, task_status=task_status
            )
        )
        emit({"event": "started", "t": time.monotonic()})
        nursery.start_soon(observe, pipeline)
        nursery.start_soon(commands, pipeline, nursery.cancel_scope)
        if args.profile:
            nursery.start_soon(profile, args.profile, args.profile_s)


async def profile(path: Path, seconds: float) -> None:
    """Profile the whole process (cProfile) for *seconds*, then write the stats to *path*."""
    profiler = cProfile.Profile()
    profiler.enable()
    await trio.sleep(seconds)
    profiler.disable()
    profiler.dump_stats(path)
    emit({"event": "profiled", "t": time.monotonic(), "path": str(path)})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consul", required=True, help="http://127.0.0.1:PORT")
    parser.add_argument("--upstreams", type=int, required=True, help="declared upstreams")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--profile", type=Path, help="write cProfile stats here")
    parser.add_argument("--profile-s", type=float, default=30.0, help="profile this long")
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse_args())
