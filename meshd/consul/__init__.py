"""The single seam between meshd and Consul.

Everything that talks to Consul goes through :func:`open_consul` / :class:`ConsulClient`,
raises only :class:`ConsulError` subclasses, and watches with :class:`Watch`. See
``docs/consul.md`` for the design.
"""

from meshd.consul.client import ConsulClient, open_consul
from meshd.consul.errors import (
    ConsulACLDenied,
    ConsulBadResponse,
    ConsulError,
    ConsulNotFound,
    ConsulRequestRejected,
    ConsulSettingsError,
    ConsulTimeout,
    ConsulUnreachable,
)
from meshd.consul.model import (
    CatalogNode,
    CatalogNodeService,
    CheckDefinition,
    KVEntry,
    ServiceInstance,
    ServiceRegistration,
)
from meshd.consul.plan import Backoff, WatchStatistics
from meshd.consul.settings import ConsulSettings
from meshd.consul.watch import Watch

__all__ = [
    "Backoff",
    "CatalogNode",
    "CatalogNodeService",
    "CheckDefinition",
    "ConsulACLDenied",
    "ConsulBadResponse",
    "ConsulClient",
    "ConsulError",
    "ConsulNotFound",
    "ConsulRequestRejected",
    "ConsulSettings",
    "ConsulSettingsError",
    "ConsulTimeout",
    "ConsulUnreachable",
    "KVEntry",
    "ServiceInstance",
    "ServiceRegistration",
    "Watch",
    "WatchStatistics",
    "open_consul",
]
