"""The epoll pump engine over real loopback sockets and real mutual TLS.

Same topology and helpers as tests/test_pump.py, with both proxies' pumps run by one
:class:`agent.epollpump.PumpEngine` thread:

    app ──tcp──▶ [outbound: plain ⇄ TLS] ══mTLS══▶ [inbound: TLS ⇄ plain] ──tcp──▶ upstream

The behaviour both pumps share (round trips, bulk, half-close, resets, 200 connections,
IPv6) is tested for both in tests/test_pump.py (``any_pump``); here is what is the
engine's own: backpressure through epoll, hand-over of buffered records, its real-clock
idle timeout, cancellation from trio, stress, shutdown, TLS tickets and buffer reuse.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import trio
import trustme

from agent import buffers
from agent.epollpump import _TIMER_SLACK, PumpEngine, open_pump_engine
from agent.pump import Connection, PlainConnection, PumpResult
from agent.tlsconn import TLSConnection, handshake
from tests.test_pump import (
    BOTH_TLS_VERSIONS,
    TIMEOUT,
    Pki,
    _contexts,
    echo_until_eof,
    listener,
    open_fds,
    open_mesh_path,
    pki,
    receive_all,
    reset,
    running_engine,
    stream,
    tcp_pair,
    tls_pair,
)

__all__ = ["listener", "pki"]  # fixtures, re-used


@pytest.fixture
def engine() -> Iterator[PumpEngine]:
    """A running engine; on teardown it must stop promptly and hold no connection."""
    with running_engine() as eng:
        yield eng


async def test_slow_reader_backpressure_then_everything_arrives(
    engine: PumpEngine, listener: socket.socket, pki: Pki
) -> None:
    """The upstream does not read for a while: directions back up (EPOLLOUT), then resume."""
    payload = os.urandom(24 << 20)
    progress = {"sent": 0}

    async def send_then_eof(s: trio.SocketStream) -> None:
        for i in range(0, len(payload), 1 << 20):
            await s.send_all(payload[i : i + (1 << 20)])
            progress["sent"] = i + (1 << 20)
        await s.send_eof()

    with trio.fail_after(TIMEOUT):
        async with (
            open_mesh_path(listener, pki, pump_fn=engine.pump) as path,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(send_then_eof, path.app)
            await trio.sleep(0.5)
            # Kernel buffers plus one bounded buffer per hop: far less than the payload.
            assert progress["sent"] < len(payload)
            got = await receive_all(path.upstream)
            await path.upstream.send_eof()
            assert await receive_all(path.app) == b""
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert {r.outcome for r in path.results.values()} == {"closed"}


@BOTH_TLS_VERSIONS
async def test_fin_racing_data_in_flight_loses_none_of_it(
    engine: PumpEngine, listener: socket.socket, version: ssl.TLSVersion
) -> None:
    """The upstream half-closes while the app's stream is backed up in the engines.

    The inbound engine then sends close_notify while it holds bytes it could not deliver
    yet and TLS records it has received but not decrypted: ``read_received_records`` must
    stash those first (OpenSSL's second ``SSL_shutdown`` would read them and fail with
    APPLICATION_DATA_AFTER_CLOSE_NOTIFY). All of it still arrives, in order, and both
    ends close cleanly. (Checked: skipping that stash, or finishing a connection when one
    direction ends, fails this test.)
    """
    pki = _contexts(trustme.CA(), max_version=version)
    # 14 MB, order-checkable: more than loopback's socket buffers can swallow (autotuned to a
    # few MB), so the stream is still backed up in the proxies when the FIN comes.
    payload = b"".join(b"%08d;" % i for i in range(1_600_000))
    for _ in range(3):
        with trio.fail_after(TIMEOUT):
            async with open_mesh_path(listener, pki, pump_fn=engine.pump) as path:
                async with trio.open_nursery() as nursery:

                    async def send() -> None:
                        await path.app.send_all(payload)
                        await path.app.send_eof()

                    nursery.start_soon(send)
                    got = bytearray(await path.upstream.receive_some(65536))
                    # Stop reading: the inbound side backs up with records in its BIO ...
                    await trio.sleep(0.2)
                    # ... and half-closes (close_notify) while they are there.
                    await path.upstream.send_eof()
                    got += await receive_all(path.upstream)
                assert await receive_all(path.app) == b""  # the upstream's EOF arrived
        assert bytes(got) == payload
        assert {r.outcome for r in path.results.values()} == {"closed"}


async def test_buffered_tls_bytes_are_handed_over(
    engine: PumpEngine, listener: socket.socket, pki: Pki
) -> None:
    """Records already in the TLS connection's BIO (read by trio) are not lost at handover."""
    client, server = await tls_pair(listener, pki)
    app, proxy_side = tcp_pair(listener)
    app_s = stream(app)
    buf = memoryview(bytearray(65536))
    with trio.fail_after(TIMEOUT):
        for i in range(3):
            await server.send_all(b"record %d;" % i)
        await trio.sleep(0.05)
        first = bytes(buf[: await client.recv_into(buf[:9])])  # one record; two in the BIO
        assert first == b"record 0;"
        async with trio.open_nursery() as nursery:
            results: list[PumpResult] = []

            async def run() -> None:
                results.append(
                    await engine.pump(client, PlainConnection(proxy_side), idle_timeout=TIMEOUT)
                )

            nursery.start_soon(run)
            got = b""
            while len(got) < len(b"record 1;record 2;"):
                got += await app_s.receive_some(100)
            assert got == b"record 1;record 2;"
            await server.send_eof()
            assert await app_s.receive_some(100) == b""  # close_notify → FIN
            await app_s.send_all(b"reply")
            await app_s.send_eof()
            assert await server.recv_into(buf) == 5
            assert await server.recv_into(buf) == 0
    server.close()
    await app_s.aclose()
    assert results[0].outcome == "closed"
    assert (results[0].bytes_a_to_b, results[0].bytes_b_to_a) == (18, 5)


