"""Connection limits (docs/adr/013): the sans-IO admission table, then the real proxies.

The table's rules are tested on values (and as a state machine with hypothesis); the
proxies' side with real loopback sockets and the agent's own handlers: ``handle_inbound``
and ``handle_outbound`` refusing over a limit, and, through the warm-connection harness of
``tests/test_warm.py`` (real mTLS, real application), a source that floods the inbound
proxy with silent connections while an honest peer's calls go through.
"""

from __future__ import annotations

import errno
import io
import json
import socket
import ssl
from pathlib import Path

import pytest
import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent import inbound, outbound
from agent.accesslog import JsonLog
from agent.inbound import OpenConnections
from agent.proxycore import ProxyLimits
from meshd.admission import (
    FAILING_SOURCES,
    REPORT_INTERVAL_S,
    REPORTED_SOURCES,
    ConnectionLimits,
    Refusal,
    Ticket,
    source_of,
)
from meshd.config.agent import parse_agent_config
from meshd.config.errors import ConfigError
from meshd.snapshot import LocalService
from tests.plugins.pki import MeshCa
from tests.test_resumption import make_proxy
from tests.test_warm import _listen, running


def admitted(limits: ConnectionLimits, source: str, now: float = 0.0) -> Ticket:
    ticket = limits.admit(source, now)
    assert isinstance(ticket, Ticket), ticket
    return ticket


def refused(limits: ConnectionLimits, source: str, now: float = 0.0) -> Refusal:
    refusal = limits.admit(source, now)
    assert isinstance(refusal, Refusal), refusal
    return refusal


# ------------------------------------------------------------------------ the table


def test_max_connections_refuses_the_next_and_a_release_frees_a_slot() -> None:
    limits = ConnectionLimits(max_connections=3)
    tickets = [admitted(limits, f"10.0.0.{i}") for i in range(3)]
    assert refused(limits, "10.0.0.9").limit == "max_connections"
    limits.release(tickets[1])
    admitted(limits, "10.0.0.9")
    assert refused(limits, "10.0.0.1").limit == "max_connections"
    stats = limits.statistics()
    assert stats.connections == 3 and stats.refused == {"max_connections": 2}


def test_unverified_per_source_limits_one_source_and_verification_frees_its_slot() -> None:
    limits = ConnectionLimits(max_connections=10, max_unverified_per_source=2)
    a1, a2 = admitted(limits, "10.0.0.1"), admitted(limits, "10.0.0.1")
    assert refused(limits, "10.0.0.1").limit == "max_unverified_per_source"
    admitted(limits, "10.0.0.2")  # another source is not affected
    limits.verified(a1)  # a verified connection stays open but leaves the count
    a3 = admitted(limits, "10.0.0.1")
    assert refused(limits, "10.0.0.1").limit == "max_unverified_per_source"
    # Verified connections are limited only by max_connections.
    for ticket in (a2, a3):
        limits.verified(ticket)
    more = [admitted(limits, "10.0.0.1") for _ in range(2)]
    for ticket in more:
        limits.verified(ticket)
    stats = limits.statistics()
    assert stats.connections == 6 and stats.unverified == 1 and stats.unverified_sources == 1


def test_release_and_verified_are_idempotent_and_no_source_is_kept_with_nothing() -> None:
    limits = ConnectionLimits(max_connections=5, max_unverified_per_source=5)
    tickets = [admitted(limits, f"10.0.0.{i % 2}") for i in range(4)]
    limits.verified(tickets[0])
    limits.verified(tickets[0])
    for ticket in tickets:
        limits.release(ticket)
        limits.release(ticket)
        limits.verified(ticket)  # after release: no effect
    stats = limits.statistics()
    assert (stats.connections, stats.unverified, stats.unverified_sources) == (0, 0, 0)


