"""The live probe that proves outbound interception works (black-box, like kuma's tests).

A throw-away listener takes the outbound proxy's port on loopback and answers every
connection with the original destination it saw (``SO_ORIGINAL_DST``). The probe then
connects, as a UID the rules capture, to an address:port that must be captured. Seeing its
own target echoed back proves the redirect; reaching anything else, or nothing, is a failure.
For IPv6 in ``refuse`` mode the connection must instead be reset; a reset cannot be told
apart from a closed port on the target, so there the rule comparison in
:func:`agent.redirect.verify` carries the proof and the probe shows nothing gets through.

The probe needs the outbound port free: run ``meshd-agent redirect verify`` before the proxy
listens (or while the agent and its socket unit are stopped). While it runs, other captured
connections reach the probe, not a proxy. The running agent does not probe: its own
connections are never captured (its UID is excluded) and it may not dial as another user;
it compares the installed rules with its spec every ``check_interval`` instead.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Literal

import trio

from agent.origdst import original_destination
from meshd.errors import MeshdError
from meshd.redirect import Family, RedirectSpec

NOBODY = 65534
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_LOOPBACK = {4: "127.0.0.1", 6: "::1"}
Outcome = Literal["redirected", "refused", "bypassed", "failed"]


class ProbeError(MeshdError):
    """The probe cannot run: the port is busy, the target is excluded, or no usable UID."""


@dataclass(frozen=True)
class ProbeResult:
    """How one probe connection went.

    Attributes:
        family: 4 or 6.
        target: the address and port dialled.
        expected: ``redirect`` or ``refuse`` (IPv6 in refuse mode).
        outcome: what happened.
        detail: one human-readable line.
    """

    family: Family
    target: tuple[str, int]
    expected: Literal["redirect", "refuse"]
    outcome: Outcome
    detail: str

    @property
    def ok(self) -> bool:
        """Whether the outcome is the one the spec asks for."""
        want: Outcome = "redirected" if self.expected == "redirect" else "refused"
        return self.outcome == want


def probe_uid(spec: RedirectSpec) -> int | None:
    """The UID to probe as: ``None`` for our own, else one the rules capture.

    Raises:
        ProbeError: we run as an excluded UID and cannot switch.
    """
    excluded = {spec.proxy_uid, *spec.exclude_uids}
    euid = os.geteuid()
    if euid not in excluded:
        return None
    if euid == 0 and NOBODY not in excluded:
        return NOBODY
    raise ProbeError(f"verify runs as uid {euid}, which is excluded: run it as root")


def _check_target(spec: RedirectSpec, family: Family, target: tuple[str, int]) -> None:
    try:
        addr = ipaddress.ip_address(target[0])
    except ValueError as exc:
        raise ProbeError(f"probe target {target[0]!r} is not an IP address") from exc
    if addr.version != family or addr.is_loopback:
        raise ProbeError(f"probe target {addr} is not a non-loopback IPv{family} address")
    nets = [ipaddress.ip_network(n) for n in spec.excluded_cidrs(family)]
    if target[1] in spec.outbound_excludes or any(addr in net for net in nets):
        raise ProbeError(f"probe target {addr} port {target[1]} is excluded from capture")


def _socket_as(family: Family, uid: int | None) -> trio.socket.SocketType:
    # iptables' owner match reads the credentials the socket was created with.
    if uid is None:
        return trio.socket.socket(_AF[family], socket.SOCK_STREAM)
    os.seteuid(uid)
    try:
        return trio.socket.socket(_AF[family], socket.SOCK_STREAM)
    finally:
        os.seteuid(0)


async def _answer(listener: trio.socket.SocketType) -> None:
    while True:
        conn, _ = await listener.accept()
        with conn:
            try:
                host, port = original_destination(conn)
                await conn.send(f"meshd-probe {host} {port}\n".encode())
            except (MeshdError, OSError):
                pass  # an unredirected peer learns nothing; the client side decides


async def probe(
    spec: RedirectSpec, family: Family, target: tuple[str, int], *, timeout: float = 2.0
) -> ProbeResult:
    """Dial *target* as a captured UID and report whether the redirect caught it.

    Raises:
        ProbeError: the probe cannot run (busy port, excluded target, no usable UID).
    """
    _check_target(spec, family, target)
    expected: Literal["redirect", "refuse"] = (
        "refuse" if family == 6 and spec.ipv6 == "refuse" else "redirect"
    )
    uid = probe_uid(spec)
    if expected == "refuse":  # nothing may answer: no listener needed
        outcome, detail = await _dial(family, target, uid, timeout)
        return ProbeResult(family, target, expected, outcome, detail)
    with trio.socket.socket(_AF[family], socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await listener.bind((_LOOPBACK[family], spec.outbound_port))
        except OSError as exc:
            raise ProbeError(
                f"cannot listen on [{_LOOPBACK[family]}]:{spec.outbound_port} for the probe "
                f"({exc.strerror}); is the outbound proxy already running?"
            ) from exc
        listener.listen(16)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_answer, listener)
            outcome, detail = await _dial(family, target, uid, timeout)
            nursery.cancel_scope.cancel()
    return ProbeResult(family, target, expected, outcome, detail)


async def _dial(
    family: Family, target: tuple[str, int], uid: int | None, timeout: float
) -> tuple[Outcome, str]:
    where = f"[{target[0]}]:{target[1]}" if family == 6 else f"{target[0]}:{target[1]}"
    with _socket_as(family, uid) as sock:
        with trio.move_on_after(timeout) as scope:
            try:
                await sock.connect(target)
                answer = await sock.recv(256)
            except ConnectionRefusedError:
                return "refused", f"connection to {where} was refused (reset)"
            except OSError as exc:
                if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                    return "failed", f"no route to {where}: pass a routable probe target"
                return "failed", f"connection to {where} failed: {exc.strerror or exc}"
        if scope.cancelled_caught:
            return "bypassed", f"{where} timed out: traffic was not redirected"
    expect = f"meshd-probe {ipaddress.ip_address(target[0])} {target[1]}\n".encode()
    if answer == expect:
        return "redirected", f"{where} reached the outbound port with its original destination"
    return "bypassed", f"{where} answered {answer[:60]!r}, not the probe: not redirected"
