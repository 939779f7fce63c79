"""What the proxies need from one snapshot, compiled once per snapshot version.

A :class:`DataPlaneView` joins the snapshot with its parsed parts: the mesh config, the
compiled intentions policy and the trust bundle. Every parse failure fails closed here, once,
and is kept as a reason string for logs and the admin endpoint:

- an invalid mesh config document → the fail-closed settings (strict mTLS, default deny,
  registry-only outbound);
- an invalid intentions document → that destination denies (see :mod:`meshd.intentions`);
- a missing or invalid trust bundle → no peer can be verified, so every mTLS connection is
  refused.

This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from meshd.intentions import Decision, Policy, authorize, compile_policy, documents_from_raw
from meshd.meshconfig import MeshConfig, load_mesh_config, mesh_config_key
from meshd.snapshot import LocalService, Snapshot
from meshd.trustbundle import TrustBundle, TrustBundleError

DEFAULT_PREFIX = "meshd/"


@dataclass(frozen=True)
class DataPlaneView:
    """One snapshot, parsed and compiled for the proxies.

    Attributes:
        snapshot: the snapshot this view was built from.
        mesh: the mesh settings in force (fail-closed settings if the document is invalid).
        mesh_error: why the mesh config document was rejected, if it was.
        policy: the compiled intentions.
        bundle: the trust bundle, or None when absent or invalid (then nothing verifies).
        bundle_error: why there is no usable bundle, if there is none.
    """

    snapshot: Snapshot
    mesh: MeshConfig
    mesh_error: str | None
    policy: Policy
    bundle: TrustBundle | None
    bundle_error: str | None

    @property
    def version(self) -> int:
        """The snapshot version this view belongs to."""
        return self.snapshot.version

    def authorize(self, source: str | None, destination: str) -> Decision:
        """The intentions decision for *source* (None: anonymous) calling *destination*."""
        return authorize(self.policy, source, destination)

    @functools.cached_property
    def identifies_by_user(self) -> bool:
        """Whether a local service names its user (``[service] user``): outbound identity
        then follows the user that opened the connection (:meth:`source_identity`). Asked
        on every new outbound connection, so worked out once per view."""
        return any(s.uid is not None for s in self.snapshot.local_services)

    def source_identity(self, destination: str, owner: int | None = None) -> LocalService | str:
        """The local service whose identity an outbound connection to *destination* uses,
        or why there is none (docs/adr/006).

        Without users named, the proxy cannot tell which local process dialled, so the
        identity must be unambiguous: the only local service, or else the only one that
        declares *destination* among its upstreams. When services name their users
        (:attr:`identifies_by_user`), *owner* (the uid that opened the connection) chooses
        among the services of that user only, by the same rule; a connection of a user no
        service names gets no identity. Anything else is refused rather than guessed,
        because a guess could borrow another service's permissions.

        Args:
            destination: the service the connection is for.
            owner: the uid of the application's socket; required when
                :attr:`identifies_by_user`.
        """
        services = self.snapshot.local_services
        if self.identifies_by_user:
            if owner is None:
                return "the owner of the connection is not known"
            services = tuple(s for s in services if s.uid == owner)
            if not services:
                return f"no local service runs as uid {owner} ([service] user)"
        if len(services) == 1:
            return services[0]
        declaring = [s for s in services if destination in s.upstreams]
        if len(declaring) == 1:
            return declaring[0]
        among = "" if owner is None else f" of uid {owner}"
        which = ", ".join(s.name for s in declaring or services)
        how = "several declare" if declaring else "none declares"
        return (
            f"no unambiguous local identity: of the local services{among} ({which}), {how}"
            f" {destination} as an upstream"
        )


def build_view(
    snapshot: Snapshot, *, prefix: str = DEFAULT_PREFIX, previous: DataPlaneView | None = None
) -> DataPlaneView:
    """Parse and compile *snapshot* for the proxies (see the module note on failures).

    Args:
        snapshot: the published snapshot.
        prefix: the KV prefix, only to name keys in error reasons.
        previous: the view of the snapshot before; its trust bundle object is kept when the
            bundle's bytes did not change. TLS contexts, and with them warm connections and
            session tickets, are keyed by that object: a new one for every snapshot (any
            endpoint or health change) threw them all away.

    Returns:
        The view.
    """
    loaded = load_mesh_config(mesh_config_key(prefix), snapshot.mesh_config_raw)
    documents = documents_from_raw(snapshot.intentions_raw, prefix)
    policy = compile_policy(documents, default_action=loaded.config.default_action)
    bundle: TrustBundle | None = None
    bundle_error: str | None = None
    if previous is not None and previous.snapshot.trust_bundle_raw == snapshot.trust_bundle_raw:
        bundle, bundle_error = previous.bundle, previous.bundle_error
    elif snapshot.trust_bundle_raw is None:
        bundle_error = "no trust bundle in Consul KV (run 'meshctl ca init')"
    else:
        try:
            bundle = TrustBundle.from_json(snapshot.trust_bundle_raw)
        except TrustBundleError as exc:
            bundle_error = str(exc)
    return DataPlaneView(
        snapshot=snapshot,
        mesh=loaded.config,
        mesh_error=None if loaded.error is None else str(loaded.error),
        policy=policy,
        bundle=bundle,
        bundle_error=bundle_error,
    )


class ViewCache:
    """Rebuilds the view only when the snapshot version changes."""

    def __init__(self, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._prefix = prefix
        self._view: DataPlaneView | None = None

    def view_for(self, snapshot: Snapshot) -> DataPlaneView:
        """The view of *snapshot* (cached by version)."""
        if self._view is None or self._view.snapshot is not snapshot:
            self._view = build_view(snapshot, prefix=self._prefix, previous=self._view)
        return self._view
