"""The public trust bundle: the roots peers accept, each with its rotation state.

Stored as JSON in Consul KV (``meshd/ca/bundle``), so it holds certificates only; private
keys stay in files on the meshd server hosts. Parsing is strict and refuses any PEM block
that is not a certificate, so a key pasted by mistake is never republished.

Schema (``version`` 1)::

    {"version": 1, "trust_domain": "<td>",
     "roots": [{"id": "<sha256 hex>", "state": "active", "pem": "-----BEGIN...",
                "retire_after": null | "<ISO 8601 UTC>"}],
     "intermediates": ["-----BEGIN CERTIFICATE-----..."]}

Exactly one root is ``active`` (it signs the current signing CA). During a rotation the next
root is ``rotating-in`` and, after the switch, the old one is ``retiring`` until every leaf it
signed has expired (``retire_after``); ``retired`` roots are listed but trusted by no one.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from meshd.errors import MeshdError
from meshd.identity import IdentityError, check_trust_domain

SCHEMA_VERSION = 1
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


class TrustBundleError(MeshdError):
    """A trust bundle document is malformed or inconsistent."""


class RootState(enum.StrEnum):
    """Where a root is in its life."""

    ACTIVE = "active"
    ROTATING_IN = "rotating-in"
    RETIRING = "retiring"
    RETIRED = "retired"


def bundle_key(kv_prefix: str) -> str:
    """The KV key of the trust bundle under meshd's *kv_prefix* (``meshd/ca/bundle``)."""
    return f"{kv_prefix.rstrip('/')}/ca/bundle"


def fingerprint(cert: x509.Certificate) -> str:
    """The certificate's SHA-256 fingerprint, lower-case hex: a root's stable id."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


@dataclass(frozen=True)
class BundleRoot:
    """A root certificate and its state; ``retire_after`` is set while ``retiring``."""

    cert: x509.Certificate
    state: RootState
    retire_after: dt.datetime | None = None

    @property
    def id(self) -> str:
        """The root's SHA-256 fingerprint."""
        return fingerprint(self.cert)


