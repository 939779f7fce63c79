"""Composing the control plane: trust bundle watch, server TLS, API, registration, leader.

:func:`serve_meshd` is what ``meshd serve`` runs, and what the tests run in-process. It
reads the trust bundle from Consul KV (``<kv_prefix>ca/bundle``, published by
``meshctl ca init``), refuses to start if the signing CA is for another trust domain or
does not chain to a root the bundle trusts (it would sign leaves no peer can verify: a CA
directory from another ``meshctl ca init``), signs its own ``meshd`` certificate, and
serves until cancelled.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from meshd.config.server import MAX_CONNECTIONS_PER_SOURCE
from meshd.consul.client import ConsulClient
from meshd.consul.errors import ConsulError
from meshd.errors import MeshdError
from meshd.logevents import log_event
from meshd.server.api import SigningApi, SigningApiStatistics
from meshd.server.ca import AuthorityStatistics, CaLoadError, SigningAuthority
from meshd.server.duties import publish_leaf_ttl, serve_leader_duties
from meshd.server.http import HttpsServer, HttpsStatistics
from meshd.server.leader import Leadership, LeadershipStatistics
from meshd.server.ratelimit import RateLimiter
from meshd.server.registration import meshd_registration, serve_registration
from meshd.server.tls import ServerTls, ServerTlsStatistics
from meshd.trustbundle import TrustBundle, TrustBundleError, bundle_key

log = logging.getLogger("meshd.server")


class StartupError(MeshdError):
    """meshd cannot start: the CA and the published trust bundle are missing or disagree."""


@dataclass(frozen=True)
class ServeOptions:
    """How to run one meshd server (initialized from ``meshd.toml`` by the caller)."""

    name: str
    listen_host: str = "0.0.0.0"  # noqa: S104 - a server listens on all addresses
    listen_port: int = 8501
    advertise_address: str = ""
    kv_prefix: str = "meshd/"
    csr_rate_per_minute: int = 60
    max_connections_per_source: int = MAX_CONNECTIONS_PER_SOURCE  # HTTPS, per client host
    register: bool = True
    leader_lock_delay_s: int = 15
    ca_dir: Path | None = None  # re-read during root rotation; None: never reloaded
    ca_poll_s: float = 10.0
    retire_check_s: float = 60.0  # how often the leader looks whether the old root may retire


@dataclass(frozen=True)
class MeshdServer:
    """A running server, handed to ``task_status`` once it accepts connections."""

    port: int
    api: SigningApi
    tls: ServerTls
    leadership: Leadership
    bundle: BundleWatch
    authority: SigningAuthority
    https: HttpsServer

    def statistics(self) -> MeshdStatistics:
        """Every component's statistics (no secrets)."""
        return MeshdStatistics(
            api=self.api.statistics(),
            authority=self.authority.statistics(),
            server_tls=self.tls.statistics(),
            leadership=self.leadership.statistics(),
            bundle=self.bundle.statistics(),
            https=self.https.statistics(),
        )


@dataclass(frozen=True)
class BundleWatchStatistics:
    """The bundle in use and how following it went."""

    trust_domain: str
    roots: int
    index: int
    errors: int


@dataclass(frozen=True)
class MeshdStatistics:
    """A running server's statistics."""

    api: SigningApiStatistics
    authority: AuthorityStatistics
    server_tls: ServerTlsStatistics
    leadership: LeadershipStatistics
    bundle: BundleWatchStatistics
    https: HttpsStatistics


