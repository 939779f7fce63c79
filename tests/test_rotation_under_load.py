"""Issue 3: a root rotation during continuous mTLS handshakes, with zero handshake failures.

In-process, with real parts: a real Consul, two real meshd servers (``serve_meshd``) that
sign with their own copy of the CA directory, the real ``meshctl ca init``/``rotate``
commands as subprocesses, two agent certifiers (``web`` and ``api``) renewing 6 s leaves,
and a loop of real TLS 1.3 handshakes over loopback between them, made the way the proxies
make them: a context from :class:`agent.tlscontexts.TLSContexts` for the *current*
certificate and bundle per connection, :func:`agent.tlsconn.handshake`, then
:func:`meshd.peer.verify_peer` on both sides (expected service on the client side) before a
byte of application data moves.

The fleet is mixed on purpose, as a real one is during a rotation:

* ``web`` renews from server A, which gets the rotated CA directory at once; ``api`` renews
  from server B, which gets it only later ("copy the CA dir to every meshd host"). So for
  a while ``web`` holds a leaf from the new hierarchy and ``api`` one from the old.
* ``api``'s host sees trust-bundle updates :data:`API_BUNDLE_LAG_S` late (a slow Consul
  agent), so it verifies ``web``'s new leaf while its bundle does not list the new signing
  CA yet; only the chain ``web`` presents (with the cross certificate) can prove it.

Steps: publish new root, cross-sign, switch signing (``meshctl ca rotate`` x3), then the
meshd leader retires the old root on its own once every leaf it signed has expired
(``--max-leaf-ttl 6s --reload-grace 8s``). Each step is checked, the mixed states are
counted, and the handshakes must all succeed.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from cryptography import x509

from agent.certifier import Certifier, CertifierSettings
from agent.signclient import Endpoint
from agent.tlsconn import TLSConnection, TLSHandshakeError, handshake
from agent.tlscontexts import TLSContexts
from cli.token import create_token
from meshd import rotation
from meshd.consul import ConsulSettings
from meshd.consul.client import open_consul
from meshd.keyfile import write_secret
from meshd.peer import PeerRejected, verify_peer
from meshd.server.ca import SigningAuthority
from meshd.server.daemon import BundleWatch, ServeOptions, serve_meshd
from meshd.trustbundle import RootState, TrustBundle
from tests.plugins.consul_agent import ConsulAgentProcess

pytestmark = pytest.mark.consul

TD = "44444444-5555-6666-7777-888888888888.consul"
MESHCTL = Path(sys.executable).parent / "meshctl"
# Short enough to renew several times and retire within the test; long enough that the
# 30 % renewal margin (>= 1.5 s) absorbs a busy event loop on a loaded machine.
LEAF_TTL_S = 6.0
RELOAD_GRACE_S = 8.0  # server B gets the new CA directory within this after the switch
API_BUNDLE_LAG_S = 5.0
CLIENTS = 3  # concurrent handshake loops
HANDSHAKE_TIMEOUT_S = 5.0
MAX_HANDSHAKES = 200_000  # a bound on the loops, far above what 60 s can do
TEST_DEADLINE_S = 75.0


@dataclass
class Tally:
    """What the handshake loops saw."""

    ok: int = 0
    failures: list[str] = field(default_factory=list)
    # (web's hierarchy, api's hierarchy) -> handshakes, e.g. ("new", "old")
    pairs: Counter[tuple[str, str]] = field(default_factory=Counter)
    # api verified a new-hierarchy web leaf while its bundle did not list the issuing CA
    stale_bundle_verifications: int = 0
    phases: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)


class LaggingView:
    """A host's view of the trust bundle, ``lag_s`` behind Consul (a slow agent)."""

    def __init__(self, watch: BundleWatch, lag_s: float) -> None:
        self._watch = watch
        self._lag = lag_s
        self._history: list[tuple[float, TrustBundle]] = [(-1e9, watch.current())]

    def current(self) -> TrustBundle:
        cutoff = trio.current_time() - self._lag
        seen = [bundle for when, bundle in self._history if when <= cutoff]
        return seen[-1]

    async def serve(self) -> None:
        while True:  # until cancelled with the test's nursery
            latest = self._watch.current()
            if latest is not self._history[-1][1]:
                self._history.append((trio.current_time(), latest))
            await trio.sleep(0.02)


