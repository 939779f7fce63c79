"""The running agent: every part of meshd-agent started, watched and stopped in order.

Design note. One nursery holds the long-lived parts (snapshot pipeline, registration,
certificates, admin endpoint, policy enforcement). The proxies' accept loops live in an
inner nursery and their connections in another, so a shutdown can go in the order the
mesh needs for zero failed requests:

1. ``STOPPING=1`` to systemd; deregister this host's services from Consul, so callers'
   snapshots drop these endpoints;
2. wait ``propagation`` seconds for that to reach them, still serving;
3. stop accepting; close warm connections not yet in use (both directions); let open
   connections finish for up to ``drain_timeout``;
4. cancel the rest.

Redirect rules stay in place when the agent stops or dies: with no proxy listening, a
redirected connection is refused, never delivered to an application unproxied. Only
``meshd-agent redirect remove`` takes them away.
"""

from __future__ import annotations

import functools
import random
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from agent.accesslog import JsonLog
from agent.admin import AdminSources, serve_admin, serve_metrics
from agent.certifier import Certifier, CertifierSettings, Endpoints
from agent.discovery import DestinationResolver, consul_lookup, serve_discovery
from agent.epollpump import open_pump
from agent.inbound import OpenConnections, handle_inbound
from agent.listener import inherited_sockets, open_listener, start_accept_loops
from agent.metrics import AgentMetrics, WatchTotals
from agent.outbound import handle_outbound
from agent.proxycore import ProxyDeps, ProxyLimits, proxy_deps
from agent.registration import Registrar, serve_registration
from agent.signclient import Endpoint
from agent.snapshots import SnapshotPipeline, local_services_from_config, serve_snapshots
from agent.tlscontexts import TLSContexts
from agent.worker import WorkerPool
from meshd.config import AgentConfig, ServiceConfig
from meshd.consul import ConsulClient
from meshd.dataplane import DataPlaneView, ViewCache
from meshd.sdnotify import notify, watchdog_interval_s
from meshd.snapshot import to_json

#: At most this long for deregistration from Consul when the agent stops (Consul's own
#: checks mark what is left critical).
DEREGISTER_TIMEOUT_S = 8.0


@dataclass
class AgentOptions:
    """How one agent runs, resolved from its configuration.

    Attributes:
        config: the validated agent.toml.
        services: the validated services.d files.
        meshd_endpoints: where the certificate authority is; None to discover the
            ``meshd`` service in Consul.
        certifier: the certifier's timing settings.
        outbound_hosts: addresses the outbound proxy listens on.
        inbound_hosts: addresses the inbound proxy listens on.
        propagation_s: how long to keep serving after deregistering, on shutdown.
        close_denied: close open connections that a new policy denies.
        agent_address: the address advertised for the agent's own registration.
        service_uids: the uid of each service that names its user, by service id.
    """

    config: AgentConfig
    services: tuple[ServiceConfig, ...]
    meshd_endpoints: Endpoints | None = None
    certifier: CertifierSettings = field(default_factory=CertifierSettings)
    outbound_hosts: tuple[str, ...] = ("127.0.0.1", "::1")
    inbound_hosts: tuple[str, ...] = ("0.0.0.0", "::")  # noqa: S104 - captured traffic arrives on any address
    propagation_s: float = 2.0
    close_denied: bool = True
    agent_address: str | None = None
    service_uids: Mapping[str, int] = field(default_factory=dict)


@dataclass
class AgentHandle:
    """What a running agent exposes to its caller (and to tests)."""

    pipeline: SnapshotPipeline
    registrar: Registrar
    certifier: Certifier
    open_connections: OpenConnections
    metrics: AgentMetrics
    admin_port: int
    stop: trio.Event = field(default_factory=trio.Event)

    def request_stop(self) -> None:
        """Begin the orderly shutdown (what SIGTERM does)."""
        self.stop.set()