async def test_idle_timeout_fires_and_resets_both_ends(
    engine: PumpEngine, listener: socket.socket, pki: Pki
) -> None:
    idle = 0.6  # the engine runs on the real monotonic clock
    with trio.fail_after(TIMEOUT):
        async with open_mesh_path(listener, pki, idle_timeout=idle, pump_fn=engine.pump) as path:
            await trio.sleep(idle * 0.6)
            await path.app.send_all(b"activity")  # pushes the timeout out
            assert await path.upstream.receive_some(100) == b"activity"
            sent_at = time.monotonic()
            with pytest.raises(trio.BrokenResourceError):
                await path.app.receive_some(100)  # RST when the outbound pump gives up
            fired_after = time.monotonic() - sent_at
    assert idle * 0.9 <= fired_after <= idle * 1.25 + 0.5
    assert {r.outcome for r in path.results.values()} == {"idle_timeout"}
    assert path.results["outbound"].bytes_a_to_b == len(b"activity")


async def test_cancellation_from_trio_aborts_in_the_engine(
    engine: PumpEngine, listener: socket.socket, pki: Pki
) -> None:
    """Policy closes the inbound connection: RST both ways, the other proxy sees a reset."""
    app, outbound_in = tcp_pair(listener)
    tls_out, tls_in = await tls_pair(listener, pki)
    inbound_out, upstream = tcp_pair(listener)
    app_s, up_s = stream(app), stream(upstream)
    scope = trio.CancelScope()
    results: dict[str, PumpResult] = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def outbound() -> None:
                results["outbound"] = await engine.pump(
                    PlainConnection(outbound_in), tls_out, idle_timeout=TIMEOUT
                )

            async def inbound() -> None:
                with scope:
                    await engine.pump(tls_in, PlainConnection(inbound_out), idle_timeout=TIMEOUT)
                    raise AssertionError("not reached: the pump was cancelled")
                assert tls_in.fileno() == -1  # reset by the engine before pump() returned

            nursery.start_soon(outbound)
            nursery.start_soon(inbound)
            await app_s.send_all(b"hello")
            assert await up_s.receive_some(100) == b"hello"
            scope.cancel()
            for s in (up_s, app_s):
                with pytest.raises(trio.BrokenResourceError):
                    while await s.receive_some(100):
                        pass
    assert scope.cancelled_caught
    assert results["outbound"].outcome == "reset"
    await app_s.aclose()
    await up_s.aclose()


