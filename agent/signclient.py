"""The agent's client of the meshd signing API: h11 over ``trio.SSLStream``.

meshd is verified like any mesh peer *before a byte of the request is written*: its chain
must reach the trust bundle and name exactly the SVID of service ``meshd`` in our trust
domain (:func:`meshd.peer.verify_peer`). Only then is the request — which may carry a
bootstrap token — sent. For renewal the client presents its current certificate; its key is
passed as the path of its 0600 file, so no copy of it is made.
"""

from __future__ import annotations

import datetime as dt
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import h11
import trio

from meshd.bootstrap import BootstrapToken
from meshd.errors import MeshdError
from meshd.peer import PeerRejected, make_ssl_context, peer_chain_der, verify_peer
from meshd.signapi import SIGN_PATH, SignRequest, SignResponse, parse_error
from meshd.trustbundle import TrustBundle

SERVER_SERVICE = "meshd"
MAX_RESPONSE_BYTES = 64 * 1024
DEFAULT_TIMEOUT_S = 15.0


class SignError(MeshdError):
    """Obtaining a certificate failed; ``status`` is meshd's HTTP status, 0 if none came."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Endpoint:
    """A meshd server address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _anonymous_context(bundle: TrustBundle) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identity is checked by verify_peer, not by host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=bundle.roots_pem().decode("ascii"))
    return ctx


async def request_certificate(
    endpoint: Endpoint,
    request: SignRequest,
    *,
    bundle: TrustBundle,
    token: BootstrapToken | None = None,
    client_cert: tuple[bytes, Path] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    now: float | None = None,
) -> SignResponse:
    """Ask meshd to sign *request*, with a token (first issuance) or a certificate (renewal).

    Args:
        endpoint: the meshd server.
        request: the CSR, service and host.
        bundle: the trust bundle meshd's certificate must chain to.
        token: the bootstrap token, for first issuance.
        client_cert: ``(chain_pem, key_path)`` of the current certificate, for renewal.
        timeout_s: the whole exchange's deadline.
        now: the wall-clock time (Unix) to judge meshd's certificate at; the clock if None.

    Returns:
        The signed chain.

    Raises:
        SignError: unreachable, meshd not proven to be meshd, timed out, or refused (with
            meshd's status and reason).
    """
    try:
        if client_cert is not None:
            chain_pem, key_path = client_cert
            ctx = make_ssl_context("client", chain_pem, key_path, bundle)
        else:
            ctx = _anonymous_context(bundle)
    except (ssl.SSLError, OSError) as exc:
        raise SignError(0, f"cannot load the certificate, key or bundle for TLS: {exc}") from None
    body = request.to_json()
    headers = _headers(endpoint, token, len(body))
    with trio.move_on_after(timeout_s) as scope:
        when = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
        status, answer = await _exchange(endpoint, ctx, bundle, when, headers, body)
    if scope.cancelled_caught:
        raise SignError(0, f"meshd at {endpoint} did not answer within {timeout_s:g} s")
    if status != 200:
        raise SignError(status, f"meshd at {endpoint} refused ({status}): {parse_error(answer)}")
    try:
        return SignResponse.from_json(answer)
    except MeshdError as exc:
        raise SignError(502, f"meshd at {endpoint}: {exc}") from None


def _headers(
    endpoint: Endpoint, token: BootstrapToken | None, length: int
) -> list[tuple[str, str]]:
    headers = [("host", str(endpoint)), ("content-type", "application/json")]
    if token is not None:
        headers.append(("authorization", f"Bearer {token.reveal()}"))
    headers.append(("content-length", str(length)))
    return headers


async def _exchange(
    endpoint: Endpoint,
    ctx: ssl.SSLContext,
    bundle: TrustBundle,
    when: dt.datetime,
    headers: list[tuple[str, str]],
    body: bytes,
) -> tuple[int, bytes]:
    try:
        tcp = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    except OSError as exc:
        raise SignError(0, f"cannot connect to meshd at {endpoint}: {exc.strerror}") from None
    tls = trio.SSLStream(tcp, ctx, server_hostname=None, https_compatible=True)
    try:
        await tls.do_handshake()
        _verify_server(tls, bundle, when, endpoint)
        conn = h11.Connection(h11.CLIENT)
        out = conn.send(h11.Request(method="POST", target=SIGN_PATH, headers=headers)) or b""
        out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await tls.send_all(out)
        return await _read_response(tls, conn)
    except (trio.BrokenResourceError, ssl.SSLError, OSError, h11.ProtocolError) as exc:
        raise SignError(0, f"TLS or HTTP with meshd at {endpoint} failed: {exc}") from None
    finally:
        await trio.aclose_forcefully(tls)


def _verify_server(
    tls: trio.SSLStream[trio.SocketStream],
    bundle: TrustBundle,
    when: dt.datetime,
    endpoint: Endpoint,
) -> None:
    chain = peer_chain_der(tls)
    try:
        verify_peer(
            chain,
            bundle,
            role="server",
            trust_domain=bundle.trust_domain,
            expected_service=SERVER_SERVICE,
            now=when,
        )
    except PeerRejected as exc:
        raise SignError(0, f"{endpoint} is not a meshd server of this mesh: {exc.reason}") from None


async def _read_response(
    tls: trio.SSLStream[trio.SocketStream], conn: h11.Connection
) -> tuple[int, bytes]:
    status = 0
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await tls.receive_some(16 * 1024)))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_RESPONSE_BYTES:
                raise SignError(0, "meshd's answer is too large")
        elif isinstance(event, h11.EndOfMessage):
            return status, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise SignError(0, "meshd closed the connection before answering")
