"""The exception family of the Consul boundary.

Every failure talking to Consul surfaces as a :class:`ConsulError`. The message always names
the Consul address, the request (method and path, so the KV key or service) and the cause,
and never a token: it is printed to operators as-is by :func:`meshd.console.run_cli`.
"""

from __future__ import annotations

from meshd.errors import MeshdError


class ConsulError(MeshdError):
    """Base class: talking to Consul failed."""


class ConsulSettingsError(ConsulError):
    """The Consul connection settings (environment variables or arguments) are invalid."""


class ConsulUnreachable(ConsulError):
    """No HTTP answer: connection refused or reset, DNS or TLS failure."""


class ConsulTimeout(ConsulError):
    """Consul did not answer within the request deadline."""


class ConsulBadResponse(ConsulError):
    """Consul answered, but with something we cannot use (bad JSON, missing index, shape)."""


class ConsulRequestRejected(ConsulError):
    """Consul answered with an HTTP error status.

    Attributes:
        status: the HTTP status code Consul answered with.
    """

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class ConsulACLDenied(ConsulRequestRejected):
    """The ACL token is missing, unknown or lacks the permission (401/403)."""


class ConsulNotFound(ConsulRequestRejected):
    """The object does not exist where the call requires it (e.g. an expired session)."""
