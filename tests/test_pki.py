"""The CA primitives: what a leaf contains, which CSRs are refused, and the bundle schema."""

from __future__ import annotations

import datetime as dt
import json
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshd import pki
from meshd.identity import SpiffeId
from meshd.trustbundle import BundleRoot, RootState, TrustBundle, TrustBundleError
from tests.plugins.pki import TRUST_DOMAIN, MeshCa, make_mesh_ca

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)
WEB = SpiffeId(TRUST_DOMAIN, "dc1", "web")
DAY = dt.timedelta(hours=24)
_E = TypeVar("_E", bound=x509.ExtensionType)


@pytest.fixture(scope="module")
def ca() -> MeshCa:
    return make_mesh_ca(now=NOW - dt.timedelta(days=1))


def ext(cert: x509.Certificate, kind: type[_E]) -> x509.Extension[_E]:
    return cert.extensions.get_extension_for_class(kind)


def test_leaf_is_exactly_what_the_ca_decides(ca: MeshCa) -> None:
    key = pki.generate_key()
    leaf = pki.sign_leaf(ca.signing, pki.build_csr(key, WEB), WEB, now=NOW, ttl=DAY)
    assert leaf.public_key() == key.public_key()
    assert [n.value for n in ext(leaf, x509.SubjectAlternativeName).value] == [WEB.uri]
    constraints = ext(leaf, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = ext(leaf, x509.KeyUsage).value
    assert usage.digital_signature and usage.key_agreement and not usage.key_cert_sign
    assert set(ext(leaf, x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    assert ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == (
        ext(ca.signing.cert, x509.SubjectKeyIdentifier).value.digest
    )
    assert ext(leaf, x509.SubjectKeyIdentifier)
    assert leaf.not_valid_before_utc == NOW - dt.timedelta(minutes=1)
    assert leaf.not_valid_after_utc == NOW + DAY
    leaf.verify_directly_issued_by(ca.signing.cert)


def test_serials_are_random_and_positive(ca: MeshCa) -> None:
    key = pki.generate_key()
    csr = pki.build_csr(key, WEB)
    serials = {
        pki.sign_leaf(ca.signing, csr, WEB, now=NOW, ttl=DAY).serial_number for _ in range(20)
    }
    assert len(serials) == 20
    assert all(0 < s < 2**159 for s in serials)


def test_ttl_is_clamped_to_the_ca(ca: MeshCa) -> None:
    csr = pki.build_csr(pki.generate_key(), WEB)
    leaf = pki.sign_leaf(ca.signing, csr, WEB, now=NOW, ttl=dt.timedelta(days=10_000))
    assert leaf.not_valid_after_utc == ca.signing.cert.not_valid_after_utc
    with pytest.raises(pki.PkiError, match="positive"):
        pki.sign_leaf(ca.signing, csr, WEB, now=NOW, ttl=dt.timedelta(0))


def hostile_csr(
    sans: list[x509.GeneralName] | None,
    *,
    is_ca: bool = False,
    key_cert_sign: bool = False,
    key: object = None,
) -> bytes:
    key = key or pki.generate_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if is_ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    if key_cert_sign:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, False, False, False), True
        )
    csr = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM)