class BundleWatch:
    """The latest trust bundle from Consul KV, followed with blocking queries."""

    def __init__(self, consul: ConsulClient, key: str, initial: TrustBundle, index: int) -> None:
        self._consul = consul
        self._key = key
        self._bundle = initial
        self._index = index
        self._errors = 0

    @classmethod
    async def load(cls, consul: ConsulClient, key: str) -> BundleWatch:
        """Read the bundle once.

        Raises:
            StartupError: the key is missing or does not hold a valid bundle.
        """
        index, entry = await consul.kv_get(key)
        if entry is None:
            raise StartupError(f"no trust bundle at Consul KV {key}: run 'meshctl ca init' first")
        try:
            return cls(consul, key, TrustBundle.from_json(entry.value), index)
        except TrustBundleError as exc:
            raise StartupError(f"the trust bundle at Consul KV {key} is invalid: {exc}") from None

    def statistics(self) -> BundleWatchStatistics:
        """The bundle's trust domain, root count, KV index and watch errors."""
        bundle = self._bundle
        return BundleWatchStatistics(
            bundle.trust_domain, len(bundle.roots), self._index, self._errors
        )

    def current(self) -> TrustBundle:
        """The newest valid bundle seen (an invalid update is ignored: fail closed on it)."""
        return self._bundle

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the key forever."""
        task_status.started()
        while True:
            try:
                index, entry = await self._consul.kv_get(self._key, index=self._index, wait_s=60)
            except ConsulError as exc:
                self._errors += 1
                log.warning("watching the trust bundle failed: %s", exc)
                await trio.sleep(min(30.0, 2.0 ** min(self._errors, 5)))
                continue
            self._index = 1 if index < self._index or index < 1 else index
            if entry is None:
                continue
            try:
                bundle = TrustBundle.from_json(entry.value)
            except TrustBundleError as exc:
                log.warning("ignoring an invalid trust bundle update: %s", exc)
                continue
            if bundle.to_json() != self._bundle.to_json():
                self._bundle = bundle


async def serve_meshd(
    consul: ConsulClient,
    authority: SigningAuthority,
    options: ServeOptions,
    *,
    duties: Callable[[], Awaitable[None]] | None = None,
    wall_clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[MeshdServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one meshd server until cancelled.

    Args:
        consul: the Consul client.
        authority: the signing CA and leaf policy.
        options: listen address, KV prefix, rate limit, registration.
        duties: what the leader runs (default: retiring old roots when due).
        wall_clock: Unix time source (tests inject one).
        task_status: started with the running :class:`MeshdServer`.

    Raises:
        StartupError: no or invalid bundle, a trust-domain mismatch, or a signing CA that
            does not chain to a root the bundle trusts.
        ConsulError: Consul unreachable at start.
    """
    prefix = options.kv_prefix.rstrip("/") + "/"
    datacenter = await consul.datacenter()
    watch = await BundleWatch.load(consul, bundle_key(prefix))
    _check_bundle_trusts(authority, watch.current(), bundle_key(prefix), options.ca_dir)
    await publish_leaf_ttl(consul, prefix, options.name, authority.leaf_ttl_s)
    tls = ServerTls(authority, datacenter, watch.current, wall_clock=wall_clock)
    api = _signing_api(consul, authority, watch, datacenter, prefix, options, wall_clock)
    leadership = Leadership(
        consul,
        key=f"{prefix}ca/leader",
        name=options.name,
        lock_delay_s=options.leader_lock_delay_s,
    )
    if duties is None:
        duties = functools.partial(
            serve_leader_duties,
            consul,
            bundle_key(prefix),
            every_s=options.retire_check_s,
            wall_clock=wall_clock,
        )
    listeners = await trio.open_tcp_listeners(options.listen_port, host=options.listen_host)
    port = listeners[0].socket.getsockname()[1]
    https = HttpsServer(tls.context, api.handle, max_per_source=options.max_connections_per_source)
    async with trio.open_nursery() as nursery:
        await nursery.start(https.serve, listeners)
        await nursery.start(watch.serve)
        await nursery.start(tls.serve_renewal)
        await nursery.start(leadership.serve, duties)
        if options.ca_dir is not None:
            nursery.start_soon(
                _serve_ca_reload, authority, options.ca_dir, watch, options.ca_poll_s
            )
        if options.register:
            registration = meshd_registration(
                name=options.name, advertise_address=options.advertise_address, port=port
            )
            await nursery.start(serve_registration, consul, registration)
        log_event(log, logging.INFO, "started", port=port, datacenter=datacenter)
        task_status.started(MeshdServer(port, api, tls, leadership, watch, authority, https))


def _check_bundle_trusts(
    authority: SigningAuthority, bundle: TrustBundle, key: str, ca_dir: Path | None
) -> None:
    """Refuse a signing CA whose leaves peers holding *bundle* could not verify.

    Raises:
        StartupError: another trust domain, or no root of the bundle issued the signing CA.
    """
    where = f"the signing CA in {ca_dir}" if ca_dir is not None else "the signing CA"
    if bundle.trust_domain != authority.trust_domain:
        raise StartupError(
            f"the trust bundle at Consul KV {key} is for {bundle.trust_domain} but {where} "
            f"is for {authority.trust_domain}"
        )
    if not authority.trusted_by(bundle):
        roots = ", ".join(f"'{r.subject.rfc4514_string()}'" for r in bundle.trusted_roots())
        raise StartupError(
            f"{where} (issued by '{authority.issuer}') does not chain to a root of the trust "
            f"bundle at Consul KV {key} ({roots}): they come from different 'meshctl ca init' "
            "runs; install the CA directory the bundle was published from"
        )


def _signing_api(
    consul: ConsulClient,
    authority: SigningAuthority,
    watch: BundleWatch,
    datacenter: str,
    prefix: str,
    options: ServeOptions,
    wall_clock: Callable[[], float],
) -> SigningApi:
    per_minute = options.csr_rate_per_minute
    return SigningApi(
        consul=consul,
        authority=authority,
        bundle=watch.current,
        datacenter=datacenter,
        kv_prefix=prefix,
        limiter=RateLimiter(rate_per_s=per_minute / 60.0, burst=max(1, min(10, per_minute))),
        wall_clock=wall_clock,
    )


async def _serve_ca_reload(
    authority: SigningAuthority, directory: Path, watch: BundleWatch, every_s: float
) -> None:
    """Pick up a signing CA replaced by ``meshctl ca rotate`` once the bundle trusts it."""
    while True:
        await trio.sleep(every_s)
        try:
            authority.reload_from_dir(directory, watch.current())
        except CaLoadError as exc:
            log_event(log, logging.WARNING, "signing_ca_not_loaded", reason=str(exc))
