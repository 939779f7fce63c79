"""The server side of a root rotation, with the real ``meshctl ca init``/``rotate``.

meshd reloads the signing CA that ``rotate`` switched to (only once the bundle trusts it),
renews its own certificate under it, renews agents' certificates under it over mTLS with
their old certificate, the new leaves verify for a peer that still holds only the old root
(cross-signed), and the leader retires the old root once its leaves have expired.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.certifier import Certifier, CertifierSettings
from agent.signclient import Endpoint
from cli.ca import ca as ca_cli
from cli.token import create_token
from meshd import rotation
from meshd.consul.client import open_consul
from meshd.keyfile import write_secret
from meshd.peer import verify_peer
from meshd.server.ca import SigningAuthority
from meshd.server.daemon import ServeOptions, serve_meshd
from meshd.server.duties import retire_once
from meshd.trustbundle import BundleRoot, RootState, TrustBundle

pytestmark = pytest.mark.consul
TD = "22222222-3333-4444-5555-666666666666.consul"


async def _meshctl_ca(consul_agent, *args: str) -> str:
    def run() -> str:
        result = CliRunner().invoke(ca_cli, list(args), env=consul_agent.env())
        assert result.exit_code == 0, (result.output, result.exception)
        return result.output

    return await trio.to_thread.run_sync(run)


async def test_rotation_reload_renewal_and_retirement(
    consul_agent, consul_settings, consul_kv_prefix, tmp_path: Path
) -> None:
    ca_dir = tmp_path / "ca"
    prefix_args = ("--kv-prefix", consul_kv_prefix)
    await _meshctl_ca(
        consul_agent, "init", "--dir", str(ca_dir), "--trust-domain", TD, *prefix_args
    )
    authority = SigningAuthority.from_dir(ca_dir, ttl_s=3600, max_ttl_s=3600)
    options = ServeOptions(
        name="rot", listen_host="127.0.0.1", listen_port=0, kv_prefix=consul_kv_prefix,
        register=False, leader_lock_delay_s=0, ca_dir=ca_dir, ca_poll_s=0.05,
    )  # fmt: skip
    clock_offset = [0.0]
    async with open_consul(consul_settings) as consul, trio.open_nursery() as nursery:
        server = await nursery.start(serve_meshd, consul, authority, options)
        old_bundle = server.bundle.current()
        token, _ = await create_token(
            consul, host="h1", services=["web"], ttl_s=600, kv_prefix=consul_kv_prefix
        )
        write_secret(tmp_path / "token", token.reveal().encode())

        async def endpoints():
            return [Endpoint("127.0.0.1", server.port)]

        certifier = Certifier(
            state_dir=tmp_path / "state", token_file=tmp_path / "token", host="h1",
            datacenter=await consul.datacenter(), services=["web"], endpoints=endpoints,
            bundle=server.bundle.current,
            settings=CertifierSettings(max_step_s=0.05, retry_base_s=0.05, retry_cap_s=0.2),
            wall_clock=lambda: time.time() + clock_offset[0],
        )  # fmt: skip
        await nursery.start(certifier.serve)
        with trio.fail_after(10):
            while certifier.current("web") is None:
                await certifier.changed.wait()
        first = certifier.current("web")
        assert first is not None

        for _ in range(3):  # publish new root, cross-sign, switch signing
            await _meshctl_ca(consul_agent, "rotate", "--dir", str(ca_dir), *prefix_args)
        with trio.fail_after(10):
            while authority.generation < 2:
                await trio.sleep(0.05)
        new_bundle = server.bundle.current()
        assert rotation.phase_of(new_bundle) is rotation.Phase.NEW_ROOT_SIGNING

        clock_offset[0] = 0.75 * 3600  # renewal due: goes over mTLS with the old certificate
        with trio.fail_after(10):
            while certifier.statistics().services[0].issued < 2:
                await certifier.changed.wait()
        second = certifier.current("web")
        assert second is not None and second.serial != first.serial
        chain = x509.load_pem_x509_certificates(second.chain_pem)
        der = [c.public_bytes(serialization.Encoding.DER) for c in chain]
        now = dt.datetime.now(dt.UTC)
        new_active = new_bundle.active.cert
        assert any(c.issuer == new_active.subject for c in chain[1:2])
        # A peer with the new bundle accepts it ...
        verify_peer(der, new_bundle, role="client", trust_domain=TD, expected_service="web",
                    now=now)  # fmt: skip
        # ... and so does a peer that still trusts only the old root (cross certificate).
        old_only = TrustBundle(TD, (BundleRoot(old_bundle.active.cert, RootState.ACTIVE),))
        verify_peer(der, old_only, role="client", trust_domain=TD, expected_service="web",
                    now=now)  # fmt: skip

        key = f"{consul_kv_prefix}ca/bundle"
        assert not await retire_once(consul, key)  # old leaves may still be valid
        later = time.time() + 3 * 86400
        assert await retire_once(consul, key, wall_clock=lambda: later)
        _, entry = await consul.kv_get(key)
        assert entry is not None
        retired = TrustBundle.from_json(entry.value)
        assert rotation.phase_of(retired) is rotation.Phase.STABLE
        assert retired.root(old_bundle.active.id).state is RootState.RETIRED
        nursery.cancel_scope.cancel()
