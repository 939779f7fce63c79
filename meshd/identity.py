"""SPIFFE identities in Consul's spelling, with exactly one way to write each.

A service identity is ``spiffe://<trust-domain>/ns/default/dc/<dc>/svc/<service>``, the form
Consul Connect writes. Parsing is deliberately strict and does not go through
:mod:`urllib.parse`, which accepts (and silently normalises) upper-case schemes, ports,
userinfo, percent-encoding and dot segments. Two spellings of one identity would let an
intention written for one slip past a check made on the other, so anything that is not the
canonical spelling is refused, and ``parse_spiffe_id(x.uri) == x`` for every valid ``x``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshd.errors import MeshdError

SCHEME = "spiffe://"
NAMESPACE = "default"
MAX_URI_LENGTH = 2048  # the SPIFFE ID specification's limit
MAX_DNS_NAME_LENGTH = 253

# ASCII only: ``[a-z0-9]`` never matches non-ASCII letters or digits, unlike ``\w`` or ``\d``.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class IdentityError(MeshdError):
    """A SPIFFE ID, trust domain, datacenter or service name is not in canonical form."""


def is_label(value: str) -> bool:
    """Whether *value* is a lower-case DNS label, the form of every service name."""
    return _LABEL.fullmatch(value) is not None


def check_label(value: str, what: str) -> str:
    """Validate a lower-case DNS label (a service or datacenter name).

    Args:
        value: the candidate label.
        what: what the value is, for the error message ("service", "datacenter").

    Returns:
        *value*, unchanged.

    Raises:
        IdentityError: the value is not 1-63 characters of ``a-z``, ``0-9`` and inner ``-``.
    """
    if not is_label(value):
        raise IdentityError(
            f"{what} {value!r} is not a DNS label: use 1-63 characters a-z, 0-9 and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def check_trust_domain(value: str) -> str:
    """Validate a trust domain: a lower-case DNS name such as Consul's ``<uuid>.consul``.

    Args:
        value: the candidate trust domain.

    Returns:
        *value*, unchanged.

    Raises:
        IdentityError: empty, too long, a trailing dot, or a label that is not a DNS label.
    """
    if not value or len(value) > MAX_DNS_NAME_LENGTH:
        raise IdentityError(f"trust domain {value!r} must be 1-{MAX_DNS_NAME_LENGTH} characters")
    for label in value.split("."):
        if not _LABEL.fullmatch(label):
            raise IdentityError(
                f"trust domain {value!r} is not a lower-case DNS name (bad label {label!r})"
            )
    return value


@dataclass(frozen=True)
class SpiffeId:
    """The identity of one service in one datacenter of a trust domain.

    Construction validates every part, so any ``SpiffeId`` in hand is canonical.
    """

    trust_domain: str
    datacenter: str
    service: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        check_label(self.datacenter, "datacenter")
        check_label(self.service, "service")

    @property
    def uri(self) -> str:
        """The canonical URI, as it appears in the certificate's URI SAN."""
        return (
            f"{SCHEME}{self.trust_domain}/ns/{NAMESPACE}"
            f"/dc/{self.datacenter}/svc/{self.service}"
        )

    def __str__(self) -> str:
        return self.uri


def trust_domain_uri(trust_domain: str) -> str:
    """The SPIFFE ID of a trust domain itself (``spiffe://<td>``), as CA certificates carry."""
    return SCHEME + check_trust_domain(trust_domain)


def parse_spiffe_id(uri: str) -> SpiffeId:
    """Parse a service SPIFFE ID written exactly as :attr:`SpiffeId.uri` writes it.

    Args:
        uri: the candidate, e.g. from a certificate's URI SAN.

    Returns:
        The identity.

    Raises:
        IdentityError: naming what is wrong: scheme, length, a port, userinfo, query,
            fragment, percent-encoding, empty or dot segments, the path shape, the
            namespace, or an invalid trust domain, datacenter or service.
    """
    if len(uri) > MAX_URI_LENGTH:
        raise IdentityError(f"SPIFFE ID is longer than {MAX_URI_LENGTH} characters")
    if not uri.startswith(SCHEME):
        raise IdentityError(f"{uri!r} is not a SPIFFE ID: it must start with {SCHEME!r}")
    rest = uri[len(SCHEME) :]
    for char, what in (("?", "a query"), ("#", "a fragment"), ("%", "percent-encoding")):
        if char in rest:
            raise IdentityError(f"SPIFFE ID {uri!r} must not contain {what}")
    authority, _, path = rest.partition("/")
    if "@" in authority:
        raise IdentityError(f"SPIFFE ID {uri!r} must not contain userinfo")
    if ":" in authority:
        raise IdentityError(f"SPIFFE ID {uri!r} must not contain a port")
    check_trust_domain(authority)
    segments = path.split("/")
    if any(seg in ("", ".", "..") for seg in segments):
        raise IdentityError(f"SPIFFE ID {uri!r} has an empty or dot path segment")
    if len(segments) != 6 or segments[0::2] != ["ns", "dc", "svc"]:
        raise IdentityError(
            f"SPIFFE ID {uri!r} is not a service identity of the form "
            f"{SCHEME}<trust-domain>/ns/{NAMESPACE}/dc/<dc>/svc/<service>"
        )
    if segments[1] != NAMESPACE:
        raise IdentityError(f"SPIFFE ID {uri!r} names namespace {segments[1]!r}, not {NAMESPACE!r}")
    return SpiffeId(trust_domain=authority, datacenter=segments[3], service=segments[5])
