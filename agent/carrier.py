"""The ``meshd/1`` protocol between an outbound and an inbound proxy (docs/adr/010).

Both proxies offer ALPN ``meshd/1``. When it is agreed, the client's first application
bytes on the mTLS connection are :data:`GO`, and only then does the inbound proxy authorize
the connection and dial the application. That lets an outbound proxy open and verify
connections *before* an application needs them (:mod:`agent.warmpool`): an unused one never
reaches the application. Without ALPN (a peer from before this protocol) the inbound proxy
dials at once and the outbound proxy sends no preamble, as before.
"""

from __future__ import annotations

import trio

from agent.tlsconn import TLSConnection
from meshd.errors import MeshdError

MESH_ALPN = "meshd/1"
GO = b"MESHDGO1"
# GO and the application bytes sent with it fit in one TLS record (at most 16 KiB of
# plaintext); anything beyond stays decrypted in the session for the pump. A connection
# holds this buffer for as long as it waits to be used (up to 120 s), so no bigger.
_READ = len(GO) + 16384


class CarrierError(MeshdError):
    """The peer broke the ``meshd/1`` preamble."""


class CarrierUnused(CarrierError):
    """The connection was closed, or timed out, before it was put to use (a warm one)."""


def speaks_carrier(tls: TLSConnection) -> bool:
    """True if both sides agreed on ``meshd/1``."""
    return tls.alpn == MESH_ALPN


async def send_go(tls: TLSConnection, first: bytes = b"") -> None:
    """Tell the inbound proxy this connection now carries an application connection;
    *first*, the application's first bytes, go in the same record."""
    await tls.send_all(GO + first)


async def receive_go(tls: TLSConnection, *, timeout: float) -> bytes:
    """Wait for :data:`GO`; return the application bytes that came with it.

    Raises:
        CarrierUnused: closed or timed out before use.
        CarrierError: the first bytes were not the preamble.
    """
    got = bytearray()
    buf = memoryview(bytearray(_READ))
    with trio.move_on_after(timeout) as waited:
        while len(got) < len(GO):
            try:
                n = await tls.recv_into(buf)
            except OSError as exc:
                raise CarrierUnused(f"closed before use ({exc})") from None
            if n == 0:
                raise CarrierUnused("closed before use")
            got += buf[:n]
    if waited.cancelled_caught:
        raise CarrierUnused(f"not used within {timeout:g} s")
    if not got.startswith(GO):
        raise CarrierError("the peer spoke meshd/1 but did not send the preamble")
    return bytes(got[len(GO) :])
