"""Data-path worker processes: the proxies on more than one core (``[proxy] workers``).

Design note (docs/adr/011-worker-processes.md). CPython runs one thread of Python at a time,
so one agent process pumps on one core. With ``[proxy] workers = N`` the agent starts N-1
worker processes (``python -m agent.worker``, never started by hand) that run the same proxy
handlers on the *same* listening sockets: the kernel hands each new connection to one
process, and each process accepts one connection per wakeup (``serve_accept_loop(shared=
True)``) so bursts spread out. Everything else stays in the agent: Consul, registration,
certificates, discovery, the admin endpoint, redirect rules.

A worker is fed over its link (:mod:`agent.workerlink`): the proxy settings, every new
snapshot, and each local service's certificate (chain and key path) whenever the certifier
changes one. It checks expiry itself, re-verifies peers and authorizes each connection
with its own view, exactly as the agent does, and closes connections a new policy denies
(``close_denied``). It reports its counters every second and asks the agent to discover
destinations it cannot map.

Lifecycle. The agent restarts a worker that exits (1 s, doubling to 30 s while it keeps
failing). At shutdown the agent sends ``drain`` when it stops accepting; a worker stops
accepting, closes its warm connections, lets open ones finish for ``drain_timeout``,
reports and exits. A worker whose link ends (the agent died) drains the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from agent.accesslog import JsonLog
from agent.childenv import child_environment
from agent.epollpump import open_pump
from agent.holder import SnapshotHolder
from agent.inbound import OpenConnections, handle_inbound
from agent.listener import start_accept_loops
from agent.metrics import AgentMetrics
from agent.outbound import handle_outbound
from agent.proxycore import ProxyDeps, proxy_deps
from agent.pump import PumpFunction
from agent.tlscontexts import CertifiedKey, TLSContexts
from agent.workerlink import (
    KIND_JSON,
    KIND_SNAPSHOT,
    Link,
    LinkedCredentials,
    ReportedSample,
    WorkerLinkError,
    certs_message,
    decode_json,
    field_of,
    parse_certs,
    parse_report,
    registry_samples,
)
from meshd.config.agent import ProxyConfig
from meshd.dataplane import DataPlaneView, ViewCache
from meshd.snapshot import Snapshot, SnapshotFormatError, from_json, to_json

REPORT_INTERVAL_S = 1.0
MAX_UNKNOWN_PER_REPORT = 64
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0  # a worker up this long starts its next restart from 1 s again
KILL_GRACE_S = 5.0  # after drain_timeout, before a worker that did not exit is killed
REPORT_TIMEOUT_S = 10.0  # a worker silent this long is stuck: it is killed and restarted
ORPHANED_DRAIN_S = 1.0  # a worker whose agent died lets its connections finish this long
# Sample names whose values only grow: a worker's last ones outlive it in the totals.
_CUMULATIVE = ("_total", "_bucket", "_count", "_sum")


# ================================================================ the worker process


async def serve_worker(link_sock: socket.socket, log: JsonLog) -> None:
    """Run one worker on *link_sock* (the agent's end is its parent) until drained."""
    link = Link(trio.SocketStream(trio.socket.from_stdlib_socket(link_sock)))
    hello = await link.receive_json()
    if hello is None or hello["type"] != "hello":
        raise WorkerLinkError("the first message on a worker link must be 'hello'")
    index = field_of(hello, "index", int)
    log = log.for_worker(index)
    settings = _proxy_settings(field_of(hello, "proxy", dict))
    views = ViewCache(prefix=field_of(hello, "kv_prefix", str))
    listeners = _listeners(field_of(hello, "listeners", list))
    log.event("worker_started", worker=index, pid=os.getpid())
    state = _WorkerState(settings, views, log)
    # Take the state the agent sends before serving: snapshot, certificates, then "start".
    while not state.started:
        if not state.apply(await link.receive()):
            log.event("worker_stopped", worker=index)
            return
    async with open_pump(settings.engine) as pump_fn, trio.open_nursery() as background:
        deps, conns = state.build(pump_fn)
        await background.start(deps.warm.serve)
        background.start_soon(state.report_forever, link)
        background.start_soon(state.enforce_policy, conns)
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptors:
                handlers = {
                    "outbound": functools.partial(handle_outbound, deps),
                    "inbound": functools.partial(handle_inbound, deps, conns),
                }
                served = [(name, sock, handlers[name]) for name, sock in listeners]
                await start_accept_loops(acceptors, served, connections, log=log, shared=True)
                await link.send_json({"type": "ready", "pid": os.getpid()})
                failure: str | None = None
                try:
                    while state.apply(await link.receive()):
                        pass
                except (WorkerLinkError, trio.BrokenResourceError, OSError) as exc:
                    failure = str(exc)
                acceptors.cancel_scope.cancel()
                conns.stop_waiting()
                deps.warm.close_all()
            for _, sock in listeners:
                sock.close()
            grace = _drain_grace(state, failure, len(conns), index)
            if state.drain_requested:
                background.start_soon(state.follow, link)
            connections.cancel_scope.deadline = trio.current_time() + grace
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await state.report(link, final=True)
        background.cancel_scope.cancel()
    if failure is not None:
        raise WorkerLinkError(failure)
    log.event("worker_stopped", worker=index)


def _drain_grace(state: _WorkerState, failure: str | None, open_now: int, index: int) -> float:
    """How long the worker's open connections may still finish once it stops accepting."""
    log = state.log
    if failure is not None:
        # A frame it cannot read: serving on with the policy it holds would be a guess.
        # Its connections are reset; the agent starts another worker.
        log.event("worker_link_failed", level="error", worker=index, error=failure)
        return 0.0
    log.event("worker_draining", worker=index, open_connections=open_now,
              told=state.drain_requested)  # fmt: skip
    if state.drain_requested:
        # Told to drain: the link stays open, and snapshots and certificates still apply
        # (a new deny closes draining connections too) until the drain is over.
        return state.settings.drain_timeout
    # The link ended: the agent is gone, and its own connections with it. systemd restarts
    # the unit only once every process of it has exited: a long drain here would keep the
    # host's proxies down that long.
    return ORPHANED_DRAIN_S


@dataclass
class _WorkerState:
    settings: ProxyConfig
    views: ViewCache
    log: JsonLog
    holder: SnapshotHolder = field(default_factory=SnapshotHolder)
    credentials: LinkedCredentials = field(default_factory=lambda: LinkedCredentials(time.time))
    metrics: AgentMetrics = field(default_factory=AgentMetrics)
    started: bool = False
    drain_requested: bool = False
    conns: OpenConnections | None = None
    unknown: list[tuple[str, int]] = field(default_factory=list)

    def current_view(self) -> DataPlaneView | None:
        snapshot = self.holder.current()
        return None if snapshot is None else self.views.view_for(snapshot)

    def build(self, pump_fn: PumpFunction) -> tuple[ProxyDeps, OpenConnections]:
        deps = proxy_deps(
            self.settings,
            view=self.current_view,
            tls=TLSContexts(self.credentials),
            metrics=self.metrics,
            log=self.log,
            on_unknown_destination=self.note_unknown,
            pump=pump_fn,
        )
        self.conns = OpenConnections()
        return deps, self.conns

    def note_unknown(self, address: str, port: int) -> None:
        """Queue an unmapped destination for the agent's discovery (bounded, never blocks)."""
        if len(self.unknown) < MAX_UNKNOWN_PER_REPORT:
            self.unknown.append((address, port))

    def apply(self, frame: tuple[int, bytes] | None) -> bool:
        """Apply one frame from the agent; False at ``drain`` or the end of the link."""
        if frame is None:
            return False
        kind, payload = frame
        if kind == KIND_SNAPSHOT:
            try:
                self.holder.publish(from_json(payload))
            except SnapshotFormatError as exc:
                raise WorkerLinkError(f"a snapshot frame does not parse: {exc}") from None
            return True
        if kind != KIND_JSON:
            raise WorkerLinkError(f"unknown frame kind {kind!r}")
        message = decode_json(payload)
        kind_name = message["type"]
        if kind_name == "certs":
            self.credentials.replace(parse_certs(message))
        elif kind_name == "start":
            self.started = True
        elif kind_name == "drain":
            self.drain_requested = True
            return False
        else:
            raise WorkerLinkError(f"unknown message type {kind_name!r} from the agent")
        return True

    async def follow(self, link: Link) -> None:
        """Keep applying the agent's frames while draining, until the link ends."""
        with contextlib.suppress(WorkerLinkError, trio.BrokenResourceError, OSError):
            while True:
                frame = await link.receive()
                if frame is None:
                    return
                self.apply(frame)

    async def report(self, link: Link, *, final: bool = False) -> None:
        unknown, self.unknown = self.unknown, []
        for address, port in unknown:
            await link.send_json({"type": "unknown", "address": address, "port": port})
        conns = self.conns
        await link.send_json(
            {
                "type": "report",
                "final": final,
                "open_inbound_connections": 0 if conns is None else len(conns),
                "samples": registry_samples(self.metrics.registry),
            }
        )

    async def report_forever(self, link: Link) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            while True:
                await self.report(link)
                await trio.sleep(REPORT_INTERVAL_S)

    async def enforce_policy(self, conns: OpenConnections) -> None:
        """As the agent does: close open connections a new snapshot's policy denies."""
        version: int | None = None
        while True:
            snapshot = await self.holder.wait_newer(version)
            version = snapshot.version
            view = self.current_view()
            if view is not None and self.settings.close_denied and len(conns):
                closed = conns.close_denied(view)
                if closed:
                    self.log.event("connections_closed_by_policy", count=closed, version=version)


def _proxy_settings(raw: dict[str, Any]) -> ProxyConfig:
    names = {f.name for f in dataclasses.fields(ProxyConfig)}
    if set(raw) != names:
        raise WorkerLinkError(f"'hello' message: proxy settings must have exactly {sorted(names)}")
    return ProxyConfig(**raw)


def _listeners(raw: list[Any]) -> list[tuple[str, socket.socket]]:
    found = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or item[0] not in ("outbound", "inbound")
            or not isinstance(item[1], int)
        ):
            raise WorkerLinkError("'hello' message: a listener is not ['outbound'|'inbound', fd]")
        sock = socket.socket(fileno=item[1])
        sock.setblocking(False)
        found.append((item[0], sock))
    return found


