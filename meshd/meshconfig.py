"""Mesh-wide settings: the document at ``<prefix>config/mesh`` in Consul KV.

Shaped like the intentions documents (PascalCase, ``Kind`` and a schema ``Version``)::

    {"Kind": "mesh", "Version": 1, "MTLSMode": "strict", "DefaultAction": "deny",
     "OutboundPolicy": "allow-any", "TracingSampleRate": 0.01}

``Kind`` and ``Version`` are required; every setting is optional and defaults as in
:data:`DEFAULTS`. Parsing is strict (unknown fields, wrong types, out-of-range values and
duplicate JSON keys are errors naming the key and field).

A missing document means the defaults. An *invalid* one must never widen access, so
:func:`load_mesh_config` then returns :data:`FAIL_CLOSED` (strict mTLS, default deny,
registry-only outbound) together with the error for the caller to log and count.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from meshd.errors import MeshdError
from meshd.intentions.document import DEFAULT_PREFIX
from meshd.intentions.schema import (
    Action,
    DocRef,
    check_action,
    check_choice,
    check_object,
    check_version,
    load_json_object,
    type_name,
)

KIND = "mesh"
SCHEMA_VERSION = 1
_FIELDS = frozenset(
    {"Kind", "Version", "MTLSMode", "DefaultAction", "OutboundPolicy", "TracingSampleRate"}
)


class MeshConfigError(MeshdError):
    """The mesh config document is malformed; the message names the key, field and problem."""


class MTLSMode(StrEnum):
    """Whether inbound proxies accept plaintext (as anonymous peers) besides mutual TLS."""

    STRICT = "strict"
    PERMISSIVE = "permissive"


class OutboundPolicy(StrEnum):
    """Whether outbound traffic to destinations outside the catalog passes through."""

    ALLOW_ANY = "allow-any"
    REGISTRY_ONLY = "registry-only"


@dataclass(frozen=True)
class MeshConfig:
    """Validated mesh-wide settings.

    Attributes:
        mtls_mode: ``strict`` (mTLS required) or ``permissive`` (plaintext is anonymous).
        default_action: what happens when no intention matches.
        outbound_policy: ``allow-any`` or ``registry-only``.
        tracing_sample_rate: the share of requests traced, 0 to 1.
    """

    mtls_mode: MTLSMode = MTLSMode.STRICT
    default_action: Action = Action.DENY
    outbound_policy: OutboundPolicy = OutboundPolicy.ALLOW_ANY
    tracing_sample_rate: float = 0.01


DEFAULTS = MeshConfig()
FAIL_CLOSED = MeshConfig(
    mtls_mode=MTLSMode.STRICT,
    default_action=Action.DENY,
    outbound_policy=OutboundPolicy.REGISTRY_ONLY,
)


@dataclass(frozen=True)
class LoadedMeshConfig:
    """What :func:`load_mesh_config` found.

    Attributes:
        config: the settings to use.
        error: why the document was rejected (``config`` is then :data:`FAIL_CLOSED`).
        present: whether the key existed.
    """

    config: MeshConfig
    error: MeshConfigError | None = None
    present: bool = False


def mesh_config_key(prefix: str = DEFAULT_PREFIX) -> str:
    """The KV key of the mesh config document, e.g. ``meshd/config/mesh``."""
    base = prefix.strip("/")
    return f"{base}/config/mesh" if base else "config/mesh"


def parse_mesh_config(key: str, raw: bytes) -> MeshConfig:
    """Parse and validate the mesh config document.

    Args:
        key: the KV key it came from; named in errors.
        raw: the stored bytes.

    Returns:
        The settings, defaults filled in.

    Raises:
        MeshConfigError: anything wrong with it, naming *key*, the field and the problem.
    """
    doc = DocRef("mesh config document", key, MeshConfigError)
    obj = check_object(doc, "(document)", load_json_object(doc, raw), _FIELDS)
    if "Kind" not in obj:
        raise doc.fail("Kind", "is required")
    check_choice(doc, "Kind", obj["Kind"], (KIND,))
    check_version(doc, obj, SCHEMA_VERSION)
    mtls = obj.get("MTLSMode", DEFAULTS.mtls_mode.value)
    outbound = obj.get("OutboundPolicy", DEFAULTS.outbound_policy.value)
    return MeshConfig(
        mtls_mode=MTLSMode(check_choice(doc, "MTLSMode", mtls, tuple(m.value for m in MTLSMode))),
        default_action=check_action(
            doc, "DefaultAction", obj.get("DefaultAction", DEFAULTS.default_action.value)
        ),
        outbound_policy=OutboundPolicy(
            check_choice(doc, "OutboundPolicy", outbound, tuple(p.value for p in OutboundPolicy))
        ),
        tracing_sample_rate=_sample_rate(doc, obj.get("TracingSampleRate")),
    )


def _sample_rate(doc: DocRef, value: Any) -> float:
    if value is None:
        return DEFAULTS.tracing_sample_rate
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise doc.fail("TracingSampleRate", f"must be a number, got {type_name(value)}")
    rate = float(value)
    if not (math.isfinite(rate) and 0.0 <= rate <= 1.0):
        raise doc.fail("TracingSampleRate", f"must be between 0 and 1, got {value}")
    return rate


def mesh_config_to_json(config: MeshConfig) -> dict[str, Any]:
    """The JSON object for *config*, every setting spelled out, fields in canonical order."""
    return {
        "Kind": KIND,
        "Version": SCHEMA_VERSION,
        "MTLSMode": config.mtls_mode.value,
        "DefaultAction": config.default_action.value,
        "OutboundPolicy": config.outbound_policy.value,
        "TracingSampleRate": config.tracing_sample_rate,
    }


def render_mesh_config(config: MeshConfig) -> bytes:
    """Render *config* as canonical JSON; ``parse_mesh_config(k, render_mesh_config(c)) == c``."""
    return (json.dumps(mesh_config_to_json(config), indent=2) + "\n").encode()


def load_mesh_config(key: str, raw: bytes | None) -> LoadedMeshConfig:
    """Turn what KV holds at *key* into the settings to use, never raising.

    Args:
        key: the KV key, for the error message.
        raw: the stored bytes, or ``None`` if the key does not exist.

    Returns:
        :data:`DEFAULTS` if the key is absent, the parsed settings if valid, and otherwise
        :data:`FAIL_CLOSED` with the parse error attached for the caller to log.
    """
    if raw is None:
        return LoadedMeshConfig(config=DEFAULTS)
    try:
        return LoadedMeshConfig(config=parse_mesh_config(key, raw), present=True)
    except MeshConfigError as exc:
        return LoadedMeshConfig(config=FAIL_CLOSED, error=exc, present=True)
