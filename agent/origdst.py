"""The destination a redirected connection was really meant for (``SO_ORIGINAL_DST``).

When iptables ``REDIRECT``s a connection to a local proxy, the accepted socket's local
address is the proxy's; netfilter's connection tracking still knows the address and port the
application dialled and hands them out through ``getsockopt``: ``SOL_IP/SO_ORIGINAL_DST``
(80) for IPv4 and ``SOL_IPV6/IP6T_SO_ORIGINAL_DST`` (also 80) for IPv6. Both return a
``struct sockaddr_in``/``sockaddr_in6`` in network byte order.
"""

from __future__ import annotations

import socket
import struct
from typing import Protocol

from meshd.errors import MeshdError

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_SOCKADDR_IN = 16
_SOCKADDR_IN6 = 28


class OriginalDestinationError(MeshdError):
    """The socket has no original destination: it was not redirected by netfilter."""


class _Socket(Protocol):
    """What :func:`original_destination` needs: stdlib and trio sockets both qualify."""

    @property
    def family(self) -> int: ...

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...

    def getsockname(self) -> tuple[str, int] | tuple[str, int, int, int]: ...


def original_destination(sock: _Socket) -> tuple[str, int]:
    """Return the ``(host, port)`` an accepted, redirected connection was addressed to.

    Works for IPv4 and IPv6 sockets, including IPv4 connections accepted on a dual-stack
    IPv6 socket (asked through ``SOL_IP``).

    Raises:
        OriginalDestinationError: the connection was not redirected (or not TCP).
    """
    attempts: list[tuple[int, int, int]] = []
    if sock.family == socket.AF_INET6:
        attempts.append((socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6))
    attempts.append((socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN))
    errors = []
    for level, option, size in attempts:
        try:
            raw = sock.getsockopt(level, option, size)
        except OSError as exc:
            errors.append(exc.strerror or str(exc))
            continue
        found = _decode(raw)
        if found == _plain(sock.getsockname()):
            # Dialled straight at the proxy's port (loopback and the agent's ports are never
            # redirected; conntrack then reports the address itself). Passed on, it would
            # reach this proxy again, and again: one connection would fill it up.
            raise OriginalDestinationError(
                f"the connection was addressed to the proxy itself ({found[0]} port"
                f" {found[1]}): it did not arrive through an iptables REDIRECT"
            )
        return found
    raise OriginalDestinationError(
        f"no original destination for this connection ({'; '.join(errors)}): "
        "it did not arrive through an iptables REDIRECT"
    )


def _plain(address: tuple[str, int] | tuple[str, int, int, int]) -> tuple[str, int]:
    """``(host, port)`` of a socket address, an IPv4-mapped IPv6 host as plain IPv4."""
    host, port = address[0], address[1]
    if host.startswith("::ffff:") and "." in host:
        host = host.removeprefix("::ffff:")
    return host, port


def _decode(raw: bytes) -> tuple[str, int]:
    family = struct.unpack_from("=H", raw)[0]
    (port,) = struct.unpack_from("!H", raw, 2)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raise OriginalDestinationError(f"original destination has unknown address family {family}")