@pytest.mark.parametrize(
    ("client", "source"),
    [
        ("10.0.0.1:5555", "10.0.0.1"),
        ("::ffff:10.0.0.1:5555", "10.0.0.1"),
        ("2001:db8::1:5555", "2001:db8::/64"),
        ("2001:db8:0:ffff:1:2:3:4:443", "2001:db8:0:ffff::/64"),
        ("fe80::1%eth0:22", "fe80::/64"),
        ("?", "?"),
    ],
)
def test_a_source_is_an_ipv4_address_or_an_ipv6_64(client: str, source: str) -> None:
    assert source_of(client) == source


def test_one_ipv6_64_is_one_source_however_many_addresses_it_uses() -> None:
    """A host holds a whole /64: counted per address, it could take every slot unverified
    and dodge the failure limit by rotating addresses."""
    limits = ConnectionLimits(max_connections=10_000, max_unverified_per_source=40)
    clients = [f"2001:db8::{i:x}:443" for i in range(1, 5001)]
    tickets = [t for c in clients if isinstance(t := limits.admit(source_of(c), 0.0), Ticket)]
    assert len(tickets) == 40
    assert isinstance(limits.admit(source_of("2001:db8:1::1:443"), 0.0), Ticket)  # next /64


def test_without_a_per_source_limit_one_source_may_take_them_all() -> None:
    limits = ConnectionLimits(max_connections=50)  # the outbound proxy's: local clients
    for _ in range(50):
        admitted(limits, "127.0.0.1")
    assert refused(limits, "127.0.0.1").limit == "max_connections"
    assert limits.statistics().unverified == 0


def test_refusals_are_reported_once_per_interval_with_how_many_there_were() -> None:
    limits = ConnectionLimits(max_connections=1)
    admitted(limits, "a")
    assert refused(limits, "b", now=100.0).report == 1
    for t in range(1, 8):
        assert refused(limits, "b", now=100.0 + t).report == 0
    assert refused(limits, "b", now=100.0 + REPORT_INTERVAL_S).report == 8


def test_per_source_refusals_are_reported_per_source_and_remembered_boundedly() -> None:
    limits = ConnectionLimits(max_connections=10_000, max_unverified_per_source=1)
    sources = [f"10.1.{i // 250}.{i % 250}" for i in range(REPORTED_SOURCES + 50)]
    for source in sources:
        admitted(limits, source)
    # Each flooding source is named once per interval, not once per connection.
    assert [refused(limits, s, now=1.0).report for s in sources[:3]] == [1, 1, 1]
    assert [refused(limits, s, now=2.0).report for s in sources[:3]] == [0, 0, 0]
    for source in sources[3:]:
        assert refused(limits, source, now=3.0).report == 1
    assert len(limits._reporting) == REPORTED_SOURCES
    # The first sources were forgotten (least recently refused): reported again at once.
    assert refused(limits, sources[0], now=4.0).report == 1


def test_failures_from_one_source_refuse_it_until_its_window_ends() -> None:
    limits = ConnectionLimits(10, 10, max_failures_per_source=3, failure_window_s=10.0)
    for now in (0.0, 1.0, 2.0):
        ticket = admitted(limits, "a", now)
        limits.failed(ticket, now)
        limits.release(ticket)
    # The third failure reaches the limit: refused on arrival, before any handshake.
    assert refused(limits, "a", 3.0).limit == "max_failures_per_source"
    assert refused(limits, "a", 9.9).report == 0  # reported once per interval
    admitted(limits, "b", 3.0)  # other sources are not concerned
    # The window began with the first failure: at 10 s it is over, and "a" is forgotten.
    admitted(limits, "a", 10.0)
    assert limits.statistics().failing_sources == 0
    assert limits.statistics().refused == {"max_failures_per_source": 2}


def test_failures_spread_over_windows_never_reach_the_limit() -> None:
    limits = ConnectionLimits(10, 10, max_failures_per_source=3, failure_window_s=10.0)
    for now in (0.0, 5.0, 10.0, 15.0, 20.0, 25.0):  # two per window
        ticket = admitted(limits, "a", now)
        limits.failed(ticket, now)
        limits.release(ticket)
    admitted(limits, "a", 26.0)


