"""The meshd signing API's wire contract, shared by the server and the agent: pure values.

``POST /v1/sign`` takes ``{"csr": "<PEM>", "service": "<name>", "host": "<node>"}`` (and an
optional numeric ``"ttl_s"``, accepted so old or curious clients are not refused, and
ignored: the CA alone chooses lifetimes). First issuance carries ``Authorization: Bearer
<token>``; renewal carries no token and is authorised by the client certificate of the TLS
connection. The answer is ``{"chain": "<PEM leaf + intermediates>", "not_after": <unix>}``.
Every error is one line of JSON, ``{"error": "<reason>"}``, with the status saying its kind:
400 malformed, 401 unauthenticated, 403 refused, 413 too large, 429 rate limited.

Parsing is strict: the body is a JSON object of bounded size with exactly these keys and
types; anything else is a 400 before any authorisation work is done.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from meshd.errors import MeshdError

SIGN_PATH = "/v1/sign"
BUNDLE_PATH = "/v1/bundle"
HEALTH_PATH = "/v1/health"
MAX_BODY_BYTES = 16 * 1024
MAX_CSR_BYTES = 8 * 1024
MAX_NAME_CHARS = 128
_REQUIRED = {"csr", "service", "host"}
_OPTIONAL = {"ttl_s"}


class ApiError(MeshdError):
    """A request refused with an HTTP status; the message is safe to log and to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> bytes:
        """The one-line JSON error document."""
        return error_body(self.message)


def error_body(message: str) -> bytes:
    """``{"error": message}`` on one line, newline-terminated."""
    return json.dumps({"error": " ".join(message.split())}).encode() + b"\n"


@dataclass(frozen=True)
class SignRequest:
    """A signing request; ``ttl_s`` is what the caller asked for (always ignored)."""

    csr_pem: bytes
    service: str
    host: str
    ttl_s: float | None = None

    def to_json(self) -> bytes:
        """Serialise as the request body."""
        doc: dict[str, Any] = {
            "csr": self.csr_pem.decode("ascii"),
            "service": self.service,
            "host": self.host,
        }
        if self.ttl_s is not None:
            doc["ttl_s"] = self.ttl_s
        return json.dumps(doc).encode()


def parse_sign_request(body: bytes) -> SignRequest:
    """Parse a ``POST /v1/sign`` body.

    Args:
        body: the raw body.

    Returns:
        The request (names are not yet checked as identities; the server does that).

    Raises:
        ApiError: 413 if too large; 400 if not a JSON object with exactly ``csr``,
            ``service``, ``host`` (strings of bounded length) and optionally ``ttl_s``.
    """
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ApiError(400, "request body is not UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "request body must be a JSON object")
    keys = set(doc)
    if not keys >= _REQUIRED or not keys <= _REQUIRED | _OPTIONAL:
        raise ApiError(400, "request body must have exactly the keys csr, service, host")
    csr, service, host = doc["csr"], doc["service"], doc["host"]
    if not all(isinstance(v, str) for v in (csr, service, host)):
        raise ApiError(400, "csr, service and host must be strings")
    if len(csr) > MAX_CSR_BYTES or not csr.isascii():
        raise ApiError(400, f"csr must be ASCII PEM of at most {MAX_CSR_BYTES} bytes")
    if not 0 < len(service) <= MAX_NAME_CHARS or not 0 < len(host) <= MAX_NAME_CHARS:
        raise ApiError(400, f"service and host must be 1-{MAX_NAME_CHARS} characters")
    ttl = doc.get("ttl_s")
    if ttl is not None and (
        isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl)
    ):
        raise ApiError(400, "ttl_s must be a number")
    return SignRequest(csr.encode("ascii"), service, host, None if ttl is None else float(ttl))


@dataclass(frozen=True)
class SignResponse:
    """A signed chain: the leaf first, then the intermediates a peer needs."""

    chain_pem: bytes
    not_after: float

    def to_json(self) -> bytes:
        """Serialise as the response body."""
        return json.dumps(
            {"chain": self.chain_pem.decode("ascii"), "not_after": self.not_after}
        ).encode()

    @classmethod
    def from_json(cls, body: bytes) -> SignResponse:
        """Parse a response body.

        Raises:
            ApiError: status 502 when the body is not a well-formed answer.
        """
        malformed = ApiError(502, "meshd answered with a malformed signing response")
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise malformed from None
        chain = doc.get("chain") if isinstance(doc, dict) else None
        not_after = doc.get("not_after") if isinstance(doc, dict) else None
        if not isinstance(chain, str) or not chain.isascii():
            raise malformed
        if isinstance(not_after, bool) or not isinstance(not_after, int | float):
            raise malformed
        return cls(chain.encode("ascii"), float(not_after))


def parse_error(body: bytes) -> str:
    """The reason in an error body, or a placeholder when it is not one."""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return " ".join(doc["error"].split())[:300]
    except (ValueError, RecursionError):
        pass
    return "no reason given"