@dataclass(frozen=True)
class TrustBundle:
    """Roots with their states, plus public intermediates (cross certificates).

    Construction checks the invariants: exactly one ``active`` root, at most one
    ``rotating-in`` and one ``retiring`` (which alone has ``retire_after``), no duplicates,
    every root a CA.
    """

    trust_domain: str
    roots: tuple[BundleRoot, ...]
    intermediates: tuple[x509.Certificate, ...] = ()

    def __post_init__(self) -> None:
        try:
            check_trust_domain(self.trust_domain)
        except IdentityError as exc:
            raise TrustBundleError(str(exc)) from None
        active = [r for r in self.roots if r.state is RootState.ACTIVE]
        if len(active) != 1:
            raise TrustBundleError(f"trust bundle has {len(active)} active roots; exactly 1")
        ids = [r.id for r in self.roots]
        if len(set(ids)) != len(ids):
            raise TrustBundleError("trust bundle lists a root twice")
        for root in self.roots:
            if not is_ca(root.cert):
                raise TrustBundleError(f"root {root.id} is not a CA certificate")
            if (root.state is RootState.RETIRING) != (root.retire_after is not None):
                raise TrustBundleError(f"root {root.id}: retire_after is set iff it is retiring")
        for state in (RootState.ROTATING_IN, RootState.RETIRING):
            if sum(r.state is state for r in self.roots) > 1:
                raise TrustBundleError(f"trust bundle has more than one {state} root")

    @property
    def active(self) -> BundleRoot:
        """The root that signs the current signing CA."""
        return next(r for r in self.roots if r.state is RootState.ACTIVE)

    def trusted_roots(self) -> tuple[x509.Certificate, ...]:
        """Roots peers accept: every root that is not ``retired``."""
        return tuple(r.cert for r in self.roots if r.state is not RootState.RETIRED)

    def roots_pem(self) -> bytes:
        """Trusted roots concatenated as PEM (for ``ssl.SSLContext.load_verify_locations``)."""
        return "".join(_pem(c) for c in self.trusted_roots()).encode("ascii")

    def root(self, root_id: str) -> BundleRoot:
        """The root with this fingerprint.

        Raises:
            TrustBundleError: no such root.
        """
        for root in self.roots:
            if root.id == root_id:
                return root
        raise TrustBundleError(f"trust bundle has no root {root_id}")

    def to_json(self) -> bytes:
        """Serialise as the versioned KV document (certificates only)."""
        doc = {
            "version": SCHEMA_VERSION,
            "trust_domain": self.trust_domain,
            "roots": [
                {
                    "id": r.id,
                    "state": r.state.value,
                    "pem": _pem(r.cert),
                    "retire_after": None if r.retire_after is None else r.retire_after.isoformat(),
                }
                for r in self.roots
            ],
            "intermediates": [_pem(c) for c in self.intermediates],
        }
        return json.dumps(doc, indent=2, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> TrustBundle:
        """Parse and validate a KV document written by :meth:`to_json`.

        Args:
            data: the document bytes.

        Returns:
            The bundle.

        Raises:
            TrustBundleError: bad JSON, unknown version, missing or mistyped field, a PEM
                block that is not exactly one certificate, a mismatched id, or a broken
                invariant (see the class docstring).
        """
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TrustBundleError(f"trust bundle is not JSON: {exc}") from None
        except RecursionError:
            raise TrustBundleError("trust bundle is nested too deeply to be one") from None
        if not isinstance(doc, dict) or doc.get("version") != SCHEMA_VERSION:
            raise TrustBundleError(f"trust bundle is not a version {SCHEMA_VERSION} document")
        roots = tuple(_parse_root(r) for r in _field(doc, "roots", list))
        inters = tuple(_parse_cert(p, "intermediates") for p in _field(doc, "intermediates", list))
        return cls(_field(doc, "trust_domain", str), roots, inters)


def _field(doc: Mapping[str, Any], name: str, kind: type) -> Any:
    value = doc.get(name)
    if not isinstance(value, kind):
        raise TrustBundleError(f"trust bundle field {name!r} must be a {kind.__name__}")
    return value


def _parse_root(entry: object) -> BundleRoot:
    if not isinstance(entry, dict):
        raise TrustBundleError("trust bundle 'roots' entries must be objects")
    cert = _parse_cert(_field(entry, "pem", str), "roots")
    try:
        state = RootState(_field(entry, "state", str))
    except ValueError:
        raise TrustBundleError(f"unknown root state {entry.get('state')!r}") from None
    if entry.get("id") != fingerprint(cert):
        raise TrustBundleError(f"root id {entry.get('id')!r} is not its certificate's SHA-256")
    raw = entry.get("retire_after")
    retire_after = None
    if raw is not None:
        try:
            retire_after = dt.datetime.fromisoformat(_field(entry, "retire_after", str))
        except ValueError:
            raise TrustBundleError(f"root retire_after {raw!r} is not ISO 8601") from None
        if retire_after.tzinfo is None:
            raise TrustBundleError(f"root retire_after {raw!r} has no time zone")
    return BundleRoot(cert, state, retire_after)


def _parse_cert(pem: object, where: str) -> x509.Certificate:
    if not isinstance(pem, str):
        raise TrustBundleError(f"trust bundle {where!r} entries must be PEM strings")
    blocks = _PEM_BLOCK.findall(pem.encode("utf-8"))
    if blocks != [b"CERTIFICATE"]:
        raise TrustBundleError(f"trust bundle {where!r} entry must be exactly one certificate")
    try:
        return x509.load_pem_x509_certificate(pem.encode("utf-8"))
    except ValueError as exc:
        raise TrustBundleError(
            f"trust bundle {where!r} entry is not a certificate: {exc}"
        ) from None


def is_ca(cert: x509.Certificate) -> bool:
    """Whether *cert* has basicConstraints CA:true."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
