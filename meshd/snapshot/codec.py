"""Strict, versioned JSON form of a :class:`~meshd.snapshot.model.Snapshot`, for persistence.

The agent writes the last published snapshot to disk so that, restarted while Consul is
away, it serves the last-known-good configuration. Reading is strict: an unknown format,
a newer ``format_version``, an unknown or missing key, or a value of the wrong type raises
:class:`SnapshotFormatError` rather than guessing, because a half-understood snapshot could
route traffic wrongly. The address map is not stored; it is derived again on load.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from meshd.errors import MeshdError
from meshd.snapshot.model import Endpoint, LocalService, Snapshot, UpstreamSet, make_snapshot

FORMAT = "meshd-snapshot"
FORMAT_VERSION = 1


class SnapshotFormatError(MeshdError):
    """A persisted snapshot cannot be read; the message names the field and the cause."""


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode("ascii")


def to_json(snapshot: Snapshot) -> bytes:
    """Serialise *snapshot* as canonical UTF-8 JSON (sorted keys, one line)."""
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": snapshot.version,
        "created_at": snapshot.created_at,
        "local_services": [
            {
                "name": s.name,
                "service_id": s.service_id,
                "port": s.port,
                "protocol": s.protocol,
                "upstreams": list(s.upstreams),
                **({} if s.uid is None else {"uid": s.uid}),
            }
            for s in snapshot.local_services
        ],
        "upstreams": {
            name: {
                "index": u.index,
                "endpoints": [
                    {
                        "address": e.address,
                        "port": e.port,
                        "node": e.node,
                        "service_id": e.service_id,
                        "meta": dict(e.meta),
                    }
                    for e in u.endpoints
                ],
            }
            for name, u in snapshot.upstreams.items()
        },
        "mesh_config": _b64(snapshot.mesh_config_raw),
        "intentions": {name: _b64(raw) for name, raw in snapshot.intentions_raw.items()},
        "trust_bundle": _b64(snapshot.trust_bundle_raw),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


class _Reader:
    """Typed access to a JSON object that remembers where it is, for error messages."""

    def __init__(
        self, obj: object, where: str, keys: frozenset[str], optional: frozenset[str] = frozenset()
    ) -> None:
        if not isinstance(obj, dict):
            raise SnapshotFormatError(f"snapshot {where}: expected an object")
        unknown = set(obj) - keys - optional
        missing = keys - set(obj)
        if unknown or missing:
            raise SnapshotFormatError(
                f"snapshot {where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}"
            )
        self.obj: dict[str, Any] = obj
        self.where = where

    def get(self, key: str, kind: type[Any] | tuple[type[Any], ...]) -> Any:
        value = self.obj[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise SnapshotFormatError(f"snapshot {self.where}.{key}: wrong type {value!r:.60}")
        return value

    def optional(self, key: str, kind: type[Any]) -> Any:
        """The value of an optional key (None when absent; present, it must be *kind*)."""
        return self.get(key, kind) if key in self.obj else None

    def b64(self, key: str) -> bytes | None:
        value = self.get(key, (str, type(None)))
        return None if value is None else _unb64(value, f"{self.where}.{key}")


def _unb64(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise SnapshotFormatError(f"snapshot {where}: expected base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SnapshotFormatError(f"snapshot {where}: invalid base64: {exc}") from None


def _str_map(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise SnapshotFormatError(f"snapshot {where}: expected an object of strings")
    return value


def _local(obj: object, where: str) -> LocalService:
    # "uid" is written only when set, so snapshots persisted before it existed still load.
    keys = frozenset({"name", "service_id", "port", "protocol", "upstreams"})
    r = _Reader(obj, where, keys, optional=frozenset({"uid"}))
    upstreams = r.get("upstreams", list)
    uid = r.optional("uid", int)
    if not all(isinstance(u, str) for u in upstreams):
        raise SnapshotFormatError(f"snapshot {where}.upstreams: expected strings")
    return LocalService(
        name=r.get("name", str),
        service_id=r.get("service_id", str),
        port=r.get("port", int),
        protocol=r.get("protocol", str),
        upstreams=tuple(upstreams),
        uid=uid,
    )


def _endpoint(obj: object, where: str) -> Endpoint:
    r = _Reader(obj, where, frozenset({"address", "port", "node", "service_id", "meta"}))
    return Endpoint(
        address=r.get("address", str),
        port=r.get("port", int),
        node=r.get("node", str),
        service_id=r.get("service_id", str),
        meta=_str_map(r.get("meta", dict), f"{where}.meta"),
    )


def _upstream(name: str, obj: object, where: str) -> UpstreamSet:
    r = _Reader(obj, where, frozenset({"index", "endpoints"}))
    endpoints = r.get("endpoints", list)
    return UpstreamSet(
        service=name,
        index=r.get("index", int),
        endpoints=tuple(_endpoint(e, f"{where}.endpoints[{i}]") for i, e in enumerate(endpoints)),
    )


_TOP_KEYS = frozenset(
    {
        "format",
        "format_version",
        "version",
        "created_at",
        "local_services",
        "upstreams",
        "mesh_config",
        "intentions",
        "trust_bundle",
    }
)


def from_json(data: bytes) -> Snapshot:
    """Parse a snapshot written by :func:`to_json`.

    Raises:
        SnapshotFormatError: the data is not JSON, not a snapshot, of another format
            version, or any field is unknown, missing or of the wrong type.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotFormatError(f"snapshot: not JSON: {exc}") from None
    except RecursionError:
        raise SnapshotFormatError("snapshot: nested too deeply to be one") from None
    r = _Reader(doc, "document", _TOP_KEYS)
    if r.get("format", str) != FORMAT:
        raise SnapshotFormatError(f"snapshot: format is {doc['format']!r}, not {FORMAT!r}")
    if r.get("format_version", int) != FORMAT_VERSION:
        raise SnapshotFormatError(
            f"snapshot: format_version {doc['format_version']} is not {FORMAT_VERSION}"
        )
    upstreams: Mapping[str, object] = r.get("upstreams", dict)
    intentions: Mapping[str, object] = r.get("intentions", dict)
    try:
        return make_snapshot(
            version=r.get("version", int),
            created_at=float(r.get("created_at", (int, float))),
            local_services=[
                _local(s, f"local_services[{i}]")
                for i, s in enumerate(r.get("local_services", list))
            ],
            upstreams=[_upstream(n, u, f"upstreams.{n}") for n, u in upstreams.items()],
            mesh_config_raw=r.b64("mesh_config"),
            intentions_raw={n: _unb64(v, f"intentions.{n}") for n, v in intentions.items()},
            trust_bundle_raw=r.b64("trust_bundle"),
        )
    except ValueError as exc:
        raise SnapshotFormatError(f"snapshot: invalid value: {exc}") from None
