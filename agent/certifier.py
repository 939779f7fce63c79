"""The agent's certifier: one key and one short-lived certificate per local service.

Design note:

* The key is generated on this host (EC P-256) and written 0600 atomically to
  ``<state_dir>/certs/<service>.key`` (created with that mode, never chmod'ed); it is kept
  across renewals and never leaves the host. The chain is ``<service>.pem``, replaced
  atomically, so a crash leaves the old certificate or the new one.
* First issuance is authorised by the host's bootstrap token (``bootstrap_token_file``, which
  must be 0600); renewals by the current certificate over mTLS.
* Renewal is at 50-70 % of the lifetime (fresh jitter per certificate), judged against the
  *wall clock* and the certificate's NotBefore/NotAfter, re-read after every short sleep, so
  clock steps and a suspended process are noticed within ``max_step_s``.
* While renewal fails the current certificate keeps being served, and attempts are retried
  with capped, jittered back-off. At NotAfter :meth:`Certifier.current` returns None: the
  proxy stops presenting an expired certificate rather than serve it.
* On start the cached certificate is used at once, so a host comes up with meshd down.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry, Gauge

from agent.signclient import Endpoint, SignError, request_certificate
from agent.tlscontexts import CertifiedKey
from meshd import pki
from meshd.bootstrap import BootstrapToken, parse_token
from meshd.errors import MeshdError
from meshd.identity import SpiffeId
from meshd.keyfile import read_secret, write_public, write_secret
from meshd.logevents import log_event
from meshd.peer import PeerRejected, verify_peer
from meshd.renewal import Phase, backoff, next_check, phase, renew_at
from meshd.signapi import SignRequest, SignResponse
from meshd.trustbundle import TrustBundle

log = logging.getLogger("meshd.agent.certifier")
Endpoints = Callable[[], Awaitable[Sequence[Endpoint]]]


class CertifierError(MeshdError):
    """A local key or token file is unusable."""


@dataclass(frozen=True)
class CertifierSettings:
    """Timing knobs (defaults suit production; tests shorten them)."""

    max_step_s: float = 5.0
    retry_base_s: float = 1.0
    retry_cap_s: float = 60.0
    request_timeout_s: float = 15.0
    save_retry_s: float = 30.0  # a certificate in use that could not be written yet


@dataclass(frozen=True)
class ServiceCertStatistics:
    """One service's certificate state; ``not_after`` is None when it has none."""

    service: str
    not_after: float | None
    serving: bool
    issued: int
    failures: int
    last_error: str


@dataclass(frozen=True)
class CertifierStatistics:
    """Every service's certificate state."""

    services: tuple[ServiceCertStatistics, ...]


@dataclass
class _State:
    cert: CertifiedKey | None = None
    renew_time: float = 0.0
    issued: int = 0
    failures: int = 0
    last_error: str = ""
    unsaved: bytes | None = None  # a chain in use that could not be written to disk yet


def endpoints_from_addresses(addresses: Iterable[str]) -> Endpoints:
    """Endpoints from configured ``https://host:port`` URLs, tried in a random order."""
    fixed = []
    for address in addresses:
        host, _, port = address.removeprefix("https://").rstrip("/").rpartition(":")
        fixed.append(Endpoint(host.strip("[]"), int(port)))

    async def endpoints() -> Sequence[Endpoint]:
        return random.sample(fixed, len(fixed))

    return endpoints