async def meshctl(consul_agent: ConsulAgentProcess, *args: str) -> str:
    """Run the real ``meshctl`` against the test Consul; return its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env.update(consul_agent.env())
    with trio.fail_after(30):
        result = await trio.run_process(
            [str(MESHCTL), *args], env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, (args, out, result.stderr.decode(errors="replace"))
    return out


def copy_ca_dir(src: Path, dst: Path) -> None:
    """What an operator does between rotation steps: copy the CA directory to a meshd host.

    Each file is written beside its target with the source's mode and renamed into place,
    keys before certificates, so the server never pairs a new certificate with an old key.
    """
    dst.mkdir(mode=0o700, exist_ok=True)
    names = sorted((p.name for p in src.iterdir() if p.is_file()), key=lambda n: n.endswith(".pem"))
    for name in names:
        source = src / name
        tmp = dst / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, source.stat().st_mode & 0o777)
        with os.fdopen(fd, "wb") as out:
            out.write(source.read_bytes())
        os.replace(tmp, dst / name)


def issuer_unknown(chain_der: tuple[bytes, ...], bundle: TrustBundle) -> bool:
    """Whether the leaf's signing CA (second in the chain) is missing from *bundle*."""
    return x509.load_der_x509_certificate(chain_der[1]) not in bundle.intermediates


def issuer_of(chain_pem: bytes) -> x509.Certificate:
    """The CA certificate that follows the leaf in a chain (the leaf's signing CA)."""
    return x509.load_pem_x509_certificates(chain_pem)[1]