def uri(value: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(value)


API = SpiffeId(TRUST_DOMAIN, "dc1", "api").uri
HOSTILE = {
    "another service": (hostile_csr([uri(API)]), "asks for spiffe://.*svc/api"),
    "extra SAN": (hostile_csr([uri(WEB.uri), uri(API)]), "2 SANs"),
    "extra DNS SAN": (hostile_csr([uri(WEB.uri), x509.DNSName("evil")]), "2 SANs"),
    "DNS SAN only": (hostile_csr([x509.DNSName("web")]), "non-URI SAN"),
    "non-SPIFFE URI": (hostile_csr([uri("https://web")]), "asks for 'https://web'"),
    "no SAN": (hostile_csr(None), "exactly the SAN"),
    "CA:true": (hostile_csr([uri(WEB.uri)], is_ca=True), "CA:true"),
    "keyCertSign": (hostile_csr([uri(WEB.uri)], key_cert_sign=True), "keyCertSign"),
    "RSA key": (
        hostile_csr([uri(WEB.uri)], key=rsa.generate_private_key(65537, 2048)),
        "not EC P-256",
    ),
    "P-384 key": (
        hostile_csr([uri(WEB.uri)], key=ec.generate_private_key(ec.SECP384R1())),
        "not EC P-256",
    ),
    "garbage": (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END", "not a PEM"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_csrs_are_refused(ca: MeshCa, case: str) -> None:
    csr, reason = HOSTILE[case]
    with pytest.raises(pki.CsrRejected, match=reason):
        pki.sign_leaf(ca.signing, csr, WEB, now=NOW, ttl=DAY)


def test_csr_with_a_broken_signature_is_refused(ca: MeshCa) -> None:
    der = bytearray(
        x509.load_pem_x509_csr(pki.build_csr(pki.generate_key(), WEB)).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[-5] ^= 0x01  # inside the signature
    csr = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(pki.CsrRejected, match="signature"):
        pki.sign_leaf(ca.signing, csr, WEB, now=NOW, ttl=DAY)


def test_identity_outside_the_trust_domain_is_refused(ca: MeshCa) -> None:
    other = SpiffeId("other.consul", "dc1", "web")
    with pytest.raises(pki.PkiError, match="outside trust domain"):
        pki.sign_leaf(ca.signing, pki.build_csr(pki.generate_key(), other), other, now=NOW, ttl=DAY)


def test_ca_certificates(ca: MeshCa) -> None:
    root, signing = ca.root.cert, ca.signing.cert
    assert ext(root, x509.BasicConstraints).value.path_length == 2
    assert ext(signing, x509.BasicConstraints).value.path_length == 0
    assert ext(signing, x509.KeyUsage).value.key_cert_sign
    assert signing.issuer == root.subject
    assert signing.not_valid_after_utc <= root.not_valid_after_utc
    assert pki.trust_domain_of(root) == pki.trust_domain_of(signing) == TRUST_DOMAIN
    assert "redacted" in repr(ca.signing) and "PRIVATE" not in repr(ca.signing)


def test_load_ca_round_trip_and_mismatch(ca: MeshCa) -> None:
    loaded = pki.load_ca(TRUST_DOMAIN, ca.signing.cert_pem, ca.signing.key_pem())
    assert loaded.cert == ca.signing.cert
    with pytest.raises(pki.PkiError, match="does not match"):
        pki.load_ca(TRUST_DOMAIN, ca.signing.cert_pem, ca.root.key_pem())


def test_cross_certificate(ca: MeshCa) -> None:
    new = pki.make_root(TRUST_DOMAIN, now=NOW, ttl=dt.timedelta(days=3650))
    cross = pki.cross_sign(ca.root, new, now=NOW)
    assert cross.subject == new.cert.subject and cross.issuer == ca.root.cert.subject
    assert cross.public_key() == new.cert.public_key()
    assert cross.not_valid_after_utc <= ca.root.cert.not_valid_after_utc
    cross.verify_directly_issued_by(ca.root.cert)


# --- trust bundle ----------------------------------------------------------------------


def test_bundle_json_round_trip(ca: MeshCa) -> None:
    bundle = TrustBundle(
        TRUST_DOMAIN,
        (
            BundleRoot(ca.root.cert, RootState.RETIRING, NOW),
            BundleRoot(make_mesh_ca().root.cert, RootState.ACTIVE),
        ),
        (ca.signing.cert,),
    )
    data = bundle.to_json()
    assert TrustBundle.from_json(data) == bundle
    assert b"PRIVATE" not in data
    assert json.loads(data)["version"] == 1


def _doc(ca: MeshCa) -> dict[str, object]:
    return json.loads(ca.bundle.to_json())  # type: ignore[no-any-return]


def test_bundle_rejects_bad_documents(ca: MeshCa) -> None:
    good = _doc(ca)
    root = good["roots"][0]  # type: ignore[index]
    key_pem = ca.root.key_pem().decode()
    cases = [
        (b"not json", "not JSON"),
        (json.dumps({**good, "version": 2}).encode(), "version 1"),
        (json.dumps({**good, "roots": "x"}).encode(), "'roots' must be a list"),
        (json.dumps({**good, "roots": [{**root, "state": "odd"}]}).encode(), "unknown root state"),
        (json.dumps({**good, "roots": [{**root, "id": "00"}]}).encode(), "not its certificate"),
        (
            json.dumps({**good, "roots": [{**root, "pem": root["pem"] + key_pem}]}).encode(),
            "exactly one certificate",
        ),
        (json.dumps({**good, "intermediates": [key_pem]}).encode(), "exactly one certificate"),
        (json.dumps({**good, "roots": [{**root, "state": "retiring"}]}).encode(), "0 active"),
        (json.dumps({**good, "roots": [root, root]}).encode(), "2 active"),
        (json.dumps({**good, "trust_domain": "Bad"}).encode(), "trust domain"),
        (
            json.dumps(
                {**good, "roots": [{**root, "retire_after": "2030-01-01T00:00:00+00:00"}]}
            ).encode(),
            "iff it is retiring",
        ),
        (
            json.dumps(
                {**good, "roots": [{**root, "retire_after": "2030-01-01T00:00:00"}]}
            ).encode(),
            "no time zone",
        ),
    ]
    for data, reason in cases:
        with pytest.raises(TrustBundleError, match=reason):
            TrustBundle.from_json(data)


def test_bundle_refuses_a_leaf_as_root(ca: MeshCa) -> None:
    chain, _ = ca.issue("web")
    leaf = x509.load_pem_x509_certificates(chain)[0]
    with pytest.raises(TrustBundleError, match="not a CA"):
        TrustBundle(TRUST_DOMAIN, (BundleRoot(leaf, RootState.ACTIVE),))