async def test_stress_2000_short_connections_no_hang(
    engine: PumpEngine, listener: socket.socket
) -> None:
    """Many short plaintext pumps, 64 at a time, with a hard time bound: a lost wakeup or a
    stuck registration shows as a timeout, a bad teardown as a wrong outcome or a leaked fd."""
    before = open_fds()
    outcomes: list[str] = []
    limit = trio.Semaphore(64)

    async def one(i: int) -> None:
        async with limit:
            app, a = tcp_pair(listener)
            b, upstream = tcp_pair(listener)
            app_s, up_s = stream(app), stream(upstream)
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    r = await engine.pump(PlainConnection(a), PlainConnection(b), idle_timeout=10)
                    outcomes.append(r.outcome)

                nursery.start_soon(run)
                if i % 7 == 0:  # some end with a reset mid-way
                    await app_s.send_all(b"x")
                    assert await up_s.receive_some(10) == b"x"
                    reset(app_s)
                    with pytest.raises(trio.BrokenResourceError):
                        while await up_s.receive_some(10):
                            pass
                else:
                    await app_s.send_all(b"ping %d" % i)
                    await app_s.send_eof()
                    assert await receive_all(up_s) == b"ping %d" % i
                    await up_s.send_all(b"pong")
                    await up_s.send_eof()
                    assert await receive_all(app_s) == b"pong"
            await app_s.aclose()
            await up_s.aclose()

    started = time.monotonic()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(2000):
                nursery.start_soon(one, i)
    assert time.monotonic() - started < 20
    assert sorted(set(outcomes)) == ["closed", "reset"]
    assert outcomes.count("reset") == len(range(0, 2000, 7))
    assert len(outcomes) == 2000
    assert open_fds() - before == set()
    # No finished connection is held for its idle check (it used to be, with its buffers
    # and TLS state, for idle_timeout / 4: memory grew with the connection rate).
    live, entries = engine.idle_checks()
    assert live == 0 and entries <= _TIMER_SLACK, (live, entries)


async def test_stress_tls_connections_no_hang(
    engine: PumpEngine, listener: socket.socket, pki: Pki
) -> None:
    """Short mesh paths (two mTLS pumps each) back to back and 16 at a time."""
    limit = trio.Semaphore(16)
    done: list[int] = []

    async def one(i: int) -> None:
        async with limit, open_mesh_path(listener, pki, pump_fn=engine.pump) as path:
            await path.app.send_all(b"req %d" % i)
            await path.app.send_eof()
            assert await receive_all(path.upstream) == b"req %d" % i
            await path.upstream.send_all(b"resp")
            await path.upstream.send_eof()
            assert await receive_all(path.app) == b"resp"
        assert {r.outcome for r in path.results.values()} == {"closed"}
        done.append(i)

    with trio.fail_after(TIMEOUT * 2):
        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(one, i)
    assert len(done) == 300


