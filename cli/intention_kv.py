"""Intentions documents in Consul KV: reading, check-and-set updates, compiling the live policy.

Every write is a read-modify-write guarded by Consul's check-and-set on the document's
``ModifyIndex``. On a conflict the *change* (a pure function) is re-applied to the other
operator's fresh version, a few times, so nobody's edit is silently overwritten.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import trio

from meshd.consul import ConsulClient
from meshd.errors import MeshdError
from meshd.intentions import (
    IntentionError,
    IntentionsDocument,
    Policy,
    compile_policy,
    documents_from_kv,
    intentions_prefix,
    parse_intentions_document,
    render_document,
)
from meshd.meshconfig import load_mesh_config, mesh_config_key

CAS_ATTEMPTS = 5

Change = Callable[[IntentionsDocument | None], IntentionsDocument | None]


class IntentionConflictError(MeshdError):
    """The document kept changing under a read-modify-write; nothing was written."""


async def read_document(
    consul: ConsulClient, key: str, destination: str
) -> tuple[IntentionsDocument | None, int]:
    """Read one intentions document and its ModifyIndex (``(None, 0)`` if absent).

    Raises:
        IntentionError: the stored document is invalid (named, with how to recover).
        ConsulError: Consul failed.
    """
    _, entry = await consul.kv_get(key)
    if entry is None:
        return None, 0
    try:
        return parse_intentions_document(
            key, entry.value, destination=destination
        ), entry.modify_index
    except IntentionError as exc:
        raise IntentionError(
            f"{exc}; fix it with 'consul kv put {key} @FILE' "
            f"or remove it with 'consul kv delete {key}'"
        ) from None


async def update_document(
    consul: ConsulClient, key: str, destination: str, change: Change
) -> IntentionsDocument | None:
    """Apply *change* to the stored document with check-and-set, retrying on conflicts.

    Args:
        consul: an open client.
        key: the document's KV key.
        destination: the destination it is for.
        change: pure function from the current document (``None`` if absent) to the new one
            (``None`` or no sources: delete the key). It may raise :class:`MeshdError` to
            refuse; it is called again on the fresh document after a conflict.

    Returns:
        The document as written (``None`` if deleted).

    Raises:
        IntentionConflictError: still conflicting after :data:`CAS_ATTEMPTS` attempts.
        IntentionError: the stored or resulting document is invalid.
        ConsulError: Consul failed.
    """
    for attempt in range(CAS_ATTEMPTS):
        current, index = await read_document(consul, key, destination)
        new = change(current)
        if new is None or not new.sources:
            written = current is None or await consul.kv_delete(key, cas=index)
        else:
            raw = render_document(new)
            parse_intentions_document(key, raw, destination=destination)  # validate before write
            written = await consul.kv_put(key, raw, cas=index)
        if written:
            return new if new is not None and new.sources else None
        await trio.sleep(random.uniform(0.01, 0.05) * (attempt + 1))  # noqa: S311 - jitter
    raise IntentionConflictError(
        f"{key} changed {CAS_ATTEMPTS} times while we tried to update it; nothing was written, "
        "try again"
    )


async def load_policy(consul: ConsulClient, prefix: str) -> tuple[Policy, str | None]:
    """Read every intentions document and the mesh config; compile as the agent does.

    Returns:
        The policy, and the mesh config error if that document is invalid (the policy then
        uses the fail-closed default, deny).
    """
    _, entries = await consul.kv_list(intentions_prefix(prefix))
    documents = documents_from_kv(((e.key, e.value) for e in entries), prefix)
    key = mesh_config_key(prefix)
    _, entry = await consul.kv_get(key)
    loaded = load_mesh_config(key, None if entry is None else entry.value)
    policy = compile_policy(documents, default_action=loaded.config.default_action)
    return policy, None if loaded.error is None else str(loaded.error)
