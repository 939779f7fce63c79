"""The sans-IO reducer: watch results in, complete versioned snapshots out.

Design note. The agent's watches (endpoints of each upstream, mesh config, trust bundle,
intentions) and its local service list each produce events; :meth:`Reducer.apply` folds
them into mutable state, synchronously and without I/O. The driver asks :meth:`ready`,
then :meth:`build` when it wants to publish; ``build`` returns the previous snapshot
unchanged when nothing changed, so versions only move on real change.

The set of upstreams to watch (:meth:`Reducer.watch_set`) is bounded by what this host's
applications call: declared upstreams of local services, destinations of intentions that
name a local service as a source, and services the outbound proxy asked for on demand
(capped, least recently requested evicted). See docs/adr/004-bounded-upstream-set.md.

Hold last good: when a watch reports zero passing endpoints for a service that had some,
the last good set is kept for ``hold_grace_s`` before the empty set is published, so a
Consul hiccup that marks everything critical does not black-hole traffic.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from meshd.snapshot.model import Endpoint, LocalService, Snapshot, UpstreamSet, make_snapshot

#: Service names we will watch: what Consul's DNS interface accepts, nothing that could
#: change the meaning of a request path. Anything else from KV or the proxy is ignored.
SERVICE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?")

#: The inputs besides upstream endpoints; all must deliver once before the first snapshot.
FIXED_INPUTS = frozenset({"mesh_config", "trust_bundle", "intentions"})
#: Every watched upstream holds one HTTP connection to the local Consul agent, which allows
#: 200 per client by default (``limits.http_max_conns_per_client``), and a restarted agent's
#: old connections count for up to about a minute: 80 leaves room for both lives plus the
#: agent's other requests. Raise Consul's limit before raising this.
DEFAULT_MAX_WATCHED = 80


@dataclass(frozen=True)
class EndpointsChanged:
    """A watch delivered the passing instances of ``service`` at Consul ``index``."""

    service: str
    endpoints: tuple[Endpoint, ...]
    index: int = 0


@dataclass(frozen=True)
class MeshConfigChanged:
    """The mesh config KV document changed (None: the key does not exist)."""

    raw: bytes | None


@dataclass(frozen=True)
class BundleChanged:
    """The trust bundle KV document changed (None: the key does not exist)."""

    raw: bytes | None


@dataclass(frozen=True)
class IntentionsChanged:
    """The intentions documents changed: destination service name to raw document."""

    documents: Mapping[str, bytes] = field(hash=False)


@dataclass(frozen=True)
class LocalServicesChanged:
    """The local service definitions changed (a file in ``services.d/`` came or went)."""

    services: tuple[LocalService, ...]


@dataclass(frozen=True)
class UpstreamRequested:
    """The outbound proxy needs ``service`` (a destination it could not map yet)."""

    service: str


Event = (
    EndpointsChanged
    | MeshConfigChanged
    | BundleChanged
    | IntentionsChanged
    | LocalServicesChanged
    | UpstreamRequested
)


@dataclass(frozen=True)
class ReducerStatistics:
    """What the reducer holds, for the admin endpoint and metrics."""

    version: int
    ready: bool
    events_applied: int
    watched: frozenset[str]
    delivered: frozenset[str]
    held: frozenset[str]
    discovered: tuple[str, ...]
    unwatched: frozenset[str] = frozenset()


class IncompleteSnapshot(RuntimeError):
    """:meth:`Reducer.build` was called before every required input delivered."""


def intention_upstreams(documents: Mapping[str, bytes], local_names: frozenset[str]) -> set[str]:
    """Destinations whose intentions name a local service as a source that may be allowed.

    A source entry counts when its ``Name`` is exactly a local service and it is not a plain
    ``deny`` (an ``allow`` or an L7 ``Permissions`` list). Wildcard sources do not count:
    they would pull in every destination with a ``*`` rule. Undecodable documents count for
    nothing; they can only narrow what is watched, never widen it.
    """
    upstreams: set[str] = set()
    for destination, raw in documents.items():
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            continue
        sources = doc.get("Sources") if isinstance(doc, dict) else None
        if not isinstance(sources, list):
            continue
        for source in sources:
            if not isinstance(source, dict) or source.get("Name") not in local_names:
                continue
            if source.get("Action") != "deny" or source.get("Permissions"):
                upstreams.add(destination)
    return upstreams


def valid_names(names: Iterable[str]) -> frozenset[str]:
    """The names that match :data:`SERVICE_NAME` (the others can never be watched)."""
    return frozenset(n for n in names if SERVICE_NAME.fullmatch(n))


class Reducer:
    """Fold watch events into snapshots. Not thread-safe; one driver task owns it."""

    def __init__(
        self,
        *,
        local_services: tuple[LocalService, ...] = (),
        hold_grace_s: float = 30.0,
        max_discovered: int = 64,
        max_watched: int = DEFAULT_MAX_WATCHED,
        required: frozenset[str] = FIXED_INPUTS,
        previous: Snapshot | None = None,
    ) -> None:
        """Start empty.

        Args:
            local_services: what this host serves (their upstreams are watched).
            hold_grace_s: how long to keep a service's last good endpoints when a watch
                reports none passing.
            max_discovered: cap on services watched because the proxy asked for them.
            max_watched: cap on all watched upstream services (each holds one connection
                to the local Consul agent); see :data:`DEFAULT_MAX_WATCHED`.
            required: which of :data:`FIXED_INPUTS` must deliver before the first snapshot.
            previous: the snapshot already published (e.g. the persisted one): new
                versions continue above it, and a first build with the same content
                returns it unchanged; its endpoint sets count as last good for the hold.
        """
        if not required <= FIXED_INPUTS:
            raise ValueError(f"required inputs {sorted(required - FIXED_INPUTS)} are unknown")
        self._local = tuple(local_services)
        self._grace = hold_grace_s
        self._max_discovered = max_discovered
        self._max_watched = max_watched
        self._unwatched: frozenset[str] = frozenset()
        self._required = required
        self._delivered: set[str] = set()
        self._mesh: bytes | None = None
        self._bundle: bytes | None = None
        self._intentions: dict[str, bytes] = {}
        self._endpoints: dict[str, UpstreamSet] = {}
        self._held_since: dict[str, float] = {}
        self._discovered: dict[str, None] = {}  # insertion order = least recently requested
        self._version = 0 if previous is None else previous.version
        self._last = previous
        self._seed = dict(previous.upstreams) if previous is not None else {}
        self._complete_once = False
        self._events = 0

    def apply(self, event: Event, *, now: float) -> None:
        """Fold one event into the state (*now*: monotonic seconds, for the hold grace)."""
        self._events += 1
        match event:
            case EndpointsChanged():
                self._apply_endpoints(event, now)
            case MeshConfigChanged(raw=raw):
                self._mesh = raw
                self._delivered.add("mesh_config")
            case BundleChanged(raw=raw):
                self._bundle = raw
                self._delivered.add("trust_bundle")
            case IntentionsChanged(documents=documents):
                self._intentions = dict(documents)
                self._delivered.add("intentions")
            case LocalServicesChanged(services=services):
                self._local = tuple(services)
            case UpstreamRequested(service=service) if valid_names([service]):
                self._discovered.pop(service, None)
                self._discovered[service] = None
                while len(self._discovered) > self._max_discovered:
                    del self._discovered[next(iter(self._discovered))]
        self._forget_unwatched()

    def _apply_endpoints(self, event: EndpointsChanged, now: float) -> None:
        if event.service not in self.watch_set():
            return  # a late result from a watch that was just stopped
        new = UpstreamSet(event.service, event.endpoints, event.index)
        # After a restart the persisted snapshot is the last good set we know of.
        old = self._endpoints.get(event.service) or self._seed.pop(event.service, None)
        if not new.endpoints and old is not None and old.endpoints:
            self._endpoints[event.service] = old
            self._held_since.setdefault(event.service, now)
            return
        self._held_since.pop(event.service, None)
        self._endpoints[event.service] = new

    def _forget_unwatched(self) -> None:
        watched = self.watch_set()
        for name in set(self._endpoints) - watched:
            del self._endpoints[name]
            self._held_since.pop(name, None)

    def watch_set(self) -> frozenset[str]:
        """The services whose endpoints must be watched now, at most ``max_watched``.

        Past the cap, declared upstreams come first, then those intentions imply, then the
        most recently requested discoveries; each group in name order, so the choice is
        deterministic. Services left out are reported by :meth:`statistics`.
        """
        names = frozenset(s.name for s in self._local)
        declared = sorted(valid_names(u for s in self._local for u in s.upstreams))
        implied = sorted(valid_names(intention_upstreams(self._intentions, names)))
        discovered = list(reversed(self._discovered))
        ordered = list(dict.fromkeys([*declared, *implied, *discovered]))
        self._unwatched = frozenset(ordered[self._max_watched :])
        return frozenset(ordered[: self._max_watched])

    def _awaited(self) -> frozenset[str]:
        """Watched services that must deliver before the first snapshot (not discoveries)."""
        return self.watch_set() - frozenset(self._discovered)

    def ready(self) -> bool:
        """True once every required input and every declared or intention upstream delivered.

        Services requested on demand never block readiness, and once complete the reducer
        stays ready: a new upstream that has not delivered yet is simply absent.
        """
        if not self._complete_once:
            fixed = self._required <= self._delivered
            self._complete_once = fixed and self._awaited() <= set(self._endpoints)
        return self._complete_once

    def next_deadline(self) -> float | None:
        """When a held endpoint set expires (monotonic seconds), so the driver can rebuild."""
        if not self._held_since:
            return None
        return min(self._held_since.values()) + self._grace

    def build(self, now: float, *, created_at: float | None = None) -> Snapshot:
        """The snapshot of the current state; the previous one if its content is the same.

        Args:
            now: monotonic seconds (expires held endpoint sets past their grace).
            created_at: wall-clock stamp for the snapshot; defaults to *now*.

        Raises:
            IncompleteSnapshot: :meth:`ready` is false.
        """
        if not self.ready():
            missing = (self._required - self._delivered) | (self._awaited() - set(self._endpoints))
            raise IncompleteSnapshot(f"snapshot incomplete: waiting for {sorted(missing)}")
        for name, since in list(self._held_since.items()):
            if now - since >= self._grace:
                del self._held_since[name]
                self._endpoints[name] = UpstreamSet(name, (), self._endpoints[name].index)
        candidate = make_snapshot(
            version=self._version + 1,
            created_at=now if created_at is None else created_at,
            local_services=self._local,
            upstreams=self._endpoints.values(),
            mesh_config_raw=self._mesh,
            intentions_raw=self._intentions,
            trust_bundle_raw=self._bundle,
        )
        if self._last is not None and self._last.same_content(candidate):
            return self._last
        self._version += 1
        self._last = candidate
        return candidate

    def statistics(self) -> ReducerStatistics:
        """A frozen view of the reducer's state."""
        return ReducerStatistics(
            version=self._version,
            ready=self.ready(),
            events_applied=self._events,
            watched=self.watch_set(),
            delivered=frozenset(self._delivered | set(self._endpoints)),
            held=frozenset(self._held_since),
            discovered=tuple(self._discovered),
            unwatched=self._unwatched,
        )