def test_without_a_failure_limit_failures_are_not_even_remembered() -> None:
    limits = ConnectionLimits(10, 10)
    for _ in range(50):
        ticket = admitted(limits, "a")
        limits.failed(ticket, 0.0)
        limits.release(ticket)
    assert limits.statistics().failing_sources == 0


def test_failing_sources_are_remembered_boundedly() -> None:
    limits = ConnectionLimits(10, 10, max_failures_per_source=1)
    for n in range(FAILING_SOURCES + 10):
        ticket = admitted(limits, f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}")
        limits.failed(ticket, 0.0)
        limits.release(ticket)
    assert limits.statistics().failing_sources == FAILING_SOURCES
    admitted(limits, "10.0.0.0")  # the first failing source was forgotten: admitted
    assert refused(limits, "10.0.0.20").limit == "max_failures_per_source"


class LimitsMachine(RuleBasedStateMachine):
    """Any interleaving of admit, verify and release keeps the counts exact and bounded."""

    def __init__(self) -> None:
        super().__init__()
        self.limits = ConnectionLimits(max_connections=6, max_unverified_per_source=3)
        self.open: list[Ticket] = []

    @rule(source=st.sampled_from(["a", "b", "c"]))
    def admit(self, source: str) -> None:
        unverified = sum(1 for t in self.open if t.source == source and t.unverified)
        decision = self.limits.admit(source, 0.0)
        if len(self.open) >= 6:
            assert isinstance(decision, Refusal) and decision.limit == "max_connections"
        elif unverified >= 3:
            assert isinstance(decision, Refusal)
            assert decision.limit == "max_unverified_per_source"
        else:
            assert isinstance(decision, Ticket)
            self.open.append(decision)

    @precondition(lambda self: self.open)
    @rule(index=st.integers(0, 100))
    def verify(self, index: int) -> None:
        self.limits.verified(self.open[index % len(self.open)])

    @precondition(lambda self: self.open)
    @rule(index=st.integers(0, 100))
    def release(self, index: int) -> None:
        self.limits.release(self.open.pop(index % len(self.open)))

    @invariant()
    def counts_match_the_open_tickets(self) -> None:
        stats = self.limits.statistics()
        unverified = [t.source for t in self.open if t.unverified]
        assert stats.connections == len(self.open) <= 6
        assert stats.unverified == len(unverified)
        assert stats.unverified_sources == len(set(unverified))
        assert all(n > 0 for n in self.limits._unverified.values())


test_limits_state_machine = LimitsMachine.TestCase
test_limits_state_machine.settings = settings(max_examples=200, stateful_step_count=40)


# ------------------------------------------------------------------ the real proxies


