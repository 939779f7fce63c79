"""verify_peer: the SVID structure table of SECURITY-TESTS C, and real TLS handshakes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshd import pki
from meshd.identity import SpiffeId
from meshd.keyfile import write_secret
from meshd.peer import PeerRejected, make_ssl_context, peer_chain_der, verify_peer
from meshd.trustbundle import BundleRoot, RootState, TrustBundle
from tests.plugins.pki import TRUST_DOMAIN, MeshCa, make_mesh_ca

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)
WEB = f"spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/web"
SERVER_AND_CLIENT = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.fixture(scope="module")
def ca() -> MeshCa:
    return make_mesh_ca(now=NOW - dt.timedelta(days=1))


def forge(
    ca: MeshCa,
    *,
    sans: list[x509.GeneralName] | None = None,
    is_ca: bool = False,
    key_cert_sign: bool = False,
    eku: list[x509.ObjectIdentifier] | None = SERVER_AND_CLIENT,
    not_before: dt.datetime = NOW - dt.timedelta(minutes=5),
    not_after: dt.datetime = NOW + dt.timedelta(hours=1),
    issuer: pki.CertificateAuthority | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
    extra: x509.ExtensionType | None = None,
) -> list[bytes]:
    """A leaf built by hand (bypassing sign_leaf's rules), DER chain leaf + issuer."""
    issuer = issuer or ca.signing
    key = key or ec.generate_private_key(ec.SECP256R1())
    sans = [x509.UniformResourceIdentifier(WEB)] if sans is None else sans
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, True, key_cert_sign, False, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if extra is not None:
        builder = builder.add_extension(extra, critical=True)
    leaf = builder.sign(issuer.key, hashes.SHA256())
    der = serialization.Encoding.DER
    return [leaf.public_bytes(der), issuer.cert.public_bytes(der)]


def uri(value: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(value)


FOREIGN = make_mesh_ca(now=NOW - dt.timedelta(days=1))  # same trust domain, other keys
CASES: dict[str, tuple[Callable[[MeshCa], list[bytes]], str]] = {
    "no SAN": (lambda c: forge(c, sans=[]), "0 URI SANs"),
    "two URI SANs": (
        lambda c: forge(c, sans=[uri(WEB), uri(WEB.replace("web", "db"))]),
        "2 URI SANs",
    ),
    "DNS-only SAN": (lambda c: forge(c, sans=[x509.DNSName("web.example")]), "0 URI SANs"),
    "URI and DNS SAN": (
        lambda c: forge(c, sans=[uri(WEB), x509.DNSName("web.example")]),
        "SANs besides its URI",
    ),
    "wrong scheme": (
        lambda c: forge(c, sans=[uri(WEB.replace("spiffe://", "https://"))]),
        "is not a spiffe:// URI",
    ),
    "non-canonical ID": (
        lambda c: forge(c, sans=[uri(WEB.replace("/svc/web", "/svc/WEB"))]),
        "not a DNS label",
    ),
    "foreign trust domain": (
        lambda c: forge(c, sans=[uri(WEB.replace(TRUST_DOMAIN, "evil.consul"))]),
        "foreign trust domain evil.consul",
    ),
    "CA:true leaf": (lambda c: forge(c, is_ca=True), "is a CA"),
    "keyCertSign leaf": (lambda c: forge(c, key_cert_sign=True), "may sign certificates"),
    "clientAuth-only EKU": (
        lambda c: forge(c, eku=[ExtendedKeyUsageOID.CLIENT_AUTH]),
        "does not allow serverAuth",
    ),
    "no EKU": (lambda c: forge(c, eku=None), "does not allow serverAuth"),
    "expired": (
        lambda c: forge(
            c, not_before=NOW - dt.timedelta(days=2), not_after=NOW - dt.timedelta(seconds=1)
        ),
        "expired at",
    ),
    "not yet valid": (
        lambda c: forge(c, not_before=NOW + dt.timedelta(seconds=30)),
        "not valid before",
    ),
    "foreign root": (lambda c: forge(c, issuer=FOREIGN.signing), "no valid chain"),
    "unknown critical extension": (
        lambda c: forge(
            c,
            extra=x509.UnrecognizedExtension(
                x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"
            ),
        ),
        "no valid chain",
    ),
    "not DER": (lambda c: [b"\x30\x03garbage"], "not valid DER"),
    "nothing": (lambda c: [], "no certificate"),
}


@pytest.mark.parametrize("case", CASES)
def test_malformed_svids_are_refused(ca: MeshCa, case: str) -> None:
    make, reason = CASES[case]
    with pytest.raises(PeerRejected, match=reason):
        verify_peer(
            make(ca),
            ca.bundle,
            role="server",
            trust_domain=TRUST_DOMAIN,
            expected_service="web",
            now=NOW,
        )


def test_well_formed_svid_is_accepted_for_both_roles(ca: MeshCa) -> None:
    chain = forge(ca)
    for role in ("client", "server"):
        peer = verify_peer(
            chain, ca.bundle, role=role, trust_domain=TRUST_DOMAIN, expected_service="web", now=NOW
        )
        assert peer == SpiffeId(TRUST_DOMAIN, "dc1", "web")


def test_wrong_service_is_refused(ca: MeshCa) -> None:
    with pytest.raises(PeerRejected, match="not service 'api'"):
        verify_peer(
            forge(ca),
            ca.bundle,
            role="server",
            trust_domain=TRUST_DOMAIN,
            expected_service="api",
            now=NOW,
        )


def test_server_only_eku_is_a_server_not_a_client(ca: MeshCa) -> None:
    chain = forge(ca, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    kwargs = {"trust_domain": TRUST_DOMAIN, "expected_service": None, "now": NOW}
    assert verify_peer(chain, ca.bundle, role="server", **kwargs).service == "web"  # type: ignore[arg-type]
    with pytest.raises(PeerRejected, match="clientAuth"):
        verify_peer(chain, ca.bundle, role="client", **kwargs)  # type: ignore[arg-type]


def test_intermediate_may_come_from_the_bundle(ca: MeshCa) -> None:
    leaf_only = forge(ca)[:1]
    with pytest.raises(PeerRejected, match="no valid chain"):
        verify_peer(
            leaf_only,
            ca.bundle,
            role="client",
            trust_domain=TRUST_DOMAIN,
            expected_service=None,
            now=NOW,
        )
    bundle = replace(ca.bundle, intermediates=(ca.signing.cert,))
    verify_peer(
        leaf_only, bundle, role="client", trust_domain=TRUST_DOMAIN, expected_service=None, now=NOW
    )


def test_retired_root_is_not_trusted(ca: MeshCa) -> None:
    other = make_mesh_ca(now=NOW - dt.timedelta(days=1))
    bundle = TrustBundle(
        TRUST_DOMAIN,
        (
            BundleRoot(other.root.cert, RootState.ACTIVE),
            BundleRoot(ca.root.cert, RootState.RETIRED),
        ),
    )
    with pytest.raises(PeerRejected, match="no valid chain"):
        verify_peer(
            forge(ca),
            bundle,
            role="client",
            trust_domain=TRUST_DOMAIN,
            expected_service=None,
            now=NOW,
        )


def test_sign_leaf_output_passes_the_verifier(ca: MeshCa) -> None:
    chain_pem, _ = ca.issue("api", now=NOW, ttl=dt.timedelta(hours=24))
    chain = [
        c.public_bytes(serialization.Encoding.DER)
        for c in x509.load_pem_x509_certificates(chain_pem)
    ]
    peer = verify_peer(
        chain,
        ca.bundle,
        role="client",
        trust_domain=TRUST_DOMAIN,
        expected_service="api",
        now=NOW + dt.timedelta(hours=23),
    )
    assert peer.service == "api"
    with pytest.raises(PeerRejected, match="expired"):
        verify_peer(
            chain,
            ca.bundle,
            role="client",
            trust_domain=TRUST_DOMAIN,
            expected_service="api",
            now=NOW + dt.timedelta(hours=25),
        )


# --- real TLS handshakes over TCP -------------------------------------------------------


async def _serve_once(
    ctx: object, listener: trio.SocketListener, received: list[bytes], peers: list[object]
) -> None:
    import ssl

    assert isinstance(ctx, ssl.SSLContext)
    stream = trio.SSLStream(await listener.accept(), ctx, server_side=True)
    try:
        await stream.do_handshake()
        peers.append(peer_chain_der(stream))
        while data := await stream.receive_some(65536):
            received.append(bytes(data))
            await stream.send_all(b"echo:" + data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


def _pem_chain(chain_der: list[bytes]) -> bytes:
    pem = serialization.Encoding.PEM
    return b"".join(x509.load_der_x509_certificate(d).public_bytes(pem) for d in chain_der)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


async def _client(
    mesh: MeshCa,
    server: tuple[bytes, bytes],
    expect: str,
    received: list[bytes],
    peers: list[object],
) -> bytes | PeerRejected:
    """Serve *server* (chain, key) once; connect as an SVID client, verify, send "hello"."""
    client_chain, client_key = mesh.issue("client-app")
    server_ctx = make_ssl_context("server", server[0], server[1], mesh.bundle)
    client_ctx = make_ssl_context("client", client_chain, client_key, mesh.bundle)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_once, server_ctx, listener, received, peers)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, client_ctx, server_hostname=expect)
        try:
            await stream.do_handshake()
            peers.append("handshake-complete")
            verify_peer(
                peer_chain_der(stream),
                mesh.bundle,
                role="server",
                trust_domain=mesh.trust_domain,
                expected_service=expect,
                now=dt.datetime.now(dt.UTC),
            )
            await stream.send_all(b"hello")
            return bytes(await stream.receive_some(100))
        except PeerRejected as exc:
            return exc  # leaving the nursery would wrap it in an ExceptionGroup
        finally:
            await stream.aclose()
            await listener.aclose()


async def test_mtls_handshake_verifies_both_peers(mesh_ca: MeshCa) -> None:
    received: list[bytes] = []
    peers: list[object] = []
    with trio.fail_after(10):
        answer = await _client(mesh_ca, mesh_ca.issue("web"), "web", received, peers)
    assert answer == b"echo:hello"
    client_chain = next(p for p in peers if isinstance(p, tuple))
    client = verify_peer(
        client_chain,
        mesh_ca.bundle,
        role="client",
        trust_domain=TRUST_DOMAIN,
        expected_service=None,
        now=dt.datetime.now(dt.UTC),
    )
    assert client.service == "client-app"
    assert len(client_chain) == 2  # leaf + signing CA, as sent


async def test_wrong_service_refused_before_any_application_byte(mesh_ca: MeshCa) -> None:
    received: list[bytes] = []
    peers: list[object] = []
    with trio.fail_after(10):
        outcome = await _client(mesh_ca, mesh_ca.issue("web"), "api", received, peers)
    assert isinstance(outcome, PeerRejected)
    assert "not service 'api'" in outcome.reason
    assert "handshake-complete" in peers  # TLS itself was satisfied...
    assert received == []  # ...yet the server application saw nothing


async def test_ssl_alone_accepts_a_two_san_leaf_that_verify_peer_refuses(mesh_ca: MeshCa) -> None:
    """Why verify_peer exists: OpenSSL completes this handshake with check_hostname off."""
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    chain = forge(
        mesh_ca,
        sans=[uri(WEB), uri(WEB.replace("web", "db"))],
        key=key,
        not_before=now - dt.timedelta(minutes=1),
        not_after=now + dt.timedelta(hours=1),
    )
    received: list[bytes] = []
    peers: list[object] = []
    with trio.fail_after(10):
        outcome = await _client(mesh_ca, (_pem_chain(chain), _key_pem(key)), "web", received, peers)
    assert isinstance(outcome, PeerRejected)
    assert "2 URI SANs" in outcome.reason
    assert "handshake-complete" in peers
    assert received == []


async def test_tls_1_2_peers_are_refused(mesh_ca: MeshCa) -> None:
    import ssl

    server_chain, server_key = mesh_ca.issue("web")
    server_ctx = make_ssl_context("server", server_chain, server_key, mesh_ca.bundle)
    client_ctx = make_ssl_context("client", *mesh_ca.issue("client-app"), mesh_ca.bundle)
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    failures: list[str] = []

    async def serve() -> None:
        stream = trio.SSLStream(await listener.accept(), server_ctx, server_side=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            failures.append(f"server: {exc.__cause__}")
        finally:
            await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), client_ctx)
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                failures.append(f"client: {exc.__cause__}")
            finally:
                await stream.aclose()
        await listener.aclose()
    assert any(f.startswith("server") and "UNSUPPORTED_PROTOCOL" in f for f in failures), failures


def test_ssl_context_properties_and_no_key_left_behind(
    mesh_ca: MeshCa, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssl
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where staging happens
    chain, key = mesh_ca.issue("web")
    ctx = make_ssl_context("client", chain, key, mesh_ca.bundle)
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname is False
    assert len(ctx.get_ca_certs()) == 1
    assert list(tmp_path.iterdir()) == []  # the staged 0600 key file is gone
    key_file = tmp_path / "web.key"
    write_secret(key_file, key)
    server = make_ssl_context("server", chain, key_file, mesh_ca.bundle)
    assert server.verify_mode is ssl.CERT_REQUIRED
    with pytest.raises(ssl.SSLError):
        make_ssl_context("server", chain, mesh_ca.issue("other")[1], mesh_ca.bundle)
