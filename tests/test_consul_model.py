"""Pure parts of the Consul seam: request payloads, response parsing, blocking-query rules."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.consul import Backoff, CheckDefinition, ServiceRegistration
from meshd.consul.model import (
    ResponseShapeError,
    check_key,
    check_name,
    check_payload,
    go_duration,
    kv_folder,
    parse_catalog_nodes,
    parse_catalog_services,
    parse_health_service,
    parse_index,
    parse_kv_entries,
    parse_kv_entry,
    registration_payload,
)
from meshd.consul.plan import BlockingQueryPlan

# -- checks and registrations -----------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "expected"),
    [
        (
            CheckDefinition(kind="http", target="http://10.0.0.1:80/health", interval_s=1.0),
            {"HTTP": "http://10.0.0.1:80/health", "Interval": "1000ms"},
        ),
        (
            CheckDefinition(kind="tcp", target="10.0.0.1:80", interval_s=2.5, timeout_s=0.5),
            {"TCP": "10.0.0.1:80", "Interval": "2500ms", "Timeout": "500ms"},
        ),
        (CheckDefinition(kind="ttl", ttl_s=30), {"TTL": "30000ms"}),
        (
            CheckDefinition(kind="ttl", ttl_s=5, name="n", check_id="c", deregister_after_s=60),
            {
                "TTL": "5000ms",
                "Name": "n",
                "CheckID": "c",
                "DeregisterCriticalServiceAfter": "60000ms",
            },
        ),
    ],
)
def test_check_payload(check: CheckDefinition, expected: dict[str, str]) -> None:
    payload = check_payload(check)
    assert payload == expected
    # python-consul2's legacy form, which Consul rejects with 400, must never appear.
    assert "Script" not in payload
    assert "script" not in payload


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"kind": "ttl"}, "ttl_s"),
        ({"kind": "ttl", "ttl_s": 0}, "ttl_s"),
        ({"kind": "ttl", "ttl_s": 5, "target": "x:1"}, "target"),
        ({"kind": "http", "target": "10.0.0.1:80"}, "http"),
        ({"kind": "http", "target": "ftp://h/"}, "http"),
        ({"kind": "tcp", "target": "10.0.0.1"}, "host:port"),
        ({"kind": "tcp", "target": "10.0.0.1:99999"}, "invalid"),
        ({"kind": "tcp", "target": "h:1", "interval_s": 0}, "interval_s"),
        ({"kind": "tcp", "target": "h:1", "timeout_s": -1}, "timeout_s"),
        ({"kind": "script", "target": "/bin/true"}, "kind"),
    ],
)
def test_invalid_checks_are_refused(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        CheckDefinition(**kwargs)  # type: ignore[arg-type]


def test_registration_payload_has_every_check_and_immutable_fields() -> None:
    meta = {"meshd": "1"}
    registration = ServiceRegistration(
        name="web",
        service_id="web-1",
        address="198.18.0.2",
        port=8080,
        tags=["a", "b"],  # type: ignore[arg-type]
        meta=meta,
        checks=(
            CheckDefinition(kind="tcp", target="198.18.0.2:8080", interval_s=1, timeout_s=1),
            CheckDefinition(kind="ttl", ttl_s=10),
        ),
    )
    meta["meshd"] = "changed"
    assert registration.tags == ("a", "b")
    assert registration.meta == {"meshd": "1"}
    mutable: Any = registration.meta
    with pytest.raises(TypeError):
        mutable["x"] = "y"
    assert registration_payload(registration) == {
        "Name": "web",
        "ID": "web-1",
        "Address": "198.18.0.2",
        "Port": 8080,
        "Tags": ["a", "b"],
        "Meta": {"meshd": "1"},
        "Checks": [
            {"TCP": "198.18.0.2:8080", "Interval": "1000ms", "Timeout": "1000ms"},
            {"TTL": "10000ms"},
        ],
    }
    assert hash(registration) == hash(registration)


def test_registration_defaults_id_to_name() -> None:
    registration = ServiceRegistration(name="db")
    assert registration.effective_id == "db"
    assert registration_payload(registration)["ID"] == "db"


@pytest.mark.parametrize(
    "kwargs",
    [{"name": ""}, {"name": "a/b"}, {"name": "x", "service_id": "../x"}, {"name": "x", "port": 0}],
)
def test_invalid_registrations_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="service"):
        ServiceRegistration(**kwargs)  # type: ignore[arg-type]


def test_go_duration_is_whole_milliseconds_and_positive() -> None:
    assert go_duration(1.5) == "1500ms"
    assert go_duration(0.0001) == "1ms"


# -- response parsing ---------------------------------------------------------------------


def test_parse_kv_entries_sorted_and_null_value() -> None:
    raw = [
        {"Key": "p/b", "Value": b"2", "ModifyIndex": 9, "CreateIndex": 3, "Flags": 0},
        {"Key": "p/a", "Value": None, "ModifyIndex": 7, "CreateIndex": 7, "Session": "s1"},
    ]
    entries = parse_kv_entries(raw)
    assert [e.key for e in entries] == ["p/a", "p/b"]
    assert entries[0].value == b""
    assert entries[0].session == "s1"
    assert entries[1].modify_index == 9
    assert parse_kv_entries(None) == ()


@pytest.mark.parametrize(
    "raw",
    [
        {"Key": "k", "Value": b"", "ModifyIndex": "9"},
        {"Key": "k", "Value": b"", "ModifyIndex": True},
        {"Value": b"", "ModifyIndex": 9},
        {"Key": "k", "Value": "not-bytes", "ModifyIndex": 9},
        ["not", "an", "object"],
    ],
)
def test_parse_kv_entry_rejects_bad_shapes(raw: object) -> None:
    with pytest.raises(ResponseShapeError):
        parse_kv_entry(raw)


def test_parse_health_service_falls_back_to_node_address() -> None:
    raw = [
        {
            "Node": {"Node": "n2", "Address": "10.0.0.2"},
            "Service": {"ID": "web-2", "Service": "web", "Address": "", "Port": 81, "Tags": None},
        },
        {
            "Node": {"Node": "n1", "Address": "10.0.0.1"},
            "Service": {
                "ID": "web-1",
                "Service": "web",
                "Address": "198.18.0.1",
                "Port": 80,
                "Tags": ["a"],
                "Meta": {"k": "v"},
            },
        },
    ]
    first, second = parse_health_service(raw)
    assert (first.service_id, first.address, first.tags, dict(first.meta)) == (
        "web-1",
        "198.18.0.1",
        ("a",),
        {"k": "v"},
    )
    assert (second.node, second.address, second.port, second.tags) == ("n2", "10.0.0.2", 81, ())


@pytest.mark.parametrize(
    ("checks", "status"),
    [
        (None, "passing"),
        ([], "passing"),
        ([{"Status": "passing"}, {"Status": "warning"}], "warning"),
        ([{"Status": "warning"}, {"Status": "critical"}, {"Status": "passing"}], "critical"),
        ([{"Status": "maintenance"}], "critical"),  # a status Consul may add: not passing
        ([{"Status": 3}], "critical"),
        (["not a check"], "critical"),
    ],
)
def test_an_instances_status_is_the_worst_of_its_checks(checks: object, status: str) -> None:
    entry = {
        "Node": {"Node": "n1", "Address": "10.0.0.1"},
        "Service": {"ID": "web-1", "Service": "web", "Address": "", "Port": 80},
        "Checks": checks,
    }
    [instance] = parse_health_service([entry])
    assert instance.status == status


@pytest.mark.parametrize(
    "raw",
    [
        {"not": "a list"},
        [{"Node": {"Node": "n"}, "Service": {}}],
        [
            {
                "Node": {"Node": "n", "Address": "a"},
                "Service": {"ID": "x", "Service": "s", "Address": "", "Port": 1},
                "Checks": {"not": "a list"},
            }
        ],
        [
            {
                "Node": {"Node": "n", "Address": "a"},
                "Service": {"ID": "x", "Service": "s", "Address": "", "Port": 1, "Tags": [1]},
            }
        ],  # fmt: skip
    ],
)
def test_parse_health_service_rejects_bad_shapes(raw: object) -> None:
    with pytest.raises(ResponseShapeError):
        parse_health_service(raw)


def test_parse_catalog() -> None:
    services = parse_catalog_services({"web": ["b", "a"], "consul": []})
    assert list(services) == ["consul", "web"]
    assert services["web"] == ("b", "a")
    nodes = parse_catalog_nodes([{"Node": "b", "Address": "2"}, {"Node": "a", "Address": "1"}])
    assert [n.node for n in nodes] == ["a", "b"]
    with pytest.raises(ResponseShapeError):
        parse_catalog_services({"web": "tag"})
    with pytest.raises(ResponseShapeError):
        parse_catalog_nodes({"Node": "a"})


@pytest.mark.parametrize(("raw", "expected"), [("17", 17), (b"3", None), ("0", 0)])
def test_parse_index(raw: object, expected: int | None) -> None:
    if expected is None:
        with pytest.raises(ResponseShapeError):
            parse_index(raw)
    else:
        assert parse_index(raw) == expected


@pytest.mark.parametrize("raw", [None, "", "abc", "-1", "1.5"])
def test_parse_index_rejects_garbage(raw: object) -> None:
    with pytest.raises(ResponseShapeError, match="X-Consul-Index"):
        parse_index(raw)


# -- blocking-query plan ------------------------------------------------------------------


def test_plan_first_answer_is_delivered_even_if_empty() -> None:
    plan: BlockingQueryPlan[object] = BlockingQueryPlan("w")
    assert plan.next_index == 0
    assert plan.on_answer(5, None, now=1.0) is True
    assert plan.next_index == 5
    stats = plan.statistics()
    assert (stats.name, stats.requests, stats.changes, stats.last_change_at) == ("w", 1, 1, 1.0)


def test_plan_skips_unchanged_results_but_advances_index() -> None:
    plan: BlockingQueryPlan[str] = BlockingQueryPlan("w")
    assert plan.on_answer(5, "a", now=1.0)
    assert not plan.on_answer(9, "a", now=2.0)
    assert plan.next_index == 9
    assert plan.on_answer(10, "b", now=3.0)
    stats = plan.statistics()
    assert (stats.requests, stats.changes, stats.last_change_at) == (3, 2, 3.0)


def test_plan_resets_when_index_goes_backwards() -> None:
    plan: BlockingQueryPlan[str] = BlockingQueryPlan("w")
    plan.on_answer(100, "a", now=0.0)
    assert not plan.on_answer(40, "a", now=0.0)
    assert plan.next_index == 0
    assert plan.statistics().resets == 1
    plan.on_answer(41, "a", now=0.0)
    assert plan.next_index == 41


def test_plan_treats_index_zero_as_one() -> None:
    plan: BlockingQueryPlan[str] = BlockingQueryPlan("w")
    plan.on_answer(0, "a", now=0.0)
    assert plan.next_index == 1
    assert plan.statistics().resets == 0


def test_plan_errors_back_off_exponentially_capped_and_reset_on_success() -> None:
    plan: BlockingQueryPlan[str] = BlockingQueryPlan("w", Backoff(initial_s=1, max_s=8))
    plan.on_answer(50, "a", now=0.0)
    delays = [plan.on_error("boom", jitter=1.0) for _ in range(6)]
    assert delays == [1, 2, 4, 8, 8, 8]
    stats = plan.statistics()
    assert (stats.errors, stats.consecutive_errors, stats.last_error) == (6, 6, "boom")
    # After an error the next query is an immediate read: the server may have restarted.
    assert plan.next_index == 0
    assert not plan.on_answer(3, "a", now=1.0)
    assert plan.statistics().consecutive_errors == 0
    assert plan.on_error("again", jitter=1.0) == 1
    assert plan.statistics().errors == 7


@given(
    attempt=st.integers(min_value=1, max_value=10_000),
    jitter=st.floats(min_value=0, max_value=1),
    initial=st.floats(min_value=0.01, max_value=5),
    extra=st.floats(min_value=0, max_value=60),
)
def test_backoff_delay_is_within_half_and_full_capped_ceiling(
    attempt: int, jitter: float, initial: float, extra: float
) -> None:
    backoff = Backoff(initial_s=initial, max_s=initial + extra)
    ceiling = min(backoff.max_s, initial * 2.0 ** min(attempt - 1, 64))
    delay = backoff.delay(attempt, jitter)
    assert ceiling / 2 <= delay <= ceiling <= backoff.max_s


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(initial_s=5, max_s=1)


@pytest.mark.parametrize("key", ["a", "a/b", "meshd/intentions/", "x.y/..z", "a b"])
def test_check_key_accepts_plain_keys_and_prefixes(key: str) -> None:
    check_key(key)


@pytest.mark.parametrize("key", ["", "/a", "a//b", "a/./b", "a/..", "../a", "a//"])
def test_check_key_refuses_keys_the_router_would_rewrite(key: str) -> None:
    with pytest.raises(ValueError, match="key"):
        check_key(key)
    check_key("", allow_empty=True)


@pytest.mark.parametrize(
    ("prefix", "folder"),
    [("meshd/", "meshd/"), ("meshd", "meshd/"), ("/meshd/", "meshd/"), ("a/b.c", "a/b.c/")],
)
def test_kv_folder_is_a_folder_keys_can_be_built_under(prefix: str, folder: str) -> None:
    assert kv_folder(prefix) == folder
    check_key(kv_folder(prefix) + "tokens/x")


@pytest.mark.parametrize("prefix", ["", "/", "//meshd", "a//b", "a/./b", "meshd/..", "../x"])
def test_kv_folder_refuses_what_the_router_would_rewrite(prefix: str) -> None:
    with pytest.raises(ValueError, match="KV prefix .*: expected a KV folder like 'meshd/'"):
        kv_folder(prefix)


@pytest.mark.parametrize("name", ["", "/a", "a/", "a//b", ".", "..", "a/./b", "x/../y"])
def test_check_name_refuses_path_changing_names(name: str) -> None:
    with pytest.raises(ValueError, match="service id"):
        check_name("service id", name)


@pytest.mark.parametrize("name", ["web", "a/b", "a?b", "a#b", "a%41b", "a b", "a.b", "..a"])
def test_check_name_accepts_names_that_reach_consul_as_themselves(name: str) -> None:
    check_name("service name", name)  # tests/test_cli_status.py reads them from Consul
