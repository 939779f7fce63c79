"""Bootstrap tokens: what entitles a host to the first certificate of each of its services.

A token is ``mtk_<id>.<secret>``. The id is public (it names the record, shows in
``meshctl token list`` and in logs); the secret is 32 random bytes that only the host's
0600 token file holds. Consul KV stores, under ``meshd/tokens/<id>``, a :class:`TokenRecord`
with a salted SHA-256 of the secret, never the secret itself: with 256 bits of entropy a
slow hash buys nothing, and the per-token salt keeps two records from ever being compared.

Every token is scoped to one host and a set of services, expires, can be revoked, and is
good for one key per service: the server marks a service consumed, with the fingerprint of
the key it certified, in a check-and-set write before it hands the certificate out, so a
replayed (or raced) token is refused. Only the same requester may come back: a CSR for
the *same* key (its signature proves the caller holds the private key, which never leaves
the host) is signed again while the token is valid, because the first answer may never have
reached the host (a timeout, a reset, a restart before the chain was saved). A stolen token
alone gains nothing from this: it also needs the host's private key. A record without a
fingerprint for a consumed service (written before fingerprints were kept) allows no retry
for it. Everything here is pure; the server does the KV reads and writes.

Service ``meshd`` is reserved: it is the control plane's own identity, which agents trust
as the CA (they send it their tokens) and find in Consul under that name. The servers
sign their own certificate through the signing authority directly, so no token ever needs
it, and a record naming it is invalid wherever it comes from.

A token lives at most :data:`MAX_TTL_S` (7 days): it is for a host's first contact, not a
standing credential, and its times must be finite (JSON has no infinity).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshd.errors import MeshdError
from meshd.identity import check_label
from meshd.registry import SERVER_SERVICE

TOKEN_PREFIX = "mtk_"  # noqa: S105 - a format marker, not a secret
KV_PREFIX = "meshd/"  # the default [consul] kv_prefix; records live under <prefix>tokens/
RECORD_VERSION = 1
ID_BYTES = 8
SECRET_BYTES = 32
SALT_BYTES = 16
MAX_TTL_S = 7 * 86400.0  # the longest a bootstrap token lives
RESERVED_SERVICES = frozenset({SERVER_SERVICE})  # identities no token may grant
# created + ttl is rounded to a float, so a record at exactly MAX_TTL_S may read a hair over.
_LIFETIME_SLACK_S = 1.0
_TOKEN = re.compile(r"mtk_([a-f0-9]{16})\.([A-Za-z0-9_-]{43})")
_ID = re.compile(r"[a-f0-9]{16}")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


class TokenError(MeshdError):
    """A token or token record is malformed (the message never contains the secret)."""


@dataclass(frozen=True)
class BootstrapToken:
    """A token as the operator hands it to a host. ``str``/``repr`` never show the secret."""

    token_id: str
    secret: str = field(repr=False)

    def reveal(self) -> str:
        """The full ``mtk_<id>.<secret>``: only to write the token file or print it once."""
        return f"{TOKEN_PREFIX}{self.token_id}.{self.secret}"

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}{self.token_id}.<redacted>"


def parse_token(text: str) -> BootstrapToken:
    """Parse a token as read from a token file (surrounding whitespace ignored).

    Raises:
        TokenError: not of the form ``mtk_<16 hex>.<43 url-safe base64>``.
    """
    match = _TOKEN.fullmatch(text.strip())
    if match is None:
        raise TokenError("bootstrap token is malformed: expected mtk_<id>.<secret>")
    return BootstrapToken(token_id=match.group(1), secret=match.group(2))


def token_key(token_id: str, kv_prefix: str = KV_PREFIX) -> str:
    """The Consul KV key of a token record: ``<kv_prefix>tokens/<id>``.

    Raises:
        TokenError: the id is not 16 lower-case hex digits (so it cannot escape the folder).
    """
    if not _ID.fullmatch(token_id):
        raise TokenError(f"token id {token_id!r} is not 16 lower-case hex digits")
    return f"{tokens_folder(kv_prefix)}{token_id}"


def tokens_folder(kv_prefix: str = KV_PREFIX) -> str:
    """The KV folder holding every token record."""
    return f"{kv_prefix.rstrip('/')}/tokens/"


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("ascii")).digest()


def _reserved(services: frozenset[str]) -> str | None:
    """Why *services* may not be in a token (one is reserved), or None."""
    if reserved := sorted(services & RESERVED_SERVICES):
        return (
            f"service {reserved[0]!r} is reserved for the control plane: agents trust it as"
            " the CA, and meshd servers sign their own certificate"
        )
    return None


def key_fingerprint(public_key: CertificatePublicKeyTypes) -> str:
    """The SHA-256 of a public key's DER SubjectPublicKeyInfo, lower-case hex.

    This is what a token record keeps of the key each service was issued to.
    """
    der = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    """What Consul KV stores about a token: scope, validity and a salted hash of the secret.

    Attributes:
        token_id: the public id.
        host: the node name the token is for.
        services: the services it may obtain a first certificate for.
        created: Unix time of creation.
        expires: Unix time after which it is refused.
        salt: per-token random salt.
        digest: SHA-256(salt + secret).
        consumed: services already issued with this token (each for one key).
        revoked: set by ``meshctl token revoke``.
        consumed_keys: ``(service, key fingerprint)`` pairs, sorted: the key each consumed
            service was issued to (:func:`key_fingerprint`); a retry with that key is
            signed again. A consumed service without one allows no retry.
    """

    token_id: str
    host: str
    services: frozenset[str]
    created: float
    expires: float
    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)
    consumed: frozenset[str] = frozenset()
    revoked: bool = False
    consumed_keys: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        token_key(self.token_id)
        if not _HOST.fullmatch(self.host):
            raise TokenError(f"token {self.token_id}: host {self.host!r} is not a node name")
        if not self.services:
            raise TokenError(f"token {self.token_id}: names no service")
        for service in self.services | self.consumed:
            check_label(service, "service")
        if why := _reserved(self.services):
            raise TokenError(f"token {self.token_id}: {why}")
        if not self.consumed <= self.services:
            raise TokenError(f"token {self.token_id}: consumed services outside its scope")
        self._check_consumed_keys()
        if not (math.isfinite(self.created) and math.isfinite(self.expires)):
            raise TokenError(f"token {self.token_id}: created and expires must be finite times")
        if not self.expires > self.created:
            raise TokenError(f"token {self.token_id}: expires before it is created")
        if self.expires - self.created > MAX_TTL_S + _LIFETIME_SLACK_S:
            raise TokenError(f"token {self.token_id}: lives longer than {MAX_TTL_S / 86400:g} days")

    def _check_consumed_keys(self) -> None:
        services = [service for service, _ in self.consumed_keys]
        if services != sorted(set(services)) or not set(services) <= self.consumed:
            raise TokenError(f"token {self.token_id}: consumed_keys must name consumed services")
        if not all(_FINGERPRINT.fullmatch(fp) for _, fp in self.consumed_keys):
            raise TokenError(f"token {self.token_id}: a consumed key is not a SHA-256 hex digest")

    def key_for(self, service: str) -> str | None:
        """The fingerprint of the key *service* was issued to, or None (not consumed, or
        consumed before fingerprints were kept)."""
        return dict(self.consumed_keys).get(service)

    def matches(self, secret: str) -> bool:
        """Whether *secret* is this token's secret (constant-time comparison)."""
        return hmac.compare_digest(_digest(self.salt, secret), self.digest)

    def consume(self, service: str, key: str) -> TokenRecord:
        """The record after issuing *service* to the key with fingerprint *key*.

        Consuming a service again for the key it was issued to changes nothing.
        """
        keys = dict(self.consumed_keys) | {service: key}
        return replace(
            self, consumed=self.consumed | {service}, consumed_keys=tuple(sorted(keys.items()))
        )

    def revoke(self) -> TokenRecord:
        """The record after revocation."""
        return replace(self, revoked=True)

    def to_json(self) -> bytes:
        """Serialise for Consul KV (versioned; contains the hash, never the secret)."""
        doc: dict[str, Any] = {
            "version": RECORD_VERSION,
            "id": self.token_id,
            "host": self.host,
            "services": sorted(self.services),
            "created": self.created,
            "expires": self.expires,
            "salt": self.salt.hex(),
            "sha256": self.digest.hex(),
            "consumed": sorted(self.consumed),
            "consumed_keys": dict(self.consumed_keys),
            "revoked": self.revoked,
        }
        # allow_nan=False: never write Infinity or NaN, which are not JSON.
        return json.dumps(doc, sort_keys=True, allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> TokenRecord:
        """Parse a record written by :meth:`to_json`.

        Raises:
            TokenError: not JSON, an unknown version, or a field of the wrong shape.
        """
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("version") != RECORD_VERSION:
                raise TokenError(f"token record: expected version {RECORD_VERSION}")
            return cls(
                token_id=_typed(doc, "id", str),
                host=_typed(doc, "host", str),
                services=frozenset(_strings(doc, "services")),
                created=float(_typed(doc, "created", (int, float))),
                expires=float(_typed(doc, "expires", (int, float))),
                salt=bytes.fromhex(_typed(doc, "salt", str)),
                digest=bytes.fromhex(_typed(doc, "sha256", str)),
                consumed=frozenset(_strings(doc, "consumed")),
                revoked=_typed(doc, "revoked", bool),
                consumed_keys=_consumed_keys(doc),
            )
        except (ValueError, MeshdError) as exc:
            raise TokenError(f"token record is invalid: {exc}") from exc
        except RecursionError:
            raise TokenError("token record is invalid: nested too deeply") from None


def _typed(doc: dict[str, Any], name: str, kind: Any) -> Any:
    value = doc.get(name)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise TokenError(f"token record: field {name!r} has the wrong type")
    return value


def _strings(doc: dict[str, Any], name: str) -> list[str]:
    value = _typed(doc, name, list)
    if not all(isinstance(item, str) for item in value):
        raise TokenError(f"token record: field {name!r} must be a list of strings")
    return list(value)


def _consumed_keys(doc: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    # Optional: records written before fingerprints were kept have none (no retry).
    value = doc.get("consumed_keys", {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise TokenError("token record: field 'consumed_keys' must map services to strings")
    return tuple(sorted(value.items()))


def new_token(
    *, host: str, services: Iterable[str], now: float, ttl_s: float
) -> tuple[BootstrapToken, TokenRecord]:
    """Create a token and the record to store for it.

    Args:
        host: the node name the token is for.
        services: the services it may obtain a first certificate for (at least one).
        now: Unix time of creation.
        ttl_s: seconds until it expires (> 0, at most :data:`MAX_TTL_S`).

    Returns:
        ``(token, record)``: show the token once, store the record.

    Raises:
        TokenError: bad host, no, bad or reserved services, a TTL not above 0 or above
            :data:`MAX_TTL_S`.
    """
    check_ttl(ttl_s)
    services = frozenset(services)
    if why := _reserved(services):
        raise TokenError(why)  # before a token id exists to name
    token = BootstrapToken(
        token_id=secrets.token_hex(ID_BYTES), secret=secrets.token_urlsafe(SECRET_BYTES)
    )
    salt = secrets.token_bytes(SALT_BYTES)
    record = TokenRecord(
        token_id=token.token_id,
        host=host,
        services=services,
        created=now,
        expires=now + ttl_s,
        salt=salt,
        digest=_digest(salt, token.secret),
    )
    return token, record


def check_ttl(ttl_s: float) -> None:
    """Refuse a token lifetime that is not above 0 and at most :data:`MAX_TTL_S`.

    Raises:
        TokenError: saying which bound it misses.
    """
    if not ttl_s > 0:
        raise TokenError(f"token TTL must be more than 0 seconds, got {ttl_s!r}")
    if not ttl_s <= MAX_TTL_S:
        raise TokenError(
            f"token TTL must be at most {MAX_TTL_S / 86400:g} days ({MAX_TTL_S:g} s), got"
            f" {ttl_s:g} s: a bootstrap token is for a host's first contact"
        )


@dataclass(frozen=True)
class TokenDecision:
    """The outcome of :func:`authorize_csr_by_token`; ``reason`` is safe to log and answer.

    ``retry`` is True when the service was already issued to the presented key: the
    same requester asks again, and is signed again.
    """

    allowed: bool
    reason: str
    retry: bool = False


def authorize_csr_by_token(
    record: TokenRecord,
    presented_secret: str,
    host: str,
    service: str,
    now: float,
    *,
    key: str | None = None,
) -> TokenDecision:
    """Decide whether a token entitles *host* to a first certificate for *service*.

    Args:
        record: the stored record for the presented token's id.
        presented_secret: the secret part the caller sent.
        host: the host the caller claims to be.
        service: the service the CSR is for.
        now: Unix time of the decision.
        key: the fingerprint (:func:`key_fingerprint`) of the CSR's public key, or None
            when it cannot be read. The caller must still check that the CSR's signature
            verifies (proof of possession) before it signs.

    Returns:
        Allowed, or refused with the first reason that applies (bad secret, revoked,
        expired, wrong host, service out of scope, already consumed for the service with
        another key or with no key recorded). Allowed with ``retry`` when the service was
        consumed for this very key.
    """
    recorded = record.key_for(service)
    retry = service in record.consumed and key is not None and recorded == key
    checks = (
        (not record.matches(presented_secret), "token secret does not match"),
        (record.revoked, f"token {record.token_id} is revoked"),
        (now >= record.expires, f"token {record.token_id} has expired"),
        (now < record.created, f"token {record.token_id} is not valid yet"),
        (host != record.host, f"token {record.token_id} is not for host {host!r}"),
        (
            service not in record.services,
            f"token {record.token_id} does not cover service {service!r}",
        ),
        (
            service in record.consumed and not retry,
            f"token {record.token_id} was already used for service {service!r}"
            + (" with another key" if recorded is not None else ""),
        ),
    )
    for failed, reason in checks:
        if failed:
            return TokenDecision(allowed=False, reason=reason)
    if retry:
        return TokenDecision(
            allowed=True,
            reason=f"token {record.token_id} re-issues {host}/{service} for the same key",
            retry=True,
        )
    return TokenDecision(allowed=True, reason=f"token {record.token_id} entitles {host}/{service}")