async def test_shutdown_resets_open_connections_and_leaks_nothing(
    listener: socket.socket, pki: Pki
) -> None:
    """Leaving open_pump_engine with connections still open: they end ``error``, their
    sockets are reset, the thread is gone and no fd is left behind."""
    threads = engine_threads()
    before = open_fds()
    results: list[PumpResult] = []
    with trio.fail_after(TIMEOUT):
        async with open_mesh_path_outside(listener, pki) as (app_s, up_s):
            async with open_pump_engine() as eng, trio.open_nursery() as nursery:
                assert engine_threads() == threads + 1
                for a, b in app_s.pairs:
                    nursery.start_soon(_collect, eng, a, b, results)
                await app_s.app.send_all(b"hi")
                assert await up_s.receive_some(10) == b"hi"
                nursery.start_soon(_stop_soon, eng)
            # The nursery ended because the engine stopped and reported both pumps.
            with pytest.raises(trio.BrokenResourceError):
                while await app_s.app.receive_some(10):
                    pass
    assert [r.outcome for r in results] == ["error", "error"]
    assert all("pump engine stopped" in r.detail for r in results)
    assert engine_threads() == threads
    assert open_fds() - before == set()
    with pytest.raises(RuntimeError, match="not running"):
        a, b = tcp_pair(listener)
        await eng.pump(PlainConnection(a), PlainConnection(b), idle_timeout=1)
    assert a.fileno() == b.fileno() == -1


def engine_threads() -> int:
    """Engine threads alive (by name: trio's idle worker threads come and go on their own)."""
    return sum(1 for t in threading.enumerate() if t.name == "meshd-pump-engine")


async def _collect(
    eng: PumpEngine, a: Connection, b: Connection, results: list[PumpResult]
) -> None:
    results.append(await eng.pump(a, b, idle_timeout=TIMEOUT))


async def _stop_soon(eng: PumpEngine) -> None:
    await trio.sleep(0.05)
    eng.request_stop()


class _Ends:
    def __init__(self, app: trio.SocketStream, pairs: list[tuple[Connection, Connection]]):
        self.app = app
        self.pairs = pairs


@asynccontextmanager
async def open_mesh_path_outside(
    listener: socket.socket, pki: Pki
) -> AsyncIterator[tuple[_Ends, trio.SocketStream]]:
    """A mesh path's connections, not yet pumped: (app end + pump pairs, upstream end)."""
    app, outbound_in = tcp_pair(listener)
    tls_out, tls_in = await tls_pair(listener, pki)
    inbound_out, upstream = tcp_pair(listener)
    ends = _Ends(
        stream(app),
        [(PlainConnection(outbound_in), tls_out), (tls_in, PlainConnection(inbound_out))],
    )
    up_s = stream(upstream)
    try:
        yield ends, up_s
    finally:
        await ends.app.aclose()
        await up_s.aclose()


@pytest.mark.parametrize("buffer_size", [1024, 65536])
async def test_bulk_with_small_buffer_needs_no_new_socket_event(
    engine: PumpEngine, listener: socket.socket, pki: Pki, buffer_size: int
) -> None:
    """A direction that stops after its per-wakeup budget with records still in the BIO
    (no socket readiness left to wake it) resumes by itself."""
    client, server = await tls_pair(listener, pki)
    app, proxy_side = tcp_pair(listener)
    app_s = stream(app)
    payload = os.urandom(600_000)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            results: list[PumpResult] = []

            async def run() -> None:
                results.append(
                    await engine.pump(
                        client,
                        PlainConnection(proxy_side),
                        idle_timeout=TIMEOUT,
                        buffer_size=buffer_size,
                    )  # fmt: skip
                )

            nursery.start_soon(run)
            await server.send_all(payload)  # no EOF: only the BIO can wake the direction
            got = bytearray()
            while len(got) < len(payload):
                got += await app_s.receive_some(65536)
            assert got == payload
            await server.send_eof()
            await app_s.send_eof()
            assert await app_s.receive_some(1) == b""
            assert await server.recv_into(memoryview(bytearray(10))) == 0
    server.close()
    await app_s.aclose()
    assert results[0].outcome == "closed"
    assert results[0].bytes_a_to_b == len(payload)


