"""The mesh's certificate authority primitives: pure, sans-IO, ``now`` passed in. EC P-256.

The hierarchy (the public trust bundle is :mod:`meshd.trustbundle`)::

    root (self-signed, long-lived, pathlen 2)
      [cross certificate: the next root's key signed by this root, during rotation]
        signing CA (intermediate, pathlen 0, held by meshd servers)
          leaf SVID (one spiffe:// URI SAN, CA:false, short TTL chosen by the CA)

:func:`sign_leaf` trusts nothing in a CSR but its public key and its proof of possession:
the SAN, basic constraints, key usages and lifetime of the certificate are the CA's choice.
CSRs that *ask* for more than the caller's identity are refused rather than quietly
trimmed, so a confused or hostile client learns it at once.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshd.errors import MeshdError
from meshd.identity import (
    IdentityError,
    SpiffeId,
    check_trust_domain,
    parse_spiffe_id,
    trust_domain_uri,
)
from meshd.trustbundle import is_ca

BACKDATE = dt.timedelta(minutes=1)  # tolerate small clock skew between hosts
_E = TypeVar("_E", bound=x509.ExtensionType)
ROOT_PATH_LENGTH = 2  # root -> [cross] -> signing CA -> leaf


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


_CA_KEY_USAGE = _key_usage(cert_sign=True)
_LEAF_KEY_USAGE = _key_usage(cert_sign=False)


class PkiError(MeshdError):
    """A CA operation was asked for something inconsistent (wrong trust domain, bad TTL)."""


class CsrRejected(PkiError):
    """A certificate signing request was refused; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"CSR rejected: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA certificate with its private key.

    ``chain`` holds the certificates to send after this CA's own when presenting a leaf it
    signed (e.g. a cross certificate during rotation); roots are never included.
    """

    trust_domain: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...] = ()

    def __repr__(self) -> str:
        return f"CertificateAuthority({self.cert.subject.rfc4514_string()!r}, key=<redacted>)"

    @property
    def cert_pem(self) -> bytes:
        """This CA's certificate (PEM)."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM, for a 0600 file. Never log it."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def trust_domain_of(cert: x509.Certificate) -> str:
    """The trust domain a CA certificate serves: its one ``spiffe://<td>`` URI SAN.

    Raises:
        PkiError: no such SAN, several, or not a valid trust domain.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError("the CA certificate has no spiffe:// URI SAN") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    domains = [u.removeprefix("spiffe://") for u in uris if u.startswith("spiffe://")]
    if len(domains) != 1:
        raise PkiError("the CA certificate must name exactly one spiffe:// trust domain")
    try:
        return check_trust_domain(domains[0])
    except IdentityError as exc:
        raise PkiError(str(exc)) from None


def load_ca(trust_domain: str, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
    """Rebuild a :class:`CertificateAuthority` from its files' contents.

    Args:
        trust_domain: the mesh's trust domain.
        cert_pem: the CA certificate first, then any extra chain certificates.
        key_pem: the unencrypted PKCS#8 private key.

    Returns:
        The CA.

    Raises:
        PkiError: unparsable, not an EC P-256 key, not a CA, or key and certificate differ.
    """
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as exc:
        raise PkiError(f"cannot load CA certificate or key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise PkiError("CA key is not an EC P-256 private key")
    if certs[0].public_key() != key.public_key():
        raise PkiError("CA key does not match the CA certificate")
    if not is_ca(certs[0]):
        raise PkiError(f"{certs[0].subject.rfc4514_string()} is not a CA certificate")
    return CertificateAuthority(trust_domain, certs[0], key, tuple(certs[1:]))


def make_root(trust_domain: str, *, now: dt.datetime, ttl: dt.timedelta) -> CertificateAuthority:
    """Create a self-signed root CA for *trust_domain*.

    Args:
        trust_domain: lower-case DNS name; carried as the URI SAN ``spiffe://<td>``.
        now: the current time (aware, UTC).
        ttl: lifetime (roots are long-lived: years).

    Returns:
        The root CA. Its subject names the creation time, so successive roots differ.

    Raises:
        IdentityError: invalid trust domain.
        PkiError: non-positive TTL.
    """
    key = generate_key()
    name = _ca_name(trust_domain, "Root CA", now)
    builder = _ca_builder(trust_domain, name, name, key.public_key(), now, now + ttl, ttl)
    builder = builder.add_extension(
        x509.BasicConstraints(ca=True, path_length=ROOT_PATH_LENGTH), critical=True
    )
    return CertificateAuthority(trust_domain, builder.sign(key, hashes.SHA256()), key)


def make_signing_ca(
    root: CertificateAuthority, *, now: dt.datetime, ttl: dt.timedelta
) -> CertificateAuthority:
    """Create the intermediate that meshd servers sign leaves with.

    Args:
        root: the issuing root.
        now: the current time.
        ttl: lifetime; clamped so it never outlives the root.

    Returns:
        The signing CA (path length 0: it can sign leaves only).

    Raises:
        PkiError: non-positive TTL.
    """
    key = generate_key()
    name = _ca_name(root.trust_domain, "Signing CA", now)
    not_after = min(now + ttl, root.cert.not_valid_after_utc)
    builder = _ca_builder(
        root.trust_domain, name, root.cert.subject, key.public_key(), now, not_after, ttl
    )
    builder = builder.add_extension(
        x509.BasicConstraints(ca=True, path_length=0), critical=True
    ).add_extension(_aki(root.cert), critical=False)
    return CertificateAuthority(root.trust_domain, builder.sign(root.key, hashes.SHA256()), key)


def cross_sign(
    old_root: CertificateAuthority, new_root: CertificateAuthority, *, now: dt.datetime
) -> x509.Certificate:
    """Certify *new_root*'s subject and key under *old_root*.

    A peer that trusts only the old root accepts a chain through this certificate to leaves
    of the new hierarchy. Call it with the arguments swapped for the other direction.

    Args:
        old_root: the issuer.
        new_root: the root whose name, key and extensions are certified.
        now: the current time.

    Returns:
        The cross certificate, valid no longer than either root.
    """
    not_after = min(new_root.cert.not_valid_after_utc, old_root.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(new_root.cert.subject)
        .issuer_name(old_root.cert.subject)
        .public_key(new_root.key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
    )
    for ext in new_root.cert.extensions:
        if not isinstance(ext.value, x509.AuthorityKeyIdentifier):
            builder = builder.add_extension(ext.value, critical=ext.critical)
    builder = builder.add_extension(_aki(old_root.cert), critical=False)
    return builder.sign(old_root.key, hashes.SHA256())


def build_csr(key: ec.EllipticCurvePrivateKey, identity: SpiffeId) -> bytes:
    """A PEM CSR asking for exactly *identity*'s URI SAN, signed by *key*.

    Args:
        key: the host-generated private key (it never leaves the host).
        identity: the identity to ask for.

    Returns:
        The CSR, PEM-encoded.
    """
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def sign_leaf(
    ca: CertificateAuthority,
    csr_pem: bytes,
    identity: SpiffeId,
    *,
    now: dt.datetime,
    ttl: dt.timedelta,
) -> x509.Certificate:
    """Issue a leaf SVID for *identity* on the public key of a checked CSR.

    The caller has already decided that the requester is entitled to *identity*.

    Args:
        ca: the signing CA.
        csr_pem: the PEM CSR.
        identity: the identity to certify (must be in the CA's trust domain).
        now: the current time.
        ttl: the lifetime chosen by the CA; clamped to the CA's own expiry.

    Returns:
        The certificate: one URI SAN, CA:false, digitalSignature+keyAgreement,
        serverAuth+clientAuth, valid from ``now - 1 min`` to ``now + ttl``.

    Raises:
        CsrRejected: bad PEM or signature, not EC P-256, or asking for another SAN, several
            SANs, CA:true or keyCertSign/cRLSign.
        PkiError: identity outside the CA's trust domain, or non-positive TTL.
    """
    if identity.trust_domain != ca.trust_domain:
        raise PkiError(f"{identity.uri} is outside trust domain {ca.trust_domain}")
    if ttl <= dt.timedelta(0):
        raise PkiError(f"leaf TTL must be positive, not {ttl}")
    csr = _checked_csr(csr_pem, identity)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(csr.public_key())
        .serial_number(_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + ttl, ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        # An empty subject obliges a critical SAN (RFC 5280, section 4.2.1.6).
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), False)
        .add_extension(_aki(ca.cert), critical=False)
    )
    return builder.sign(ca.key, hashes.SHA256())


def _checked_csr(csr_pem: bytes, identity: SpiffeId) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise CsrRejected("not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise CsrRejected("the CSR's signature does not verify (no proof of key possession)")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise CsrRejected("the CSR's key is not EC P-256")
    constraints = _csr_extension(csr, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise CsrRejected("the CSR asks for a CA certificate (basicConstraints CA:true)")
    usage = _csr_extension(csr, x509.KeyUsage)
    if usage is not None and (usage.key_cert_sign or usage.crl_sign):
        raise CsrRejected("the CSR asks for keyCertSign or cRLSign")
    _check_csr_san(csr, identity)
    return csr


def _csr_extension(csr: x509.CertificateSigningRequest, kind: type[_E]) -> _E | None:
    try:
        return csr.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_csr_san(csr: x509.CertificateSigningRequest, identity: SpiffeId) -> None:
    san = _csr_extension(csr, x509.SubjectAlternativeName)
    if san is None:
        raise CsrRejected(f"the CSR must ask for exactly the SAN {identity.uri}")
    names = list(san)
    if len(names) != 1:
        raise CsrRejected(f"the CSR asks for {len(names)} SANs; exactly one is allowed")
    name = names[0]
    if not isinstance(name, x509.UniformResourceIdentifier):
        raise CsrRejected(f"the CSR asks for a non-URI SAN {name.value!r}")
    if name.value != identity.uri:
        try:
            asked = parse_spiffe_id(name.value).uri
        except IdentityError:
            asked = repr(name.value)
        raise CsrRejected(f"the CSR asks for {asked}; the caller may only get {identity.uri}")


def _ca_name(trust_domain: str, role: str, now: dt.datetime) -> x509.Name:
    stamp = f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshd"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshd {role} {stamp}"),
        ]
    )


def _ca_builder(
    trust_domain: str,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: dt.datetime,
    not_after: dt.datetime,
    ttl: dt.timedelta,
) -> x509.CertificateBuilder:
    if ttl <= dt.timedelta(0):
        raise PkiError(f"CA TTL must be positive, not {ttl}")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(trust_domain_uri(trust_domain))]
            ),
            critical=False,
        )
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _serial() -> int:
    # 159 random bits: positive, at most 20 octets, unguessable (CA/B Forum asks >= 64 bits).
    return secrets.randbits(159) | 1
