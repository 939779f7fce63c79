"""Listening sockets for the proxies, and accept loops that survive fd exhaustion.

Design note. Listening sockets are plain non-blocking stdlib sockets (the data path avoids
trio's socket wrappers, see ADR 003). They come either from systemd socket activation
(``LISTEN_FDS``/``LISTEN_PID``, matched by port), so a restart of the agent never refuses a
connection — the kernel keeps queueing on the socket systemd holds — or are opened here.

Accept loops hand each connection to a handler started in a *separate* nursery owned by
the caller: cancelling the accept loop (drain) stops new connections while the established
ones keep flowing until they finish or the drain deadline passes.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping

import trio

from agent.accesslog import JsonLog
from meshd.errors import MeshdError

SD_LISTEN_FDS_START = 3
BACKLOG = 4096
# The process ran out of something the next accept needs: wait instead of spinning.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The client gave up before we accepted: nothing to do but take the next one.
_CLIENT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
RESOURCE_BACKOFF_S = 0.1

Handler = Callable[[socket.socket], Awaitable[None]]


class ListenerError(MeshdError):
    """A listening socket could not be opened."""


def inherited_sockets(
    environ: Mapping[str, str] | None = None,
) -> dict[tuple[str, int], socket.socket]:
    """Listening TCP sockets passed by systemd socket activation, keyed by (host, port).

    Args:
        environ: the environment to read (defaults to ``os.environ``).

    Returns:
        (address, port) to socket; empty when the agent was not socket-activated.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    found: dict[tuple[str, int], socket.socket] = {}
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        sock = socket.socket(fileno=fd)
        if sock.type == socket.SOCK_STREAM:
            host, port = sock.getsockname()[:2]
            found[(host, port)] = sock
    return found


def open_listener(
    host: str, port: int, *, inherited: Mapping[tuple[str, int], socket.socket]
) -> socket.socket:
    """A non-blocking listening socket on *host*:*port*, inherited if systemd passed one.

    Raises:
        ListenerError: the address is in use or cannot be bound; names the address.
    """
    sock = inherited.get((host, port))
    if sock is None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise ListenerError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


async def serve_accept_loop(
    listener: socket.socket,
    handler: Handler,
    connections: trio.Nursery,
    *,
    log: JsonLog,
    name: str,
    shared: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections forever, starting ``handler(conn)`` in *connections* for each.

    Args:
        listener: a non-blocking listening socket.
        handler: owns the accepted socket (must close it).
        connections: the nursery that outlives this loop, so cancelling the loop drains.
        log: where resource exhaustion is reported.
        name: the listener's name in log events.
        shared: other processes accept from the same socket (``[proxy] workers``): take one
            connection per readiness and go back to waiting, so that a burst of queued
            connections is spread over the processes instead of taken by whichever woke
            first (each wakeup reaches every waiting process; the others find EAGAIN).
        task_status: started once the loop is accepting.
    """
    task_status.started()
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
            continue
        except OSError as exc:
            if exc.errno in _CLIENT_ERRNOS:
                continue
            if exc.errno in _RESOURCE_ERRNOS:
                log.event("accept_backoff", level="warning", listener=name, error=exc.strerror)
                await trio.sleep(RESOURCE_BACKOFF_S)
                continue
            raise
        conn.setblocking(False)
        connections.start_soon(handler, conn)
        if shared:
            await trio.lowlevel.wait_readable(listener)


async def start_accept_loops(
    acceptors: trio.Nursery,
    listeners: Iterable[tuple[str, socket.socket, Handler]],
    connections: trio.Nursery,
    *,
    log: JsonLog,
    shared: bool,
) -> None:
    """Start :func:`serve_accept_loop` in *acceptors* for each (name, socket, handler)."""
    for name, sock, handler in listeners:
        await acceptors.start(
            functools.partial(
                serve_accept_loop, sock, handler, connections, log=log, name=name, shared=shared
            )
        )
