"""Intentions: strict parsing, canonical rendering, compilation and the pure authorize().

Fixtures are built through production code (STYLE #18): every document below is JSON that
goes through ``parse_intentions_document``/``documents_from_kv`` exactly as KV data does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.intentions import (
    Action,
    Barrier,
    IntentionError,
    IntentionsDocument,
    InvalidDocument,
    compile_policy,
    documents_from_kv,
    documents_from_raw,
    intentions_key,
    parse_intentions_document,
    render_document,
)
from meshd.intentions import authorize as authorize_fn

L7_DENY = [{"Action": "deny", "HTTP": {"PathPrefix": "/admin"}}]
L7_ALLOW = [{"Action": "allow", "HTTP": {"PathExact": "/health", "Methods": ["GET"]}}]

# A source spec: "allow", "deny", "l7-deny" (Permissions with a deny), "l7-allow".
Spec = Mapping[str, str]


def source_json(name: str, spec: str) -> dict[str, Any]:
    if spec.startswith("l7"):
        return {"Name": name, "Permissions": L7_DENY if spec == "l7-deny" else L7_ALLOW}
    return {"Name": name, "Action": spec, "Description": f"{name} {spec}"}


def raw_doc(destination: str, sources: Spec | list[tuple[str, str]]) -> bytes:
    pairs = list(sources.items()) if isinstance(sources, Mapping) else sources
    body = {
        "Kind": "service-intentions",
        "Name": destination,
        "Version": 1,
        "Sources": [source_json(name, spec) for name, spec in pairs],
    }
    return json.dumps(body).encode()


def kv_documents(
    docs: Mapping[str, Spec | bytes],
) -> dict[str, IntentionsDocument | InvalidDocument]:
    """Documents as the agent gets them: raw KV entries through ``documents_from_kv``."""
    entries = [
        (intentions_key(dst), spec if isinstance(spec, bytes) else raw_doc(dst, spec))
        for dst, spec in docs.items()
    ]
    return documents_from_kv(entries)


BROKEN = b'{"Kind": "service-intentions", "Name": '


class Case(NamedTuple):
    docs: Mapping[str, Spec | bytes]
    default: str
    source: str | None
    destination: str
    allowed: bool
    precedence: int | None
    matched: tuple[str, str] | None  # (source, destination) of the deciding intention


CASES: dict[str, Case] = {
    # -- every precedence level, each beating the next one down, both ways round ------------
    "9 exact/exact allow beats 8 */exact deny": Case(
        {"api": {"web": "allow", "*": "deny"}}, "deny", "web", "api", True, 9, ("web", "api")
    ),
    "9 exact/exact deny beats 8 */exact allow": Case(
        {"api": {"web": "deny", "*": "allow"}}, "allow", "web", "api", False, 9, ("web", "api")
    ),
    "8 */exact allow beats 6 exact/* deny": Case(
        {"api": {"*": "allow"}, "*": {"web": "deny"}}, "deny", "web", "api", True, 8, ("*", "api")
    ),
    "8 */exact deny beats 6 exact/* allow": Case(
        {"api": {"*": "deny"}, "*": {"web": "allow"}}, "allow", "web", "api", False, 8, ("*", "api")
    ),
    "6 exact/* allow beats 5 */* deny": Case(
        {"*": {"web": "allow", "*": "deny"}}, "deny", "web", "api", True, 6, ("web", "*")
    ),
    "6 exact/* deny beats 5 */* allow": Case(
        {"*": {"web": "deny", "*": "allow"}}, "allow", "web", "api", False, 6, ("web", "*")
    ),
    "5 */* allow beats default deny": Case(
        {"*": {"*": "allow"}}, "deny", "web", "api", True, 5, ("*", "*")
    ),
    "5 */* deny beats default allow": Case(
        {"*": {"*": "deny"}}, "allow", "web", "api", False, 5, ("*", "*")
    ),
    "9 beats 6 and 5": Case(
        {"api": {"web": "allow"}, "*": {"web": "deny", "*": "deny"}},
        "deny", "web", "api", True, 9, ("web", "api"),
    ),
    "exact source does not match another source": Case(
        {"api": {"web": "allow"}}, "deny", "db", "api", False, None, None
    ),
    # -- defaults --------------------------------------------------------------------------
    "nothing matches, default deny": Case({}, "deny", "web", "api", False, None, None),
    "nothing matches, default allow": Case({}, "allow", "web", "api", True, None, None),
    "other destination's document does not apply": Case(
        {"db": {"web": "deny"}}, "allow", "web", "api", True, None, None
    ),
    # -- the * destination -----------------------------------------------------------------
    "* destination applies to a destination without a document": Case(
        {"*": {"web": "allow"}}, "deny", "web", "api", True, 6, ("web", "*")
    ),
    "* destination applies when the destination's own document does not match": Case(
        {"api": {"db": "allow"}, "*": {"web": "deny"}},
        "allow", "web", "api", False, 6, ("web", "*"),
    ),
    # -- deny wins ties: a source named twice is a malformed document, which denies -------
    "duplicate source allow+deny denies": Case(
        {"api": raw_doc("api", [("web", "allow"), ("web", "deny")])},
        "allow", "web", "api", False, None, None,
    ),
    # -- L7 sources deny at L4 and never fall through (CVE-2021-36213) ---------------------
    "L7 deny permission, default deny: deny": Case(
        {"api": {"web": "l7-deny"}}, "deny", "web", "api", False, 9, ("web", "api")
    ),
    "L7 source does not fall through to a * allow": Case(
        {"api": {"web": "l7-allow", "*": "allow"}},
        "allow", "web", "api", False, 9, ("web", "api"),
    ),
    "L7 */* source denies at L4 under default allow": Case(
        {"*": {"*": "l7-allow"}}, "allow", "web", "api", False, 5, ("*", "*")
    ),
    # -- malformed documents: all deny -----------------------------------------------------
    "malformed destination document denies despite */* allow": Case(
        {"api": BROKEN, "*": {"*": "allow"}}, "allow", "web", "api", False, None, None
    ),
    "malformed document leaves other destinations alone": Case(
        {"api": BROKEN, "db": {"web": "allow"}}, "deny", "web", "db", True, 9, ("web", "db")
    ),
    "unknown action denies": Case(
        {"api": raw_doc("api", [("web", "permit")]), "*": {"*": "allow"}},
        "allow", "web", "api", False, None, None,
    ),
    "Name/key mismatch denies": Case(
        {"api": raw_doc("db", {"web": "allow"})}, "allow", "web", "api", False, None, None
    ),
    "malformed * document denies a destination without a document": Case(
        {"*": BROKEN}, "allow", "web", "api", False, None, None
    ),
    "malformed * document denies sources the destination's document does not match": Case(
        {"*": BROKEN, "api": {"db": "allow"}}, "allow", "web", "api", False, None, None
    ),
    "malformed * document cannot undo an exact intention": Case(
        {"*": BROKEN, "api": {"web": "allow"}}, "deny", "web", "api", True, 9, ("web", "api")
    ),
    "malformed * document cannot undo a */exact intention": Case(
        {"*": BROKEN, "api": {"*": "allow"}}, "deny", "web", "api", True, 8, ("*", "api")
    ),
    # -- malformed names -------------------------------------------------------------------
    "upper-case source never matches, denied": Case(
        {"api": {"*": "allow"}}, "allow", "Web", "api", False, None, None
    ),
    "* is not a source identity": Case(
        {"api": {"*": "allow"}}, "allow", "*", "api", False, None, None
    ),
    "* is not a destination to connect to": Case(
        {"*": {"*": "allow"}}, "allow", "web", "*", False, None, None
    ),
    # -- anonymous (plaintext, permissive mode) peers ---------------------------------------
    "anonymous, no intentions, default allow": Case({}, "allow", None, "api", True, None, None),
    "anonymous, no intentions, default deny": Case({}, "deny", None, "api", False, None, None),
    "anonymous, */exact allow": Case(
        {"api": {"*": "allow"}}, "deny", None, "api", True, 8, ("*", "api")
    ),
    "anonymous is denied if any identity is denied": Case(
        {"api": {"web": "deny", "*": "allow"}}, "allow", None, "api", False, 9, ("web", "api")
    ),
    "anonymous does not get an exact allow": Case(
        {"api": {"web": "allow"}}, "deny", None, "api", False, None, None
    ),
    "anonymous, exact and * allows": Case(
        {"api": {"web": "allow", "*": "allow"}}, "deny", None, "api", True, 8, ("*", "api")
    ),
    "anonymous, */* deny under default allow": Case(
        {"*": {"*": "deny"}}, "allow", None, "api", False, 5, ("*", "*")
    ),
    "anonymous: a lower exact deny is shadowed by a higher allow": Case(
        {"api": {"web": "allow"}, "*": {"web": "deny", "*": "allow"}},
        "deny", None, "api", True, 5, ("*", "*"),
    ),
    "anonymous, malformed destination document": Case(
        {"api": BROKEN}, "allow", None, "api", False, None, None
    ),
    "anonymous, L7 source": Case(
        {"api": {"web": "l7-allow"}}, "allow", None, "api", False, 9, ("web", "api")
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_authorize(case: Case) -> None:
    policy = compile_policy(kv_documents(case.docs), default_action=Action(case.default))
    decision = authorize_fn(policy, case.source, case.destination)
    assert decision.allowed is case.allowed, decision.reason
    assert decision.precedence == case.precedence, decision.reason
    got = decision.intention
    assert (None if got is None else (got.source, got.destination)) == case.matched
    assert decision.reason


def test_invalid_documents_are_listed_with_reasons() -> None:
    policy = compile_policy(kv_documents({"api": BROKEN, "db": {"web": "allow"}, "*": BROKEN}))
    assert [(d.destination, d.key) for d in policy.invalid] == [
        ("*", "meshd/intentions/*"),
        ("api", "meshd/intentions/api"),
    ]
    assert all("not valid JSON" in d.reason for d in policy.invalid)
    reason = authorize_fn(policy, "web", "cache").reason
    assert "meshd/intentions/*" in reason and "invalid" in reason


def test_evaluation_order_is_precedence_then_deny_first() -> None:
    docs = {"api": {"b": "allow", "a": "allow", "c": "deny", "*": "allow"}, "*": {"*": "deny"}}
    policy = compile_policy(kv_documents(docs))
    order = [
        (s.source, s.destination, s.precedence, s.l4_action.value)
        for s in policy.evaluation_order("api")
        if not isinstance(s, Barrier)
    ]
    assert order == [
        ("c", "api", 9, "deny"),
        ("a", "api", 9, "allow"),
        ("b", "api", 9, "allow"),
        ("*", "api", 8, "allow"),
        ("*", "*", 5, "deny"),
    ]


def test_documents_from_raw_matches_documents_from_kv() -> None:
    raw = {"api": raw_doc("api", {"web": "allow"}), "db": BROKEN}
    entries = [(intentions_key(dst), doc) for dst, doc in raw.items()]
    assert documents_from_raw(raw) == documents_from_kv(entries)


def test_kv_folder_key_is_skipped_and_nested_keys_are_invalid() -> None:
    docs = documents_from_kv(
        [("meshd/intentions/", b""), ("meshd/intentions/a/b", raw_doc("b", {})), ("other", b"")]
    )
    assert list(docs) == ["a/b"]
    assert isinstance(docs["a/b"], InvalidDocument)


# -- parsing ---------------------------------------------------------------------------------


def doc_json(**overrides: Any) -> bytes:
    body: dict[str, Any] = {
        "Kind": "service-intentions",
        "Name": "api",
        "Version": 1,
        "Sources": [{"Name": "web", "Action": "allow"}],
    }
    body.update(overrides)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


PARSE_ERRORS: dict[str, tuple[bytes, str]] = {
    "not JSON": (b"{nope", "(document): is not valid JSON"),
    "not UTF-8": (b'{"Name": "\xff"}', "(document): is not UTF-8"),
    "not an object": (b"[]", "(document): must be a JSON object, got array"),
    "duplicate JSON key": (
        b'{"Kind": "service-intentions", "Kind": "x"}', "duplicate field 'Kind'"
    ),
    "NaN": (doc_json(Version=float("nan")), "NaN is not valid JSON"),
    "unknown top-level field": (doc_json(Namespace="default"), "unknown field 'Namespace'"),
    "missing Kind": (doc_json(Kind=None), "Kind: is required"),
    "wrong Kind": (doc_json(Kind="service-defaults"), "Kind: must be 'service-intentions'"),
    "missing Version": (doc_json(Version=None), "Version: is required"),
    "future Version": (doc_json(Version=2), "Version: unsupported version 2"),
    "boolean Version": (doc_json(Version=True), "Version: must be an integer, got boolean"),
    "Name mismatch": (doc_json(Name="db"), "Name: is 'db' but the key is for destination 'api'"),
    "Sources not a list": (doc_json(Sources={}), "Sources: must be an array"),
    "unknown Action": (
        doc_json(Sources=[{"Name": "web", "Action": "permit"}]),
        "Sources[0].Action: must be 'allow' or 'deny', got 'permit'",
    ),
    "Action wrong type": (
        doc_json(Sources=[{"Name": "web", "Action": 1}]),
        "Sources[0].Action: must be a string, got number",
    ),
    "both Action and Permissions": (
        doc_json(Sources=[{"Name": "web", "Action": "allow", "Permissions": L7_DENY}]),
        "Sources[0]: needs exactly one of Action or Permissions, got both",
    ),
    "neither Action nor Permissions": (
        doc_json(Sources=[{"Name": "web"}]), "got neither"
    ),
    "duplicate source": (
        doc_json(Sources=[{"Name": "web", "Action": "allow"}, {"Name": "web", "Action": "deny"}]),
        "Sources[1].Name: duplicate source 'web'",
    ),
    "bad source name": (
        doc_json(Sources=[{"Name": "Web", "Action": "allow"}]),
        "Sources[0].Name: 'Web' is not a service name",
    ),
    "partial wildcard": (
        doc_json(Sources=[{"Name": "web*", "Action": "allow"}]), "'web*' is not a service name"
    ),
    "unknown source field": (
        doc_json(Sources=[{"Name": "web", "Action": "allow", "Precedence": 9}]),
        "Sources[0]: unknown field 'Precedence'",
    ),
    "Meta value not a string": (
        doc_json(Meta={"team": 1}), "Meta.team: must be a string, got number"
    ),
    "empty Permissions": (
        doc_json(Sources=[{"Name": "web", "Permissions": []}]), "must not be empty"
    ),
    "unknown permission Action": (
        doc_json(Sources=[{"Name": "web", "Permissions": [
            {"Action": "x", "HTTP": {"PathExact": "/"}}]}]),
        "Sources[0].Permissions[0].Action: must be 'allow' or 'deny'",
    ),
    "two path matchers": (
        doc_json(Sources=[{"Name": "web", "Permissions": [
            {"Action": "allow", "HTTP": {"PathExact": "/a", "PathPrefix": "/b"}}]}]),
        "at most one of PathExact, PathPrefix, PathRegex",
    ),
    "relative path": (
        doc_json(Sources=[{"Name": "web", "Permissions": [
            {"Action": "allow", "HTTP": {"PathPrefix": "admin"}}]}]),
        "PathPrefix: must start with '/'",
    ),
    "unknown method": (
        doc_json(Sources=[{"Name": "web", "Permissions": [
            {"Action": "allow", "HTTP": {"Methods": ["FETCH"]}}]}]),
        "Methods[0]: unknown HTTP method 'FETCH'",
    ),
    "header with two matchers": (
        doc_json(Sources=[{"Name": "web", "Permissions": [
            {"Action": "allow",
             "HTTP": {"Header": [{"Name": "x", "Exact": "a", "Prefix": "b"}]}}]}]),
        "Header[0]: exactly one of",
    ),
    "bad path regex": (
        doc_json(Sources=[{"Name": "web", "Permissions": [
            {"Action": "allow", "HTTP": {"PathRegex": "/a(["}}]}]),
        "PathRegex: is not a valid regular expression",
    ),
    "bad header regex": (
        doc_json(Sources=[{"Name": "web", "Permissions": [
            {"Action": "allow", "HTTP": {"Header": [{"Name": "x-a", "Regex": "*"}]}}]}]),
        "Header[0].Regex: is not a valid regular expression",
    ),
    "underscore header name": (
        doc_json(Sources=[{"Name": "web", "Permissions": [
            {"Action": "allow", "HTTP": {"Header": [{"Name": "x_user", "Exact": "a"}]}}]}]),
        "Header[0].Name: 'x_user' is not an HTTP header name",
    ),
    "header name with a space": (
        doc_json(Sources=[{"Name": "web", "Permissions": [
            {"Action": "allow", "HTTP": {"Header": [{"Name": "x user", "Present": True}]}}]}]),
        "is not an HTTP header name",
    ),
    "empty HTTP match": (
        doc_json(Sources=[{"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {}}]}]),
        "must match on at least one of",
    ),
}  # fmt: skip


@pytest.mark.parametrize(("raw", "message"), PARSE_ERRORS.values(), ids=PARSE_ERRORS.keys())
def test_parse_rejects(raw: bytes, message: str) -> None:
    with pytest.raises(IntentionError) as info:
        parse_intentions_document("meshd/intentions/api", raw)
    text = str(info.value)
    assert text.startswith("intentions document meshd/intentions/api: ")
    assert message in text
    assert "\n" not in text


def test_parse_full_document_and_render_canonically() -> None:
    raw = doc_json(
        Meta={"owner": "team-a"},
        Sources=[
            {"Name": "web", "Action": "allow", "Description": "frontend", "Meta": {"t": "1"}},
            {"Name": "*", "Permissions": [
                {"Action": "allow", "HTTP": {"PathRegex": "^/v[0-9]+/", "Methods": ["GET"],
                 "Header": [{"Name": "x-a", "Present": True, "Invert": True},
                            {"Name": "x-b", "Exact": ""}]}}]},
        ],
    )  # fmt: skip
    doc = parse_intentions_document("meshd/intentions/api", raw)
    assert [s.name for s in doc.sources] == ["*", "web"]
    assert doc.source("web") is not None and doc.source("web").description == "frontend"  # type: ignore[union-attr]
    assert doc.sources[0].is_l7 and not doc.sources[1].is_l7
    rendered = render_document(doc)
    assert parse_intentions_document("meshd/intentions/api", rendered) == doc
    assert render_document(parse_intentions_document("x/api", rendered)) == rendered
    assert list(json.loads(rendered)) == ["Kind", "Name", "Version", "Meta", "Sources"]


def test_wildcard_destination_document() -> None:
    raw = doc_json(Name="*", Sources=[{"Name": "*", "Action": "deny"}])
    assert parse_intentions_document("meshd/intentions/*", raw).name == "*"


def test_with_and_without_source_keep_sources_sorted() -> None:
    doc = parse_intentions_document("meshd/intentions/api", doc_json())
    added = doc.with_source(doc.sources[0].__class__(name="a", action=Action.DENY))
    assert [s.name for s in added.sources] == ["a", "web"]
    assert [s.name for s in added.without_source("web").sources] == ["a"]


# -- properties ------------------------------------------------------------------------------

NAMES = ("a", "b", "c")
SPECS = st.sampled_from(["allow", "deny", "l7-deny", "l7-allow"])
SOURCES = st.dictionaries(st.sampled_from([*NAMES, "d", "*"]), SPECS, max_size=5)
DOCS = st.dictionaries(
    st.sampled_from([*NAMES, "*"]), st.one_of(SOURCES, st.just(BROKEN)), max_size=4
)
PROBE_SOURCES = (*NAMES, "d", "e", None)
PROBE_DESTINATIONS = (*NAMES, "d")


def decisions(
    docs: Mapping[str, IntentionsDocument | InvalidDocument], default: Action
) -> dict[tuple[str | None, str], bool]:
    policy = compile_policy(docs, default_action=default)
    return {
        (src, dst): authorize_fn(policy, src, dst).allowed
        for src in PROBE_SOURCES
        for dst in PROBE_DESTINATIONS
    }


@settings(max_examples=100, deadline=None)
@given(docs=DOCS, default=st.sampled_from(list(Action)), data=st.data())
def test_compilation_is_order_independent(
    docs: dict[str, Spec | bytes], default: Action, data: st.DataObject
) -> None:
    """Same intentions, any order of documents and of sources: same decisions."""
    shuffled: dict[str, Spec | bytes] = {}
    for dst in data.draw(st.permutations(list(docs))):
        spec = docs[dst]
        if isinstance(spec, bytes):
            shuffled[dst] = spec
        else:
            order = data.draw(st.permutations(list(spec.items())))
            shuffled[dst] = raw_doc(dst, order)
    assert decisions(kv_documents(shuffled), default) == decisions(kv_documents(docs), default)


@settings(max_examples=100, deadline=None)
@given(docs=DOCS, default=st.sampled_from(list(Action)), data=st.data())
def test_invalidating_a_document_never_widens_access(
    docs: dict[str, Spec | bytes], default: Action, data: st.DataObject
) -> None:
    """Fail closed: replacing any document with garbage only ever turns allows into denies."""
    parsed = kv_documents(docs)
    victim = data.draw(st.sampled_from([*NAMES, "*"]))
    broken = dict(parsed)
    broken[victim] = InvalidDocument(destination=victim, key=intentions_key(victim), reason="x")
    before, after = decisions(parsed, default), decisions(broken, default)
    widened = [pair for pair, allowed in after.items() if allowed and not before[pair]]
    assert widened == []


@settings(max_examples=100, deadline=None)
@given(docs=DOCS, default=st.sampled_from(list(Action)))
def test_anonymous_allowed_only_if_every_identity_is(
    docs: dict[str, Spec | bytes], default: Action
) -> None:
    table = decisions(kv_documents(docs), default)
    for dst in PROBE_DESTINATIONS:
        if table[(None, dst)]:
            assert all(table[(src, dst)] for src in PROBE_SOURCES if src is not None)


@settings(max_examples=50, deadline=None)
@given(sources=SOURCES, meta=st.dictionaries(st.text(max_size=5), st.text(max_size=5)))
def test_render_parse_round_trip(sources: Spec, meta: dict[str, str]) -> None:
    body = json.loads(raw_doc("api", sources))
    body["Meta"] = meta
    doc = parse_intentions_document("meshd/intentions/api", json.dumps(body).encode())
    rendered = render_document(doc)
    assert parse_intentions_document("meshd/intentions/api", rendered) == doc
    assert render_document(parse_intentions_document("meshd/intentions/api", rendered)) == rendered


@settings(max_examples=200, deadline=None)
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_arbitrary_bytes_never_raise_and_never_allow(raw: bytes) -> None:
    """Whatever sits in KV, loading never crashes, and garbage denies its destination."""
    docs = documents_from_kv([(intentions_key("api"), raw)])
    policy = compile_policy(docs, default_action=Action.ALLOW)
    if isinstance(docs["api"], InvalidDocument):
        assert not authorize_fn(policy, "web", "api").allowed


def test_document_under_the_wrong_destination_is_invalid() -> None:
    """A programming error (doc for db passed as api's) denies api instead of applying db's."""
    db = parse_intentions_document("meshd/intentions/db", raw_doc("db", {"web": "allow"}))
    policy = compile_policy({"api": db}, default_action=Action.ALLOW)
    assert not authorize_fn(policy, "web", "api").allowed
    assert [d.destination for d in policy.invalid] == ["api"]
