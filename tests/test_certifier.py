"""The agent's certifier against a real in-process meshd (real Consul, real TLS).

Wall-clock behaviour (renewal at 50-70 %, clock jumps, expiry) is driven by an injected
wall clock; TLS validity is still judged by OpenSSL at real time, so jumps stay within the
certificates' real validity.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cryptography import x509
from prometheus_client import CollectorRegistry

from agent.certifier import Certifier, CertifierSettings
from agent.signclient import Endpoint
from cli.token import create_token
from meshd import keyfile
from meshd.consul.client import ConsulClient, open_consul
from meshd.keyfile import write_secret
from meshd.server.ca import SigningAuthority
from meshd.server.daemon import MeshdServer, ServeOptions, serve_meshd
from tests.plugins.pki import MeshCa

pytestmark = pytest.mark.consul
FAST = CertifierSettings(
    max_step_s=0.05, retry_base_s=0.05, retry_cap_s=0.2, request_timeout_s=5, save_retry_s=0.1
)


class WallClock:
    """Real time plus an offset that a test can step (a clock jump or a suspension)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Mesh:
    consul: ConsulClient
    server: MeshdServer
    mesh_ca: MeshCa
    prefix: str
    datacenter: str
    scope: trio.CancelScope

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.server.port)


async def _mesh(mesh_ca, settings, prefix, ttl_s) -> AsyncIterator[Mesh]:
    async with open_consul(settings) as consul, trio.open_nursery() as nursery:
        await consul.kv_put(f"{prefix}ca/bundle", mesh_ca.bundle.to_json())
        authority = SigningAuthority(mesh_ca.signing, ttl_s=ttl_s, max_ttl_s=ttl_s)
        options = ServeOptions(
            name="t", listen_host="127.0.0.1", listen_port=0, kv_prefix=prefix,
            csr_rate_per_minute=6000, register=False, leader_lock_delay_s=0,
        )  # fmt: skip
        scope = trio.CancelScope()

        async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await serve_meshd(consul, authority, options, task_status=task_status)

        server = await nursery.start(run)
        yield Mesh(consul, server, mesh_ca, prefix, await consul.datacenter(), scope)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def mesh(mesh_ca, consul_settings, consul_kv_prefix) -> AsyncIterator[Mesh]:
    async for m in _mesh(mesh_ca, consul_settings, consul_kv_prefix, 3600.0):
        yield m


async def _token_file(mesh: Mesh, tmp_path: Path, services=("web",)) -> Path:
    token, _ = await create_token(
        mesh.consul, host="web-1", services=services, ttl_s=600, kv_prefix=mesh.prefix
    )
    path = tmp_path / "bootstrap.token"
    write_secret(path, token.reveal().encode() + b"\n")
    return path


def _certifier(mesh: Mesh, tmp_path: Path, token_file: Path, *, endpoint=None, clock=time.time,
               registry=None, services=("web",)) -> Certifier:  # fmt: skip
    async def endpoints():
        return [endpoint or mesh.endpoint]

    return Certifier(
        state_dir=tmp_path / "state", token_file=token_file, host="web-1",
        datacenter=mesh.datacenter, services=services, endpoints=endpoints,
        bundle=lambda: mesh.mesh_ca.bundle, settings=FAST, wall_clock=clock, registry=registry,
    )  # fmt: skip


