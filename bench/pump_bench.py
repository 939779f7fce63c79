"""Micro-benchmark: naive trio.SSLStream proxy pair vs. agent.pump (trio and epoll engines).

Topology per system, every piece its own process, all on 127.0.0.1:

    load generator ──tcp──▶ outbound proxy ══mTLS══▶ inbound proxy ──tcp──▶ upstream

The upstream answers every 100-byte request with a 1024-byte response (keep-alive, fixed
framing: this is L4, contents do not matter). The load generator runs an open loop at a fixed
rate over a few keep-alive connections and measures latency from each request's *intended*
send time (no coordinated omission). CPU per request is each proxy process's CPU clock
(``CLOCK_PROCESS_CPUTIME_ID`` of the pid, ns resolution) over the measured window, divided by
the requests in it. Systems are measured interleaved, several rounds, medians reported.

    .venv/bin/python bench/pump_bench.py                # ~45 s: direct, naive, fast, epoll
    .venv/bin/python bench/pump_bench.py --consul --no-naive  # direct, consul, fast, epoll
    .venv/bin/python bench/pump_bench.py --consul --no-naive --engine epoll --rounds 7
    .venv/bin/python bench/pump_bench.py --rate 2000 --seconds 3 --rounds 3
    .venv/bin/python bench/pump_bench.py --profile      # cProfile the fast proxies only
    .venv/bin/python bench/pump_bench.py --floor        # CPU per wakeup: trio vs. bare epoll

``fast`` is agent.pump on trio; ``epoll`` is the same connections pumped by
agent.epollpump's engine thread (``[proxy] engine = "epoll"``).

Bounded: every run has a request count and a wall-clock limit; total ≤ 60 s by default.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

REQUEST = (
    b"GET /item HTTP/1.1\r\nHost: upstream\r\nUser-Agent: pump-bench\r\n".ljust(96) + b"\r\n\r\n"
)
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 985\r\n\r\n".ljust(1024, b"x")
assert len(REQUEST) == 100 and len(RESPONSE) == 1024
SNI = "inbound.test"


# ---------------------------------------------------------------- child processes


def _contexts(certdir: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=certdir / "ca.pem")
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_cert_chain(certdir / "inbound.pem")
    client = ssl.create_default_context(cafile=certdir / "ca.pem")
    client.check_hostname = False
    client.load_cert_chain(certdir / "outbound.pem")
    return server, client


async def _listen(port: int = 0) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    print(sock.getsockname()[1], flush=True)  # tells the parent we are ready, and where
    return sock


async def serve_upstream() -> None:
    """Answer each 100-byte request with RESPONSE, forever."""

    async def handle(stream: trio.SocketStream) -> None:
        pending = 0
        with contextlib.suppress(trio.BrokenResourceError):  # a proxy reset the connection
            async for chunk in stream:
                pending += len(chunk)
                while pending >= len(REQUEST):
                    pending -= len(REQUEST)
                    await stream.send_all(RESPONSE)

    listener = trio.SocketListener(await _listen())
    await trio.serve_listeners(handle, [listener])


async def serve_naive_proxy(role: str, target: int, certdir: Path) -> None:
    """The straightforward trio proxy: trio.SSLStream and a receive_some/send_all loop."""
    server_ctx, client_ctx = _contexts(certdir)

    async def copy(
        src: trio.abc.ReceiveStream, dst: trio.abc.SendStream, done: trio.CancelScope
    ) -> None:
        # SSLStream has no half-close: the first EOF (or error) ends the connection.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for chunk in src:
                await dst.send_all(chunk)
        done.cancel()

    async def handle(down: trio.abc.Stream) -> None:
        up: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", target)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            if role == "outbound":
                up = trio.SSLStream(up, client_ctx, server_hostname=SNI)
                await up.do_handshake()
            else:
                down = trio.SSLStream(down, server_ctx, server_side=True)
                await down.do_handshake()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(copy, down, up, nursery.cancel_scope)
                nursery.start_soon(copy, up, down, nursery.cancel_scope)
        await trio.aclose_forcefully(up)
        await trio.aclose_forcefully(down)

    listener = trio.SocketListener(await _listen())
    await trio.serve_listeners(handle, [listener])


async def serve_fast_proxy(role: str, target: int, certdir: Path, engine: bool = False) -> None:
    """agent.tlsconn + agent.pump (or the epoll engine), as the real proxies use them."""
    from agent.epollpump import open_pump_engine
    from agent.pump import Connection, PlainConnection, PumpFunction, pump
    from agent.tlsconn import TLSHandshakeError, handshake

    server_ctx, client_ctx = _contexts(certdir)

    async def connect(accepted: trio.socket.SocketType) -> tuple[Connection, Connection]:
        down = socket.socket(fileno=accepted.detach())
        up_t = trio.socket.socket()
        await up_t.connect(("127.0.0.1", target))
        up = socket.socket(fileno=up_t.detach())
        if role == "outbound":
            tls = await handshake(
                up, client_ctx, server_side=False, server_hostname=SNI, timeout=10
            )
            return PlainConnection(down), tls
        return await handshake(down, server_ctx, server_side=True, timeout=10), PlainConnection(up)

    async def handle(accepted: trio.socket.SocketType, pump_fn: PumpFunction) -> None:
        with contextlib.suppress(TLSHandshakeError, OSError):  # one bad peer is not fatal
            a, b = await connect(accepted)
            await pump_fn(a, b, idle_timeout=120)

    async with contextlib.AsyncExitStack() as stack:
        pump_fn: PumpFunction = pump
        if engine:
            pump_fn = (await stack.enter_async_context(open_pump_engine())).pump
        listener = await _listen()
        async with trio.open_nursery() as nursery:
            while True:
                accepted, _ = await listener.accept()
                nursery.start_soon(handle, accepted, pump_fn)


async def serve_echo_trio() -> None:
    """The floor of any trio proxy: one wait_readable wakeup, one recv, one send."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    await trio.lowlevel.wait_readable(listener)
    sock, _ = listener.accept()
    sock.setblocking(False)
    buf = bytearray(65536)
    while True:
        await trio.lowlevel.wait_readable(sock)
        if not (n := sock.recv_into(buf)):
            return
        sock.send(buf[:n])


