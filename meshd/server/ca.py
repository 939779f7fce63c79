"""The signing authority a meshd server holds: the signing CA's key and the leaf policy.

The CA directory (``[ca] dir``, 0700, laid out by :mod:`meshd.cadir` and written by
``meshctl ca init``/``rotate``) holds ``signing-ca.pem`` (the signing CA certificate, then
any chain such as a cross certificate) and ``signing-ca.key`` (0600). The trust domain is
the signing CA's own ``spiffe://<td>`` URI SAN.

During a root rotation ``meshctl ca rotate`` replaces those two files; the server notices
(:meth:`SigningAuthority.reload_from_dir`, polled by the daemon) and switches to the new
signing CA only once it chains to a root the published bundle trusts, so nothing is ever
issued that peers cannot verify. Leaf lifetime is the server's alone: ``ttl_s`` clamped to
``max_ttl_s``; nothing a caller sends changes it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from meshd import cadir, pki
from meshd.errors import MeshdError
from meshd.identity import SpiffeId
from meshd.logevents import log_event
from meshd.trustbundle import TrustBundle

log = logging.getLogger("meshd.server.ca")


class CaLoadError(MeshdError):
    """The CA directory's files are missing, unsafe or inconsistent."""


@dataclass(frozen=True)
class IssuedLeaf:
    """A signed leaf and the chain to hand to its owner."""

    cert: x509.Certificate
    chain_pem: bytes
    not_after: float
    serial: str


@dataclass(frozen=True)
class AuthorityStatistics:
    """What a :class:`SigningAuthority` has done."""

    trust_domain: str
    issued: int
    refused: int
    ca_not_after: float
    leaf_ttl_s: float
    generation: int


def trusted_by(ca: pki.CertificateAuthority, bundle: TrustBundle) -> bool:
    """Whether *ca*'s certificate was issued by a root *bundle* trusts."""
    for root in bundle.trusted_roots():
        try:
            ca.cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


class SigningAuthority:
    """Signs leaves for identities the caller has already been found entitled to."""

    def __init__(self, ca: pki.CertificateAuthority, *, ttl_s: float, max_ttl_s: float) -> None:
        if not ttl_s > 0 or not max_ttl_s > 0:
            raise ValueError("leaf ttl_s and max_ttl_s must be positive")
        self._ttl = dt.timedelta(seconds=min(ttl_s, max_ttl_s))
        self._issued = 0
        self._refused = 0
        self.generation = 0
        self._cert_digest = b""
        self._use(ca)

    def __repr__(self) -> str:
        return f"SigningAuthority({self._ca!r}, ttl={self._ttl})"

    def _use(self, ca: pki.CertificateAuthority) -> None:
        self._ca = ca
        self._chain_tail = b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (ca.cert, *ca.chain)
        )
        self._cert_digest = hashlib.sha256(self._chain_tail).digest()
        self.generation += 1

    @classmethod
    def from_dir(cls, directory: Path, *, ttl_s: float, max_ttl_s: float) -> SigningAuthority:
        """Load the signing CA from a CA directory.

        Raises:
            CaLoadError: a file is missing or unreadable, the key file is not 0600, or the
                certificate and key do not form a signing CA.
        """
        try:
            ca = cadir.load(directory, cadir.SIGNING)
        except MeshdError as exc:
            raise CaLoadError(str(exc)) from None
        return cls(ca, ttl_s=ttl_s, max_ttl_s=max_ttl_s)

    def reload_from_dir(self, directory: Path, bundle: TrustBundle) -> bool:
        """Switch to the directory's signing CA if it changed and *bundle* trusts it.

        Returns:
            True if the signing CA changed.

        Raises:
            CaLoadError: the new files are unusable, in another trust domain, or not
                trusted by the bundle yet (the old CA stays in use).
        """
        try:
            pem = (directory / f"{cadir.SIGNING}.pem").read_bytes()
        except OSError as exc:
            raise CaLoadError(f"cannot read the signing CA in {directory}: {exc}") from None
        if hashlib.sha256(pem).digest() == self._cert_digest:
            return False
        try:
            ca = cadir.load(directory, cadir.SIGNING)
        except MeshdError as exc:
            raise CaLoadError(str(exc)) from None
        if ca.trust_domain != self.trust_domain:
            raise CaLoadError(f"the new signing CA is for trust domain {ca.trust_domain}")
        if not trusted_by(ca, bundle):
            raise CaLoadError("the new signing CA does not chain to a root in the trust bundle")
        self._use(ca)
        subject = ca.cert.subject.rfc4514_string()
        log_event(log, logging.INFO, "signing_ca_loaded", subject=subject)
        return True

    def trusted_by(self, bundle: TrustBundle) -> bool:
        """Whether the signing CA in use was issued by a root *bundle* trusts."""
        return trusted_by(self._ca, bundle)

    @property
    def issuer(self) -> str:
        """The signing CA's issuer (its root's subject), for error messages."""
        return self._ca.cert.issuer.rfc4514_string()

    @property
    def trust_domain(self) -> str:
        """The trust domain this CA signs for."""
        return self._ca.trust_domain

    @property
    def leaf_ttl_s(self) -> float:
        """The lifetime of every leaf issued."""
        return self._ttl.total_seconds()

    def sign(self, csr_pem: bytes, identity: SpiffeId, now: float) -> IssuedLeaf:
        """Sign a leaf for *identity* on the CSR's key, for the fixed TTL.

        Args:
            csr_pem: the caller's CSR.
            identity: the identity the caller was found entitled to.
            now: Unix time.

        Returns:
            The leaf and its chain (leaf, signing CA, any cross certificate).

        Raises:
            pki.CsrRejected: the CSR asks for anything but *identity* or is malformed.
            pki.PkiError: *identity* is outside this CA's trust domain.
        """
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        try:
            leaf = pki.sign_leaf(self._ca, csr_pem, identity, now=when, ttl=self._ttl)
        except pki.PkiError:
            self._refused += 1
            raise
        self._issued += 1
        return IssuedLeaf(
            cert=leaf,
            chain_pem=leaf.public_bytes(serialization.Encoding.PEM) + self._chain_tail,
            not_after=leaf.not_valid_after_utc.timestamp(),
            serial=f"{leaf.serial_number:x}",
        )

    def statistics(self) -> AuthorityStatistics:
        """Counts of issued and refused leaves, the CA's own expiry, reload generation."""
        return AuthorityStatistics(
            trust_domain=self.trust_domain,
            issued=self._issued,
            refused=self._refused,
            ca_not_after=self._ca.cert.not_valid_after_utc.timestamp(),
            leaf_ttl_s=self.leaf_ttl_s,
            generation=self.generation,
        )
