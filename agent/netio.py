"""Small socket operations for the proxies on plain non-blocking stdlib sockets."""

from __future__ import annotations

import os
import socket

import trio


async def connect_tcp(address: str, port: int, *, timeout: float) -> socket.socket:
    """Connect a non-blocking TCP socket to *address*:*port* within *timeout* seconds.

    Raises:
        OSError: the connect failed (refused, unreachable, ...).
        trio.TooSlowError: it did not complete in time.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with trio.fail_after(timeout):
            try:
                sock.connect((address, port))
            except BlockingIOError:
                # Over loopback the handshake completes inside connect(): one cheap check
                # saves a trip through trio's scheduler (the inbound proxy's app dial).
                if not _connected(sock):
                    await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err)) from None
    except BaseException:
        sock.close()
        raise
    return sock


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


async def peek(sock: socket.socket, size: int, *, timeout: float) -> bytes:
    """The first bytes the peer sent, left in the socket; b"" if it closed first.

    Raises:
        trio.TooSlowError: nothing arrived within *timeout* seconds.
    """
    with trio.fail_after(timeout):
        while True:
            try:
                return sock.recv(size, socket.MSG_PEEK)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
