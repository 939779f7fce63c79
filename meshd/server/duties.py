"""What only the leader does: retire the old root once every leaf it signed has expired.

A rotation's last step must not wait for an operator to remember it, and must not be done
twice: the leader checks the published bundle periodically and, when the retiring root's
``retire_after`` has passed, publishes the STABLE bundle (:func:`meshd.rotation.
retire_old_root`) with a check-and-set write. The decision is the pure
:func:`retirement_due`; this module only reads and writes Consul.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable

import trio

from meshd import rotation
from meshd.consul.client import ConsulClient
from meshd.consul.errors import ConsulError
from meshd.logevents import log_event
from meshd.trustbundle import RootState, TrustBundle, TrustBundleError

log = logging.getLogger("meshd.server.duties")
CHECK_EVERY_S = 60.0


def retirement_due(bundle: TrustBundle, now: dt.datetime) -> TrustBundle | None:
    """The bundle to publish if the retiring root may be retired at *now*, else None."""
    if rotation.phase_of(bundle) is not rotation.Phase.NEW_ROOT_SIGNING:
        return None
    retiring = [r for r in bundle.roots if r.state is RootState.RETIRING]
    if not retiring or retiring[0].retire_after is None or now <= retiring[0].retire_after:
        return None
    return rotation.retire_old_root(bundle, now=now)


async def retire_once(
    consul: ConsulClient, key: str, *, wall_clock: Callable[[], float] = time.time
) -> bool:
    """Retire the old root if due.

    Returns:
        True if a retired bundle was published.

    Raises:
        ConsulError: Consul failed.
        TrustBundleError: the published bundle is invalid.
    """
    index, entry = await consul.kv_get(key)
    if entry is None:
        return False
    bundle = TrustBundle.from_json(entry.value)
    updated = retirement_due(bundle, dt.datetime.fromtimestamp(wall_clock(), dt.UTC))
    if updated is None:
        return False
    if not await consul.kv_put(key, updated.to_json(), cas=entry.modify_index):
        return False  # changed meanwhile (an operator's rotate): look again next time
    log_event(log, logging.INFO, "root_retired", bundle=key, index=index)
    return True


async def publish_leaf_ttl(
    consul: ConsulClient, prefix: str, server: str, leaf_ttl_s: float
) -> None:
    """Publish how long this server's leaves live, under ``<prefix>ca/leaf-ttl/<server>``.

    ``meshctl ca rotate`` keeps the old root trusted until every leaf it signed has
    expired, so it needs the longest leaf lifetime any server issues. Each server writes its
    own key at start; a stale key of a retired server only makes that bound longer.

    Raises:
        ConsulError: Consul failed or refused the write.
    """
    body = json.dumps({"leaf_ttl_s": leaf_ttl_s}).encode()
    await consul.kv_put(f"{prefix}{rotation.LEAF_TTL_KEY}{server}", body)


async def serve_leader_duties(
    consul: ConsulClient,
    bundle_key: str,
    *,
    every_s: float = CHECK_EVERY_S,
    wall_clock: Callable[[], float] = time.time,
) -> None:
    """Run the leader's duties until cancelled (when leadership ends)."""
    while True:
        try:
            await retire_once(consul, bundle_key, wall_clock=wall_clock)
        except (ConsulError, TrustBundleError, rotation.RotationError) as exc:
            log_event(log, logging.WARNING, "duty_failed", reason=str(exc)[:300])
        await trio.sleep(every_s)
