"""The data-plane view: one snapshot parsed and compiled, failing closed on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshd.balancer import RoundRobin
from meshd.bootstrap import TokenError, TokenRecord
from meshd.config import ConfigError
from meshd.config.document import parse_toml
from meshd.dataplane import DataPlaneView, ViewCache, build_view
from meshd.intentions import Action, IntentionsDocument, SourceIntention, render_document
from meshd.meshconfig import MeshConfig, MTLSMode, OutboundPolicy, render_mesh_config
from meshd.snapshot import LocalService, SnapshotFormatError, from_json, make_snapshot
from meshd.snapshot.reducer import intention_upstreams
from meshd.trustbundle import TrustBundle, TrustBundleError
from tests.plugins.pki import MeshCa


def intentions(destination: str, **sources: str) -> bytes:
    return render_document(
        IntentionsDocument(
            name=destination,
            sources=tuple(SourceIntention(n, action=Action(a)) for n, a in sorted(sources.items())),
        )
    )


#: 200 kB (Consul takes values up to 512 kB) that Python's json gives up on with a
#: RecursionError, which no parser may let escape: it would end the agent.
NESTED = b"[" * 100_000 + b"]" * 100_000


def snapshot(*, mesh: bytes | None = None, bundle: bytes | None = None, **docs: bytes):
    return make_snapshot(
        version=3,
        created_at=1.0,
        local_services=(
            LocalService("web", "web-1", 8080, upstreams=("api",)),
            LocalService("admin", "admin-1", 8081, upstreams=("api", "db")),
        ),
        mesh_config_raw=mesh,
        intentions_raw=docs,
        trust_bundle_raw=bundle,
    )


def test_view_compiles_intentions_with_the_mesh_default(mesh_ca: MeshCa) -> None:
    mesh = render_mesh_config(MeshConfig(default_action=Action.ALLOW))
    view = build_view(
        snapshot(mesh=mesh, bundle=mesh_ca.bundle.to_json(), api=intentions("api", web="deny"))
    )
    assert view.bundle is not None and view.bundle_error is None
    assert view.mesh.default_action == Action.ALLOW and view.mesh_error is None
    assert not view.authorize("web", "api").allowed
    assert view.authorize("admin", "api").allowed  # falls to the default: allow
    assert view.authorize("web", "db").allowed


@pytest.mark.parametrize(
    "raw",
    [b"{", b"[]", json.dumps({"Kind": "mesh", "Version": 99}).encode(), b"\xff\xfe", NESTED],
    ids=["truncated", "not-an-object", "unknown-version", "not-utf8", "nested-too-deep"],
)
def test_invalid_mesh_config_fails_closed(raw: bytes) -> None:
    view = build_view(snapshot(mesh=raw))
    assert view.mesh_error is not None
    assert view.mesh.mtls_mode == MTLSMode.STRICT
    assert view.mesh.default_action == Action.DENY
    assert view.mesh.outbound_policy == OutboundPolicy.REGISTRY_ONLY
    assert not view.authorize("web", "api").allowed


def test_missing_or_invalid_bundle_leaves_nothing_verifiable() -> None:
    assert build_view(snapshot()).bundle is None
    assert "meshctl ca init" in (build_view(snapshot()).bundle_error or "")
    broken = build_view(snapshot(bundle=b'{"version": 1}'))
    assert broken.bundle is None and broken.bundle_error


@pytest.mark.parametrize(
    "raw",
    [b"{not json", NESTED, b'{"a":' * 50_000 + b"1" + b"}" * 50_000],
    ids=["not-json", "nested-arrays", "nested-objects"],
)
def test_invalid_intentions_document_denies_only_its_destination(
    mesh_ca: MeshCa, raw: bytes
) -> None:
    mesh = render_mesh_config(MeshConfig(default_action=Action.ALLOW))
    view = build_view(snapshot(mesh=mesh, api=raw, db=intentions("db", web="allow")))
    assert not view.authorize("web", "api").allowed
    assert view.authorize("web", "db").allowed
    assert [d.destination for d in view.policy.invalid] == ["api"]


def test_documents_nested_too_deeply_are_errors_everywhere_they_are_read() -> None:
    """Every reader of a document from Consul, a peer or disk turns deep nesting into its
    own error (the agent, meshd and meshctl then report it), never a RecursionError."""
    with pytest.raises(TrustBundleError, match="nested too deeply"):
        TrustBundle.from_json(NESTED)
    with pytest.raises(TokenError, match="nested too deeply"):
        TokenRecord.from_json(NESTED)
    with pytest.raises(SnapshotFormatError, match="nested too deeply"):
        from_json(NESTED)
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_toml("a = " + "[" * 100_000 + "]" * 100_000, file="agent.toml", base=Path("."))
    assert intention_upstreams({"api": NESTED}, frozenset({"web"})) == set()
    assert "nested too deeply" in str(build_view(snapshot(bundle=NESTED)).bundle_error)
    view = build_view(snapshot(mesh=NESTED))
    assert "nested too deeply" in str(view.mesh_error)


def test_source_identity_must_be_unambiguous() -> None:
    view = build_view(snapshot())
    assert not view.identifies_by_user
    assert view.source_identity("db") == LocalService(
        "admin", "admin-1", 8081, upstreams=("api", "db")
    )
    assert (
        view.source_identity("api")
        == (  # two local services declare api
            "no unambiguous local identity: of the local services (admin, web), several declare"
            " api as an upstream"
        )
    )
    assert view.source_identity("elsewhere") == (
        "no unambiguous local identity: of the local services (admin, web), none declares"
        " elsewhere as an upstream"
    )
    single = make_snapshot(
        version=1, created_at=0, local_services=(LocalService("web", "web-1", 8080),)
    )
    only = build_view(single).source_identity("anything")
    assert isinstance(only, LocalService) and only.name == "web"


def by_user(*services: LocalService) -> DataPlaneView:
    return build_view(make_snapshot(version=1, created_at=0, local_services=services))


WEB = LocalService("web", "web-1", 8080, upstreams=("api",), uid=1001)
ADMIN = LocalService("admin", "admin-1", 8081, upstreams=("api",), uid=1002)
CRON = LocalService("cron", "cron-1", 8082, upstreams=("api", "db"), uid=1002)
LEGACY = LocalService("legacy", "legacy-1", 8083, upstreams=("api",))


@pytest.mark.parametrize(
    ("services", "destination", "owner", "expected"),
    [
        # Two services call api: their users tell them apart.
        ((WEB, ADMIN), "api", 1001, WEB),
        ((WEB, ADMIN), "api", 1002, ADMIN),
        # The only service of a user is that user's identity, declared upstream or not.
        ((WEB, ADMIN), "db", 1001, WEB),
        # A user no service names gets nothing, root included; so does an unknown owner.
        ((WEB, ADMIN), "api", 0, "no local service runs as uid 0 ([service] user)"),
        ((WEB, ADMIN), "api", None, "the owner of the connection is not known"),
        # A service without a user never lends its identity once users are named.
        ((WEB, LEGACY), "api", 1003, "no local service runs as uid 1003 ([service] user)"),
        ((WEB, LEGACY), "api", 1001, WEB),
        # Two services of one user: their upstreams decide, as without users.
        ((WEB, ADMIN, CRON), "db", 1002, CRON),
        (
            (WEB, ADMIN, CRON),
            "api",
            1002,
            "no unambiguous local identity: of the local services of uid 1002 (admin, cron),"
            " several declare api as an upstream",
        ),
    ],
)
def test_source_identity_by_the_user_that_opened_the_connection(
    services: tuple[LocalService, ...],
    destination: str,
    owner: int | None,
    expected: LocalService | str,
) -> None:
    view = by_user(*services)
    assert view.identifies_by_user
    assert view.source_identity(destination, owner) == expected


def test_view_cache_rebuilds_only_for_a_new_snapshot() -> None:
    cache = ViewCache()
    first = snapshot()
    assert cache.view_for(first) is cache.view_for(first)
    assert cache.view_for(snapshot()) is not cache.view_for(first)


def test_round_robin_rotates_and_orders_retries() -> None:
    rr = RoundRobin()
    endpoints = ("a", "b", "c")
    picks = [rr.attempt_order("api", endpoints) for _ in range(4)]
    assert picks == [("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b"), ("a", "b", "c")]
    assert rr.attempt_order("db", endpoints, max_attempts=2) == ("a", "b")  # own rotation
    assert rr.attempt_order("api", ()) == ()
    assert rr.statistics().picks == (("api", 4), ("db", 1))
