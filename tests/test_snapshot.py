"""The sans-IO snapshot reducer and codec, and the driver's coalescing under virtual time."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from agent.snapshots import SnapshotHolder, SnapshotPipeline, load_persisted
from meshd.snapshot import (
    BundleChanged,
    Endpoint,
    EndpointsChanged,
    Event,
    IncompleteSnapshot,
    IntentionsChanged,
    LocalService,
    LocalServicesChanged,
    MeshConfigChanged,
    Reducer,
    Snapshot,
    SnapshotFormatError,
    UpstreamRequested,
    from_json,
    to_json,
)

WEB = LocalService("web", "web-1", 8080, "http", upstreams=("api",))


def ep(address: str, port: int = 9000, sid: str | None = None) -> Endpoint:
    return Endpoint(address, port, f"node-{address}", sid or f"svc-{address}", {"v": "1"})


def fixed_inputs() -> list[Event]:
    return [
        MeshConfigChanged(b'{"mtls":"strict"}'),
        BundleChanged(b"-----BEGIN CERTIFICATE-----"),
        IntentionsChanged({}),
    ]


def ready_reducer(**kwargs: object) -> Reducer:
    reducer = Reducer(local_services=(WEB,), **kwargs)  # type: ignore[arg-type]
    for event in [*fixed_inputs(), EndpointsChanged("api", (ep("198.18.0.2"),), 7)]:
        reducer.apply(event, now=0.0)
    return reducer


# -- completeness ---------------------------------------------------------------------------


def test_not_ready_until_every_required_input_delivered() -> None:
    reducer = Reducer(local_services=(WEB,))
    events = [*fixed_inputs(), EndpointsChanged("api", (), 3)]
    for event in events:
        assert not reducer.ready()
        with pytest.raises(IncompleteSnapshot, match="waiting for"):
            reducer.build(0.0)
        reducer.apply(event, now=0.0)
    assert reducer.ready()
    snapshot = reducer.build(1.0)
    assert snapshot.version == 1
    assert snapshot.upstreams["api"].endpoints == ()  # delivered, just empty


def test_missing_names_in_incomplete_error() -> None:
    reducer = Reducer(local_services=(WEB,))
    reducer.apply(MeshConfigChanged(None), now=0)
    with pytest.raises(IncompleteSnapshot) as info:
        reducer.build(0)
    assert "api" in str(info.value) and "trust_bundle" in str(info.value)
    assert "mesh_config" not in str(info.value)


def test_on_demand_upstream_never_blocks_readiness() -> None:
    reducer = ready_reducer()
    reducer.apply(UpstreamRequested("billing"), now=0)
    assert "billing" in reducer.watch_set()
    assert reducer.ready()
    assert "billing" not in reducer.build(0).upstreams


# -- versioning -------------------------------------------------------------------------------


def test_version_moves_only_on_content_change() -> None:
    reducer = ready_reducer()
    first = reducer.build(0.0)
    # Same endpoints in another order and at a newer index: same content.
    reducer.apply(EndpointsChanged("api", (ep("198.18.0.2"),), 99), now=1)
    reducer.apply(MeshConfigChanged(b'{"mtls":"strict"}'), now=1)
    assert reducer.build(2.0) is first
    reducer.apply(EndpointsChanged("api", (ep("198.18.0.3"), ep("198.18.0.2")), 100), now=3)
    second = reducer.build(4.0)
    assert second.version == 2
    assert [e.address for e in second.endpoints("api")] == ["198.18.0.2", "198.18.0.3"]
    assert first.endpoints("api") == (ep("198.18.0.2"),)  # the old value is untouched


def test_versions_continue_above_previous_snapshot() -> None:
    persisted = ready_reducer().build(0)
    reducer = ready_reducer(previous=persisted)
    assert reducer.build(5) is persisted  # same content: no new version after restart
    reducer.apply(MeshConfigChanged(b"{}"), now=5)
    assert reducer.build(6).version == persisted.version + 1


# -- address map ------------------------------------------------------------------------------


def test_address_map_maps_endpoints_and_drops_ambiguous() -> None:
    reducer = ready_reducer()
    reducer.apply(UpstreamRequested("db"), now=0)
    reducer.apply(EndpointsChanged("db", (ep("198.18.0.9", 5432), ep("198.18.0.2")), 1), now=0)
    snapshot = reducer.build(0)
    assert snapshot.service_for("198.18.0.9", 5432) == "db"
    assert snapshot.service_for("198.18.0.2", 9000) is None  # claimed by api and db
    assert snapshot.service_for("198.18.0.9", 5433) is None
    assert snapshot.local_service_on(8080) == WEB


# -- hold last good (SECURITY-TESTS F) --------------------------------------------------------


def test_empty_endpoints_held_for_grace_then_published() -> None:
    reducer = ready_reducer(hold_grace_s=30.0)
    assert reducer.build(0).endpoints("api")
    reducer.apply(EndpointsChanged("api", (), 8), now=10.0)
    assert reducer.next_deadline() == 40.0
    held = reducer.build(39.9)
    assert held.version == 1 and held.endpoints("api") == (ep("198.18.0.2"),)
    assert reducer.statistics().held == frozenset({"api"})
    expired = reducer.build(40.0)
    assert expired.version == 2 and expired.endpoints("api") == ()
    assert reducer.next_deadline() is None


def test_recovery_during_grace_cancels_the_hold() -> None:
    reducer = ready_reducer(hold_grace_s=30.0)
    reducer.build(0)
    reducer.apply(EndpointsChanged("api", (), 8), now=10.0)
    reducer.apply(EndpointsChanged("api", (), 9), now=20.0)  # still empty: grace not reset
    assert reducer.next_deadline() == 40.0
    reducer.apply(EndpointsChanged("api", (ep("198.18.0.4"),), 10), now=25.0)
    assert reducer.next_deadline() is None
    assert reducer.build(100.0).endpoints("api") == (ep("198.18.0.4"),)


def test_persisted_endpoints_are_held_after_restart() -> None:
    persisted = ready_reducer().build(0)
    reducer = Reducer(local_services=(WEB,), previous=persisted, hold_grace_s=30.0)
    for event in [*fixed_inputs(), EndpointsChanged("api", (), 1)]:
        reducer.apply(event, now=100.0)
    assert reducer.ready()
    assert reducer.build(129.0) is persisted  # Consul says none pass: keep the persisted set
    assert reducer.build(130.0).endpoints("api") == ()


# -- bounded watch set ------------------------------------------------------------------------


def intention(*sources: tuple[str, str]) -> bytes:
    return json.dumps({"Sources": [{"Name": n, "Action": a} for n, a in sources]}).encode()


def test_watch_set_is_declared_plus_intentions_naming_local_sources() -> None:
    reducer = Reducer(local_services=(WEB,))
    reducer.apply(
        IntentionsChanged(
            {
                "billing": intention(("web", "allow")),
                "audit": intention(("web", "deny")),
                "search": intention(("*", "allow")),
                "web": intention(("frontend", "allow")),  # callers of web: not upstreams
                "other": intention(("batch", "allow")),
                "broken": b"{not json",
            }
        ),
        now=0,
    )
    assert reducer.watch_set() == {"api", "billing"}


def test_invalid_service_names_are_never_watched() -> None:
    reducer = Reducer(local_services=(LocalService("web", "web-1", 8080, upstreams=("ok", "a b")),))
    reducer.apply(
        IntentionsChanged(
            {"nested/key": intention(("web", "allow")), "x?y": intention(("web", "allow"))}
        ),
        now=0,
    )
    for name in ("../v1/kv", "", "-x", "é"):
        reducer.apply(UpstreamRequested(name), now=0)
    assert reducer.watch_set() == {"ok"}


def test_l7_permissions_count_as_possible_allow() -> None:
    doc = json.dumps({"Sources": [{"Name": "web", "Permissions": [{"Action": "allow"}]}]})
    reducer = Reducer(local_services=(WEB,))
    reducer.apply(IntentionsChanged({"billing": doc.encode()}), now=0)
    assert "billing" in reducer.watch_set()


def test_discovered_upstreams_capped_least_recent_evicted() -> None:
    reducer = Reducer(local_services=(WEB,), max_discovered=2)
    for name in ("a", "b", "a", "c"):
        reducer.apply(UpstreamRequested(name), now=0)
    assert reducer.watch_set() == {"api", "a", "c"}


def test_watch_set_is_capped_declared_first_then_intentions_then_discoveries() -> None:
    many = LocalService("web", "web-1", 8080, upstreams=("d1", "d2", "d3"))
    reducer = Reducer(local_services=(many,), max_watched=5)
    for event in fixed_inputs():
        reducer.apply(event, now=0)
    reducer.apply(IntentionsChanged({"i2": intention(("web", "allow")),
                                     "i1": intention(("web", "allow"))}), now=0)  # fmt: skip
    for name in ("x", "y"):
        reducer.apply(UpstreamRequested(name), now=0)
    assert reducer.watch_set() == {"d1", "d2", "d3", "i1", "i2"}
    assert reducer.statistics().unwatched == {"x", "y"}
    # Readiness waits only for what is watched, never for what the cap left out.
    for name in ("d1", "d2", "d3", "i1"):
        reducer.apply(EndpointsChanged(name, (ep("198.18.0.9"),), 1), now=0)
    assert not reducer.ready()
    reducer.apply(EndpointsChanged("i2", (), 1), now=0)
    assert reducer.ready()
    small = Reducer(local_services=(many,), max_watched=2)
    assert small.watch_set() == {"d1", "d2"}  # deterministic: by name within a group
    assert small.statistics().unwatched == {"d3"}


def test_leaving_the_watch_set_drops_endpoints_and_late_results() -> None:
    reducer = ready_reducer()
    reducer.apply(LocalServicesChanged((LocalService("web", "web-1", 8080),)), now=0)
    assert reducer.watch_set() == frozenset()
    reducer.apply(EndpointsChanged("api", (ep("198.18.0.7"),), 9), now=0)  # late result
    snapshot = reducer.build(0)
    assert snapshot.upstreams == {} and snapshot.address_map == {}


event_strategy = st.one_of(
    st.builds(
        EndpointsChanged,
        st.sampled_from(["api", "db"]),
        st.lists(
            st.builds(ep, st.sampled_from(["198.18.0.2", "198.18.0.3"]), st.sampled_from([80, 81])),
            max_size=3,
        ).map(tuple),
        st.integers(0, 100),
    ),
    st.builds(MeshConfigChanged, st.sampled_from([None, b"a", b"b"])),
    st.builds(UpstreamRequested, st.sampled_from(["db", "cache"])),
)


@given(st.lists(event_strategy, max_size=20))
def test_versions_track_content_changes(events: list[Event]) -> None:
    reducer = ready_reducer(hold_grace_s=0.0)
    previous = reducer.build(0)
    for event in events:
        reducer.apply(event, now=1)
        snapshot = reducer.build(1)
        changed = not snapshot.same_content(previous)
        assert snapshot.version == previous.version + changed
        assert (snapshot is previous) == (not changed)
        for (address, port), name in snapshot.address_map.items():
            assert any((e.address, e.port) == (address, port) for e in snapshot.endpoints(name))
        assert set(snapshot.upstreams) <= reducer.watch_set()
        previous = snapshot


# -- codec ------------------------------------------------------------------------------------


def built_snapshot() -> Snapshot:
    reducer = ready_reducer()
    reducer.apply(IntentionsChanged({"api": intention(("web", "allow"))}), now=0)
    return reducer.build(0.0, created_at=1_700_000_000.5)


def test_round_trip() -> None:
    snapshot = built_snapshot()
    again = from_json(to_json(snapshot))
    assert again == snapshot
    assert to_json(again) == to_json(snapshot)


def test_a_local_services_uid_round_trips_and_older_snapshots_without_it_load() -> None:
    snapshot = dataclasses.replace(
        built_snapshot(), local_services=(dataclasses.replace(WEB, uid=1001),)
    )
    doc = json.loads(to_json(snapshot))
    assert doc["local_services"][0]["uid"] == 1001
    assert from_json(to_json(snapshot)) == snapshot
    del doc["local_services"][0]["uid"]  # as written before services named their users
    assert from_json(json.dumps(doc).encode()).local_services[0].uid is None
    doc["local_services"][0]["uid"] = "1001"
    with pytest.raises(SnapshotFormatError, match=r"local_services\[0\]\.uid: wrong type"):
        from_json(json.dumps(doc).encode())


@given(
    st.dictionaries(st.text(min_size=1, max_size=8), st.binary(max_size=32), max_size=4),
    st.one_of(st.none(), st.binary(max_size=64)),
)
def test_round_trip_arbitrary_documents(intentions: dict[str, bytes], mesh: bytes | None) -> None:
    reducer = Reducer(required=frozenset())
    reducer.apply(IntentionsChanged(intentions), now=0)
    reducer.apply(MeshConfigChanged(mesh), now=0)
    snapshot = reducer.build(0)
    assert from_json(to_json(snapshot)) == snapshot


def mutated(change: str) -> bytes:
    doc = json.loads(to_json(built_snapshot()))
    match change:
        case "format_version":
            doc["format_version"] = 2
        case "format":
            doc["format"] = "other"
        case "unknown_key":
            doc["extra"] = 1
        case "missing_key":
            del doc["trust_bundle"]
        case "bool_port":
            doc["local_services"][0]["port"] = True
        case "bad_base64":
            doc["mesh_config"] = "***"
        case "endpoint_key":
            doc["upstreams"]["api"]["endpoints"][0]["weight"] = 1
        case "bad_protocol":
            doc["local_services"][0]["protocol"] = "udp"
        case "meta_type":
            doc["upstreams"]["api"]["endpoints"][0]["meta"] = {"v": 1}
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "change",
    [
        "format_version",
        "format",
        "unknown_key",
        "missing_key",
        "bool_port",
        "bad_base64",
        "endpoint_key",
        "bad_protocol",
        "meta_type",
    ],
)
def test_strict_rejection(change: str) -> None:
    with pytest.raises(SnapshotFormatError):
        from_json(mutated(change))


def test_rejects_non_json() -> None:
    with pytest.raises(SnapshotFormatError, match="not JSON"):
        from_json(b"\xff\x00")


# -- driver: holder and coalescing under virtual time ------------------------------------------


async def test_holder_readers_skip_to_newest() -> None:
    holder = SnapshotHolder()
    reducer = ready_reducer()
    first = reducer.build(0)
    reducer.apply(MeshConfigChanged(b"2"), now=0)
    second = reducer.build(0)
    assert holder.publish(first) and holder.publish(second)
    assert not holder.publish(first)  # older never replaces newer
    assert await holder.wait_newer(None) is second
    assert await holder.wait_newer(0) is second  # skipped version 1
    with trio.move_on_after(1) as scope:
        await holder.wait_newer(second.version)
    assert scope.cancelled_caught
    assert holder.statistics().published == 2


async def run_pipeline(
    nursery: trio.Nursery, state_dir: Path | None, coalesce_s: float
) -> tuple[SnapshotPipeline, trio.MemorySendChannel[Event]]:
    send, receive = trio.open_memory_channel[Event](100)
    pipeline = SnapshotPipeline(SnapshotHolder(), Reducer(local_services=(WEB,)), send)
    started: list[str] = []

    async def watch_upstream(name: str) -> None:
        started.append(name)
        await trio.sleep_forever()

    nursery.start_soon(
        lambda: pipeline.serve_reducer(
            receive, state_dir=state_dir, coalesce_s=coalesce_s, watch_upstream=watch_upstream
        )
    )
    await trio.sleep(0)
    return pipeline, send


async def test_coalesces_a_burst_into_one_publish(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        pipeline, send = await run_pipeline(nursery, None, coalesce_s=0.5)
        start = trio.current_time()
        for event in fixed_inputs():
            await send.send(event)
            await trio.sleep(0.1)
        assert pipeline.holder.current() is None  # incomplete: api has not delivered
        await send.send(EndpointsChanged("api", (ep("198.18.0.2"),), 1))
        first = await pipeline.holder.wait_newer(None)
        assert trio.current_time() - start == pytest.approx(0.5)  # window from first change
        await trio.sleep(1.0)
        burst_start = trio.current_time()
        for i in range(3, 8):  # five changes within one window
            await send.send(EndpointsChanged("api", (ep(f"198.18.0.{i}"),), i))
            await trio.sleep(0.05)
        second = await pipeline.holder.wait_newer(first.version)
        assert trio.current_time() - burst_start == pytest.approx(0.5)
        assert (first.version, second.version) == (1, 2)
        assert second.endpoints("api") == (ep("198.18.0.7"),)
        await trio.sleep(5)
        assert pipeline.holder.statistics().published == 2
        assert pipeline.statistics().upstream_watches == frozenset({"api"})
        nursery.cancel_scope.cancel()


async def test_hold_expiry_wakes_the_driver(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        pipeline, send = await run_pipeline(nursery, None, coalesce_s=0.05)
        for event in [*fixed_inputs(), EndpointsChanged("api", (ep("198.18.0.2"),), 1)]:
            await send.send(event)
        await pipeline.holder.wait_newer(None)
        emptied_at = trio.current_time()
        await send.send(EndpointsChanged("api", (), 2))
        snapshot = await pipeline.holder.wait_newer(1)
        assert trio.current_time() - emptied_at == pytest.approx(30.0, abs=0.1)
        assert snapshot.endpoints("api") == ()
        nursery.cancel_scope.cancel()


async def test_watch_set_changes_start_and_stop_watches(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        pipeline, send = await run_pipeline(nursery, None, coalesce_s=0.05)
        pipeline.request_upstream("billing")
        await trio.sleep(0.1)
        assert pipeline.statistics().upstream_watches == {"api", "billing"}
        pipeline.update_local_services((LocalService("web", "web-1", 8080),))
        await trio.sleep(0.1)
        assert pipeline.statistics().upstream_watches == {"billing"}
        nursery.cancel_scope.cancel()


async def test_published_snapshots_persist_0600(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        pipeline, send = await run_pipeline(nursery, tmp_path, coalesce_s=0.01)
        for event in [*fixed_inputs(), EndpointsChanged("api", (ep("198.18.0.2"),), 1)]:
            await send.send(event)
        snapshot = await pipeline.holder.wait_newer(None)
        with trio.fail_after(5):
            while pipeline.statistics().persisted < 1:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    path = tmp_path / "snapshot.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_persisted(tmp_path) == snapshot


def test_load_persisted_ignores_garbage_and_loose_modes(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.json"
    assert load_persisted(tmp_path) is None
    path.write_bytes(to_json(built_snapshot()))
    path.chmod(0o644)  # group/other readable: refused like a leaked key
    assert load_persisted(tmp_path) is None
    path.chmod(0o600)
    assert load_persisted(tmp_path) == built_snapshot()
    path.write_bytes(b'{"format": "meshd-snapshot"}')
    assert load_persisted(tmp_path) is None
