"""New connection per request: what a fresh application connection costs through the mesh.

Topology per system, every piece its own process, all on 127.0.0.1:

    load generator ──tcp──▶ outbound proxy ══mTLS══▶ inbound proxy ──tcp──▶ upstream

Every request opens a new application connection (connect, 100-byte request, 1 KiB
response, close), at a fixed rate in an open loop; latency is taken from each request's
*intended* start (no coordinated omission). Systems, measured interleaved, several rounds,
medians reported:

* ``direct``: the generator talks to the upstream.
* ``consul``: a ``consul connect proxy`` pair on a private ``consul agent -dev`` (optional).
* ``meshd-full``: the agent's own proxy handlers (``agent.outbound._to_mesh_service`` and
  ``agent.inbound.handle_inbound``: SPIFFE SVIDs from ``meshd.pki``, contexts from
  ``agent.tlscontexts``, peer verification, intentions, access log, pump) with session
  resumption and the verifier's memory switched off: a full mTLS handshake and a full
  verification on both sides for every connection (the behaviour before ADR 008).
* ``meshd-nomem``: resumption on, the verifier's memory off (to attribute the gain).
* ``meshd-cold``: resumption and the verifier's memory, warm connections off
  (``[proxy] warm_connections = 0``).
* ``meshd``: as shipped: resumption, the verifier's memory and two warm connections per
  endpoint (docs/adr/010): the handshake happens ahead of the request, off its path.

Only the original-destination lookup (iptables) is left out: the outbound proxy is told the
destination service, and the inbound proxy the local port.

    .venv/bin/python -m bench.newconn_bench              # ~30 s, without Consul
    .venv/bin/python -m bench.newconn_bench --consul     # ~45 s, + `consul connect proxy`
    .venv/bin/python -m bench.newconn_bench --consul --write   # also into docs/performance.md
    .venv/bin/python -m bench.newconn_bench --rate 100 --seconds 2 --rounds 5

Bounded: each run has a request count and a wall-clock limit; total ≤ 60 s of measurement.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from bench.agent_pair import write_pki
from bench.pump_bench import REQUEST, RESPONSE, Proc, _free_port, _one_exchange, _wait_for
from bench.pump_bench import start_consul as start_consul_pair

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("direct", "consul", "meshd-full", "meshd-nomem", "meshd-cold", "meshd")
VARIANTS = {"meshd-full": "full", "meshd-nomem": "nomem", "meshd-cold": "resume", "meshd": "warm"}


# ------------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Run:
    """One measured run of one system."""

    system: str
    requests: int
    errors: int
    cpu_us: float  # both proxies, per request
    p50_us: float
    p99_us: float


async def load(port: int, *, rate: float, count: int, limit: float) -> tuple[list[float], int]:
    """Open loop: ``count`` requests at ``rate``/s, each on a new connection.

    Returns:
        The latencies (s) of the successful requests, and the number that failed.
    """
    latencies: list[float] = []
    errors = 0

    async def exchange() -> bool:
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(REQUEST)
            got = 0
            while got < len(RESPONSE):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return False  # closed mid-response
                got += len(chunk)
        return True

    async def one(intended: float) -> None:
        nonlocal errors
        try:
            done = await exchange()
        except (OSError, trio.BrokenResourceError):
            done = False
        if done:
            latencies.append(trio.current_time() - intended)
        else:
            errors += 1

    with trio.fail_after(limit):
        async with trio.open_nursery() as nursery:
            start = trio.current_time() + 0.05
            for k in range(count):
                intended = start + k / rate
                await trio.sleep_until(intended)
                nursery.start_soon(one, intended)
    return latencies, errors


def measure(system: str, port: int, proxies: list[Proc], args: argparse.Namespace) -> Run:
    count = int(args.rate * args.seconds)
    # A few untimed connections first: contexts built, the first ticket in hand.
    trio.run(partial(load, port, rate=args.rate, count=5, limit=10))
    before = [p.cpu() for p in proxies]
    lat, errors = trio.run(
        partial(load, port, rate=args.rate, count=count, limit=args.seconds * 3 + 5)
    )
    used = sum(p.cpu() - b for p, b in zip(proxies, before, strict=True))
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return Run(system, len(lat), errors, used / max(len(lat), 1) * 1e6, q[49] * 1e6, q[98] * 1e6)


def report(runs: list[Run], args: argparse.Namespace) -> str:
    """The table of medians over rounds, and the per-round ratios to Consul (returned)."""

    def med(system: str, attr: str) -> float:
        return statistics.median(float(getattr(r, attr)) for r in runs if r.system == system)

    systems = sorted({r.system for r in runs}, key=SYSTEMS.index)
    lines = [
        f"new connection per request, {args.rate:g}/s open loop, {args.seconds:g} s x "
        f"{args.rounds} rounds interleaved, 100 B request / 1 KiB response; medians",
        f"{'system':<13}{'requests':>9}{'errors':>7}{'cpu/req both':>14}{'p50':>8}{'p99':>8}"
        f"{'added p50':>11}{'added p99':>11}{'p50 / consul':>14}   (µs)",
    ]
    base50, base99 = med("direct", "p50_us"), med("direct", "p99_us")
    consul50 = med("consul", "p50_us") - base50 if "consul" in systems else None
    for system in systems:
        added50 = med(system, "p50_us") - base50
        ratio = f"{added50 / consul50:>14.2f}" if consul50 and system != "direct" else ""
        lines.append(
            f"{system:<13}{sum(r.requests for r in runs if r.system == system):>9}"
            f"{sum(r.errors for r in runs if r.system == system):>7}"
            f"{med(system, 'cpu_us'):>14.0f}{med(system, 'p50_us'):>8.0f}"
            f"{med(system, 'p99_us'):>8.0f}{added50:>11.0f}"
            f"{med(system, 'p99_us') - base99:>11.0f}{ratio}"
        )
    if consul50:
        pairs = zip(*([r for r in runs if r.system == s] for s in ("direct", "consul", "meshd")),
                    strict=True)  # fmt: skip
        ratios = sorted((m.p50_us - d.p50_us) / (c.p50_us - d.p50_us) for d, c, m in pairs)
        verdict = "met" if statistics.median(ratios) <= 0.5 else "MISSED"
        lines += [
            "",
            f"added p50 meshd/consul per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
            f"median {statistics.median(ratios):.2f} (target <= 0.5: {verdict})",
        ]
    text = "\n".join(lines)
    print("\n" + text)
    return text


def write_section(text: str) -> None:
    """Put the table in docs/performance.md, section ``newconn`` (other sections kept)."""
    import platform
    import ssl

    from bench.report import replace_section

    consul = subprocess.run(["consul", "version"], capture_output=True, text=True, check=False)
    body = (
        "## New connection per request (issue 6 item 3, ADR 008 and 010)\n\n"
        f"`python -m bench.newconn_bench {' '.join(sys.argv[1:])}`, "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}, Python {platform.python_version()}, {ssl.OPENSSL_VERSION}, "
        f"{consul.stdout.splitlines()[0] if consul.stdout else 'no consul'}.\n\n"
        f"```\n{text}\n```\n"
    )
    replace_section(REPO / "docs" / "performance.md", "newconn", body)


# ------------------------------------------------------------------------------- main


def _listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def start_meshd(
    variant: str, upstream: int, certdir: Path, procs: list[Proc]
) -> tuple[int, list[Proc]]:
    pair: list[Proc] = []
    target = upstream
    for role in ("inbound", "outbound"):
        port = _free_port()
        cmd = [sys.executable, "-m", "bench.agent_pair", role, variant, str(port), str(target),
               str(certdir)]  # fmt: skip
        proc = Proc(cmd=cmd, port=port)
        procs.append(proc)
        pair.insert(0, proc)
        _wait_for(partial(_listening, port), f"meshd {variant} {role}")
        target = port
    _wait_for(lambda: _one_exchange(target), f"meshd {variant} pair")
    return target, pair


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--rate", type=float, default=100.0, help="new connections per second")
    parser.add_argument("--seconds", type=float, default=2.0, help="per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--consul", action="store_true", help="add a `consul connect proxy` pair")
    parser.add_argument("--profile", action="store_true", help="cProfile (CPU) the meshd pair")
    parser.add_argument("--write", action="store_true", help="write docs/performance.md#newconn")
    args = parser.parse_args()
    n_systems = len(SYSTEMS) - (not args.consul)
    if args.seconds * args.rounds * n_systems > 60 or args.rate * args.seconds > 5000:
        parser.error("seconds x rounds x systems must stay under 60 s, rate x seconds <= 5000")
    os.chdir(REPO)
    if args.profile:
        os.environ["NEWCONN_PROFILE"] = "warm"
    with tempfile.TemporaryDirectory() as tmp:
        certdir = Path(tmp)
        write_pki(certdir)
        procs: list[Proc] = []
        try:
            procs.append(Proc("upstream"))
            upstream = procs[0].port
            systems: dict[str, tuple[int, list[Proc]]] = {"direct": (upstream, [])}
            if args.consul:
                started, entry, consul_pair = start_consul_pair(certdir, upstream)
                procs += started
                systems["consul"] = (entry, consul_pair)
            for system, variant in VARIANTS.items():
                systems[system] = start_meshd(variant, upstream, certdir, procs)
            runs = []
            for i in range(args.rounds):
                order = list(systems) if i % 2 == 0 else list(systems)[::-1]
                runs += [measure(name, *systems[name], args) for name in order]
        finally:
            for p in reversed(procs):
                p.stop()
        text = report(runs, args)
        if args.write:
            write_section(text)
        if args.profile:
            import pstats

            for role in ("outbound", "inbound"):
                print(f"\n--- meshd {role} proxy: CPU profile ---")
                stats = pstats.Stats(str(certdir / f"warm-{role}.pstats"))
                stats.sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
