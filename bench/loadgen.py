"""A lean HTTP/1.1 load generator: one process, one epoll loop, no framework.

    python -m bench.loadgen '<json config>'

Modes (``conn``): ``keepalive`` sends on a pool of pre-opened keep-alive connections;
``newconn`` opens a fresh TCP connection for every request (``Connection: close``), so each
request pays the proxies' full mTLS handshake. ``rate`` > 0 is open loop: request *i* is due at
``t0 + i / rate`` whatever happened to earlier ones, and its latency is measured from that
intended time, so a stall is charged to every request it delayed (no coordinated omission).
When no pooled connection is free the request waits in a backlog, and that wait counts.
``rate`` = 0 is closed loop (each connection or slot sends again as soon as it is answered),
for maximum throughput.

Timers: epoll_wait has millisecond resolution, so the loop sleeps in ``select()`` on the epoll
fd (microsecond timeout, hrtimer) and then harvests with ``epoll.poll(0)``.

Protocol with the orchestrator on stdout: a line ``START`` when the measured window opens, a
line ``END`` when it closes, then one JSON line with the results. Latencies are exact: every
sample is kept (int nanoseconds) and percentiles are read from the sorted samples.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import select
import socket
import sys
import time
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
_RECV = 65536
_EP_IN = select.EPOLLIN
_EP_OUT = select.EPOLLOUT


@dataclass(frozen=True)
class Config:
    """One cell's load."""

    host: str
    port: int
    conn: str  # keepalive | newconn
    rate: float  # requests/s; 0 = closed loop
    connections: int  # keepalive pool size, or newconn concurrency in closed loop
    warmup: float
    duration: float
    drain: float = 2.0
    max_inflight: int = 1024
    cpus: tuple[int, ...] = ()
    nice: int = 0


def _request(host: str, port: int, close: bool) -> bytes:
    conn = "close" if close else "keep-alive"
    return f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: {conn}\r\n\r\n".encode()