async def test_client_session_ticket_is_published_and_resumes(
    engine: PumpEngine, listener: socket.socket, pki: Pki
) -> None:
    """A pumped client connection's ``ssl_object.session`` is a snapshot the engine thread
    publishes (never the live OpenSSL session read across threads), gains the TLS 1.3
    ticket once the first bytes arrive, and resumes a new connection."""
    raw_c, raw_s = tcp_pair(listener)
    out: dict[str, object] = {}

    async def server_side() -> None:
        out["s"] = await handshake(raw_s, pki.server_ctx, server_side=True, timeout=TIMEOUT)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_side)
        client = await handshake(
            raw_c, pki.client_ctx, server_side=False, server_hostname="inbound.test",
            timeout=TIMEOUT,
        )  # fmt: skip
    server = out["s"]
    assert isinstance(server, TLSConnection)
    client_obj = client.ssl_object
    app, proxy_side = tcp_pair(listener)
    app_s = stream(app)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                await engine.pump(PlainConnection(proxy_side), client, idle_timeout=TIMEOUT)

            nursery.start_soon(run)
            await trio.sleep(0.05)
            assert type(client_obj).__name__ == "EngineOwnedSSLObject"
            await server.send_all(b"first bytes")  # the server's tickets went out before
            assert await app_s.receive_some(100) == b"first bytes"
            session = client_obj.session
            assert session is not None and session.has_ticket
            with pytest.raises(ValueError, match="engine-owned"):
                client_obj.session = session
            await server.send_eof()
            await app_s.send_eof()
            assert await app_s.receive_some(10) == b""
            assert await server.recv_into(memoryview(bytearray(10))) == 0
    server.close()
    await app_s.aclose()
    # The published session resumes.
    raw_c, raw_s = tcp_pair(listener)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_side)
        resumed = await handshake(
            raw_c, pki.client_ctx, server_side=False, server_hostname="inbound.test",
            timeout=TIMEOUT, session=session,
        )  # fmt: skip
    assert resumed.session_reused
    resumed.close()
    server = out["s"]
    assert isinstance(server, TLSConnection)
    server.close()


async def test_finished_connections_return_their_buffers_zeroed_for_the_next(
    engine: PumpEngine, listener: socket.socket, pki: Pki
) -> None:
    """Both directions' buffers and the TLS read buffers go back to ``agent.buffers`` when a
    connection ends, zeroed; the next connection takes those and carries its own bytes only."""
    secret = b"connection-one-secret " * 3000  # fills well into the 64 KiB buffers
    buffers._free.clear()
    seen: list[set[int]] = []
    with trio.fail_after(TIMEOUT):
        for payload in (secret, b"two"):
            async with (
                open_mesh_path(listener, pki, pump_fn=engine.pump) as path,
                trio.open_nursery() as n,
            ):
                n.start_soon(echo_until_eof, path.upstream)
                await path.app.send_all(payload)
                await path.app.send_eof()
                got = b""
                while chunk := await path.app.receive_some(65536):
                    got += chunk
                assert got == payload
            for result in path.results.values():
                assert result.outcome == "closed", result
            # Two pumps: two directions each, and one TLS side each with its read buffer.
            free = list(buffers._free)
            assert len(free) == 6 and all(not any(buf) for buf in free)
            seen.append({id(buf) for buf in free})
    assert seen[0] == seen[1]  # the second connection ran on the first one's buffers


def test_the_buffer_pool_keeps_only_its_own_size_and_at_most_its_cap() -> None:
    buffers._free.clear()
    buffers.give(bytearray(1024))  # a caller's own buffer size: left to the collector
    buffers.give(b"\x01" * buffers.SIZE)  # not a bytearray
    assert buffers.free_count() == 0
    for _ in range(buffers.MAX_FREE + 5):
        buffers.give(bytearray(b"\x01" * buffers.SIZE))
    assert buffers.free_count() == buffers.MAX_FREE
    taken = buffers.take()
    assert len(taken) == buffers.SIZE and not any(taken)
    buffers._free.clear()
    assert len(buffers.take()) == buffers.SIZE  # an empty pool allocates
