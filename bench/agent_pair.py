"""The agent's own proxy handlers as a benchmark process, one per side.

    python -m bench.agent_pair ROLE VARIANT PORT TARGET CERTDIR [--engine epoll|trio]
                                [--listen-fd FD]

``ROLE`` is ``outbound`` (plaintext in on PORT, mTLS out to TARGET) or ``inbound`` (mTLS in
on PORT, plaintext out to TARGET). Both run ``agent.outbound._to_mesh_service`` /
``agent.inbound.handle_inbound`` with SPIFFE SVIDs from ``meshd.pki`` (:func:`write_pki`),
contexts from ``agent.tlscontexts``, peer verification, intentions (web → api allowed),
the access log and the chosen pump engine. Only the original-destination lookup (iptables)
is left out: the outbound proxy is told the destination service, the inbound proxy the port.

``VARIANT`` switches the new-connection machinery, to attribute its gains:
``full`` (no resumption, no verifier memory, no warm connections), ``nomem`` (resumption),
``resume`` (resumption + verifier memory) and ``warm`` (as shipped: all of it plus two warm
connections per endpoint, docs/adr/010).

``--listen-fd FD`` serves an inherited listening socket instead of opening PORT: several
processes then accept from the one socket, as the agent's ``[proxy] workers`` do (the
``meshd-w2`` system), and the accept loop runs with ``shared=True``. Such a process prints
``accepting`` to stderr when its accept loop starts; with ``BENCH_ACCEPT_LOG=1`` it also
prints one ``accept ROLE PID MONOTONIC`` line per accepted connection (to see how the
connections spread over the processes).

On SIGTERM it prints its handshake and warm-connection counters to stderr and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import trio

TRUST_DOMAIN = "11111111-2222-3333-4444-555555555555.consul"


# ---------------------------------------------------------------------- certificates


def write_pki(certdir: Path) -> None:
    """A mesh CA (root + signing CA) through ``meshd.pki``; SVIDs for web and api."""
    from cryptography.hazmat.primitives import serialization

    from meshd import pki
    from meshd.identity import SpiffeId
    from meshd.keyfile import write_secret
    from meshd.trustbundle import BundleRoot, RootState, TrustBundle

    now = dt.datetime.now(dt.UTC)
    root = pki.make_root(TRUST_DOMAIN, now=now, ttl=dt.timedelta(days=30))
    signing = pki.make_signing_ca(root, now=now, ttl=dt.timedelta(days=10))
    bundle = TrustBundle(
        TRUST_DOMAIN, (BundleRoot(root.cert, RootState.ACTIVE),), intermediates=(signing.cert,)
    )
    (certdir / "bundle.json").write_bytes(bundle.to_json())
    for service in ("web", "api"):
        identity = SpiffeId(TRUST_DOMAIN, "dc1", service)
        key = pki.generate_key()
        leaf = pki.sign_leaf(signing, pki.build_csr(key, identity), identity, now=now,
                             ttl=dt.timedelta(hours=24))  # fmt: skip
        pem = serialization.Encoding.PEM
        chain = b"".join(c.public_bytes(pem) for c in (leaf, signing.cert))
        (certdir / f"{service}.pem").write_bytes(chain)
        write_secret(certdir / f"{service}.key", key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))  # fmt: skip


# ------------------------------------------------------------------ the meshd proxies


class _Files:
    """A credential source over the files written by :func:`write_pki`."""

    def __init__(self, certdir: Path) -> None:
        from agent.tlscontexts import CertifiedKey

        self._certs = {
            s: CertifiedKey(
                s, (certdir / f"{s}.pem").read_bytes(), certdir / f"{s}.key", 0.0, 0.0, serial
            )  # fmt: skip
            for serial, s in enumerate(("web", "api"), start=1)
        }

    def current(self, service: str) -> Any:
        return self._certs.get(service)


async def serve_meshd(
    role: str,
    variant: str,
    port: int,
    target: int,
    certdir: Path,
    engine: str = "trio",
    listen_fd: int | None = None,
) -> None:
    """One of the agent's proxies, through its own handler functions.

    *engine* is ``[proxy] engine``: ``epoll`` (the agent's default) or ``trio``.
    *listen_fd* is an inherited listening socket shared with other processes (``--listen-fd``).
    """
    from agent import inbound, outbound
    from agent.accesslog import JsonLog
    from agent.metrics import AgentMetrics
    from agent.proxycore import ProxyDeps
    from agent.tlscontexts import TLSContexts
    from agent.tlssessions import SessionCache
    from meshd.dataplane import build_view
    from meshd.intentions import Action, IntentionsDocument, SourceIntention, render_document
    from meshd.peer import PeerVerifier, VerifiedPeer
    from meshd.snapshot import Endpoint, LocalService, UpstreamSet, make_snapshot

    class NoSessions(SessionCache):
        def session_for(self, *args: Any, **kwargs: Any) -> None:
            return None

    class NoMemory(PeerVerifier):
        def verify(self, *args: Any, **kwargs: Any) -> VerifiedPeer:
            self._entries.clear()
            return super().verify(*args, **kwargs)

    from agent.listener import open_listener, serve_accept_loop
    from agent.warmpool import WarmPool

    bundle_raw = (certdir / "bundle.json").read_bytes()
    log = JsonLog(sys.stderr if os.environ.get("NEWCONN_LOG") else open(os.devnull, "w"))  # noqa: SIM115
    deps = ProxyDeps(view=lambda: None, tls=TLSContexts(_Files(certdir)), metrics=AgentMetrics(),
                     log=log)  # fmt: skip
    if variant == "full":
        deps.sessions = NoSessions()
    if variant in ("full", "nomem"):
        deps.peers = NoMemory()
    deps.warm = WarmPool(
        per_endpoint=2 if variant == "warm" else 0,
        count=lambda outcome: deps.metrics.warm_connections.labels(outcome).inc(),
    )
    if role == "outbound":
        local = LocalService("web", "web-1", 8080, upstreams=("api",))
        endpoint = Endpoint("127.0.0.1", target, node="n2", service_id="api-1")
        snapshot = make_snapshot(version=1, created_at=time.time(), local_services=(local,),
                                 upstreams=(UpstreamSet("api", (endpoint,)),),
                                 trust_bundle_raw=bundle_raw)  # fmt: skip
    else:
        local = LocalService("api", "api-1", target)
        allow = IntentionsDocument("api", (SourceIntention("web", action=Action.ALLOW),))
        snapshot = make_snapshot(version=1, created_at=time.time(), local_services=(local,),
                                 intentions_raw={"api": render_document(allow)},
                                 trust_bundle_raw=bundle_raw)  # fmt: skip
    view = build_view(snapshot)
    assert view.bundle is not None, view.bundle_error
    deps.view = lambda: view
    conns = inbound.OpenConnections()

    def report(*_: object) -> None:
        counts = {
            f"{s.labels['direction']}:resumed={s.labels['resumed']}": s.value
            for metric in deps.metrics.tls_handshakes.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        }
        warm = {
            s.labels["outcome"]: s.value
            for metric in deps.metrics.warm_connections.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        }
        print(
            f"meshd {variant} {role}: handshakes {json.dumps(counts)} warm {json.dumps(warm)}",
            file=sys.stderr,
        )
        if profile is not None:
            profile.disable()
            profile.dump_stats(str(certdir / f"{variant}-{role}.pstats"))
        os._exit(0)

    profile = None
    if os.environ.get("NEWCONN_PROFILE") == variant:  # --profile: CPU profile on SIGTERM
        import cProfile

        profile = cProfile.Profile(time.process_time)
        profile.enable()
    signal.signal(signal.SIGTERM, report)

    accept_log = listen_fd is not None and os.environ.get("BENCH_ACCEPT_LOG") == "1"

    async def handle(sock: socket.socket) -> None:
        started = trio.current_time()
        if accept_log:
            print(f"accept {role} {os.getpid()} {time.monotonic():.6f}", file=sys.stderr)
        if role == "outbound":
            await outbound._to_mesh_service(deps, view, sock, "api", started)
            return
        await inbound.handle_inbound(deps, conns, sock, target=("127.0.0.1", target))

    # The agent's own listener and accept loop; or a listening socket shared with the other
    # processes of this side (opened by the launcher, like the agent's workers get theirs).
    if listen_fd is None:
        listener = open_listener("127.0.0.1", port, inherited={})
    else:
        listener = socket.socket(fileno=listen_fd)
        listener.setblocking(False)
    async with contextlib.AsyncExitStack() as stack:
        if engine == "epoll":
            from agent.epollpump import open_pump_engine

            deps.pump = (await stack.enter_async_context(open_pump_engine())).pump
        nursery = await stack.enter_async_context(trio.open_nursery())
        await nursery.start(deps.warm.serve)
        if listen_fd is not None:
            print("accepting", file=sys.stderr, flush=True)
        await serve_accept_loop(
            listener, handle, nursery, log=log, name=role, shared=listen_fd is not None
        )


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until SIGTERM."""
    p = argparse.ArgumentParser(prog="python -m bench.agent_pair")
    p.add_argument("role", choices=["outbound", "inbound"])
    p.add_argument("variant", choices=["full", "nomem", "resume", "warm"])
    p.add_argument("port", type=int)
    p.add_argument("target", type=int)
    p.add_argument("certdir", type=Path)
    p.add_argument("--engine", choices=["epoll", "trio"], default="epoll")
    p.add_argument(
        "--listen-fd",
        type=int,
        default=None,
        metavar="FD",
        help="serve this inherited listening socket (shared with other processes)",
    )
    args = p.parse_args(argv)
    trio.run(serve_meshd, args.role, args.variant, args.port, args.target, args.certdir,
             args.engine, args.listen_fd)  # fmt: skip


if __name__ == "__main__":
    main()