def connect_from(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


async def was_reset(sock: socket.socket, *, within: float = 5.0) -> bool:
    """True once the proxy reset *sock*; False if it is still open after *within* s."""
    sock.setblocking(False)
    with trio.move_on_after(within):
        while True:
            try:
                sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                await trio.sleep(0.01)
                continue
            except ConnectionResetError:
                return True
            return False  # EOF or data: closed or answered, not reset
    return False


async def still_open(sock: socket.socket, *, after: float = 0.3) -> bool:
    await trio.sleep(after)
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError as exc:
        assert exc.errno == errno.ECONNRESET, exc
    return False


def events(log: io.StringIO, event: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    return [line for line in lines if line["event"] == event]


async def test_the_proxies_reset_a_connection_over_a_limit_at_once_and_report_it(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    proxy = make_proxy(mesh_ca, tmp_path, LocalService("api", "api-1", 9090))
    deps, log = proxy.deps, io.StringIO()
    deps.log = JsonLog(log)
    deps.limits = ProxyLimits(
        inbound=ConnectionLimits(max_connections=4, max_unverified_per_source=2),
        outbound=ConnectionLimits(max_connections=1),
    )
    refusals = deps.metrics.connections_refused
    # Two connections from 127.0.0.1 are waiting for their first byte (held by hand here:
    # without iptables, a real one would end at once for lack of an original destination).
    held = [admitted(deps.limits.inbound, "127.0.0.1") for _ in range(2)]
    async with trio.open_nursery() as nursery:
        port = await _listen(
            lambda sock: inbound.handle_inbound(deps, OpenConnections(), sock), nursery
        )
        out_port = await _listen(lambda sock: outbound.handle_outbound(deps, sock), nursery)
        with connect_from("127.0.0.1", port) as sock:
            assert await was_reset(sock)
        assert refusals.labels("inbound", "max_unverified_per_source")._value.get() == 1
        [event] = events(log, "connection_limit_reached")
        assert event["limit"] == "max_unverified_per_source" and event["source"] == "127.0.0.1"
        assert event["refused"] == 1 and event["value"] == 2 and event["direction"] == "inbound"
        assert events(log, "access") == []  # a refusal over a limit writes no access line

        # Another source gets in: past admission, it fails on what comes next (no original
        # destination), and its ticket is given back.
        with connect_from("127.0.0.2", port) as sock:
            assert await was_reset(sock)
        with connect_from("127.0.0.2", port) as sock:
            assert await was_reset(sock)
        first, second = events(log, "access")
        assert first["outcome"] == second["outcome"] == "no_original_destination"
        assert str(first["source"]).startswith("127.0.0.2:") and first["source"] != second["source"]
        # The metrics name no address (each has its own port): one series for both.
        series = [
            (s.labels["source"], s.labels["destination"], s.labels["outcome"], s.value)
            for family in deps.metrics.connections.collect()
            for s in family.samples
            if s.name.endswith("_total")
        ]
        assert series == [("?", "?", "no_original_destination", 2.0)]
        assert deps.limits.inbound.statistics().connections == 2

        # max_connections: full with two more held, every source is refused.
        held += [admitted(deps.limits.inbound, "10.0.0.1") for _ in range(2)]
        with connect_from("127.0.0.3", port) as sock:
            assert await was_reset(sock)
        assert refusals.labels("inbound", "max_connections")._value.get() == 1
        for ticket in held:
            deps.limits.inbound.release(ticket)
        with connect_from("127.0.0.3", port) as sock:
            assert await was_reset(sock)  # admitted now: no original destination
        assert refusals.labels("inbound", "max_connections")._value.get() == 1

        # The outbound proxy's own limit.
        busy = admitted(deps.limits.outbound, "127.0.0.1")
        with connect_from("127.0.0.1", out_port) as sock:
            assert await was_reset(sock)
        assert refusals.labels("outbound", "max_connections")._value.get() == 1
        deps.limits.outbound.release(busy)
        nursery.cancel_scope.cancel()
    stats = deps.limits.inbound.statistics()
    assert (stats.connections, stats.unverified_sources) == (0, 0)


async def test_a_flooding_source_leaves_an_honest_peer_its_connections(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    """SECURITY-TESTS E, connection flood: 127.0.0.2 opens silent connections into the
    inbound proxy; beyond its unverified quota they are reset, while web's calls (from
    127.0.0.1, verified) go through. Without the per-source limit the flood would take all
    of max_connections and web's calls would be refused."""
    async with running(mesh_ca, tmp_path) as m:
        limits = ConnectionLimits(max_connections=12, max_unverified_per_source=4)
        m.api.deps.limits = ProxyLimits(inbound=limits, outbound=ConnectionLimits(10))
        assert await m.call(b"before") == b"api:before"
        flood = [connect_from("127.0.0.2", m.inbound_port) for _ in range(12)]
        try:
            await trio.sleep(0.3)  # the proxy has taken them all
            outcome = [await still_open(sock, after=0.0) for sock in flood]
            assert outcome.count(True) == 4, outcome  # the quota, waiting for a first byte
            stats = limits.statistics()
            assert (stats.unverified, stats.unverified_sources) == (4, 1)
            assert stats.refused == {"max_unverified_per_source": 8}

            # Honest calls, several at once, while the flood holds its quota.
            replies: list[bytes] = []

            async def one(i: int) -> None:
                replies.append(await m.call(b"during-%d" % i))

            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(one, i)
            assert sorted(replies) == sorted(b"api:during-%d" % i for i in range(6))
            assert limits.statistics().refused == {"max_unverified_per_source": 8}
        finally:
            for sock in flood:
                sock.close()
        # Everything the flood held is given back; what remains is web's warm connections
        # (verified, waiting for first use).
        await m.until(
            "the flood's connections released",
            lambda: limits.statistics().unverified_sources == 0
            and limits.statistics().connections == m.conns.waiting_count,
        )


async def test_a_source_whose_handshakes_keep_failing_is_refused_before_the_next(
    mesh_ca: MeshCa, tmp_path: Path
) -> None:
    """SECURITY-TESTS E, handshake flood: 127.0.0.2 makes TLS handshakes without a client
    certificate, each costing api's inbound proxy a key exchange and a signature. After 3
    failures its next connection is reset on arrival, with no handshake, while web's calls
    (127.0.0.1, verified) go through and another source still gets its handshake."""
    async with running(mesh_ca, tmp_path) as m:
        limits = ConnectionLimits(100, 50, max_failures_per_source=3)
        m.api.deps.limits = ProxyLimits(inbound=limits, outbound=ConnectionLimits(10))
        client = ssl.create_default_context()
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        failures = m.api.deps.metrics.tls_failures.labels("inbound", "handshake")
        refusals = m.api.deps.metrics.connections_refused.labels(
            "inbound", "max_failures_per_source"
        )

        async def without_certificate(source: str) -> None:
            """A TLS handshake from *source* without a certificate: it must fail."""
            stream = trio.SocketStream(
                trio.socket.from_stdlib_socket(connect_from(source, m.inbound_port))
            )
            tls = trio.SSLStream(stream, client, server_hostname="api")
            try:
                with trio.fail_after(5):
                    await tls.do_handshake()
                    # TLS 1.3: the server's verdict on our certificate comes after it.
                    assert await tls.receive_some(1) == b""
            except trio.BrokenResourceError:
                pass  # reset or refused in TLS: either way, no service
            finally:
                await stream.aclose()

        for n in range(1, 4):
            await without_certificate("127.0.0.2")
            await m.until(f"failure {n} counted", lambda n=n: failures._value.get() == n)
        await without_certificate("127.0.0.2")
        await m.until("the refusal counted", lambda: refusals._value.get() == 1)
        assert failures._value.get() == 3  # reset on arrival: no handshake was made
        assert limits.statistics().failing_sources == 1
        assert await m.call(b"honest") == b"api:honest"
        await without_certificate("127.0.0.3")  # another source: a handshake, that fails
        await m.until("its failure counted", lambda: failures._value.get() == 4)
        assert refusals._value.get() == 1


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("max_connections = 0", "proxy.max_connections"),
        ("max_unverified_per_source = 0", "proxy.max_unverified_per_source"),
        ("max_connections = 10\nmax_unverified_per_source = 11", "could never apply"),
    ],
)
def test_limits_are_validated(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_agent_config(f"[proxy]\n{text}\n")


def test_the_per_source_default_follows_a_lower_max_connections() -> None:
    """Setting only max_connections below the per-source default is not an error."""
    low = parse_agent_config("[proxy]\nmax_connections = 300\n").proxy
    assert (low.max_connections, low.max_unverified_per_source) == (300, 300)
    default = parse_agent_config("").proxy
    assert (default.max_connections, default.max_unverified_per_source) == (10_000, 1_000)
