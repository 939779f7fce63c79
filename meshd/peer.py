"""Peer verification: who is on the other end of a mutual-TLS connection.

Python's :mod:`ssl` (OpenSSL with ``check_hostname`` off) proves the peer holds a key
certified somewhere under our roots, and nothing about *which* identity it is: it never
looks at URI SANs, and it accepts leaves with several SANs, CA:true, or keyCertSign.
:func:`verify_peer` is the check every proxy runs after the handshake and before any
application byte moves. It is a pure function of the presented chain, the trust bundle and
``now``: it parses, checks the leaf's SVID structure, then validates the path to a bundle
root with :mod:`cryptography.x509.verification` (RFC 5280 path building, signatures,
validity windows, CA basic constraints, key usage, path lengths).

:func:`make_ssl_context` builds the matching :class:`ssl.SSLContext`: TLS 1.3 only (both
ends are meshd, so no legacy peer needs 1.2; 1.3 encrypts certificates, so identities are
not visible on the wire, and has no renegotiation), CERT_REQUIRED both ways,
``check_hostname`` off because identity is ours to check.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import shutil
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from meshd.errors import MeshdError
from meshd.identity import SCHEME, IdentityError, SpiffeId, parse_spiffe_id
from meshd.keyfile import write_secret
from meshd.trustbundle import TrustBundle

if TYPE_CHECKING:
    import trio

PeerRole = Literal["client", "server"]
_E = TypeVar("_E", bound=x509.ExtensionType)
MAX_CHAIN_CERTS = 6
MAX_CERT_BYTES = 16 * 1024
_ENCODING_DER = 2  # _ssl.ENCODING_DER, for the private Certificate.public_bytes
_ROLE_EKU = {"client": ExtendedKeyUsageOID.CLIENT_AUTH, "server": ExtendedKeyUsageOID.SERVER_AUTH}


class PeerRejected(MeshdError):
    """The peer's certificate does not prove an acceptable identity; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"peer rejected: {reason}")
        self.reason = reason


def verify_peer(
    chain_der: Sequence[bytes],
    bundle: TrustBundle,
    *,
    role: PeerRole,
    trust_domain: str,
    expected_service: str | None,
    now: dt.datetime,
) -> SpiffeId:
    """Verify a peer's certificate chain and return its SPIFFE identity.

    Args:
        chain_der: the certificates the peer presented, leaf first (DER). Intermediates
            missing from it are taken from ``bundle.intermediates``.
        bundle: the trust bundle; every non-retired root is a trust anchor.
        role: the role the *peer* plays: ``"server"`` when we dialled it (outbound proxy),
            ``"client"`` when it dialled us (inbound proxy). Its EKU must allow that role.
        trust_domain: the trust domain the peer must belong to.
        expected_service: the service the peer must be (outbound), or None (inbound).
        now: the current time (aware).

    Returns:
        The peer's identity.

    Raises:
        PeerRejected: with a precise reason: no or unparsable certificate, not yet valid,
            expired, leaf is a CA or may sign certificates, wrong EKU, not exactly one
            ``spiffe://`` URI SAN, foreign trust domain, no valid path to the bundle, or
            another service than expected.
        ValueError: a programming error: unknown role or a naive ``now``.
    """
    verified = _verify_chain(chain_der, bundle, role=role, trust_domain=trust_domain, now=now)
    return _expect(verified.identity, expected_service)


@dataclass(frozen=True)
class VerifiedPeer:
    """A chain that passed :func:`verify_peer`'s checks, and the window it passes them in.

    Attributes:
        identity: the leaf's SPIFFE ID.
        valid_from: the latest ``notBefore`` of the verified path (leaf to root).
        valid_until: the earliest ``notAfter`` of the verified path.
    """

    identity: SpiffeId
    valid_from: dt.datetime
    valid_until: dt.datetime


def _verify_chain(
    chain_der: Sequence[bytes],
    bundle: TrustBundle,
    *,
    role: PeerRole,
    trust_domain: str,
    now: dt.datetime,
) -> VerifiedPeer:
    """Every check of :func:`verify_peer` except the expected service."""
    if role not in _ROLE_EKU or now.tzinfo is None:
        raise ValueError(f"verify_peer: role must be client|server and now aware ({role!r})")
    certs = _parse_chain(chain_der)
    leaf = certs[0]
    _check_validity(leaf, now)
    _check_leaf_constraints(leaf, role)
    identity = _leaf_identity(leaf)
    if identity.trust_domain != trust_domain:
        raise PeerRejected(f"{identity.uri} is in foreign trust domain {identity.trust_domain}")
    if bundle.trust_domain != trust_domain:
        raise PeerRejected(f"the trust bundle is for {bundle.trust_domain}, not {trust_domain}")
    path = _check_path(leaf, certs[1:], bundle, now)
    return VerifiedPeer(
        identity,
        valid_from=max(c.not_valid_before_utc for c in path),
        valid_until=min(c.not_valid_after_utc for c in path),
    )


