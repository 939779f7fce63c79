"""The intentions document: one JSON value per destination in Consul KV.

Key ``<prefix>intentions/<destination>`` (prefix default ``meshd/``) holds a document shaped
like Consul's ``service-intentions`` config entry, plus one field of our own::

    {"Kind": "service-intentions", "Name": "api", "Version": 1,
     "Sources": [{"Name": "web", "Action": "allow", "Description": "frontend"},
                 {"Name": "*", "Action": "deny"}]}

``Version`` is required and is the schema version (currently 1). Consul's entry has no such
field; we add one because the same document is read by agents of different releases during a
rolling upgrade, and an agent must refuse (and so deny) a document newer than it understands
rather than ignore fields that might narrow access. Parsing is strict: unknown fields,
duplicate JSON keys, wrong types, an unknown ``Action``, both or neither of ``Action`` and
``Permissions``, duplicate source names and a ``Name`` that differs from the key's destination
are all errors naming the key, the field and the problem.

Service names are lower-case DNS labels (``[a-z0-9]`` and inner ``-``, at most 63
characters), exactly as :mod:`meshd.identity` accepts them in SPIFFE IDs. Matching is
exact, so allowing upper case would let ``Web`` dodge a deny on ``web``; a name outside that
set is refused here and never matches in :func:`authorize`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from meshd.identity import IdentityError, check_label
from meshd.intentions.permissions import Permission, parse_permissions, render_permission
from meshd.intentions.schema import (
    Action,
    DocRef,
    IntentionError,
    check_action,
    check_choice,
    check_meta,
    check_object,
    check_str,
    check_version,
    load_json_object,
)

KIND = "service-intentions"
SCHEMA_VERSION = 1
WILDCARD = "*"
DEFAULT_PREFIX = "meshd/"

_DOC_FIELDS = frozenset({"Kind", "Name", "Version", "Meta", "Sources"})
_SOURCE_FIELDS = frozenset({"Name", "Action", "Permissions", "Description", "Meta"})


def is_service_name(name: str) -> bool:
    """True if *name* is a valid (exact, non-wildcard) service name, as SPIFFE IDs carry them."""
    try:
        check_label(name, "service")
    except IdentityError:
        return False
    return True


@dataclass(frozen=True)
class SourceIntention:
    """One entry of ``Sources``: what *name* may do to the document's destination.

    Exactly one of ``action`` (L4) and ``permissions`` (L7) is set.
    """

    name: str
    action: Action | None = None
    permissions: tuple[Permission, ...] = ()
    description: str = ""
    meta: tuple[tuple[str, str], ...] = ()

    @property
    def is_l7(self) -> bool:
        """True if this source is governed by L7 ``Permissions`` rather than an ``Action``."""
        return bool(self.permissions)


@dataclass(frozen=True)
class IntentionsDocument:
    """A parsed, valid intentions document. ``sources`` are sorted by name."""

    name: str
    sources: tuple[SourceIntention, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    version: int = SCHEMA_VERSION

    def source(self, name: str) -> SourceIntention | None:
        """Return the entry for source *name*, if any."""
        return next((s for s in self.sources if s.name == name), None)

    def with_source(self, source: SourceIntention) -> IntentionsDocument:
        """Return a copy with *source* added, replacing any entry of the same name."""
        others = tuple(s for s in self.sources if s.name != source.name)
        return replace(self, sources=tuple(sorted((*others, source), key=lambda s: s.name)))

    def without_source(self, name: str) -> IntentionsDocument:
        """Return a copy without the entry for source *name*."""
        return replace(self, sources=tuple(s for s in self.sources if s.name != name))


@dataclass(frozen=True)
class InvalidDocument:
    """A document that could not be read or parsed; its destination denies everyone.

    Attributes:
        destination: the destination named by the key (may itself be malformed).
        key: the KV key.
        reason: the parse error, one line.
    """

    destination: str
    key: str
    reason: str


def intentions_prefix(prefix: str = DEFAULT_PREFIX) -> str:
    """The KV folder holding every intentions document, e.g. ``meshd/intentions/``."""
    base = prefix.strip("/")
    return f"{base}/intentions/" if base else "intentions/"


def intentions_key(destination: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The KV key of *destination*'s intentions document."""
    return intentions_prefix(prefix) + destination


def parse_intentions_document(
    key: str, raw: bytes, *, destination: str | None = None
) -> IntentionsDocument:
    """Parse and validate one intentions document.

    Args:
        key: the KV key it came from; named in errors.
        raw: the stored bytes.
        destination: the destination the key stands for; by default the key's last segment.

    Returns:
        The document, sources sorted by name.

    Raises:
        IntentionError: anything wrong with it, naming *key*, the field and the problem.
    """
    doc = DocRef("intentions document", key)
    expected = key.rpartition("/")[2] if destination is None else destination
    if expected != WILDCARD and not is_service_name(expected):
        raise doc.fail("(key)", f"{expected!r} is not a service name or '*'")
    obj = check_object(doc, "(document)", load_json_object(doc, raw), _DOC_FIELDS)
    for required in ("Kind", "Name", "Sources"):
        if required not in obj:
            raise doc.fail(required, "is required")
    check_choice(doc, "Kind", obj["Kind"], (KIND,))
    version = check_version(doc, obj, SCHEMA_VERSION)
    name = check_str(doc, "Name", obj["Name"])
    if name != expected:
        raise doc.fail("Name", f"is {name!r} but the key is for destination {expected!r}")
    meta = check_meta(doc, "Meta", obj.get("Meta", {}))
    sources = obj["Sources"]
    if not isinstance(sources, list):
        raise doc.fail("Sources", "must be an array")
    parsed = [_parse_source(doc, f"Sources[{i}]", item) for i, item in enumerate(sources)]
    seen: set[str] = set()
    for i, source in enumerate(parsed):
        if source.name in seen:
            raise doc.fail(f"Sources[{i}].Name", f"duplicate source {source.name!r}")
        seen.add(source.name)
    ordered = tuple(sorted(parsed, key=lambda s: s.name))
    return IntentionsDocument(name=name, sources=ordered, meta=meta, version=version)


