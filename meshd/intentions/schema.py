"""Strict JSON document parsing shared by the intentions and mesh-config documents.

Every parse error has one shape, ``<what> <key>: <field>: <problem>`` (for example
``intentions document meshd/intentions/api: Sources[1].Action: must be 'allow' or 'deny',
got 'permit'``), so an operator reading one line knows which KV key to fix, where, and how.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from meshd.errors import MeshdError


class IntentionError(MeshdError):
    """An intentions document is malformed; the message names the key, field and problem."""


class Action(StrEnum):
    """What an intention (or the mesh default) does with a matching connection."""

    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True)
class DocRef:
    """Which document is being parsed, and which error family reports its faults.

    Attributes:
        what: how operators call the document, e.g. ``"intentions document"``.
        key: the KV key it was read from (or will be written to).
        error: the :class:`MeshdError` subclass raised for a fault in it.
    """

    what: str
    key: str
    error: type[MeshdError] = IntentionError

    def fail(self, field: str, problem: str) -> MeshdError:
        """Build the error for *problem* at *field* (``(document)`` for the whole thing)."""
        return self.error(f"{self.what} {self.key}: {field}: {problem}")


def type_name(value: Any) -> str:
    """Name a JSON value's type the way a JSON author would."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def check_object(doc: DocRef, field: str, value: Any, allowed: frozenset[str]) -> Mapping[str, Any]:
    """Return *value* as a JSON object whose keys are all in *allowed*.

    Raises:
        MeshdError: (``doc.error``) *value* is not an object or has an unknown key.
    """
    if not isinstance(value, dict):
        raise doc.fail(field, f"must be an object, got {type_name(value)}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        names = ", ".join(sorted(allowed))
        raise doc.fail(field, f"unknown field {unknown[0]!r} (allowed: {names})")
    return value


def check_str(doc: DocRef, field: str, value: Any, *, allow_empty: bool = False) -> str:
    """Return *value* if it is a string (non-empty unless *allow_empty*).

    Raises:
        MeshdError: (``doc.error``) not a string, or empty when that is not allowed.
    """
    if not isinstance(value, str):
        raise doc.fail(field, f"must be a string, got {type_name(value)}")
    if not value and not allow_empty:
        raise doc.fail(field, "must not be empty")
    return value


def check_choice(doc: DocRef, field: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return *value* if it is one of the strings in *choices*.

    Raises:
        MeshdError: (``doc.error``) anything else, listing the choices.
    """
    text = check_str(doc, field, value)
    if text not in choices:
        options = " or ".join(repr(c) for c in choices)
        raise doc.fail(field, f"must be {options}, got {text!r}")
    return text


def check_action(doc: DocRef, field: str, value: Any) -> Action:
    """Return *value* as an :class:`Action`; anything but ``allow``/``deny`` is an error."""
    return Action(check_choice(doc, field, value, ("allow", "deny")))


def check_meta(doc: DocRef, field: str, value: Any) -> tuple[tuple[str, str], ...]:
    """Return a ``Meta`` object (string to string) as sorted pairs.

    Raises:
        MeshdError: (``doc.error``) not an object, or a value that is not a string.
    """
    if not isinstance(value, dict):
        raise doc.fail(field, f"must be an object, got {type_name(value)}")
    for name, item in value.items():
        check_str(doc, f"{field}.{name}", item, allow_empty=True)
    return tuple(sorted(value.items()))


def check_version(doc: DocRef, obj: Mapping[str, Any], supported: int) -> int:
    """Check the required ``Version`` field: an integer this code understands.

    A document from a newer meshd (higher version) is an error rather than read partially:
    fields we do not know might have narrowed access.

    Raises:
        MeshdError: (``doc.error``) missing, not an integer, or unsupported.
    """
    if "Version" not in obj:
        raise doc.fail("Version", f"is required (this meshd writes {supported})")
    version: object = obj["Version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise doc.fail("Version", f"must be an integer, got {type_name(version)}")
    if version != supported:
        raise doc.fail("Version", f"unsupported version {version} (this meshd reads {supported})")
    return version


def load_json_object(doc: DocRef, raw: bytes) -> Mapping[str, Any]:
    """Decode *raw* as one UTF-8 JSON object, rejecting what ``json`` would let through.

    Duplicate keys (``{"Action": "allow", "Action": "deny"}``: which one wins depends on the
    reader) and the non-standard constants ``NaN``/``Infinity`` are errors.

    Raises:
        MeshdError: (``doc.error``) not UTF-8, not JSON, duplicate keys, or not an object.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise doc.fail("(document)", f"is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise doc.fail("(document)", f"is not valid JSON: {exc.msg} at {where}") from None
    except _RejectedError as exc:
        raise doc.fail("(document)", str(exc)) from None
    except RecursionError:  # json's C parser gives up on deep nesting
        raise doc.fail("(document)", "is nested too deeply") from None
    if not isinstance(value, dict):
        raise doc.fail("(document)", f"must be a JSON object, got {type_name(value)}")
    return value


class _RejectedError(ValueError):
    """Valid to Python's ``json``, refused by us."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise _RejectedError(f"duplicate field {name!r}")
        out[name] = value
    return out


def _no_constant(name: str) -> Any:
    raise _RejectedError(f"{name} is not valid JSON")
