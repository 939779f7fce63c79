"""Which user opened an intercepted connection: the kernel's ``sock_diag`` netlink lookup.

An intercepted outbound connection reaches the outbound proxy with nothing of the process
that opened it, yet a host may run several services that call the same upstream. The
application's own socket still exists on this host, under the user that created it. One
``SOCK_DIAG_BY_FAMILY`` request (``NETLINK_SOCK_DIAG``, the interface ``ss`` uses, open to
unprivileged users) asks for the socket with an exact four-tuple; the reply's
``inet_diag_msg.idiag_uid`` is its owner. The application's socket is addressed
*(its own address and port, the original destination)*: the accepted socket's peer and
``SO_ORIGINAL_DST``.

A socket in ``TIME_WAIT`` is reported with uid 0 (the kernel keeps no owner for it), so
such a reply is "unknown", never root. Anything but a well-formed reply for our request is
"unknown" too: the caller refuses rather than guesses (ADR 006).

Building and parsing the messages is pure (:func:`build_request`, :func:`parse_reply`);
:class:`SocketOwners` holds one netlink socket per process and is synchronous: the kernel
answers a sock_diag request before ``send`` returns, so the reply is read without waiting.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import socket
import struct
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
TCP_TIME_WAIT = 6
INET_DIAG_NOCOOKIE = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host order)
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid.
_REQ = struct.Struct("=BBBBI")
# inet_diag_sockid: sport, dport (big-endian), src[16], dst[16], if, cookie[2].
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue, wqueue,
# uid, inode.
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_SOCKID_SIZE = _SOCKID.size + _SOCKID_TAIL.size
_MSG_SIZE = _MSG_HEAD.size + _SOCKID_SIZE + _MSG_TAIL.size
_REPLY_BUFFER = 8192
_STALE_REPLIES = 16


@dataclass(frozen=True)
class Owner:
    """The answer for one connection: its owner's uid, or why it is not known."""

    uid: int | None
    reason: str = ""


def _packed(address: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return family, ip.packed.ljust(16, b"\0")


def build_request(local: tuple[str, int], remote: tuple[str, int], seq: int) -> bytes:
    """The netlink request for the TCP socket whose own address is *local* and whose peer is
    *remote* (IPv4, IPv6, or IPv4-mapped IPv6, which is asked as IPv4).

    Raises:
        ValueError: an address is not an IP address, or the two are of different families.
    """
    family, src = _packed(local[0])
    other, dst = _packed(remote[0])
    if family != other:
        raise ValueError(f"{local[0]} and {remote[0]} are of different address families")
    body = (
        _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
        + _SOCKID.pack(local[1], remote[1], src, dst)
        + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0)
    return header + body


def parse_reply(data: bytes, seq: int) -> Owner | None:
    """The owner in a reply to request *seq*; None if *data* answers another request.

    Never raises: a malformed reply is an :class:`Owner` without uid, saying why.
    """
    if len(data) < _NLMSGHDR.size:
        return Owner(None, f"sock_diag: short reply ({len(data)} bytes)")
    length, kind, _flags, got_seq, _pid = _NLMSGHDR.unpack_from(data)
    if got_seq != seq:
        return None
    if not _NLMSGHDR.size <= length <= len(data):
        return Owner(None, f"sock_diag: reply length {length} of {len(data)} bytes")
    return _parse_body(kind, data[_NLMSGHDR.size : length])


def _parse_body(kind: int, body: bytes) -> Owner:
    if kind == NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", body) if len(body) >= 4 else (0,)
        if error == 0:
            return Owner(None, "sock_diag: empty acknowledgement")
        return Owner(None, f"the client's socket is gone ({_strerror(-error)})")
    if kind != SOCK_DIAG_BY_FAMILY or len(body) < _MSG_SIZE:
        return Owner(None, f"sock_diag: unexpected reply (type {kind}, {len(body)} bytes)")
    _family, state, _timer, _retrans = _MSG_HEAD.unpack_from(body)
    if state == TCP_TIME_WAIT:
        return Owner(None, "the client's socket is closed (TIME_WAIT keeps no owner)")
    _expires, _rqueue, _wqueue, uid, _inode = _MSG_TAIL.unpack_from(
        body, _MSG_HEAD.size + _SOCKID_SIZE
    )
    return Owner(uid)


def _strerror(errno: int) -> str:
    try:
        return os.strerror(errno)
    except ValueError:
        return f"errno {errno}"


class SocketOwners:
    """Looks up the owners of this host's TCP sockets (one netlink socket, opened lazily).

    One instance per process; not for concurrent use from several threads.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = itertools.count(1)

    def owner(self, local: tuple[str, int], remote: tuple[str, int]) -> Owner:
        """The owner of the socket at *local* connected to *remote* (see the module note)."""
        try:
            request = build_request(local, remote, seq := next(self._seq) & 0xFFFFFFFF)
        except ValueError as exc:
            return Owner(None, f"cannot ask for {local} -> {remote}: {exc}")
        try:
            sock = self._socket()
            sock.send(request)
            for _ in range(_STALE_REPLIES):  # skip replies to requests given up on
                found = parse_reply(sock.recv(_REPLY_BUFFER), seq)
                if found is not None:
                    return found
            return Owner(None, "sock_diag: no reply to this request")
        except BlockingIOError:
            return Owner(None, "sock_diag: no reply")
        except OSError as exc:
            self.close()
            return Owner(None, f"sock_diag: {exc.strerror or exc}")

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
            sock.setblocking(False)
            self._sock = sock
        return self._sock

    def close(self) -> None:
        """Close the netlink socket (a later lookup opens another)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