def _expect(identity: SpiffeId, expected_service: str | None) -> SpiffeId:
    if expected_service is not None and identity.service != expected_service:
        raise PeerRejected(f"peer is {identity.uri}, not service {expected_service!r}")
    return identity


class PeerVerifier:
    """:func:`verify_peer` with a small memory of chains that passed, for resumed sessions.

    Every new connection must be verified (a resumed TLS session carries the peer's leaf from
    the original handshake, and nobody else checks it again), but a leaf once proven to
    chain to a bundle root stays proven, against that same bundle, for as long as ``now``
    stays inside the proven path's validity window: the certificates a peer presents beside
    its leaf are only hints for building that path (and a resumed session has none of them).
    Entries are keyed by the SHA-256 of the leaf, the peer's role and the trust domain, and
    hold the bundle object they were verified against (a new bundle, e.g. a root retired,
    misses). Only successes are remembered; the expected service
    is compared on every call; a hit outside the window is dropped and verified afresh (so
    an expired peer gets the precise reason). At most ``max_entries``, least recently used
    evicted. Not thread-safe (one per trio thread).
    """

    def __init__(self, max_entries: int = 1024) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._entries: OrderedDict[bytes, tuple[TrustBundle, VerifiedPeer]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def verify(
        self,
        chain_der: Sequence[bytes],
        bundle: TrustBundle,
        *,
        role: PeerRole,
        trust_domain: str,
        expected_service: str | None,
        now: dt.datetime,
    ) -> VerifiedPeer:
        """Like :func:`verify_peer` (same arguments and errors), returning the window too."""
        if role not in _ROLE_EKU or now.tzinfo is None:
            raise ValueError(f"verify_peer: role must be client|server and now aware ({role!r})")
        key = _leaf_key(chain_der, role, trust_domain)
        entry = None if key is None else self._entries.get(key)
        if entry is not None and key is not None:
            cached_bundle, verified = entry
            if cached_bundle is bundle and verified.valid_from <= now <= verified.valid_until:
                self._entries.move_to_end(key)
                self.hits += 1
                _expect(verified.identity, expected_service)
                return verified
            del self._entries[key]
        self.misses += 1
        verified = _verify_chain(chain_der, bundle, role=role, trust_domain=trust_domain, now=now)
        assert key is not None  # _verify_chain refuses what _leaf_key cannot key
        self._entries[key] = (bundle, verified)
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)
        _expect(verified.identity, expected_service)
        return verified


def _leaf_key(chain_der: Sequence[bytes], role: PeerRole, trust_domain: str) -> bytes | None:
    if not chain_der or len(chain_der[0]) > MAX_CERT_BYTES:
        return None  # let the full check give the reason
    digest = hashlib.sha256(f"{role}\0{trust_domain}\0".encode())
    digest.update(chain_der[0])
    return digest.digest()


def _parse_chain(chain_der: Sequence[bytes]) -> list[x509.Certificate]:
    if not chain_der:
        raise PeerRejected("the peer presented no certificate")
    if len(chain_der) > MAX_CHAIN_CERTS:
        raise PeerRejected(
            f"the peer presented {len(chain_der)} certificates (max {MAX_CHAIN_CERTS})"
        )
    certs = []
    for index, der in enumerate(chain_der):
        if len(der) > MAX_CERT_BYTES:
            raise PeerRejected(f"certificate {index} is larger than {MAX_CERT_BYTES} bytes")
        try:
            certs.append(x509.load_der_x509_certificate(der))
        except ValueError:
            raise PeerRejected(f"certificate {index} is not valid DER") from None
    return certs


