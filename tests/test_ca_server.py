"""The meshd CA server, in-process on 127.0.0.1 with real Consul and real TLS handshakes.

Covers SECURITY-TESTS C "CA endpoint": only the caller's own identity is ever signed, and
hostile CSRs (extra SANs, another service, CA:true, long lifetimes) and replayed, revoked,
expired or misdirected tokens are refused.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from agent.signclient import Endpoint, SignError, request_certificate
from cli.token import create_token, list_tokens, revoke_token
from meshd import pki
from meshd.bootstrap import BootstrapToken, TokenError, new_token, token_key
from meshd.consul.client import ConsulClient, open_consul
from meshd.consul.settings import ConsulSettings
from meshd.identity import SpiffeId
from meshd.keyfile import write_secret
from meshd.server.ca import SigningAuthority
from meshd.server.daemon import MeshdServer, ServeOptions, serve_meshd
from meshd.server.leader import Leadership
from meshd.server.registration import meshd_registration, serve_registration
from meshd.signapi import SignRequest
from tests.plugins.pki import MeshCa

pytestmark = pytest.mark.consul
TTL_S = 3600.0


@dataclass
class Harness:
    consul: ConsulClient
    server: MeshdServer
    mesh_ca: MeshCa
    prefix: str
    datacenter: str

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.server.port)

    def identity(self, service: str) -> SpiffeId:
        return SpiffeId(self.mesh_ca.trust_domain, self.datacenter, service)

    async def token(self, host: str = "web-1", services=("web",), ttl_s=600.0, **kw):
        token, _ = await create_token(
            self.consul, host=host, services=services, ttl_s=ttl_s, kv_prefix=self.prefix, **kw
        )
        return token

    async def sign(self, csr: bytes, service: str = "web", host: str = "web-1", *,
                   token: BootstrapToken | None = None, client_cert=None, ttl_s=None):  # fmt: skip
        return await request_certificate(
            self.endpoint,
            SignRequest(csr, service, host, ttl_s),
            bundle=self.mesh_ca.bundle,
            token=token,
            client_cert=client_cert,
        )


async def _start(mesh_ca, settings: ConsulSettings, prefix: str, rate: int = 600):
    async with open_consul(settings) as consul, trio.open_nursery() as nursery:
        await consul.kv_put(f"{prefix}ca/bundle", mesh_ca.bundle.to_json())
        authority = SigningAuthority(mesh_ca.signing, ttl_s=TTL_S, max_ttl_s=2 * TTL_S)
        options = ServeOptions(
            name="test", listen_host="127.0.0.1", listen_port=0, kv_prefix=prefix,
            csr_rate_per_minute=rate, register=False, leader_lock_delay_s=0,
        )  # fmt: skip
        server = await nursery.start(serve_meshd, consul, authority, options)
        yield Harness(consul, server, mesh_ca, prefix, await consul.datacenter())
        nursery.cancel_scope.cancel()


@pytest.fixture
async def ca(mesh_ca, consul_settings, consul_kv_prefix) -> AsyncIterator[Harness]:
    async for harness in _start(mesh_ca, consul_settings, consul_kv_prefix):
        yield harness


def key_and_csr(identity: SpiffeId):
    key = pki.generate_key()
    return key, pki.build_csr(key, identity)


def custom_csr(key, uris: list[str], *, ca: bool = False, key_cert_sign: bool = False) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
        critical=True,
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    if key_cert_sign:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), True
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def leaf_of(chain_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(chain_pem)[0]


async def test_issuance_with_token_signs_exactly_the_identity(ca: Harness) -> None:
    token = await ca.token()
    key, csr = key_and_csr(ca.identity("web"))
    answer = await ca.sign(csr, token=token, ttl_s=10 * 365 * 86400.0)  # asks 10 years
    leaf = leaf_of(answer.chain_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [n.value for n in san] == [ca.identity("web").uri]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The lifetime is the server's fixed TTL (+ 1 min backdating), whatever was asked.
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime == dt.timedelta(seconds=TTL_S) + pki.BACKDATE
    assert leaf.public_key() == key.public_key()
    assert answer.not_after == leaf.not_valid_after_utc.timestamp()
    assert ca.server.api.statistics().allowed == 1


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("extra_san", "2 SANs"),
        ("other_service", "may only get"),
        ("ca_true", "CA certificate"),
        ("key_cert_sign", "keyCertSign"),
        ("foreign_domain", "may only get"),
        ("garbage", "not a PEM"),
    ],
)
async def test_hostile_csrs_are_refused(ca: Harness, kind: str, reason: str) -> None:
    token = await ca.token()
    key = pki.generate_key()
    web, db = ca.identity("web").uri, ca.identity("db").uri
    csr = {
        "extra_san": lambda: custom_csr(key, [web, db]),
        "other_service": lambda: custom_csr(key, [db]),
        "ca_true": lambda: custom_csr(key, [web], ca=True),
        "key_cert_sign": lambda: custom_csr(key, [web], key_cert_sign=True),
        "foreign_domain": lambda: custom_csr(key, [web.replace("11111111", "99999999")]),
        "garbage": lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n",
    }[kind]()
    with pytest.raises(SignError) as info:
        await ca.sign(csr, token=token)
    assert info.value.status == 403 and reason in str(info.value)
    # A refused CSR does not burn the token: the honest CSR still works.
    await ca.sign(key_and_csr(ca.identity("web"))[1], token=token)


async def test_token_refusals(ca: Harness) -> None:
    _, csr_web = key_and_csr(ca.identity("web"))
    _, csr_db = key_and_csr(ca.identity("db"))
    token = await ca.token(services=("web",))
    cases = [
        (dict(csr=csr_db, service="db", token=token), 403, "does not cover"),
        (dict(csr=csr_web, host="web-2", token=token), 403, "not for host"),
        (dict(csr=csr_web, token=BootstrapToken(token.token_id, "A" * 43)), 401, "not match"),
        (dict(csr=csr_web, token=BootstrapToken("0" * 16, "A" * 43)), 401, "unknown"),
        (dict(csr=csr_web), 401, "bootstrap token"),
        (dict(csr=csr_web, service="Bad_Name", token=token), 400, "DNS label"),
    ]
    for kwargs, status, reason in cases:
        with pytest.raises(SignError) as info:
            await ca.sign(**kwargs)
        assert info.value.status == status and reason in str(info.value), kwargs
    await ca.sign(csr_web, token=token)  # still unused after all those refusals


async def test_replayed_revoked_and_expired_tokens(ca: Harness) -> None:
    token = await ca.token(services=("web", "api"))
    await ca.sign(key_and_csr(ca.identity("web"))[1], token=token)
    with pytest.raises(SignError, match="already used"):
        await ca.sign(key_and_csr(ca.identity("web"))[1], token=token)
    await revoke_token(ca.consul, token.token_id, kv_prefix=ca.prefix)
    with pytest.raises(SignError, match="revoked"):
        await ca.sign(key_and_csr(ca.identity("api"))[1], service="api", token=token)
    old = await ca.token(ttl_s=60, now=1_000_000.0)
    with pytest.raises(SignError, match="expired"):
        await ca.sign(key_and_csr(ca.identity("web"))[1], token=old)
    states = {r.token_id: r for r in await list_tokens(ca.consul, kv_prefix=ca.prefix)}
    assert states[token.token_id].revoked and states[token.token_id].consumed == {"web"}


async def test_a_token_record_that_never_expires_is_refused(ca: Harness) -> None:
    """A record written to KV with "expires": Infinity (json.loads reads it) or a lifetime
    beyond a week is unusable, not eternal."""
    for expires in (b"Infinity", str(time.time() + 8 * 86400).encode()):
        token = await ca.token()
        key = token_key(token.token_id, ca.prefix)
        _, entry = await ca.consul.kv_get(key)
        assert entry is not None
        doc = json.loads(entry.value)
        doc["expires"] = 0
        data = json.dumps(doc).encode().replace(b'"expires": 0', b'"expires": ' + expires)
        await ca.consul.kv_put(key, data)
        with pytest.raises(SignError) as info:
            await ca.sign(key_and_csr(ca.identity("web"))[1], token=token)
        assert info.value.status == 403 and "record is unusable" in str(info.value), expires


async def test_concurrent_replay_issues_once(ca: Harness) -> None:
    token = await ca.token()
    results: list[object] = []

    async def attempt() -> None:
        try:
            results.append(await ca.sign(key_and_csr(ca.identity("web"))[1], token=token))
        except SignError as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(attempt)
    assert sum(not isinstance(r, SignError) for r in results) == 1


async def _issued(ca: Harness, tmp_path: Path, service: str):
    key, csr = key_and_csr(ca.identity(service))
    answer = await ca.sign(csr, service=service, token=await ca.token(services=(service,)))
    key_path = tmp_path / f"{service}.key"
    write_secret(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    return key, answer.chain_pem, key_path


async def test_renewal_over_mtls_for_the_same_identity(ca: Harness, tmp_path: Path) -> None:
    key, chain, key_path = await _issued(ca, tmp_path, "web")
    renewed = await ca.sign(pki.build_csr(key, ca.identity("web")), client_cert=(chain, key_path))
    assert leaf_of(renewed.chain_pem).serial_number != leaf_of(chain).serial_number
    # Renewal for another identity with this certificate is refused.
    other = pki.build_csr(key, ca.identity("api"))
    with pytest.raises(SignError) as info:
        await ca.sign(other, service="api", client_cert=(chain, key_path))
    assert info.value.status == 403 and "cannot renew" in str(info.value)


async def test_renewal_with_a_foreign_certificate_fails(ca: Harness, tmp_path: Path) -> None:
    from tests.plugins.pki import make_mesh_ca

    foreign = make_mesh_ca()  # same trust domain name, different root
    chain, key_pem = foreign.issue("web")
    key_path = tmp_path / "foreign.key"
    write_secret(key_path, key_pem)
    key = serialization.load_pem_private_key(key_pem, None)
    with pytest.raises(SignError) as info:
        await ca.sign(pki.build_csr(key, ca.identity("web")), client_cert=(chain, key_path))
    assert info.value.status in (0, 401)  # TLS alert, or verify_peer's refusal


async def test_the_control_planes_identity_is_never_issued(ca: Harness, tmp_path: Path) -> None:
    """svc/meshd is the CA to every agent: no token names it, and neither a record written
    straight to KV nor a certificate for it (renewal) obtains one; the server's own still
    works (every sign below verifies the server as svc/meshd first)."""
    with pytest.raises(TokenError, match="'meshd' is reserved for the control plane"):
        await ca.token(host="evil-1", services=("web", "meshd"))
    # A record naming meshd, written to KV by someone who can write the token folder.
    token, record = new_token(host="evil-1", services=["web"], now=time.time(), ttl_s=600)
    doc = json.loads(record.to_json())
    doc["services"] = ["meshd", "web"]
    await ca.consul.kv_put(token_key(token.token_id, ca.prefix), json.dumps(doc).encode())
    key, csr = key_and_csr(ca.identity("meshd"))
    with pytest.raises(SignError) as info:
        await ca.sign(csr, service="meshd", host="evil-1", token=token)
    assert info.value.status == 403 and "reserved for the control plane" in str(info.value)
    # Renewal: a leaf for svc/meshd from the mesh's own signing CA gets no fresh one.
    chain, key_pem = ca.mesh_ca.issue("meshd", datacenter=ca.datacenter)
    key_path = tmp_path / "meshd.key"
    write_secret(key_path, key_pem)
    meshd_key = serialization.load_pem_private_key(key_pem, None)
    renewal = pki.build_csr(meshd_key, ca.identity("meshd"))  # type: ignore[arg-type]
    with pytest.raises(SignError) as info:
        await ca.sign(renewal, service="meshd", host="evil-1", client_cert=(chain, key_path))
    assert info.value.status == 403 and "reserved for the control plane" in str(info.value)
    # The server signs its own certificate directly, and re-signs it as usual.
    ca.server.tls.refresh()
    assert ca.server.tls.statistics().issued == 2
    await ca.sign(key_and_csr(ca.identity("web"))[1], token=await ca.token())


async def test_one_host_holding_idle_connections_does_not_lock_agents_out(ca: Harness) -> None:
    """256 idle connections from one address (the server's whole capacity) never get past
    its share of 32 (the default); an agent on another address still gets its certificate."""
    held = []
    try:
        for _ in range(256):
            sock = trio.socket.socket()
            held.append(sock)
            await sock.bind(("127.0.0.2", 0))
            await sock.connect(("127.0.0.1", ca.server.port))  # then never a byte
        with trio.fail_after(5):
            while ca.server.https.statistics().refused_over_source_limit < 256 - 32:
                await trio.sleep(0.01)
        assert ca.server.https.statistics().open_connections == 32
        await ca.sign(key_and_csr(ca.identity("web"))[1], token=await ca.token())
    finally:
        for sock in held:
            sock.close()


async def _raw(ca: Harness, method: str, path: str, body: bytes = b"", headers=None):
    ctx = ssl.create_default_context(cadata=ca.mesh_ca.bundle.roots_pem().decode())
    ctx.check_hostname = False
    async with httpx.AsyncClient(verify=ctx, trust_env=False) as client:
        return await client.request(
            method, f"https://127.0.0.1:{ca.server.port}{path}", content=body, headers=headers
        )


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/sign", b"not json", 400),
        ("POST", "/v1/sign", b"[]", 400),
        ("POST", "/v1/sign", b'{"csr": "x", "service": "web"}', 400),
        ("POST", "/v1/sign", b'{"csr": 1, "service": "web", "host": "h"}', 400),
        ("POST", "/v1/sign", b'{"csr": "x", "service": "web", "host": "h", "san": "x"}', 400),
        ("POST", "/v1/sign", b"{" * 20000, 413),
        ("GET", "/v1/sign", b"", 405),
        ("GET", "/v1/nothing", b"", 404),
    ],
)
async def test_strict_request_parsing(ca: Harness, method, path, body, status) -> None:
    response = await _raw(ca, method, path, body)
    assert response.status_code == status
    assert list(response.json()) == ["error"] and response.text.count("\n") == 1


async def test_bundle_and_health(ca: Harness) -> None:
    assert (await _raw(ca, "GET", "/v1/health")).json() == {"status": "ok"}
    assert (await _raw(ca, "GET", "/v1/bundle")).content == ca.mesh_ca.bundle.to_json()


async def test_server_publishes_its_leaf_lifetime_for_rotations(ca: Harness) -> None:
    # meshctl ca rotate keeps the old root until leaves of this lifetime have expired.
    _, entry = await ca.consul.kv_get(f"{ca.prefix}ca/leaf-ttl/test")
    assert entry is not None
    assert json.loads(entry.value) == {"leaf_ttl_s": TTL_S}


async def test_rate_limit_answers_429(mesh_ca, consul_settings, consul_kv_prefix) -> None:
    async for ca in _start(mesh_ca, consul_settings, consul_kv_prefix, rate=2):
        statuses = []
        for _ in range(4):
            response = await _raw(ca, "POST", "/v1/sign", b"{}")
            statuses.append(response.status_code)
        assert statuses[:2] == [400, 400] and statuses[2:] == [429, 429]


async def test_decision_logs_hold_no_secrets(
    ca: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = await ca.token()
    key, csr = key_and_csr(ca.identity("web"))
    await ca.sign(csr, token=token)
    with pytest.raises(SignError):  # replayed with another key
        await ca.sign(key_and_csr(ca.identity("web"))[1], token=token)
    with pytest.raises(SignError):
        await ca.sign(csr, token=BootstrapToken(token.token_id, "B" * 43))
    lines = [r.getMessage() for r in caplog.records if r.name == "meshd.server.sign"]
    decisions = [json.loads(line)["decision"] for line in lines]
    assert decisions == ["allow", "deny", "deny"]
    text = caplog.text + repr(ca.server.api.statistics())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()  # fmt: skip
    for secret in (token.secret, token.reveal(), "B" * 43, key_pem.splitlines()[1]):
        assert secret not in text
    assert token.token_id in text  # the id is what an operator greps for


async def test_leader_lock_has_one_holder_and_fails_over(consul_settings, consul_kv_prefix) -> None:
    async with open_consul(consul_settings) as consul, trio.open_nursery() as nursery:
        key = f"{consul_kv_prefix}ca/leader"
        first = Leadership(consul, key=key, name="a", ttl_s=10, lock_delay_s=0)
        second = Leadership(consul, key=key, name="b", ttl_s=10, lock_delay_s=0)
        first_scope = trio.CancelScope()

        async def run_first() -> None:
            with first_scope:
                await first.serve(trio.sleep_forever)

        nursery.start_soon(run_first)
        with trio.fail_after(10):
            while not first.is_leader:
                await first.changed.wait()
        await nursery.start(second.serve, trio.sleep_forever)
        await trio.sleep(0.5)
        assert first.is_leader and not second.is_leader
        first_scope.cancel()  # destroys its session, releasing the lock
        with trio.fail_after(10):
            while not second.is_leader:
                await second.changed.wait()
        assert second.statistics().elections_won == 1
        nursery.cancel_scope.cancel()


async def test_registration_in_consul(consul_settings) -> None:
    async with open_consul(consul_settings) as consul, trio.open_nursery() as nursery:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        registration = meshd_registration(
            name="regtest", advertise_address="127.0.0.1", port=port, check_interval_s=1
        )
        await nursery.start(serve_registration, consul, registration)
        with trio.fail_after(20):
            while True:
                _, instances = await consul.health_service("meshd")
                if any(i.service_id == "meshd-regtest" and i.port == port for i in instances):
                    break
                await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
        await listener.aclose()
    async with open_consul(consul_settings) as consul:
        _, instances = await consul.health_service("meshd")
        assert all(i.service_id != "meshd-regtest" for i in instances)


async def test_non_tls_clients_are_counted_and_dropped(ca: Harness) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", ca.server.port)
    await stream.send_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n")
    with trio.fail_after(5):
        while ca.server.statistics().https.failed_handshakes < 1:
            await trio.sleep(0.01)
    await stream.aclose()
    stats = ca.server.statistics()
    assert stats.https.accepted >= 1 and stats.bundle.roots == 1
    assert stats.authority.trust_domain == ca.mesh_ca.trust_domain


async def test_impostor_with_a_mesh_certificate_never_sees_the_token(
    mesh_ca: MeshCa, issue_svid, tmp_path: Path
) -> None:
    """A valid mesh certificate of another service must not receive a single request byte."""
    from meshd.peer import make_ssl_context

    chain, key_pem = issue_svid("web")  # a real mesh identity, but not "meshd"
    ctx = make_ssl_context("server", chain, key_pem, mesh_ca.bundle)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    received = bytearray()

    async def impostor(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, ctx, server_side=True)
        try:
            await tls.do_handshake()
            while data := await tls.receive_some(4096):
                received.extend(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(tls)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, impostor, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        key = pki.generate_key()
        identity = SpiffeId(mesh_ca.trust_domain, "dc1", "web")
        token = BootstrapToken("0" * 16, "S" * 43)
        with pytest.raises(SignError, match="not a meshd server"):
            await request_certificate(
                Endpoint("127.0.0.1", port),
                SignRequest(pki.build_csr(key, identity), "web", "h"),
                bundle=mesh_ca.bundle,
                token=token,
            )
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert bytes(received) == b""


async def test_leader_survives_losing_its_session(consul_settings, consul_kv_prefix) -> None:
    """A destroyed session (Consul restart, node check failing) ends leadership, not the task."""
    async with open_consul(consul_settings) as consul, trio.open_nursery() as nursery:
        key = f"{consul_kv_prefix}ca/leader"
        leader = Leadership(consul, key=key, name="a", ttl_s=10, lock_delay_s=0)
        duty_runs = []

        async def duties() -> None:
            duty_runs.append(trio.current_time())
            await trio.sleep_forever()

        await nursery.start(leader.serve, duties)
        with trio.fail_after(10):
            while not leader.is_leader:
                await leader.changed.wait()
        _, entry = await consul.kv_get(key)
        assert entry is not None and entry.session
        await consul.session_destroy(entry.session)
        with trio.fail_after(10):
            while leader.statistics().elections_won < 2:
                await leader.changed.wait()
            while len(duty_runs) < 2:  # the duties start right after the election
                await trio.sleep(0.01)
        assert leader.is_leader and leader.statistics().errors == 1
        nursery.cancel_scope.cancel()


async def test_a_retry_with_the_same_key_is_signed_again(ca: Harness) -> None:
    """The answer to a first issuance can be lost (a timeout, a reset, an agent that
    restarts before saving it). The agent keeps its key, so its retry with the same token
    and a new CSR for that key is signed again: a new certificate (another serial) for the
    same key. Another key with the token stays refused, and does not spoil the retry."""
    token = await ca.token()
    key = pki.generate_key()
    first = leaf_of((await ca.sign(pki.build_csr(key, ca.identity("web")), token=token)).chain_pem)
    _, before = await ca.consul.kv_get(token_key(token.token_id, ca.prefix))
    again = leaf_of((await ca.sign(pki.build_csr(key, ca.identity("web")), token=token)).chain_pem)
    assert again.public_key() == first.public_key() == key.public_key()
    assert again.serial_number != first.serial_number
    _, after = await ca.consul.kv_get(token_key(token.token_id, ca.prefix))
    assert before is not None and after is not None and after.value == before.value
    with pytest.raises(SignError) as info:
        await ca.sign(key_and_csr(ca.identity("web"))[1], token=token)
    assert info.value.status == 403 and "already used for service 'web'" in str(info.value)
    await ca.sign(pki.build_csr(key, ca.identity("web")), token=token)
    (record,) = await list_tokens(ca.consul, kv_prefix=ca.prefix)
    assert record.consumed == {"web"}
    assert ca.server.api.statistics().allowed == 3


async def test_a_retry_is_refused_once_the_token_is_revoked_or_expired(ca: Harness) -> None:
    key = pki.generate_key()
    token = await ca.token()
    await ca.sign(pki.build_csr(key, ca.identity("web")), token=token)
    await revoke_token(ca.consul, token.token_id, kv_prefix=ca.prefix)
    with pytest.raises(SignError) as info:
        await ca.sign(pki.build_csr(key, ca.identity("web")), token=token)
    assert info.value.status == 403 and "revoked" in str(info.value)
    short = await ca.token(ttl_s=3.0)
    await ca.sign(pki.build_csr(key, ca.identity("web")), token=short)
    await ca.sign(pki.build_csr(key, ca.identity("web")), token=short)  # still in its lifetime
    (record,) = [r for r in await list_tokens(ca.consul, kv_prefix=ca.prefix)
                 if r.token_id == short.token_id]  # fmt: skip
    await trio.sleep(max(0.0, record.expires - time.time()) + 0.1)
    with pytest.raises(SignError) as info:
        await ca.sign(pki.build_csr(key, ca.identity("web")), token=short)
    assert info.value.status == 403 and "expired" in str(info.value)


async def test_a_record_consumed_by_an_older_server_gives_no_retry(ca: Harness) -> None:
    """A record that names a consumed service without the key it was issued to (written
    before keys were recorded) allows no retry for it; its other services work as before,
    and retries for them once they are issued."""
    token = await ca.token(services=("web", "api"))
    key = token_key(token.token_id, ca.prefix)
    _, entry = await ca.consul.kv_get(key)
    assert entry is not None
    doc = json.loads(entry.value)
    doc["consumed"] = ["web"]
    doc.pop("consumed_keys", None)
    await ca.consul.kv_put(key, json.dumps(doc).encode())
    web_key, api_key = pki.generate_key(), pki.generate_key()
    with pytest.raises(SignError) as info:
        await ca.sign(pki.build_csr(web_key, ca.identity("web")), token=token)
    assert info.value.status == 403 and "already used" in str(info.value)
    for _ in range(2):
        await ca.sign(pki.build_csr(api_key, ca.identity("api")), service="api", token=token)
