"""The signing API: who may have which certificate, decided per request, logged once.

Order of work for ``POST /v1/sign`` (cheapest refusal first, Consul last):

1. per-client rate limit (429);
2. strict parse of the body (400/413) and of the requested identity (400); service
   ``meshd``, the control plane's own identity, is refused to every caller (403), token or
   certificate: agents trust it as the CA, and the servers sign their own directly;
3. entitlement: a ``Bearer`` bootstrap token (first issuance; record read from Consul KV and
   judged by :func:`meshd.bootstrap.authorize_csr_by_token`), or else the client certificate
   of this TLS connection (renewal; :func:`meshd.peer.verify_peer` with role client, and its
   identity must equal the requested one) — 401 when neither proves anything, 403 when the
   caller is known but not entitled;
4. the CSR is checked and signed by :class:`~meshd.server.ca.SigningAuthority` (403 when it
   asks for more than the identity);
5. for a token, the service is marked consumed, with the fingerprint of the key it was
   issued to, in a check-and-set write; only if that write wins is the certificate handed
   out, so a replayed or raced token gets nothing. A retry by the same requester (the
   token, host and service of a consumed service, and a CSR for the key recorded for it)
   is signed again, through the same write, because the first answer may never have
   reached the host; a token without that key gets nothing (docs/identity.md).

Every decision is one JSON log line on logger ``meshd.server.sign`` with the client
address, identity, token *id* and outcome; never the token secret, CSR or key.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from meshd import pki
from meshd.bootstrap import (
    RESERVED_SERVICES,
    TokenError,
    TokenRecord,
    authorize_csr_by_token,
    key_fingerprint,
    parse_token,
    token_key,
)
from meshd.consul.client import ConsulClient
from meshd.consul.errors import ConsulError
from meshd.identity import IdentityError, SpiffeId
from meshd.logevents import log_event
from meshd.peer import PeerRejected, verify_peer
from meshd.server.ca import IssuedLeaf, SigningAuthority
from meshd.server.http import ClientInfo, HttpRequest, HttpResponse
from meshd.server.ratelimit import RateLimiter
from meshd.signapi import (
    BUNDLE_PATH,
    HEALTH_PATH,
    SIGN_PATH,
    ApiError,
    SignRequest,
    SignResponse,
    parse_sign_request,
)
from meshd.trustbundle import TrustBundle

log = logging.getLogger("meshd.server.sign")
_ROUTES = {SIGN_PATH: "POST", BUNDLE_PATH: "GET", HEALTH_PATH: "GET"}


@dataclass(frozen=True)
class _Grant:
    """Why a caller is entitled; ``record`` is the token record to consume, if any."""

    method: str
    record: TokenRecord | None = None
    entry_index: int = 0


@dataclass(frozen=True)
class SigningApiStatistics:
    """Decisions of a :class:`SigningApi`."""

    allowed: int
    denied: int
    by_status: tuple[tuple[int, int], ...] = field(default=())


class SigningApi:
    """Answers the HTTPS API's requests. Use :meth:`handle` as the server's handler."""

    def __init__(
        self,
        *,
        consul: ConsulClient,
        authority: SigningAuthority,
        bundle: Callable[[], TrustBundle],
        datacenter: str,
        kv_prefix: str,
        limiter: RateLimiter,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._consul = consul
        self._authority = authority
        self._bundle = bundle
        self._datacenter = datacenter
        self._kv_prefix = kv_prefix
        self._limiter = limiter
        self._clock = wall_clock
        self._allowed = 0
        self._statuses: dict[int, int] = {}

    async def handle(self, request: HttpRequest, client: ClientInfo) -> HttpResponse:
        """Route one request.

        Returns:
            The response; errors are one-line JSON with a 4xx/5xx status.
        """
        path = request.target.split("?", 1)[0]
        if path not in _ROUTES:
            return self._error(ApiError(404, f"no such endpoint {path[:100]!r}"))
        if request.method != _ROUTES[path]:
            return self._error(ApiError(405, f"{path} accepts {_ROUTES[path]} only"))
        if path == HEALTH_PATH:
            return HttpResponse(200, b'{"status": "ok"}\n')
        if path == BUNDLE_PATH:
            return HttpResponse(200, self._bundle().to_json())
        return await self._sign(request, client)

    def _error(self, exc: ApiError) -> HttpResponse:
        self._statuses[exc.status] = self._statuses.get(exc.status, 0) + 1
        return HttpResponse(exc.status, exc.body())

    async def _sign(self, request: HttpRequest, client: ClientInfo) -> HttpResponse:
        facts: dict[str, Any] = {"client": client.address}
        try:
            identity, issued = await self._decide(request, client, facts)
        except ApiError as exc:
            _log_decision(facts, allowed=False, status=exc.status, reason=exc.message)
            return self._error(exc)
        self._allowed += 1
        self._statuses[200] = self._statuses.get(200, 0) + 1
        _log_decision(
            facts,
            allowed=True,
            status=200,
            reason=f"issued {identity.uri}",
            serial=issued.serial,
            not_after=issued.not_after,
        )
        return HttpResponse(200, SignResponse(issued.chain_pem, issued.not_after).to_json())

    async def _decide(
        self, request: HttpRequest, client: ClientInfo, facts: dict[str, Any]
    ) -> tuple[SpiffeId, IssuedLeaf]:
        if not self._limiter.take(client.address, trio.current_time()):
            raise ApiError(429, "too many signing requests from this address; slow down")
        sign = parse_sign_request(request.body)
        facts.update(service=sign.service, host=sign.host, requested_ttl_s=sign.ttl_s)
        identity = self._identity(sign.service)
        grant = await self._entitle(request, client, sign, identity, facts)
        issued = self._issue(sign, identity)
        if grant.record is not None:
            await self._consume(grant, sign.service, issued)
        return identity, issued

    def _identity(self, service: str) -> SpiffeId:
        try:
            identity = SpiffeId(self._authority.trust_domain, self._datacenter, service)
        except IdentityError as exc:
            raise ApiError(400, str(exc)) from None
        if service in RESERVED_SERVICES:
            # Whoever holds it is the CA to every agent. Refused before any entitlement,
            # so neither a token record (however it got into KV) nor a certificate for
            # it (renewal) can obtain it; ServerTls signs the servers' own directly.
            raise ApiError(
                403,
                f"service {service!r} is reserved for the control plane; it is never issued"
                " to a caller",
            )
        return identity

    async def _entitle(
        self,
        request: HttpRequest,
        client: ClientInfo,
        sign: SignRequest,
        identity: SpiffeId,
        facts: dict[str, Any],
    ) -> _Grant:
        authorization = request.headers.get("authorization")
        if authorization is not None:
            facts["method"] = "token"
            return await self._entitle_by_token(authorization, sign, facts)
        facts["method"] = "renewal"
        if not client.chain_der:
            raise ApiError(401, "send a bootstrap token or renew over mTLS with your certificate")
        now = dt.datetime.fromtimestamp(self._clock(), dt.UTC)
        try:
            peer = verify_peer(
                client.chain_der,
                self._bundle(),
                role="client",
                trust_domain=self._authority.trust_domain,
                expected_service=None,
                now=now,
            )
        except PeerRejected as exc:
            raise ApiError(401, f"client certificate refused: {exc.reason}") from None
        facts["peer"] = peer.uri
        if peer != identity:
            raise ApiError(403, f"a certificate for {peer.uri} cannot renew {identity.uri}")
        return _Grant("renewal")

    async def _entitle_by_token(
        self, authorization: str, sign: SignRequest, facts: dict[str, Any]
    ) -> _Grant:
        scheme, _, text = authorization.partition(" ")
        malformed = ApiError(401, "Authorization must be 'Bearer mtk_<id>.<secret>'")
        if scheme.lower() != "bearer":
            raise malformed
        try:
            token = parse_token(text)
        except TokenError:
            raise malformed from None
        facts["token_id"] = token.token_id
        try:
            _, entry = await self._consul.kv_get(token_key(token.token_id, self._kv_prefix))
        except ConsulError:
            raise ApiError(503, "cannot read the token store (Consul); retry later") from None
        if entry is None:
            raise ApiError(401, f"unknown bootstrap token {token.token_id}")
        try:
            record = TokenRecord.from_json(entry.value)
        except TokenError as exc:
            raise ApiError(403, f"token {token.token_id} record is unusable: {exc}") from None
        decision = authorize_csr_by_token(
            record, token.secret, sign.host, sign.service, self._clock(), key=_csr_key(sign)
        )
        if not decision.allowed:
            raise ApiError(403 if record.matches(token.secret) else 401, decision.reason)
        if decision.retry:
            facts["retry"] = True  # the same key again: its first answer may have been lost
        return _Grant("token", record, entry.modify_index)

    def _issue(self, sign: SignRequest, identity: SpiffeId) -> IssuedLeaf:
        try:
            return self._authority.sign(sign.csr_pem, identity, self._clock())
        except pki.CsrRejected as exc:
            raise ApiError(403, exc.reason) from None
        except pki.PkiError as exc:
            raise ApiError(400, str(exc)) from None

    async def _consume(self, grant: _Grant, service: str, issued: IssuedLeaf) -> None:
        # The fingerprint of the key actually certified (the CSR's). On a retry the record
        # is unchanged, but still written with check-and-set: a revocation that lands
        # while we sign wins, as it does against a first issuance.
        assert grant.record is not None
        key = token_key(grant.record.token_id, self._kv_prefix)
        data = grant.record.consume(service, key_fingerprint(issued.cert.public_key())).to_json()
        try:
            won = await self._consul.kv_put(key, data, cas=grant.entry_index)
        except ConsulError:
            raise ApiError(503, "cannot update the token store (Consul); retry later") from None
        if not won:
            raise ApiError(
                403, f"token {grant.record.token_id} changed while in use (replayed or revoked)"
            )

    def statistics(self) -> SigningApiStatistics:
        """Allowed and refused signing decisions, and answers by status."""
        denied = sum(n for status, n in self._statuses.items() if status != 200)
        return SigningApiStatistics(
            allowed=self._allowed, denied=denied, by_status=tuple(sorted(self._statuses.items()))
        )


def _csr_key(sign: SignRequest) -> str | None:
    """The fingerprint of the CSR's public key, or None when it cannot be read (then the
    signing step refuses the CSR with the reason)."""
    try:
        return key_fingerprint(x509.load_pem_x509_csr(sign.csr_pem).public_key())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None


def _log_decision(facts: dict[str, Any], *, allowed: bool, status: int, reason: str,
                  **extra: Any) -> None:  # fmt: skip
    fields = {"decision": "allow" if allowed else "deny", "status": status, "reason": reason,
              **facts, **extra}  # fmt: skip
    log_event(log, logging.INFO, "sign", **fields)