def _parse_source(doc: DocRef, field: str, value: Any) -> SourceIntention:
    obj = check_object(doc, field, value, _SOURCE_FIELDS)
    if "Name" not in obj:
        raise doc.fail(f"{field}.Name", "is required")
    name = check_str(doc, f"{field}.Name", obj["Name"])
    if name != WILDCARD and not is_service_name(name):
        raise doc.fail(f"{field}.Name", f"{name!r} is not a service name or '*'")
    has_action, has_permissions = "Action" in obj, "Permissions" in obj
    if has_action == has_permissions:
        which = "both" if has_action else "neither"
        raise doc.fail(field, f"needs exactly one of Action or Permissions, got {which}")
    return SourceIntention(
        name=name,
        action=check_action(doc, f"{field}.Action", obj["Action"]) if has_action else None,
        permissions=(
            parse_permissions(doc, f"{field}.Permissions", obj["Permissions"])
            if has_permissions
            else ()
        ),
        description=check_str(
            doc, f"{field}.Description", obj.get("Description", ""), allow_empty=True
        ),
        meta=check_meta(doc, f"{field}.Meta", obj.get("Meta", {})),
    )


def document_to_json(doc: IntentionsDocument) -> dict[str, Any]:
    """The JSON object for *doc*, fields in canonical order, empty optional fields omitted."""
    out: dict[str, Any] = {"Kind": KIND, "Name": doc.name, "Version": doc.version}
    if doc.meta:
        out["Meta"] = dict(doc.meta)
    out["Sources"] = [source_to_json(s) for s in sorted(doc.sources, key=lambda s: s.name)]
    return out


def source_to_json(source: SourceIntention) -> dict[str, Any]:
    """The JSON object for one ``Sources`` entry."""
    out: dict[str, Any] = {"Name": source.name}
    if source.action is not None:
        out["Action"] = source.action.value
    if source.permissions:
        out["Permissions"] = [render_permission(p) for p in source.permissions]
    if source.description:
        out["Description"] = source.description
    if source.meta:
        out["Meta"] = dict(source.meta)
    return out


def render_document(doc: IntentionsDocument) -> bytes:
    """Render *doc* as canonical JSON: fixed field order, sources sorted, 2-space indent.

    The same document always renders to the same bytes, so a rewrite that changes nothing
    is visible as such and ``parse_intentions_document(key, render_document(d)) == d``.
    """
    return (json.dumps(document_to_json(doc), indent=2, ensure_ascii=False) + "\n").encode()


def documents_from_kv(
    entries: Iterable[tuple[str, bytes | None]], prefix: str = DEFAULT_PREFIX
) -> dict[str, IntentionsDocument | InvalidDocument]:
    """Parse every entry of a KV listing of :func:`intentions_prefix`, never raising.

    An entry that does not parse becomes an :class:`InvalidDocument` (which denies its
    destination in the compiled policy), so one bad document cannot stop the rest loading.
    The folder key itself (``meshd/intentions/``, made by some UIs) is skipped.

    Args:
        entries: ``(key, value)`` pairs; a ``None`` value (empty key) is invalid.
        prefix: the meshd KV prefix the entries were listed under.

    Returns:
        Destination to document, for :func:`meshd.intentions.compile_policy`.
    """
    folder = intentions_prefix(prefix)
    out: dict[str, IntentionsDocument | InvalidDocument] = {}
    for key, raw in entries:
        if key == folder or not key.startswith(folder):
            continue
        destination = key[len(folder) :]
        out[destination] = parse_or_invalid(key, raw, destination=destination)
    return out


def documents_from_raw(
    raw_by_destination: Mapping[str, bytes], prefix: str = DEFAULT_PREFIX
) -> dict[str, IntentionsDocument | InvalidDocument]:
    """Like :func:`documents_from_kv`, for raw documents already keyed by destination.

    This is the shape a snapshot keeps (``Snapshot.intentions_raw``).
    """
    return {
        destination: parse_or_invalid(
            intentions_key(destination, prefix), raw, destination=destination
        )
        for destination, raw in raw_by_destination.items()
    }


def parse_or_invalid(
    key: str, raw: bytes | None, *, destination: str
) -> IntentionsDocument | InvalidDocument:
    """Like :func:`parse_intentions_document`, but a fault becomes an :class:`InvalidDocument`."""
    try:
        return parse_intentions_document(key, raw or b"", destination=destination)
    except IntentionError as exc:
        return InvalidDocument(destination=destination, key=key, reason=str(exc))