async def serve_agent(
    consul: ConsulClient,
    options: AgentOptions,
    *,
    log: JsonLog,
    task_status: trio.TaskStatus[AgentHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the agent until :meth:`AgentHandle.request_stop` or SIGTERM/SIGINT, then drain."""
    cfg = options.config
    metrics = AgentMetrics()
    views = ViewCache(prefix=cfg.consul.kv_prefix)
    async with open_pump(cfg.proxy.engine) as pump_fn, trio.open_nursery() as background:
        pipeline: SnapshotPipeline = await background.start(
            functools.partial(
                serve_snapshots,
                consul,
                prefix=cfg.consul.kv_prefix,
                local_services=local_services_from_config(options.services, options.service_uids),
                state_dir=Path(cfg.agent.state_dir),
            )
        )

        metrics.watch_consul(functools.partial(watch_totals, pipeline))

        def current_view() -> DataPlaneView | None:
            snapshot = pipeline.holder.current()
            return None if snapshot is None else views.view_for(snapshot)

        certifier = Certifier(
            state_dir=Path(cfg.agent.state_dir),
            token_file=Path(cfg.agent.bootstrap_token_file),
            host=cfg.agent.node_name,
            datacenter=cfg.agent.datacenter,
            services=[s.name for s in options.services],
            endpoints=options.meshd_endpoints or _discover_meshd(consul),
            bundle=lambda: view.bundle if (view := current_view()) is not None else None,
            settings=options.certifier,
            registry=metrics.registry,
        )
        await background.start(certifier.serve)
        registrar: Registrar = await background.start(
            functools.partial(
                serve_registration,
                consul,
                options.services,
                agent_service_id=f"meshd-agent-{cfg.agent.node_name}",
                metrics_port=cfg.proxy.metrics_port,
                inbound_port=cfg.proxy.inbound_port,
                address=options.agent_address,
                # Callers reach a service only once its proxy can present its certificate.
                services_ready=certifier.wait_ready,
            )
        )
        resolver: DestinationResolver = await background.start(
            functools.partial(serve_discovery, consul_lookup(consul), pipeline.request_upstream)
        )
        deps = proxy_deps(
            cfg.proxy,
            view=current_view,
            tls=TLSContexts(certifier),
            metrics=metrics,
            log=log,
            on_unknown_destination=resolver.notify_unknown,
            pump=pump_fn,
        )
        await background.start(deps.warm.serve)
        conns = OpenConnections()
        workers = None
        if cfg.proxy.workers > 1:
            workers = WorkerPool(
                count=cfg.proxy.workers - 1,
                proxy=cfg.proxy,
                kv_prefix=cfg.consul.kv_prefix,
                snapshots=pipeline.holder,
                certifier=certifier,
                services=[s.name for s in options.services],
                on_unknown=resolver.notify_unknown,
                log=log,
                level=cfg.log.level,
            )
        sources = _admin_sources(
            metrics, pipeline, registrar, resolver, conns, workers, deps.limits
        )
        admin_port = await background.start(serve_admin, sources, "127.0.0.1", cfg.proxy.admin_port)
        if cfg.proxy.metrics_port:
            await background.start(
                serve_metrics, sources, cfg.proxy.metrics_address, cfg.proxy.metrics_port
            )
        background.start_soon(
            _serve_policy_enforcement,
            pipeline,
            current_view,
            conns,
            metrics,
            log,
            options.close_denied,
        )
        handle = AgentHandle(pipeline, registrar, certifier, conns, metrics, admin_port)
        background.start_soon(_serve_signals, handle)
        background.start_soon(_serve_watchdog)
        await _serve_proxies(deps, conns, workers, options, handle, log, task_status)
        background.cancel_scope.cancel()


async def _serve_proxies(
    deps: ProxyDeps,
    conns: OpenConnections,
    workers: WorkerPool | None,
    options: AgentOptions,
    handle: AgentHandle,
    log: JsonLog,
    task_status: trio.TaskStatus[AgentHandle],
) -> None:
    cfg = options.config
    inherited = inherited_sockets()
    listeners: list[tuple[str, socket.socket, Any]] = []
    outbound = functools.partial(handle_outbound, deps)
    inbound = functools.partial(handle_inbound, deps, conns)
    for host in options.outbound_hosts:
        sock = open_listener(host, cfg.proxy.outbound_port, inherited=inherited)
        listeners.append(("outbound", sock, outbound))
    for host in options.inbound_hosts:
        sock = open_listener(host, cfg.proxy.inbound_port, inherited=inherited)
        listeners.append(("inbound", sock, inbound))
    shared = workers is not None
    async with trio.open_nursery() as supervisor, trio.open_nursery() as connections:
        if workers is not None:
            await supervisor.start(workers.serve, [(name, sock) for name, sock, _ in listeners])
        async with trio.open_nursery() as acceptors:
            await start_accept_loops(acceptors, listeners, connections, log=log, shared=shared)
            notify("READY=1")
            log.event("agent_ready", admin_port=handle.admin_port)
            task_status.started(handle)
            await handle.stop.wait()
            notify("STOPPING=1")
            log.event("agent_draining", open_connections=len(conns))
            # Bounded: with Consul hung, the drain must still fit systemd's stop timeout
            # (TimeoutStopSec=45: this, propagation and drain_timeout, 30 s by default).
            with trio.move_on_after(DEREGISTER_TIMEOUT_S) as bounded:
                await handle.registrar.deregister_all()
            if bounded.cancelled_caught:
                log.event("deregistration_timed_out", level="warning",
                          seconds=DEREGISTER_TIMEOUT_S)  # fmt: skip
            await trio.sleep(options.propagation_s)
            acceptors.cancel_scope.cancel()
            # Connections opened ahead of need carry nothing yet: close them now, both ways,
            # rather than hold the drain for them.
            conns.stop_waiting()
            deps.warm.close_all()
            if workers is not None:
                workers.begin_drain(cfg.proxy.drain_timeout)
        for _, sock, _ in listeners:
            sock.close()
        connections.cancel_scope.deadline = trio.current_time() + cfg.proxy.drain_timeout
    if workers is not None:
        await workers.wait_stopped()
    log.event("agent_stopped")


async def _serve_signals(handle: AgentHandle) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            handle.request_stop()


async def _serve_watchdog() -> None:
    """Tell systemd we are alive at half its watchdog timeout (if it set one)."""
    interval = watchdog_interval_s()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)


async def _serve_policy_enforcement(
    pipeline: SnapshotPipeline,
    current_view: Any,
    conns: OpenConnections,
    metrics: AgentMetrics,
    log: JsonLog,
    close_denied: bool,
) -> None:
    """On every new snapshot: refresh gauges, and close connections it now denies."""
    version: int | None = None
    # Said once each, when they appear: snapshots follow every endpoint change, and the
    # same invalid document on each would flood the log.
    reported: frozenset[tuple[str, str, str]] = frozenset()  # (event, destination, reason)
    while True:
        snapshot = await pipeline.holder.wait_newer(version)
        version = snapshot.version
        view: DataPlaneView = current_view()
        metrics.snapshot_version.set(view.version)
        metrics.snapshot_created.set(snapshot.created_at)
        metrics.config_errors.labels("intentions").set(len(view.policy.invalid))
        metrics.config_errors.labels("mesh").set(0 if view.mesh_error is None else 1)
        metrics.config_errors.labels("bundle").set(0 if view.bundle is not None else 1)
        problems = {("invalid_intentions", i.destination, i.reason) for i in view.policy.invalid}
        if view.mesh_error is not None:
            problems.add(("invalid_mesh_config", "", view.mesh_error))
        for event, destination, reason in sorted(problems - reported):
            where = {"destination": destination} if destination else {}
            log.event(event, level="error", reason=reason, **where)
        reported = frozenset(problems)
        if close_denied and len(conns):
            closed = conns.close_denied(view)
            if closed:
                log.event("connections_closed_by_policy", count=closed, version=version)


def watch_totals(pipeline: SnapshotPipeline) -> WatchTotals:
    """What the agent's metrics say of its Consul watches."""
    stats = pipeline.statistics()
    return WatchTotals(stats.watch_errors, len(stats.watches), len(stats.watches_failing))


def _discover_meshd(consul: ConsulClient) -> Endpoints:
    """The passing instances of the ``meshd`` service in Consul, in random order."""

    async def endpoints() -> list[Endpoint]:
        _, instances = await consul.health_service("meshd")
        found = [Endpoint(i.address, i.port) for i in instances]
        random.shuffle(found)
        return found

    return endpoints


def _admin_sources(
    metrics: AgentMetrics,
    pipeline: SnapshotPipeline,
    registrar: Registrar,
    resolver: DestinationResolver,
    conns: OpenConnections,
    workers: WorkerPool | None,
    limits: ProxyLimits,
) -> AdminSources:
    def stats() -> dict[str, Any]:
        workers_open = (
            0 if workers is None else sum(w.open_inbound_connections for w in workers.status)
        )
        return {
            "snapshots": pipeline.statistics(),
            "registration": registrar.statistics(),
            "discovery": resolver.statistics(),
            "open_inbound_connections": len(conns) + workers_open,
            "workers": [] if workers is None else workers.statistics(),
            # This process's; each worker has its own (``[proxy] workers``).
            "connection_limits": {
                "inbound": limits.inbound.statistics(),
                "outbound": limits.outbound.statistics(),
            },
        }

    def snapshot_json() -> bytes | None:
        snapshot = pipeline.holder.current()
        return None if snapshot is None else to_json(snapshot)

    return AdminSources(
        metrics=metrics,
        ready=lambda: pipeline.holder.current() is not None,
        stats=stats,
        snapshot_json=snapshot_json,
        worker_reports=(lambda: []) if workers is None else workers.reports,
    )