def serve_echo_epoll() -> None:
    """The same echo on a bare epoll loop: the floor of Python without trio's scheduler."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    sock, _ = listener.accept()
    ep, buf = select.epoll(), bytearray(65536)
    ep.register(sock.fileno(), select.EPOLLIN)
    while ep.poll() and (n := sock.recv_into(buf)):
        sock.send(buf[:n])


def child_main(argv: list[str]) -> None:
    """Entry point of the child processes: upstream | echo-trio | echo-epoll |
    naive|fast|epoll outbound|inbound TARGET DIR [PSTATS]."""
    kind = argv[0]
    if kind in ("upstream", "echo-trio", "echo-epoll"):
        if kind == "echo-epoll":
            serve_echo_epoll()
        else:
            trio.run(serve_upstream if kind == "upstream" else serve_echo_trio)
        return
    role, target, certdir = argv[1], int(argv[2]), Path(argv[3])
    serve: Callable[..., Awaitable[None]] = serve_naive_proxy
    if kind != "naive":
        serve = partial(serve_fast_proxy, engine=kind == "epoll")
    if len(argv) > 4:  # --profile: dump stats on SIGTERM
        import cProfile
        import signal

        prof = cProfile.Profile(time.process_time)  # CPU, not wall: idle epoll is free

        def dump(*_: object) -> None:
            prof.disable()
            prof.dump_stats(argv[4])
            sys.exit(0)

        signal.signal(signal.SIGTERM, dump)
        prof.enable()
    trio.run(serve, role, target, certdir)


# ---------------------------------------------------------------- parent: load and figures

SYSTEMS = ("direct", "consul", "naive", "fast", "epoll")
MESHD = ("fast", "epoll")
WARMUP = 20  # exchanges per connection before the latency clock starts (inside the CPU window)


@dataclass(frozen=True)
class Run:
    """One measured run of one system."""

    system: str
    requests: int
    cpu_us_outbound: float
    cpu_us_inbound: float
    kernel_share: float
    p50_us: float
    p90_us: float
    p99_us: float

    @property
    def cpu_us(self) -> float:
        return self.cpu_us_outbound + self.cpu_us_inbound


class Proc:
    """A child process; ours print their port when ready. Its CPU clock is read by pid."""

    def __init__(self, *args: str, cmd: list[str] | None = None, port: int = 0) -> None:
        if cmd is None:
            cmd = [sys.executable, __file__, "--child", *args]
            self.popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            assert self.popen.stdout is not None
            port = int(self.popen.stdout.readline())
        else:
            self.popen = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, text=True)
        self.port = port
        self._clock = ((~self.popen.pid) << 3) | 2  # Linux: CPUCLOCK_SCHED of that process

    def cpu(self) -> float:
        """CPU seconds (user + kernel) used so far, ns resolution."""
        return time.clock_gettime(self._clock)

    def kernel_cpu(self) -> float:
        """Kernel-mode CPU seconds so far, at clock-tick resolution (for the split only)."""
        with open(f"/proc/{self.popen.pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[12]) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(timeout=10)


async def _exchange(stream: trio.SocketStream) -> None:
    await stream.send_all(REQUEST)
    got = 0
    while got < len(RESPONSE):
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise RuntimeError("connection closed mid-response")
        got += len(chunk)


async def load(port: int, *, rate: float, count: int, conns: int, limit: float) -> list[float]:
    """Open loop: ``count`` exchanges at ``rate``/s over ``conns`` connections; latencies (s).

    Raises:
        trio.TooSlowError: the whole run, warm-up included, took longer than ``limit`` s.
    """
    latencies: list[float] = []
    interval = conns / rate

    async def one_conn(i: int, stream: trio.SocketStream) -> None:
        start = trio.current_time() + i / rate
        for k in range(count // conns):
            intended = start + k * interval
            await trio.sleep_until(intended)
            await _exchange(stream)
            latencies.append(trio.current_time() - intended)

    with trio.fail_after(limit):
        streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(conns)]
        for s in streams:  # handshakes, caches
            for _ in range(WARMUP):
                await _exchange(s)
        async with trio.open_nursery() as nursery:
            for i, s in enumerate(streams):
                nursery.start_soon(one_conn, i, s)
        for s in streams:
            await s.aclose()
    return latencies


def measure(system: str, port: int, proxies: list[Proc], args: argparse.Namespace) -> Run:
    """One run against ``port``; CPU of ``proxies`` (outbound, inbound) over the run."""
    count = int(args.rate * args.seconds)
    limit = args.seconds * 3 + 5
    before = [p.cpu() for p in proxies]
    kernel_before = sum(p.kernel_cpu() for p in proxies)
    lat = trio.run(partial(load, port, rate=args.rate, count=count, conns=args.conns, limit=limit))
    used = [p.cpu() - b for p, b in zip(proxies, before, strict=True)] or [0.0, 0.0]
    kernel = sum(p.kernel_cpu() for p in proxies) - kernel_before
    n = len(lat) + WARMUP * args.conns
    q = statistics.quantiles(lat, n=1000, method="inclusive")
    return Run(
        system, len(lat), used[0] / n * 1e6, used[1] / n * 1e6, kernel / max(sum(used), 1e-9),
        q[499] * 1e6, q[899] * 1e6, q[989] * 1e6,
    )  # fmt: skip


def write_certs(certdir: Path) -> None:
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(certdir / "ca.pem"))
    for name in ("inbound", "outbound"):
        leaf = ca.issue_cert(f"{name}.test")
        leaf.private_key_and_cert_chain_pem.write_to_path(str(certdir / f"{name}.pem"))


def report(runs: list[Run], args: argparse.Namespace) -> None:
    """Print one table of medians over rounds, and the ratios."""

    def med(system: str, attr: str) -> float:
        return statistics.median(float(getattr(r, attr)) for r in runs if r.system == system)

    print(
        f"\n{args.rate:.0f} req/s open loop, {args.conns} keep-alive conns, {args.seconds}s x "
        f"{args.rounds} rounds interleaved, 100 B request / 1 KiB response; medians"
    )
    print(
        f"{'system':<8}{'cpu/req both':>14}{'outbound':>10}{'inbound':>10}{'kernel':>8}"
        f"{'p50':>9}{'p90':>9}{'p99':>9}{'added p50':>11}{'added p99':>11}   (µs)"
    )
    base50, base99 = med("direct", "p50_us"), med("direct", "p99_us")
    systems = sorted({r.system for r in runs}, key=SYSTEMS.index)
    for system in systems:
        cpu = [med(system, a) for a in ("cpu_us", "cpu_us_outbound", "cpu_us_inbound")]
        lat = [med(system, a) for a in ("p50_us", "p90_us", "p99_us")]
        print(
            f"{system:<8}{cpu[0]:>14.1f}{cpu[1]:>10.1f}{cpu[2]:>10.1f}"
            f"{med(system, 'kernel_share'):>8.0%}{lat[0]:>9.0f}{lat[1]:>9.0f}{lat[2]:>9.0f}"
            f"{lat[0] - base50:>11.0f}{lat[2] - base99:>11.0f}"
        )
    print()
    comparisons = [(m, ref) for m in MESHD for ref in ("naive", "consul", "fast") if m != ref]
    for mine, reference in comparisons:
        if mine not in systems or reference not in systems:
            continue
        pairs = zip(*([r for r in runs if r.system == s] for s in (mine, reference)), strict=True)
        ratios = sorted(f.cpu_us / ref.cpu_us for f, ref in pairs)
        print(
            f"CPU per request {mine}/{reference}: median {statistics.median(ratios):.2f} "
            f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})"
        )
    if "consul" in systems:
        c50, c99 = med("consul", "p50_us") - base50, med("consul", "p99_us") - base99
        for mine in (m for m in MESHD if m in systems):
            m50, m99 = med(mine, "p50_us") - base50, med(mine, "p99_us") - base99
            print(
                f"added latency {mine}: p50 {m50:.0f} µs (consul {c50:.0f}), "
                f"p99 {m99:.0f} µs (consul {c99:.0f}; target <= 1000)"
            )
    elif "naive" in systems:  # issue 6 measured naive ≈ 520 µs, Consul's proxy ≈ 210 µs
        for mine in (m for m in MESHD if m in systems):
            ratio = med(mine, "cpu_us") / med("naive", "cpu_us") * 520 / 210
            print(f"{mine}/Consul estimated from issue 6's naive/Consul: {ratio:.2f} (<= 1.25)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(check: Callable[[], object], what: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _one_exchange(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(REQUEST)
        got = b""
        while len(got) < len(RESPONSE) and (chunk := sock.recv(65536)):
            got += chunk
        return len(got) == len(RESPONSE)


def start_consul(workdir: Path, upstream: int) -> tuple[list[Proc], int, list[Proc]]:
    """A private dev agent (Connect CA, default allow) and a ``consul connect proxy`` pair."""
    http, inbound_port, outbound_port = _free_port(), _free_port(), _free_port()
    flags = [f"-{k}-port={_free_port()}" for k in ("serf-lan", "serf-wan", "server")]
    agent = Proc(cmd=["consul", "agent", "-dev", "-bind=127.0.0.1", "-client=127.0.0.1",
                      f"-http-port={http}", "-dns-port=-1", "-grpc-port=-1", *flags,
                      f"-data-dir={workdir / 'consul'}", "-log-level=error"])  # fmt: skip
    leader = f"http://127.0.0.1:{http}/v1/status/leader"
    _wait_for(lambda: len(urllib.request.urlopen(leader, timeout=2).read()) > 2, "Consul leader")
    proxy = ["consul", "connect", "proxy", f"-http-addr=127.0.0.1:{http}"]
    service = ["-service=bench-up", f"-service-addr=127.0.0.1:{upstream}"]
    listen = [f"-listen=127.0.0.1:{inbound_port}", "-register"]
    inbound = Proc(cmd=[*proxy, *service, *listen], port=inbound_port)
    client = ["-service=bench-client", f"-upstream=bench-up:{outbound_port}"]
    outbound = Proc(cmd=[*proxy, *client], port=outbound_port)
    _wait_for(lambda: _one_exchange(outbound_port), "the Consul proxy pair")
    return [agent, inbound, outbound], outbound_port, [outbound, inbound]


def start_systems(
    certdir: Path, args: argparse.Namespace, procs: list[Proc]
) -> dict[str, tuple[int, list[Proc]]]:
    """Start the upstream and the proxy pairs (into ``procs``); return system -> entry."""
    procs.append(Proc("upstream"))
    systems: dict[str, tuple[int, list[Proc]]] = {"direct": (procs[0].port, [])}
    if args.consul:
        started, entry, consul_pair = start_consul(certdir, procs[0].port)
        procs += started
        systems["consul"] = (entry, consul_pair)
    kinds = [] if args.no_naive else ["naive"]
    kinds += {"trio": ["fast"], "epoll": ["epoll"], "both": ["fast", "epoll"]}[args.engine]
    for kind in kinds:
        pair: list[Proc] = []
        target = procs[0].port
        for role in ("inbound", "outbound"):
            profile = args.profile and kind == "fast"
            stats = [str(certdir / f"{kind}-{role}.pstats")] if profile else []
            proc = Proc(kind, role, str(target), str(certdir), *stats)
            procs.append(proc)
            pair.insert(0, proc)
            target = proc.port
        systems[kind] = (target, pair)
    return systems


def wakeup_floor(rate: float, count: int = 3000) -> None:
    """CPU per wakeup of an echo process at ``rate``: trio vs. a bare epoll loop."""
    for kind in ("echo-epoll", "echo-trio", "echo-epoll", "echo-trio"):
        proc = Proc(kind)
        with socket.create_connection(("127.0.0.1", proc.port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            before, start = proc.cpu(), time.perf_counter()
            for k in range(count):
                time.sleep(max(0.0, start + k / rate - time.perf_counter()))
                sock.sendall(REQUEST)
                sock.recv(len(REQUEST))  # one segment on loopback with TCP_NODELAY
            print(f"{kind:<11} {(proc.cpu() - before) / count * 1e6:6.1f} µs CPU per wakeup")
        proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=2.0, help="per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--conns", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="cProfile (CPU) the fast pair")
    parser.add_argument("--floor", action="store_true", help="only trio vs. epoll wakeup cost")
    parser.add_argument("--consul", action="store_true", help="add `consul connect proxy` pair")
    parser.add_argument(
        "--engine", choices=("trio", "epoll", "both"), default="both",
        help="meshd pair(s): fast = agent.pump on trio, epoll = agent.epollpump",
    )  # fmt: skip
    parser.add_argument("--no-naive", action="store_true", help="skip the trio.SSLStream pair")
    args = parser.parse_args()
    if args.floor:
        wakeup_floor(args.rate)
        return
    count = 1 + args.consul + (not args.no_naive) + (2 if args.engine == "both" else 1)
    if args.seconds * args.rounds * count > 60:
        parser.error("seconds x rounds x systems must stay under 60 s")
    with tempfile.TemporaryDirectory() as tmp:
        certdir = Path(tmp)
        write_certs(certdir)
        procs: list[Proc] = []
        try:
            systems = start_systems(certdir, args, procs)
            runs = []
            for i in range(args.rounds):
                order = list(systems) if i % 2 == 0 else list(systems)[::-1]  # no fixed first
                runs += [measure(name, *systems[name], args) for name in order]
        finally:
            for p in reversed(procs):
                p.stop()
        report(runs, args)
        if args.profile:
            import pstats

            for role in ("outbound", "inbound"):
                print(f"\n--- fast {role} proxy: CPU profile ---")
                stats = pstats.Stats(str(certdir / f"fast-{role}.pstats"))
                stats.sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child_main(sys.argv[2:])
    else:
        main()
