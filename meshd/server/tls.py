"""The server's own TLS identity: a leaf for service ``meshd`` it signs itself, and renews.

Agents verify meshd like any mesh peer (chain to the bundle, exactly the SVID of service
``meshd``) before they send a token, so the server needs no other PKI. The key lives only
in memory: a restart simply signs a new one. The TLS context is rebuilt on renewal and
whenever the trust bundle changes; the listener asks :meth:`ServerTls.context` per
connection, so a swap never drops a connection.

The context requests, but does not require, a client certificate (first issuance has none);
whatever is presented must chain to the bundle (OpenSSL) and is then checked by
:func:`meshd.peer.verify_peer` in the API.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio
from cryptography.hazmat.primitives import serialization

from meshd import pki
from meshd.identity import SpiffeId
from meshd.peer import make_ssl_context
from meshd.renewal import next_check, renew_at
from meshd.server.ca import IssuedLeaf, SigningAuthority
from meshd.trustbundle import TrustBundle

SERVICE = "meshd"
MAX_STEP_S = 30.0
MIN_RENEW_INTERVAL_S = 0.1


@dataclass(frozen=True)
class ServerTlsStatistics:
    """The server certificate's expiry and how often it was issued."""

    not_after: float
    issued: int


class ServerTls:
    """Holds the current server TLS context; :meth:`serve_renewal` keeps it fresh."""

    def __init__(
        self,
        authority: SigningAuthority,
        datacenter: str,
        bundle: Callable[[], TrustBundle],
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._authority = authority
        self._identity = SpiffeId(authority.trust_domain, datacenter, SERVICE)
        self._bundle = bundle
        self._clock = wall_clock
        self._issued = 0
        self._issued_at = 0.0
        self._generation = 0
        self._leaf: IssuedLeaf | None = None
        self._key_pem = b""
        self._bundle_seen: TrustBundle | None = None
        self._context: ssl.SSLContext | None = None
        self.refresh()

    def refresh(self) -> None:
        """Sign a new leaf for ``meshd`` and rebuild the context."""
        key = pki.generate_key()
        self._key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        csr = pki.build_csr(key, self._identity)
        self._issued_at = self._clock()
        self._generation = self._authority.generation
        self._leaf = self._authority.sign(csr, self._identity, self._issued_at)
        self._issued += 1
        self._rebuild()

    def _rebuild(self) -> None:
        assert self._leaf is not None
        bundle = self._bundle()
        context = make_ssl_context("server", self._leaf.chain_pem, self._key_pem, bundle)
        context.verify_mode = ssl.CERT_OPTIONAL  # first issuance comes without a certificate
        self._context = context
        self._bundle_seen = bundle

    def context(self) -> ssl.SSLContext:
        """The context for the next connection (renewed first if the signing CA or the
        bundle changed, so the server always presents what peers will trust)."""
        if self._authority.generation != self._generation:
            self.refresh()
        elif self._bundle() is not self._bundle_seen:
            self._rebuild()
        assert self._context is not None
        return self._context

    async def serve_renewal(
        self,
        *,
        max_step_s: float = MAX_STEP_S,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Renew the server certificate at 50 % of its lifetime, forever."""
        task_status.started()
        while True:
            assert self._leaf is not None
            # Count the lifetime from issuance: NotBefore is backdated for clock skew.
            due = renew_at(self._issued_at, self._leaf.not_after, 0.0)
            while (now := self._clock()) < due:
                await trio.sleep(next_check(now, due, max_step=max_step_s))
            await trio.sleep(MIN_RENEW_INTERVAL_S)  # never a busy loop, whatever the TTL
            self.refresh()

    def statistics(self) -> ServerTlsStatistics:
        """The current certificate's NotAfter and how many were issued."""
        assert self._leaf is not None
        return ServerTlsStatistics(self._leaf.not_after, self._issued)