async def test_root_rotation_under_continuous_handshakes_has_zero_failures(
    consul_agent: ConsulAgentProcess,
    consul_settings: ConsulSettings,
    consul_kv_prefix: str,
    tmp_path: Path,
) -> None:
    prefix = ("--kv-prefix", consul_kv_prefix)
    bundle_key = f"{consul_kv_prefix}ca/bundle"
    ca_a, ca_b = tmp_path / "ca-a", tmp_path / "ca-b"
    await meshctl(consul_agent, "ca", "init", "--dir", str(ca_a), "--trust-domain", TD, *prefix)
    copy_ca_dir(ca_a, ca_b)
    old_signing = x509.load_pem_x509_certificates((ca_a / "signing-ca.pem").read_bytes())[0]

    def hierarchy(chain_pem: bytes) -> str:
        return "old" if issuer_of(chain_pem) == old_signing else "new"

    with trio.fail_after(TEST_DEADLINE_S):
        async with open_consul(consul_settings) as consul, trio.open_nursery() as nursery:
            servers = []
            for name, ca_dir in (("a", ca_a), ("b", ca_b)):
                authority = SigningAuthority.from_dir(
                    ca_dir, ttl_s=LEAF_TTL_S, max_ttl_s=LEAF_TTL_S
                )
                options = ServeOptions(
                    name=name, listen_host="127.0.0.1", listen_port=0,
                    kv_prefix=consul_kv_prefix, csr_rate_per_minute=6000, register=False,
                    leader_lock_delay_s=0, ca_dir=ca_dir, ca_poll_s=0.1, retire_check_s=0.25,
                )  # fmt: skip
                servers.append(await nursery.start(serve_meshd, consul, authority, options))
            server_a, server_b = servers
            datacenter = await consul.datacenter()

            # Two hosts, each with its own view of the bundle; api's lags behind.
            web_watch = await BundleWatch.load(consul, bundle_key)
            api_watch = await BundleWatch.load(consul, bundle_key)
            await nursery.start(web_watch.serve)
            await nursery.start(api_watch.serve)
            api_view = LaggingView(api_watch, API_BUNDLE_LAG_S)
            nursery.start_soon(api_view.serve)

            certifiers: dict[str, Certifier] = {}
            for host, service, server, view in (
                ("h-web", "web", server_a, web_watch.current),
                ("h-api", "api", server_b, api_view.current),
            ):
                token, _ = await create_token(
                    consul, host=host, services=[service], ttl_s=600, kv_prefix=consul_kv_prefix
                )
                token_file = tmp_path / f"{host}.token"
                write_secret(token_file, token.reveal().encode())

                async def endpoints(port: int = server.port) -> list[Endpoint]:
                    return [Endpoint("127.0.0.1", port)]

                certifiers[service] = Certifier(
                    state_dir=tmp_path / host, token_file=token_file, host=host,
                    datacenter=datacenter, services=[service], endpoints=endpoints,
                    bundle=view,
                    settings=CertifierSettings(
                        max_step_s=0.05, retry_base_s=0.05, retry_cap_s=0.5, request_timeout_s=5
                    ),
                )  # fmt: skip
                await nursery.start(certifiers[service].serve)
            web, api = certifiers["web"], certifiers["api"]
            with trio.fail_after(10):
                while web.current("web") is None or api.current("api") is None:
                    await trio.sleep(0.02)

            tally = Tally()
            stop = trio.Event()
            web_tls, api_tls = TLSContexts(web), TLSContexts(api)

            async def serve_api(conn_sock: socket.socket) -> None:
                # api's inbound side: handshake, verify the client, answer one byte.
                cert = api.current("api")
                bundle = api_view.current()
                ctx = api_tls.context("server", "api", bundle)
                if cert is None or ctx is None:
                    tally.failures.append("api has no valid certificate")
                    conn_sock.close()
                    return
                try:
                    tls = await handshake(
                        conn_sock, ctx, server_side=True, timeout=HANDSHAKE_TIMEOUT_S
                    )
                except TLSHandshakeError as exc:
                    tally.failures.append(f"api handshake: {exc}")
                    return
                try:
                    peer_chain = tls.peer_chain_der()
                    verify_peer(
                        peer_chain, bundle, role="client", trust_domain=TD,
                        expected_service=None, now=dt.datetime.now(dt.UTC),
                    )  # fmt: skip
                    if len(peer_chain) > 1 and issuer_unknown(peer_chain, bundle):
                        tally.stale_bundle_verifications += 1
                    await tls.send_all(b"k")
                    await tls.send_eof()
                except (PeerRejected, OSError) as exc:
                    tally.failures.append(f"api verifying web: {exc}")
                finally:
                    tls.close()

            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            api_port = listeners[0].socket.getsockname()[1]

            async def accept_loop() -> None:
                with listeners[0].socket as listener:
                    async with trio.open_nursery() as conns:
                        while True:
                            sock, _ = await listener.accept()
                            raw = socket.socket(fileno=sock.detach())
                            conns.start_soon(serve_api, raw)

            nursery.start_soon(accept_loop)

            async def one_handshake() -> None:
                # web's outbound side: handshake, verify the server is api, exchange a byte.
                web_cert = web.current("web")
                api_cert = api.current("api")
                bundle = web_watch.current()
                ctx = web_tls.context("client", "web", bundle)
                if web_cert is None or api_cert is None or ctx is None:
                    tally.failures.append("web or api has no valid certificate")
                    return
                pair = (hierarchy(web_cert.chain_pem), hierarchy(api_cert.chain_pem))
                tsock = trio.socket.socket()
                try:
                    await tsock.connect(("127.0.0.1", api_port))
                except OSError as exc:
                    tsock.close()
                    tally.failures.append(f"web connect: {exc}")
                    return
                raw = socket.socket(fileno=tsock.detach())
                try:
                    tls: TLSConnection = await handshake(
                        raw, ctx, server_side=False, timeout=HANDSHAKE_TIMEOUT_S
                    )
                except TLSHandshakeError as exc:
                    tally.failures.append(f"web handshake {pair}: {exc}")
                    return
                try:
                    verify_peer(
                        tls.peer_chain_der(), bundle, role="server", trust_domain=TD,
                        expected_service="api", now=dt.datetime.now(dt.UTC),
                    )  # fmt: skip
                    buf = memoryview(bytearray(8))
                    with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                        got = await tls.recv_into(buf)
                    if bytes(buf[:got]) != b"k":
                        tally.failures.append(f"web {pair}: api refused us (got {got} bytes)")
                        return
                except (PeerRejected, OSError, trio.TooSlowError) as exc:
                    tally.failures.append(f"web verifying api {pair}: {exc}")
                    return
                finally:
                    tls.close()
                tally.ok += 1
                tally.pairs[pair] += 1
                tally.phases[rotation.phase_of(bundle).value] += 1

            async def client_loop() -> None:
                while not stop.is_set() and tally.total < MAX_HANDSHAKES:
                    await one_handshake()

            async with trio.open_nursery() as load:
                for _ in range(CLIENTS):
                    load.start_soon(client_loop)

                async def wait_for(what: str, cond: Callable[[], bool], timeout_s: float) -> None:
                    # Bounded; a handshake failure ends the wait at once, with the evidence.
                    deadline = trio.current_time() + timeout_s
                    while not cond():
                        late = trio.current_time() > deadline
                        if tally.failures or late:
                            print(f"\n{'timed out' if late else 'failed'}: {what}\n{tally}")
                            print("\n".join(tally.failures[:10]))
                            print(web.statistics(), api.statistics(), sep="\n")
                        assert not tally.failures, (what, tally.failures[:5])
                        assert not late, f"timed out: {what}"
                        await trio.sleep(0.02)

                async def handshakes_since(start: int, count: int, timeout_s: float) -> None:
                    await wait_for(
                        f"{count} handshakes", lambda: tally.ok >= start + count, timeout_s
                    )

                await handshakes_since(0, 50, 10)  # load is running before anything changes
                before = tally.ok

                # 1-2: publish the new root, cross-sign (about a second apart: less than
                # api's lag, so api meets each step late).
                await meshctl(consul_agent, "ca", "rotate", "--dir", str(ca_a), *prefix)
                copy_ca_dir(ca_a, ca_b)
                await handshakes_since(tally.ok, 20, 10)
                await trio.sleep(0.5)
                await meshctl(consul_agent, "ca", "rotate", "--dir", str(ca_a), *prefix)
                copy_ca_dir(ca_a, ca_b)
                await handshakes_since(tally.ok, 20, 10)
                await trio.sleep(0.5)
                # 3: switch signing. Server A has the new CA at once, server B not yet.
                await meshctl(
                    consul_agent, "ca", "rotate", "--dir", str(ca_a), "--max-leaf-ttl",
                    f"{LEAF_TTL_S:g}s", "--reload-grace", f"{RELOAD_GRACE_S:g}s", *prefix,
                )  # fmt: skip
                switched = time.monotonic()
                with trio.fail_after(5):
                    while server_a.authority.generation < 2:
                        await trio.sleep(0.02)
                assert server_b.authority.generation == 1
                new_signing = x509.load_pem_x509_certificates(
                    (ca_a / "signing-ca.pem").read_bytes()
                )[0]
                assert new_signing != old_signing
                # web renews into the new hierarchy at its normal time (<= 70 % of its lifetime).
                await wait_for(
                    "web renewed into the new hierarchy, api still old",
                    lambda: tally.pairs[("new", "old")] >= 20,
                    LEAF_TTL_S + 1,
                )
                assert time.monotonic() - switched < RELOAD_GRACE_S - 1, "slower than the grace"
                copy_ca_dir(ca_a, ca_b)  # now server B signs under the new root too
                with trio.fail_after(5):
                    while server_b.authority.generation < 2:
                        await trio.sleep(0.02)
                await wait_for(
                    "api renewed from server B",
                    lambda: tally.pairs[("new", "new")] >= 20,
                    LEAF_TTL_S + 1,
                )

                # 4: nobody runs rotate again; the leader retires the old root when due.
                await wait_for(
                    "the leader retired the old root",
                    lambda: rotation.phase_of(web_watch.current()) is rotation.Phase.STABLE,
                    20,
                )
                retired_at = tally.ok
                # Let the lagging host catch up too, under load.
                await wait_for(
                    "api saw the retirement",
                    lambda: rotation.phase_of(api_view.current()) is rotation.Phase.STABLE,
                    API_BUNDLE_LAG_S + 5,
                )
                await handshakes_since(tally.ok, 50, 10)
                stop.set()
            nursery.cancel_scope.cancel()

    final = web_watch.current()
    assert [r.state for r in final.roots] == [RootState.RETIRED, RootState.ACTIVE]
    assert old_signing not in final.intermediates and new_signing in final.intermediates
    print(
        f"\nhandshakes ok={tally.ok} failed={len(tally.failures)} pairs={dict(tally.pairs)} "
        f"stale-bundle={tally.stale_bundle_verifications} phases={dict(tally.phases)} "
        f"before={before} after-retire={tally.ok - retired_at}"
    )
    assert tally.failures == [], tally.failures[:5]
    assert tally.ok >= 500
    assert set(tally.phases) == {p.value for p in rotation.Phase}  # load through every phase
    assert tally.pairs[("old", "old")] > 0 and tally.pairs[("new", "old")] > 0
    assert tally.pairs[("new", "new")] > 0
    assert tally.stale_bundle_verifications > 0  # the cross certificate carried them
    assert web.statistics().services[0].issued >= 3  # renewed during the test
    assert api.statistics().services[0].issued >= 3