class Certifier:
    """Obtains, caches and renews certificates for the local services."""

    def __init__(
        self,
        *,
        state_dir: Path,
        token_file: Path,
        host: str,
        datacenter: str,
        services: Iterable[str],
        endpoints: Endpoints,
        bundle: Callable[[], TrustBundle | None],
        settings: CertifierSettings | None = None,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._dir = state_dir / "certs"
        self._token_file = token_file
        self._host = host
        self._datacenter = datacenter
        self._endpoints = endpoints
        self._bundle = bundle
        self._settings = settings or CertifierSettings()
        self._clock = wall_clock
        self._rng = rng or random.SystemRandom()
        self._states = {service: _State() for service in sorted(set(services))}
        self._expiry = None if registry is None else Gauge(
            "meshd_cert_expiry_timestamp_seconds",
            "NotAfter of the service's current certificate (Unix time).",
            ["service"],
            registry=registry,
        )  # fmt: skip
        self._renewal = None if registry is None else Gauge(
            "meshd_cert_renewal_timestamp_seconds",
            "When the agent renews the service's current certificate (Unix time); renewal"
            " is overdue while it is past.",
            ["service"],
            registry=registry,
        )  # fmt: skip
        self.changed = trio.Event()

    def current(self, service: str) -> CertifiedKey | None:
        """The certificate to present for *service*, or None (none yet, or expired)."""
        cert = self._states[service].cert
        if cert is None or self._clock() >= cert.not_after:
            return None
        return cert

    async def wait_ready(self) -> None:
        """Return once every local service has a certificate to present."""
        while any(self.current(service) is None for service in self._states):
            await self.changed.wait()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep every service's certificate fresh, forever.

        Started once the cached certificates are loaded (before meshd is contacted).
        """
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for service in self._states:
            self._load_cached(service)
        async with trio.open_nursery() as nursery:
            for service in self._states:
                nursery.start_soon(self._serve_service, service)
            task_status.started()

    def _paths(self, service: str) -> tuple[Path, Path]:
        return self._dir / f"{service}.key", self._dir / f"{service}.pem"

    def _load_cached(self, service: str) -> None:
        key_path, chain_path = self._paths(service)
        try:
            chain = chain_path.read_bytes()
            key = _load_key(read_secret(key_path))
            cert = _certified(service, chain, key_path)
            leaf = x509.load_pem_x509_certificates(chain)[0]
        except (OSError, ValueError, MeshdError) as exc:
            log_event(log, logging.INFO, "cert_cache_unusable", service=service, reason=str(exc))
            return
        if leaf.public_key() != key.public_key():
            log_event(log, logging.WARNING, "cert_cache_unusable", service=service,
                      reason="the cached certificate does not match its key")  # fmt: skip
            return
        self._install(service, cert, received=chain_path.stat().st_mtime)

    def _install(self, service: str, cert: CertifiedKey, *, received: float) -> None:
        state = self._states[service]
        state.cert = cert
        # The lifetime counts from when we got it: NotBefore is backdated for clock skew,
        # which would make short-lived certificates look half used at once.
        start = min(max(cert.not_before, received), cert.not_after)
        state.renew_time = renew_at(start, cert.not_after, self._rng.random())
        if self._expiry is not None and self._renewal is not None:
            self._expiry.labels(service=service).set(cert.not_after)
            self._renewal.labels(service=service).set(state.renew_time)
        self.changed.set()
        self.changed = trio.Event()

    async def _serve_service(self, service: str) -> None:
        state = self._states[service]
        attempt = 0
        while True:
            cert = state.cert
            due = (
                cert is None
                or phase(self._clock(), state.renew_time, cert.not_after) != Phase.FRESH
            )
            if not due and state.unsaved is not None:
                # Served but not yet on disk: try again, without holding up a renewal.
                retry = self._clock() + self._settings.save_retry_s
                await self._sleep_until(min(state.renew_time, retry))
                self._save(service)
            elif not due:
                await self._sleep_until(state.renew_time)
            elif await self._attempt(service):
                attempt = 0
                await trio.sleep(0)  # a checkpoint even if meshd answered instantly
            else:
                # Keep serving the current certificate (if still valid) and retry later.
                await trio.sleep(
                    backoff(
                        attempt,
                        base=self._settings.retry_base_s,
                        cap=self._settings.retry_cap_s,
                        jitter_fraction=self._rng.random(),
                    )
                )
                attempt += 1

    async def _attempt(self, service: str) -> bool:
        state = self._states[service]
        try:
            cert = await self._obtain(service)
        except MeshdError as exc:
            state.failures += 1
            state.last_error = str(exc)[:300]
            log_event(log, logging.WARNING, "cert_failed", service=service, reason=state.last_error)
            return False
        state.issued += 1
        self._install(service, cert, received=self._clock())
        return True

    async def _sleep_until(self, wake: float) -> None:
        # Short steps against the wall clock: a monotonic timer would miss a suspension.
        while (now := self._clock()) < wake:
            await trio.sleep(next_check(now, wake, max_step=self._settings.max_step_s))

    async def _obtain(self, service: str) -> CertifiedKey:
        bundle = self._bundle()
        if bundle is None:
            raise SignError(0, "no trust bundle yet")
        identity = SpiffeId(bundle.trust_domain, self._datacenter, service)
        key_path, chain_path = self._paths(service)
        key = self._key(key_path)
        request = SignRequest(pki.build_csr(key, identity), service, self._host)
        current = self.current(service)
        token = None
        client_cert = None
        if current is not None:
            client_cert = (current.chain_pem, key_path)
        else:
            token = parse_token(read_secret(self._token_file).decode("ascii", "replace"))
        answer = await self._ask(request, bundle, token=token, client_cert=client_cert)
        cert = _certified(service, answer.chain_pem, key_path)
        self._check_answer(answer.chain_pem, key, bundle, service)
        # Signed is signed: a certificate that cannot be saved (a full disk) is served all
        # the same, and saved when it can be (_serve_service tries again). Thrown away, a
        # renewal would be lost, and a first one could be had again only while the
        # bootstrap token lasts (a retry with the same key, docs/identity.md).
        self._states[service].unsaved = answer.chain_pem
        self._save(service)
        via = "renewal" if client_cert else "token"
        log_event(log, logging.INFO, "cert_issued", service=service, serial=f"{cert.serial:x}",
                  not_after=cert.not_after, via=via)  # fmt: skip
        return cert

    def _save(self, service: str) -> bool:
        """Write *service*'s unsaved chain; False (logged) when it cannot be, yet."""
        state = self._states[service]
        if state.unsaved is None:
            return True
        try:
            write_public(self._paths(service)[1], state.unsaved)
        except MeshdError as exc:
            log_event(log, logging.WARNING, "cert_not_saved", service=service,
                      reason=str(exc)[:300], retry_in_s=self._settings.save_retry_s)  # fmt: skip
            return False
        state.unsaved = None
        return True

    def _key(self, key_path: Path) -> ec.EllipticCurvePrivateKey:
        try:
            return _load_key(read_secret(key_path))
        except ValueError:
            raise CertifierError(f"{key_path} does not hold a usable EC key") from None
        except MeshdError:
            if key_path.exists():
                raise  # present but unsafe or unreadable: never silently replace it
        key = pki.generate_key()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
        write_secret(key_path, pem, overwrite=False)
        return key

    async def _ask(
        self,
        request: SignRequest,
        bundle: TrustBundle,
        *,
        token: BootstrapToken | None,
        client_cert: tuple[bytes, Path] | None,
    ) -> SignResponse:
        endpoints = await self._endpoints()
        if not endpoints:
            raise SignError(0, "no meshd server is known (none configured or registered)")
        error: SignError | None = None
        for endpoint in endpoints:
            try:
                return await request_certificate(
                    endpoint, request, bundle=bundle,
                    timeout_s=self._settings.request_timeout_s, now=self._clock(),
                    token=token, client_cert=client_cert,
                )  # fmt: skip
            except SignError as exc:
                error = exc
                if exc.status:
                    raise  # meshd's decision is authoritative; another server decides alike
        assert error is not None
        raise error

    def _check_answer(
        self, chain_pem: bytes, key: ec.EllipticCurvePrivateKey, bundle: TrustBundle, service: str
    ) -> None:
        chain = x509.load_pem_x509_certificates(chain_pem)
        if chain[0].public_key() != key.public_key():
            raise SignError(502, "meshd returned a certificate for another key")
        der = [c.public_bytes(serialization.Encoding.DER) for c in chain]
        try:
            verify_peer(der, bundle, role="client", trust_domain=bundle.trust_domain,
                        expected_service=service,
                        now=dt.datetime.fromtimestamp(self._clock(), dt.UTC))  # fmt: skip
        except PeerRejected as exc:
            raise SignError(502, f"meshd returned an unusable certificate: {exc.reason}") from None

    def statistics(self) -> CertifierStatistics:
        """Each service's NotAfter, whether it is being served, and counters."""
        return CertifierStatistics(
            tuple(
                ServiceCertStatistics(
                    service=service,
                    not_after=None if state.cert is None else state.cert.not_after,
                    serving=self.current(service) is not None,
                    issued=state.issued,
                    failures=state.failures,
                    last_error=state.last_error,
                )
                for service, state in self._states.items()
            )
        )


def _load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the key file does not hold an EC private key")  # noqa: TRY004
    return key


def _certified(service: str, chain_pem: bytes, key_path: Path) -> CertifiedKey:
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    except ValueError:
        raise SignError(502, "meshd returned something that is not a PEM chain") from None
    return CertifiedKey(
        service=service,
        chain_pem=chain_pem,
        key_path=key_path,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        serial=leaf.serial_number,
    )