def _check_validity(leaf: x509.Certificate, now: dt.datetime) -> None:
    if now < leaf.not_valid_before_utc:
        raise PeerRejected(
            f"certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
        )
    if now > leaf.not_valid_after_utc:
        raise PeerRejected(f"certificate expired at {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_leaf_constraints(leaf: x509.Certificate, role: PeerRole) -> None:
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise PeerRejected("the leaf certificate is a CA (basicConstraints CA:true)")
    usage = _extension(leaf, x509.KeyUsage)
    if usage is None:
        raise PeerRejected("the leaf certificate has no keyUsage extension")
    if usage.key_cert_sign or usage.crl_sign:
        raise PeerRejected("the leaf certificate may sign certificates (keyCertSign/cRLSign)")
    if not usage.digital_signature:
        raise PeerRejected("the leaf certificate's keyUsage lacks digitalSignature")
    eku = _extension(leaf, x509.ExtendedKeyUsage)
    wanted = _ROLE_EKU[role]
    if eku is None or wanted not in eku:
        raise PeerRejected(f"the leaf certificate's extendedKeyUsage does not allow {role}Auth")


def _leaf_identity(leaf: x509.Certificate) -> SpiffeId:
    san = _extension(leaf, x509.SubjectAlternativeName)
    names = [] if san is None else list(san)
    uris = [n.value for n in names if isinstance(n, x509.UniformResourceIdentifier)]
    if len(uris) != 1:
        raise PeerRejected(f"the certificate has {len(uris)} URI SANs; an SVID has exactly one")
    if len(names) != 1:
        raise PeerRejected("the certificate has SANs besides its URI; an SVID has exactly one")
    if not uris[0].startswith(SCHEME):
        raise PeerRejected(f"the URI SAN {uris[0]!r} is not a {SCHEME} URI")
    try:
        return parse_spiffe_id(uris[0])
    except IdentityError as exc:
        raise PeerRejected(str(exc)) from None


@functools.lru_cache(maxsize=8)
def _store(bundle: TrustBundle) -> Store:
    return Store(list(bundle.trusted_roots()))


def _check_path(
    leaf: x509.Certificate,
    presented: list[x509.Certificate],
    bundle: TrustBundle,
    now: dt.datetime,
) -> list[x509.Certificate]:
    """Build and check the path; return it (leaf first, bundle root last)."""
    # The leaf's own EKU was checked above for the peer's role; the client verifier would
    # otherwise demand clientAuth of servers too. Everything else is the WebPKI profile.
    ee_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None
    )
    verifier = (
        PolicyBuilder()
        .store(_store(bundle))
        .time(now)
        .max_chain_depth(MAX_CHAIN_CERTS)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        return verifier.verify(leaf, presented + list(bundle.intermediates)).chain
    except VerificationError as exc:
        raise PeerRejected(
            f"no valid chain to the {bundle.trust_domain} trust bundle: {exc}"
        ) from None


def peer_chain_der(tls: ssl.SSLObject | ssl.SSLSocket | trio.SSLStream[Any]) -> tuple[bytes, ...]:
    """The certificates the peer sent (leaf first, DER) on a completed handshake.

    Python 3.11 and 3.12 expose the chain only privately (public from 3.13), and
    :class:`trio.SSLStream` does not expose its ``SSLObject``; we reach through both. Where
    that fails we return the leaf alone and :func:`verify_peer` takes the intermediates
    from the bundle.

    Args:
        tls: an SSL socket, memory-BIO object or trio stream with a completed handshake.

    Returns:
        The chain; empty if the peer sent no certificate.
    """
    obj: Any = getattr(tls, "_ssl_object", tls)  # trio.SSLStream wraps an ssl.SSLObject
    getter = getattr(obj, "get_unverified_chain", None)  # Python >= 3.13
    if getter is None:
        getter = getattr(getattr(obj, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        # A peer that sent no certificate yields None or [None], depending on the version.
        chain = [c for c in (getter() or []) if c is not None]
        return tuple(c if isinstance(c, bytes) else c.public_bytes(_ENCODING_DER) for c in chain)
    leaf = obj.getpeercert(binary_form=True)
    return () if leaf is None else (leaf,)


def make_ssl_context(
    role: PeerRole,
    cert_chain_pem: bytes,
    key: bytes | Path,
    bundle: TrustBundle,
) -> ssl.SSLContext:
    """An mTLS context presenting our SVID and trusting the bundle's roots.

    Args:
        role: *this* side's role: ``"client"`` (outbound proxy) or ``"server"`` (inbound).
        cert_chain_pem: our leaf, then its intermediates (PEM).
        key: our private key as PEM bytes, or the path of its 0600 file. Bytes are staged in
            a fresh 0700 directory as a 0600 file (ssl loads keys from files only) and
            removed before returning.
        bundle: trust anchors: every non-retired root.

    Returns:
        A TLS 1.3-only context with CERT_REQUIRED and ``check_hostname`` off; callers must
        run :func:`verify_peer` after the handshake and before any application byte, on
        resumed sessions too. A server context issues one session ticket per handshake
        (sealed with keys that live and die with this context, so a renewal or a bundle
        change, which build a new context, voids every ticket it issued); resumption always
        runs a fresh ECDHE (``psk_dhe_ke``) and never 0-RTT (docs/adr/008).

    Raises:
        ssl.SSLError: the certificate or key cannot be loaded or do not match.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if role == "client" else ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if role == "server":
        ctx.num_tickets = 1  # the client keeps the newest only; OpenSSL's default is 2
    ctx.load_verify_locations(cadata=bundle.roots_pem().decode("ascii"))
    staging = Path(tempfile.mkdtemp(prefix="meshd-tls-"))  # created 0700
    try:
        cert_file = staging / "chain.pem"
        cert_file.write_bytes(cert_chain_pem)
        if isinstance(key, Path):
            key_file = key
        else:
            key_file = staging / "key.pem"
            write_secret(key_file, key)
        ctx.load_cert_chain(cert_file, key_file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ctx
