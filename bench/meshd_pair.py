"""Stand-in meshd proxies for the benchmark: one process per side, run as a module.

    python -m bench.meshd_pair {fast|naive} {outbound|inbound} --listen H:P --upstream H:P \
        --ca CA.pem --cert LEAF.pem

* ``fast``: the agent's L4 path: ``agent.tlsconn.handshake`` and the pump engine the agent
  uses by default (``--engine epoll``: ``agent.epollpump``; ``--engine trio``:
  ``agent.pump.pump``). Outbound: plaintext in, mTLS out; inbound: mTLS in, plaintext out.
* ``naive``: the baseline the issue quotes: ``trio.serve_tcp`` + ``trio.SSLStream`` and a
  two-task ``receive_some``/``send_all`` copy loop.

Neither runs the agent's control plane (snapshots, SPIFFE check, authorization); they measure
the data path only. The real ``meshd-agent`` proxies replace them through
:class:`bench.systems.PairLauncher`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import socket
import ssl
import sys
from typing import Any

import trio

from bench.topology import SERVER_NAME

IDLE_TIMEOUT = 300.0
HANDSHAKE_TIMEOUT = 10.0


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def make_context(role: str, ca: str, cert: str) -> ssl.SSLContext:
    """An mTLS context: ``outbound`` is the TLS client, ``inbound`` the TLS server."""
    if role == "outbound":
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    else:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(cert)
    return ctx


# ---------------------------------------------------------------------------------- fast


async def _serve_fast(
    role: str,
    listen: tuple[str, int],
    upstream: tuple[str, int],
    ctx: ssl.SSLContext,
    engine_name: str = "epoll",
) -> None:
    """The agent's own data path; *engine_name* as ``[proxy] engine`` (default: epoll)."""
    from agent.epollpump import open_pump_engine
    from agent.pump import pump

    if engine_name == "epoll":
        async with open_pump_engine() as engine:
            await _serve_fast_with(role, listen, upstream, ctx, engine.pump)
    else:
        await _serve_fast_with(role, listen, upstream, ctx, pump)


async def _serve_fast_with(
    role: str, listen: tuple[str, int], upstream: tuple[str, int], ctx: ssl.SSLContext, pump: Any
) -> None:
    from agent.pump import PlainConnection
    from agent.tlsconn import handshake

    async def connect() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.connect(upstream)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                sock.close()
                raise OSError(err, "connect failed") from None
        return sock

    async def handle(sock: socket.socket) -> None:
        try:
            if role == "outbound":
                a = PlainConnection(sock)
                up = await connect()
                b = await handshake(
                    up,
                    ctx,
                    server_side=False,
                    server_hostname=SERVER_NAME,
                    timeout=HANDSHAKE_TIMEOUT,
                )
            else:
                a = await handshake(sock, ctx, server_side=True, timeout=HANDSHAKE_TIMEOUT)
                b = PlainConnection(await connect())
        except Exception as exc:  # a failed peer is not fatal to the proxy
            print(f"{role}: setup failed: {exc}", file=sys.stderr)
            sock.close()
            return
        await pump(a, b, idle_timeout=IDLE_TIMEOUT)

    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await listener.bind(listen)
    listener.listen(4096)
    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(handle, socket.socket(fileno=conn.detach()))


# --------------------------------------------------------------------------------- naive


async def _serve_naive(
    role: str, listen: tuple[str, int], upstream: tuple[str, int], ctx: ssl.SSLContext
) -> None:
    async def copy(src: trio.abc.Stream, dst: trio.abc.Stream, done: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    async def handle(down: trio.SocketStream) -> None:
        a: trio.abc.Stream
        b: trio.abc.Stream
        try:
            up = await trio.open_tcp_stream(*upstream)
            if role == "outbound":
                a = down
                b = trio.SSLStream(up, ctx, server_hostname=SERVER_NAME)
                await b.do_handshake()
            else:
                a = trio.SSLStream(down, ctx, server_side=True)
                await a.do_handshake()
                b = up
        except (OSError, trio.BrokenResourceError) as exc:
            print(f"{role}: setup failed: {exc}", file=sys.stderr)
            await down.aclose()
            return
        try:
            async with a, b, trio.open_nursery() as nursery:
                nursery.start_soon(copy, a, b, nursery.cancel_scope)
                nursery.start_soon(copy, b, a, nursery.cancel_scope)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away while closing; the connection is over either way

    await trio.serve_tcp(handle, listen[1], host=listen[0], backlog=4096)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until killed."""
    p = argparse.ArgumentParser(prog="python -m bench.meshd_pair")
    p.add_argument("impl", choices=["fast", "naive"])
    p.add_argument("role", choices=["outbound", "inbound"])
    p.add_argument("--listen", type=_addr, required=True)
    p.add_argument("--upstream", type=_addr, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument(
        "--engine",
        choices=["epoll", "trio"],
        default="epoll",
        help="the fast path's pump engine, as [proxy] engine (default: epoll)",
    )
    args = p.parse_args(argv)
    ctx = make_context(args.role, args.ca, args.cert)
    serve: Any = (
        functools.partial(_serve_fast, engine_name=args.engine)
        if args.impl == "fast"
        else _serve_naive
    )
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args.role, args.listen, args.upstream, ctx)


if __name__ == "__main__":
    main()
