"""Configuration snapshots: the frozen value the proxies read, its reducer and its codec.

Everything here is sans-IO. The agent's driver (``agent/snapshots.py``) runs the Consul
watches, feeds :class:`Reducer` and publishes what it builds.
"""

from meshd.snapshot.codec import FORMAT_VERSION, SnapshotFormatError, from_json, to_json
from meshd.snapshot.discovery import (
    DestinationCache,
    DiscoveryStatistics,
    NodeService,
    match_destination,
)
from meshd.snapshot.model import (
    Endpoint,
    LocalService,
    Snapshot,
    UpstreamSet,
    build_address_map,
    make_snapshot,
)
from meshd.snapshot.reducer import (
    FIXED_INPUTS,
    BundleChanged,
    EndpointsChanged,
    Event,
    IncompleteSnapshot,
    IntentionsChanged,
    LocalServicesChanged,
    MeshConfigChanged,
    Reducer,
    ReducerStatistics,
    UpstreamRequested,
    intention_upstreams,
)

__all__ = [
    "FIXED_INPUTS",
    "FORMAT_VERSION",
    "BundleChanged",
    "DestinationCache",
    "DiscoveryStatistics",
    "Endpoint",
    "EndpointsChanged",
    "Event",
    "IncompleteSnapshot",
    "IntentionsChanged",
    "LocalService",
    "LocalServicesChanged",
    "MeshConfigChanged",
    "NodeService",
    "Reducer",
    "ReducerStatistics",
    "Snapshot",
    "SnapshotFormatError",
    "UpstreamRequested",
    "UpstreamSet",
    "build_address_map",
    "from_json",
    "intention_upstreams",
    "make_snapshot",
    "match_destination",
    "to_json",
]