async def _wait(certifier: Certifier, predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await certifier.changed.wait()


async def test_issuance_stores_chain_and_0600_key(mesh: Mesh, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    certifier = _certifier(mesh, tmp_path, await _token_file(mesh, tmp_path), registry=registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(certifier.serve)
        await _wait(certifier, lambda: certifier.current("web") is not None)
        nursery.cancel_scope.cancel()
    cert = certifier.current("web")
    assert cert is not None
    key_path = tmp_path / "state" / "certs" / "web.key"
    assert cert.key_path == key_path
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert (tmp_path / "state" / "certs" / "web.pem").read_bytes() == cert.chain_pem
    leaf = x509.load_pem_x509_certificates(cert.chain_pem)[0]
    assert leaf.not_valid_after_utc.timestamp() == cert.not_after
    gauge = registry.get_sample_value("meshd_cert_expiry_timestamp_seconds", {"service": "web"})
    assert gauge == cert.not_after
    # Renewal is due at 50-70 % of the lifetime (counted from receipt, after the backdated
    # NotBefore).
    due = registry.get_sample_value("meshd_cert_renewal_timestamp_seconds", {"service": "web"})
    lifetime = cert.not_after - cert.not_before
    assert (
        due is not None
        and cert.not_before + 0.5 * lifetime <= due < cert.not_after - 0.25 * lifetime
    )
    (stats,) = certifier.statistics().services
    assert stats.serving and stats.not_after == cert.not_after and stats.issued == 1
    assert "BEGIN" not in repr(cert) and "PRIVATE" not in repr(certifier.statistics())


async def test_key_is_never_visible_to_others(mesh: Mesh, tmp_path: Path) -> None:
    """umask 0 would expose any file created without an explicit mode; a poller watches."""
    certs = tmp_path / "state" / "certs"
    certs.mkdir(parents=True)
    seen: list[tuple[str, int]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for entry in os.scandir(certs):
                with contextlib.suppress(FileNotFoundError):  # renamed under us
                    seen.append((entry.name, stat.S_IMODE(entry.stat().st_mode)))

    token_file = await _token_file(mesh, tmp_path)
    certifier = _certifier(mesh, tmp_path, token_file)
    old_umask = os.umask(0)
    thread = threading.Thread(target=poll)
    thread.start()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(certifier.serve)
            await _wait(certifier, lambda: certifier.current("web") is not None)
            nursery.cancel_scope.cancel()
    finally:
        done.set()
        thread.join()
        os.umask(old_umask)
    key_modes = {mode for name, mode in seen if "key" in name}
    assert key_modes == {0o600}, seen
    assert {mode for name, mode in seen if "pem" in name} <= {0o644}


async def test_renews_before_expiry_with_short_ttl(
    mesh_ca, consul_settings, consul_kv_prefix, tmp_path: Path
) -> None:
    async for mesh in _mesh(mesh_ca, consul_settings, consul_kv_prefix, 2.0):
        certifier = _certifier(mesh, tmp_path, await _token_file(mesh, tmp_path))
        serials = []
        async with trio.open_nursery() as nursery:
            await nursery.start(certifier.serve)
            with trio.fail_after(8):
                while len(serials) < 3:
                    cert = certifier.current("web")
                    if cert is not None and cert.serial not in serials:
                        serials.append(cert.serial)
                        # renewed while still valid: at 50-70 % of 2 s
                        assert time.time() < cert.not_after
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
        (stats,) = certifier.statistics().services
        assert stats.issued >= 3 and stats.failures == 0


async def test_clock_jump_renews_promptly_and_expiry_stops_presenting(
    mesh: Mesh, tmp_path: Path
) -> None:
    clock = WallClock()
    certifier = _certifier(mesh, tmp_path, await _token_file(mesh, tmp_path), clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(certifier.serve)
        await _wait(certifier, lambda: certifier.current("web") is not None)
        first = certifier.current("web")
        assert first is not None
        # The host was suspended (or the clock stepped) for 75 % of the lifetime: no
        # monotonic timer fired, yet renewal happens within a few steps.
        clock.offset = 0.75 * 3600
        start = trio.current_time()
        await _wait(certifier, lambda: certifier.statistics().services[0].issued == 2, 5)
        assert trio.current_time() - start < 2.0
        second = certifier.current("web")
        assert second is not None and second.serial != first.serial
        # Now jump past NotAfter: the certificate must no longer be presented.
        clock.offset = 2 * 3600
        assert certifier.current("web") is None
        await trio.sleep(0.3)
        # By this clock meshd's own certificate has expired too: the agent refuses to talk
        # to it (so never sends its token) and keeps retrying.
        (stats,) = certifier.statistics().services
        assert not stats.serving and stats.failures >= 1 and "expired" in stats.last_error
        nursery.cancel_scope.cancel()


async def test_cached_start_and_serving_while_meshd_is_down(mesh: Mesh, tmp_path: Path) -> None:
    token_file = await _token_file(mesh, tmp_path)
    first = _certifier(mesh, tmp_path, token_file)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.serve)
        await _wait(first, lambda: first.current("web") is not None)
        nursery.cancel_scope.cancel()
    cached = first.current("web")
    assert cached is not None
    # meshd is down: nothing listens on this port.
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead = Endpoint("127.0.0.1", sock.getsockname()[1])
    clock = WallClock()
    second = _certifier(mesh, tmp_path, token_file, endpoint=dead, clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(second.serve)
        current = second.current("web")
        assert current is not None and current.serial == cached.serial  # at once, from cache
        clock.offset = 0.8 * 3600  # renewal due; every attempt fails
        with trio.fail_after(5):
            while second.statistics().services[0].failures < 3:
                await trio.sleep(0.05)
        still = second.current("web")
        assert still is not None and still.serial == cached.serial  # keeps serving
        assert "cannot connect" in second.statistics().services[0].last_error
        nursery.cancel_scope.cancel()


async def test_token_file_must_be_private(mesh: Mesh, tmp_path: Path) -> None:
    token_file = await _token_file(mesh, tmp_path)
    os.chmod(token_file, 0o644)  # the operator's mistake, simulated
    certifier = _certifier(mesh, tmp_path, token_file)
    async with trio.open_nursery() as nursery:
        await nursery.start(certifier.serve)
        with trio.fail_after(5):
            while certifier.statistics().services[0].failures < 1:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert certifier.current("web") is None
    assert "0644" in certifier.statistics().services[0].last_error


async def test_a_certificate_signed_while_the_disk_is_full_is_served_and_saved_later(
    mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the chain's fsync fails with ENOSPC. That used to end the agent
    (an OSError out of meshd.keyfile) and lose the certificate, whose bootstrap token was
    spent: the service could never get one again. Now it is served from memory, and
    written once the disk has room."""
    certifier = _certifier(mesh, tmp_path, await _token_file(mesh, tmp_path))
    real_fsync = os.fsync
    full = True

    def fsync(fd: int) -> None:
        if full and ".web.pem." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(keyfile.os, "fsync", fsync)
    chain = tmp_path / "state" / "certs" / "web.pem"
    async with trio.open_nursery() as nursery:
        await nursery.start(certifier.serve)
        await _wait(certifier, lambda: certifier.current("web") is not None)
        await trio.sleep(0.3)  # a few save attempts
        assert not chain.exists()
        full = False
        with trio.fail_after(5):
            while not chain.exists():
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    cert = certifier.current("web")
    assert cert is not None and chain.read_bytes() == cert.chain_pem
    (stats,) = certifier.statistics().services
    assert stats.issued == 1 and stats.failures == 0


async def test_an_agent_restarted_before_saving_its_first_certificate_gets_one_again(
    mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the disk is full when the first certificate arrives, and the agent
    restarts before it could save it (its key was saved before it asked). The restarted
    agent asks again with the same token and key, and is signed: its token did not stay
    spent on an answer the host no longer has."""
    token_file = await _token_file(mesh, tmp_path)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if ".web.pem." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    first = _certifier(mesh, tmp_path, token_file)
    with monkeypatch.context() as patch:
        patch.setattr(keyfile.os, "fsync", fsync)
        async with trio.open_nursery() as nursery:
            await nursery.start(first.serve)
            await _wait(first, lambda: first.current("web") is not None)
            nursery.cancel_scope.cancel()  # the restart: the unsaved chain is gone
    assert not (tmp_path / "state" / "certs" / "web.pem").exists()
    lost = first.current("web")
    second = _certifier(mesh, tmp_path, token_file)
    chain = tmp_path / "state" / "certs" / "web.pem"
    async with trio.open_nursery() as nursery:
        await nursery.start(second.serve)
        await _wait(second, lambda: second.current("web") is not None)
        with trio.fail_after(5):
            while not chain.exists():
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    cert = second.current("web")
    assert cert is not None and lost is not None and cert.serial != lost.serial
    leaf = x509.load_pem_x509_certificates(cert.chain_pem)[0]
    assert leaf.public_key() == x509.load_pem_x509_certificates(lost.chain_pem)[0].public_key()
    assert chain.read_bytes() == cert.chain_pem
    assert second.statistics().services[0].failures == 0