def response_complete(buf: bytearray) -> int:
    """0 while incomplete; else 1 for a 200 and -1 for any other status."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 0
    at = buf.find(b"\r\nContent-Length:", 0, end)
    if at < 0:
        at = buf.lower().find(b"\r\ncontent-length:", 0, end)
    length = 0
    if at >= 0:
        stop = buf.find(b"\r\n", at + 2)
        length = int(buf[at + 17 : stop])
    if len(buf) < end + 4 + length:
        return 0
    return 1 if buf[9:12] == b"200" else -1


def percentiles(samples: array[int] | list[int]) -> dict[str, float]:
    """Exact percentiles (nearest rank) of nanosecond samples, in microseconds."""
    data = sorted(samples)
    n = len(data)
    out: dict[str, float] = {}
    for p in PERCENTILES:
        if not n:
            out[f"p{p:g}"] = float("nan")
            continue
        rank = max(1, -(-int(p * n * 10) // 1000))  # ceil(p/100 * n) without float error
        out[f"p{p:g}"] = data[min(n, rank) - 1] / 1000.0
    return out


class _Conn:
    __slots__ = ("buf", "intended", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.intended = 0


class Generator:
    """The epoll loop; :meth:`run` returns the result dictionary."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ep = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self.idle: list[_Conn] = []
        self.backlog: deque[int] = deque()
        self.samples: array[int] = array("q")
        self.lags: array[int] = array("q")
        self.errors = 0
        self.non200 = 0
        self.overflow = 0
        self.completed = 0
        self.req = _request(cfg.host, cfg.port, close=cfg.conn == "newconn")
        self.m_start = 0
        self.m_end = 0

    # ---------------------------------------------------------------- connections
    def _open_blocking(self) -> _Conn:
        sock = socket.create_connection((self.cfg.host, self.cfg.port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        c = _Conn(sock)
        self.conns[sock.fileno()] = c
        self.ep.register(sock.fileno(), _EP_IN)
        return c

    def _open_async(self, intended: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rc = sock.connect_ex((self.cfg.host, self.cfg.port))
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            self._fail(intended)
            return
        c = _Conn(sock)
        c.intended = intended
        self.conns[sock.fileno()] = c
        self.ep.register(sock.fileno(), _EP_OUT)

    def _drop(self, c: _Conn) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(c)  # closed while idle: it must not be handed out again
        fd = c.sock.fileno()
        self.conns.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(fd)
        c.sock.close()

    def _fail(self, intended: int) -> None:
        if self.m_start <= intended < self.m_end:
            self.errors += 1

    # ----------------------------------------------------------------- requests
    def _send(self, c: _Conn, intended: int) -> None:
        c.intended = intended
        c.buf.clear()
        try:
            c.sock.send(self.req)
        except OSError:
            self._drop(c)
            self._fail(intended)
            if self.cfg.conn == "keepalive":
                self._replace()

    def _replace(self) -> None:
        with contextlib.suppress(OSError):
            self.idle.append(self._open_blocking())

    def _issue(self, intended: int) -> None:
        if self.m_start <= intended < self.m_end:
            # How late the generator itself is: its own error, charged to every system alike.
            self.lags.append(time.perf_counter_ns() - intended)
        if self.cfg.conn == "newconn":
            if len(self.conns) >= self.cfg.max_inflight:
                if self.m_start <= intended < self.m_end:
                    self.overflow += 1
                return
            self._open_async(intended)
        elif self.idle:
            self._send(self.idle.pop(), intended)
        else:
            self.backlog.append(intended)

    def _done(self, c: _Conn, ok: int, now: int) -> None:
        if self.m_start <= c.intended < self.m_end:
            if ok > 0:
                self.samples.append(now - c.intended)
                self.completed += 1
            else:
                self.non200 += 1
        if self.cfg.conn == "newconn":
            self._drop(c)
            if self.cfg.rate == 0 and now < self.m_end:
                self._open_async(now)
        elif self.cfg.rate == 0:
            if now < self.m_end:
                self._send(c, now)
            else:
                self.idle.append(c)
        elif self.backlog:
            self._send(c, self.backlog.popleft())
        else:
            self.idle.append(c)

    def _closed(self, c: _Conn) -> None:
        """*c* was closed or reset by the other side."""
        busy = c not in self.idle  # an idle one owes no answer: no request failed
        self._drop(c)
        if busy:
            self._fail(c.intended)
        if self.cfg.conn == "keepalive":
            self._replace()
            if self.cfg.rate == 0 and self.idle and time.perf_counter_ns() < self.m_end:
                self._send(self.idle.pop(), time.perf_counter_ns())
            elif self.backlog and self.idle:  # waiting requests go first
                self._send(self.idle.pop(), self.backlog.popleft())
        elif self.cfg.rate == 0 and time.perf_counter_ns() < self.m_end:
            self._open_async(time.perf_counter_ns())

    def _event(self, fd: int, ev: int) -> None:
        c = self.conns.get(fd)
        if c is None:
            return
        if ev & _EP_OUT and not ev & _EP_IN and not c.buf:
            if c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._drop(c)
                self._fail(c.intended)
                return
            self.ep.modify(fd, _EP_IN)
            try:
                c.sock.send(self.req)
            except OSError:
                self._drop(c)
                self._fail(c.intended)
            return
        try:
            data = c.sock.recv(_RECV)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # closed or reset before a complete answer
            self._closed(c)
            return
        c.buf += data
        ok = response_complete(c.buf)
        if ok:
            self._done(c, ok, time.perf_counter_ns())

    # --------------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:  # noqa: PLR0912 - one loop, read top to bottom
        cfg = self.cfg
        if cfg.conn == "keepalive":
            for _ in range(cfg.connections):
                self.idle.append(self._open_blocking())
        t0 = time.perf_counter_ns()
        self.m_start = t0 + int(cfg.warmup * 1e9)
        self.m_end = self.m_start + int(cfg.duration * 1e9)
        hard_end = self.m_end + int(cfg.drain * 1e9)
        interval = int(1e9 / cfg.rate) if cfg.rate > 0 else 0
        if interval == 0:  # closed loop: fill every connection / slot once
            for _ in range(cfg.connections):
                self._issue(t0)
        next_due = t0 if interval else hard_end
        started = ended = False
        ru0 = ru1 = resource.getrusage(resource.RUSAGE_SELF)
        epfd = self.ep.fileno()
        while True:
            now = time.perf_counter_ns()
            if not started and now >= self.m_start:
                started = True
                ru0 = resource.getrusage(resource.RUSAGE_SELF)
                print("START", flush=True)
            if not ended and now >= self.m_end:
                ended = True
                ru1 = resource.getrusage(resource.RUSAGE_SELF)
                print("END", flush=True)
            if now >= hard_end or (ended and not self._outstanding()):
                break
            while next_due <= now and next_due < self.m_end:
                self._issue(next_due)
                next_due += interval
            wake = min(next_due if next_due < self.m_end else hard_end, self.m_end, hard_end)
            if not started:
                wake = min(wake, self.m_start)
            timeout = max(0.0, (wake - now) / 1e9)
            if timeout > 0:
                select.select((epfd,), (), (), min(timeout, 0.05))
            for fd, ev in self.ep.poll(0):
                self._event(fd, ev)
        lost = self._lost()
        for c in list(self.conns.values()):
            self._drop(c)
        cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        return {
            "completed": self.completed,
            "errors": self.errors + self.non200 + lost,
            "overflow": self.overflow,
            "rate": self.completed / cfg.duration,
            "latency_us": percentiles(self.samples),
            "gen_cpu_s": cpu,
            "gen_lag_us": percentiles(self.lags) if cfg.rate > 0 else {},
        }

    def _outstanding(self) -> bool:
        if self.backlog:
            return True
        if self.cfg.conn == "newconn":
            return bool(self.conns)
        return len(self.idle) < len(self.conns)

    def _lost(self) -> int:
        """Requests of the measured window still unanswered at the hard end."""
        lost = sum(1 for t in self.backlog if self.m_start <= t < self.m_end)
        busy = [c for c in self.conns.values() if c not in self.idle]
        return lost + sum(1 for c in busy if self.m_start <= c.intended < self.m_end)


def _tight_timers() -> None:
    """Ask for 1 ns timer slack (default 50 µs) so sleeps end on time (PR_SET_TIMERSLACK)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)


def main(argv: list[str] | None = None) -> None:
    """Run one cell from the JSON config in ``argv[0]`` and print the result as JSON."""
    raw = json.loads((argv or sys.argv[1:])[0])
    raw["cpus"] = tuple(raw.get("cpus", ()))
    cfg = Config(**raw)
    if cfg.cpus:
        os.sched_setaffinity(0, cfg.cpus)
    _tight_timers()
    if cfg.nice:
        with contextlib.suppress(PermissionError):  # raising priority needs root
            os.nice(cfg.nice)
    print(json.dumps(Generator(cfg).run()), flush=True)


if __name__ == "__main__":
    main()
