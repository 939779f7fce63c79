"""mTLS contexts for the proxies, rebuilt only when a certificate or the bundle changes.

Building an ``ssl.SSLContext`` costs milliseconds (key load, store build), so contexts are
cached per (role, service) and keyed by the certificate's fingerprint and the bundle's
identity: a renewal or a root rotation produces new contexts for new connections, while
open connections keep the context they were made with.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from agent.carrier import MESH_ALPN
from meshd.peer import make_ssl_context
from meshd.trustbundle import TrustBundle

Role = Literal["client", "server"]


@dataclass(frozen=True)
class CertifiedKey:
    """A service's current certificate: the chain (PEM) and the path of its 0600 key.

    Made by the agent's certifier; a data-path worker gets the same over its link.
    """

    service: str
    chain_pem: bytes = field(repr=False)
    key_path: Path
    not_before: float
    not_after: float
    serial: int


class CredentialSource(Protocol):
    """Where the proxies get certificates from (the agent's certifier)."""

    def current(self, service: str) -> CertifiedKey | None:
        """The service's valid certificate, or None (not issued yet, or expired)."""


class TLSContexts:
    """A cache of contexts keyed by role, service, certificate and bundle."""

    def __init__(self, source: CredentialSource) -> None:
        self._source = source
        self._cache: dict[tuple[Role, str], tuple[int, TrustBundle, ssl.SSLContext]] = {}

    def context(self, role: Role, service: str, bundle: TrustBundle) -> ssl.SSLContext | None:
        """The context for *service* acting as *role*, or None without a valid certificate.

        Args:
            role: ``client`` for the outbound proxy, ``server`` for the inbound proxy.
            service: the local service whose identity is presented.
            bundle: the trust bundle of the current snapshot.
        """
        cert = self._source.current(service)
        if cert is None:
            return None
        key = (role, service)
        cached = self._cache.get(key)
        # Bundles are immutable and replaced on change; holding the one a context was built
        # from (rather than its id, which a later object could reuse) makes `is` exact.
        if cached is not None and cached[0] == cert.serial and cached[1] is bundle:
            return cached[2]
        ctx = make_ssl_context(role, cert.chain_pem, cert.key_path, bundle)
        # Both proxies offer meshd/1 (docs/adr/010); a peer from before it agrees on nothing.
        ctx.set_alpn_protocols([MESH_ALPN])
        self._cache[key] = (cert.serial, bundle, ctx)
        return ctx