def run_worker(link_fd: int, level: str) -> None:
    """Serve as a worker on the link the agent passed as *link_fd*."""
    # systemd signals the whole unit; the agent decides when its workers stop (``drain``),
    # and a worker whose agent is gone drains when the link ends.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    log = JsonLog(level=level)
    try:
        link_sock = socket.socket(fileno=link_fd)
        trio.run(serve_worker, link_sock, log)
    except (WorkerLinkError, OSError) as exc:
        # Only ever the agent's side sending what this version does not understand (or
        # no link at all): one line, and the agent starts another worker.
        log.event("worker_failed", level="error", error=f"{type(exc).__name__}: {exc}")
        sys.exit(1)


# ================================================================ the agent's side


class CertificateFeed(Protocol):
    """What the pool reads from the agent's certifier."""

    @property
    def changed(self) -> trio.Event:
        """Set (and replaced) whenever a certificate changes."""

    def current(self, service: str) -> CertifiedKey | None:
        """The service's valid certificate, or None."""


@dataclass
class WorkerStatus:
    """One worker slot as ``/stats`` shows it."""

    index: int
    pid: int | None = None
    starts: int = 0
    last_exit: str = ""
    open_inbound_connections: int = 0


class WorkerPool:
    """The agent's N-1 workers: started, fed, restarted, drained.

    Args:
        count: how many worker processes (``[proxy] workers`` - 1).
        proxy: the proxy settings every worker runs with.
        kv_prefix: for the workers' view error messages.
        snapshots: the agent's snapshot holder (each new one is sent on).
        certifier: ``current(service)`` and a ``changed`` event (the agent's certifier).
        services: the local services whose certificates the workers need.
        on_unknown: where a worker's unmapped destinations go (discovery).
        log: the agent's log.
        level: the log level workers run with (``[log] level``).
        argv: the command that starts a worker, ``--link-fd FD`` appended (default: this
            Python, ``-m agent.worker``; tests start faulty workers with it).
    """

    def __init__(
        self,
        *,
        count: int,
        proxy: ProxyConfig,
        kv_prefix: str,
        snapshots: SnapshotHolder,
        certifier: CertificateFeed,
        services: Sequence[str],
        on_unknown: Callable[[str, int], None],
        log: JsonLog,
        level: str = "info",
        argv: Sequence[str] | None = None,
    ) -> None:
        self._proxy = proxy
        self._kv_prefix = kv_prefix
        self._listeners: list[tuple[str, socket.socket]] = []
        self._snapshots = snapshots
        self._certifier = certifier
        self._services = list(services)
        self._on_unknown = on_unknown
        self._log = log
        self._argv = (
            list(argv)
            if argv is not None
            else [sys.executable, "-m", "agent.worker", "--log-level", level]
        )
        self.status = [WorkerStatus(i + 1) for i in range(count)]
        self._reports: dict[int, list[ReportedSample]] = {}
        # Counters of workers that exited, so the host's totals never go down.
        self._retired: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._started = False
        self._draining = False
        self._drain = trio.Event()
        self._done = trio.Event()
        self._drain_deadline = math.inf
        self._encoding: tuple[int, bytes] | None = None

    def reports(self) -> list[list[ReportedSample]]:
        """Each running worker's latest samples, and the counters of exited ones."""
        retired = [(name, dict(labels), value) for (name, labels), value in self._retired.items()]
        return [*self._reports.values(), retired]

    def _retire(self, index: int) -> None:
        for name, labels, value in self._reports.pop(index, []):
            if name.endswith(_CUMULATIVE):
                key = (name, tuple(sorted(labels.items())))
                self._retired[key] = self._retired.get(key, 0.0) + value

    def statistics(self) -> list[dict[str, Any]]:
        """The workers for ``/stats``."""
        return [dataclasses.asdict(s) for s in self.status]

    async def serve(
        self,
        listeners: Sequence[tuple[str, socket.socket]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run every worker slot on *listeners* (the agent's listening sockets, shared
        with each worker) until :meth:`begin_drain` has finished them all."""
        self._listeners = list(listeners)
        self._started = True
        async with trio.open_nursery() as nursery:
            for status in self.status:
                nursery.start_soon(self._serve_slot, status)
            task_status.started()
        self._done.set()

    def begin_drain(self, drain_timeout: float) -> None:
        """Tell every worker to stop accepting and drain; none is restarted from now on."""
        self._draining = True
        self._drain_deadline = trio.current_time() + drain_timeout + KILL_GRACE_S
        self._drain.set()

    async def wait_stopped(self) -> None:
        """Wait until every worker exited (those still running at the deadline are killed)."""
        if not self._started or not self._draining:
            return
        with trio.move_on_at(self._drain_deadline + 1.0):
            await self._done.wait()

    async def _serve_slot(self, status: WorkerStatus) -> None:
        delay = RESTART_FIRST_S
        while not self._draining:
            began = trio.current_time()
            status.last_exit = await self._run_once(status)
            status.pid = None
            status.open_inbound_connections = 0  # its connections went with it
            self._retire(status.index)
            if self._draining:
                return
            self._log.event("worker_exited", level="error", worker=status.index,
                            reason=status.last_exit, restart_in_s=delay)  # fmt: skip
            if trio.current_time() - began >= HEALTHY_AFTER_S:
                delay = RESTART_FIRST_S
            with trio.move_on_after(delay):
                await self._drain.wait()
            delay = min(delay * 2, RESTART_MAX_S)

    async def _run_once(self, status: WorkerStatus) -> str:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno(), *(s.fileno() for _, s in self._listeners)]
        try:
            process = await trio.lowlevel.open_process(
                [*self._argv, "--link-fd", str(theirs.fileno())],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                env=child_environment(),
            )
        except OSError as exc:
            ours.close()
            return f"could not start: {exc}"
        finally:
            theirs.close()  # the worker has its own copy
        status.pid = process.pid
        status.starts += 1
        link = Link(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        reason = "exited"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_exit, process, nursery.cancel_scope)
            try:
                await self._feed(link, status, process, nursery)
            except (WorkerLinkError, trio.BrokenResourceError, trio.ClosedResourceError,
                    OSError) as exc:  # fmt: skip
                reason = f"link: {exc}"
                self._kill(process)
            await process.wait()
            nursery.cancel_scope.cancel()
        with contextlib.suppress(OSError):
            await link.aclose()
        code = process.returncode
        return f"{reason} (exit status {code})" if code is not None else reason

    async def _watch_exit(self, process: trio.Process, scope: trio.CancelScope) -> None:
        await process.wait()
        # Let the reader see the last frames first; then stop feeding.
        await trio.sleep(0.2)
        scope.cancel()

    async def _feed(
        self, link: Link, status: WorkerStatus, process: trio.Process, nursery: trio.Nursery
    ) -> None:
        await link.send_json(
            {
                "type": "hello",
                "index": status.index,
                "kv_prefix": self._kv_prefix,
                "proxy": dataclasses.asdict(self._proxy),
                "listeners": [[name, s.fileno()] for name, s in self._listeners],
            }
        )
        version = None
        # Bounded like the reports that follow: a worker that hangs before reading its link
        # would otherwise hold this slot (and the agent's send) for ever.
        with trio.move_on_after(REPORT_TIMEOUT_S) as stuck:
            snapshot = self._snapshots.current()
            if snapshot is not None:
                version = snapshot.version
                await link.send_snapshot(self._encoded(snapshot))
            # Taken before the message is made: a certificate installed while it is on its
            # way sets this event, and _send_certs sends again.
            changed = self._certifier.changed
            await link.send_json(certs_message(self._services, self._certifier.current))
            await link.send_json({"type": "start"})
        if stuck.cancelled_caught:
            raise WorkerLinkError(f"worker {status.index} took nothing for {REPORT_TIMEOUT_S}s")
        nursery.start_soon(self._send_snapshots, link, version, process, status)
        nursery.start_soon(self._send_certs, link, changed, process, status)
        nursery.start_soon(self._send_drain, link, status, process)
        while True:
            # A worker reports every second, also while it drains.
            with trio.move_on_after(REPORT_TIMEOUT_S) as silent:
                message = await link.receive_json()
            if silent.cancelled_caught:
                raise WorkerLinkError(f"worker {status.index} sent nothing for {REPORT_TIMEOUT_S}s")
            if message is None:
                return
            self._take(status, message)

    def _take(self, status: WorkerStatus, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "report":
            self._reports[status.index] = parse_report(message)
            status.open_inbound_connections = int(
                field_of(message, "open_inbound_connections", int)
            )
        elif kind == "unknown":
            self._on_unknown(field_of(message, "address", str), field_of(message, "port", int))
        elif kind == "ready":
            self._log.event("worker_ready", worker=status.index, pid=status.pid)
        else:
            raise WorkerLinkError(f"unknown message type {kind!r} from worker {status.index}")

    def _encoded(self, snapshot: Snapshot) -> bytes:
        """*snapshot* as sent on the link, encoded once per version for all the workers."""
        if self._encoding is None or self._encoding[0] != snapshot.version:
            self._encoding = (snapshot.version, to_json(snapshot))
        return self._encoding[1]

    async def _send_snapshots(
        self, link: Link, version: int | None, process: trio.Process, status: WorkerStatus
    ) -> None:
        with self._link_failure_ends(process, status):
            while True:
                snapshot = await self._snapshots.wait_newer(version)
                version = snapshot.version
                await link.send_snapshot(self._encoded(snapshot))

    async def _send_certs(
        self, link: Link, changed: trio.Event, process: trio.Process, status: WorkerStatus
    ) -> None:
        with self._link_failure_ends(process, status):
            while True:
                await changed.wait()
                changed = self._certifier.changed  # before the message: see _feed
                await link.send_json(certs_message(self._services, self._certifier.current))

    @contextlib.contextmanager
    def _link_failure_ends(self, process: trio.Process, status: WorkerStatus) -> Iterator[None]:
        """A send to a worker that died, or one that cannot be sent, ends that worker (it
        is started again) and never the agent: a task of the worker's nursery that raised
        would end the pool, and the agent with it."""
        try:
            yield
        except (WorkerLinkError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError) as exc:  # fmt: skip
            if process.poll() is None:  # not merely dead already: say why it goes
                self._log.event("worker_link_failed", level="error", worker=status.index,
                                error=str(exc) or type(exc).__name__)  # fmt: skip
            self._kill(process)

    async def _send_drain(self, link: Link, status: WorkerStatus, process: trio.Process) -> None:
        await self._drain.wait()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await link.send_json({"type": "drain"})
        await trio.sleep_until(self._drain_deadline)
        self._log.event("worker_killed", level="warning", worker=status.index,
                        reason="still running after drain_timeout")  # fmt: skip
        self._kill(process)

    @staticmethod
    def _kill(process: trio.Process) -> None:
        with contextlib.suppress(OSError):
            process.kill()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m agent.worker --link-fd FD``: how the agent starts a worker (never by hand).

    Started this way rather than through ``meshd-agent`` so that a worker loads the proxies
    and nothing else (no Consul client, certifier or CLI): about 15 MB less per worker.
    """
    parser = argparse.ArgumentParser(prog="python -m agent.worker")
    parser.add_argument("--link-fd", type=int, required=True, help="the agent's end of the link")
    parser.add_argument("--log-level", default="info", help="as the agent's [log] level")
    args = parser.parse_args(argv)
    run_worker(args.link_fd, args.log_level)


if __name__ == "__main__":
    main()
