"""ConsulClient against a real Consul agent (and, for faults, real misbehaving sockets)."""

from __future__ import annotations

import json
import socket
import urllib.request
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from meshd.consul import (
    CheckDefinition,
    ConsulACLDenied,
    ConsulBadResponse,
    ConsulClient,
    ConsulError,
    ConsulNotFound,
    ConsulRequestRejected,
    ConsulSettings,
    ConsulTimeout,
    ConsulUnreachable,
    ServiceInstance,
    ServiceRegistration,
    open_consul,
)
from tests.plugins.consul_agent import ConsulAgentProcess

pytestmark = pytest.mark.consul


@asynccontextmanager
async def client_for(settings: ConsulSettings) -> AsyncIterator[ConsulClient]:
    async with open_consul(settings) as consul:
        yield consul


def unique(prefix: str) -> str:
    return f"{prefix}-{trio.lowlevel.current_task().name.rsplit('.', 1)[-1][-24:]}".replace(
        "_", "-"
    )


# -- KV ---------------------------------------------------------------------------------


async def test_kv_get_put_cas_delete(
    consul_settings: ConsulSettings, consul_kv_prefix: str
) -> None:
    key = consul_kv_prefix + "x"
    async with client_for(consul_settings) as consul:
        index, entry = await consul.kv_get(key)
        assert entry is None
        assert index > 0
        assert await consul.kv_put(key, b"one", cas=0) is True
        assert await consul.kv_put(key, b"two", cas=0) is False  # only if absent
        _, entry = await consul.kv_get(key)
        assert entry is not None
        assert (entry.key, entry.value) == (key, b"one")
        assert await consul.kv_put(key, b"stale", cas=entry.modify_index + 1000) is False
        assert await consul.kv_put(key, b"three", cas=entry.modify_index) is True
        _, updated = await consul.kv_get(key)
        assert updated is not None
        assert updated.value == b"three"
        assert updated.modify_index > entry.modify_index
        assert await consul.kv_delete(key, cas=entry.modify_index) is False
        assert await consul.kv_delete(key, cas=updated.modify_index) is True
        assert (await consul.kv_get(key))[1] is None


async def test_kv_binary_and_empty_values(
    consul_settings: ConsulSettings, consul_kv_prefix: str
) -> None:
    blob = bytes(range(256)) * 4
    async with client_for(consul_settings) as consul:
        assert await consul.kv_put(consul_kv_prefix + "bin", blob)
        assert await consul.kv_put(consul_kv_prefix + "empty", b"", flags=42)
        _, binary = await consul.kv_get(consul_kv_prefix + "bin")
        _, empty = await consul.kv_get(consul_kv_prefix + "empty")
    assert binary is not None and binary.value == blob
    assert empty is not None and (empty.value, empty.flags) == (b"", 42)


async def test_kv_list_recurse_and_delete_recurse(
    consul_settings: ConsulSettings, consul_kv_prefix: str
) -> None:
    async with client_for(consul_settings) as consul:
        index, entries = await consul.kv_list(consul_kv_prefix)
        assert entries == ()
        assert index > 0
        for name in ("b", "a", "dir/c"):
            assert await consul.kv_put(consul_kv_prefix + name, name.encode())
        _, entries = await consul.kv_list(consul_kv_prefix)
        assert [(e.key[len(consul_kv_prefix) :], e.value) for e in entries] == [
            ("a", b"a"),
            ("b", b"b"),
            ("dir/c", b"dir/c"),
        ]
        assert await consul.kv_delete(consul_kv_prefix + "dir/", recurse=True)
        _, entries = await consul.kv_list(consul_kv_prefix)
        assert len(entries) == 2


async def test_kv_blocking_get_returns_on_change(
    consul_settings: ConsulSettings, consul_kv_prefix: str
) -> None:
    key = consul_kv_prefix + "blocking"
    async with client_for(consul_settings) as consul:
        await consul.kv_put(key, b"v1")
        index, _ = await consul.kv_get(key)

        async def write_later() -> None:
            await trio.sleep(0.2)
            await consul.kv_put(key, b"v2")

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_later)
            new_index, entry = await consul.kv_get(key, index=index, wait_s=10)
        assert entry is not None and entry.value == b"v2"
        assert new_index > index
        assert 0.15 < trio.current_time() - start < 3


async def test_kv_blocking_get_times_out_quietly(
    consul_settings: ConsulSettings, consul_kv_prefix: str
) -> None:
    async with client_for(consul_settings) as consul:
        await consul.kv_put(consul_kv_prefix + "q", b"v")
        index, _ = await consul.kv_get(consul_kv_prefix + "q")
        start = trio.current_time()
        same_index, entry = await consul.kv_get(consul_kv_prefix + "q", index=index, wait_s=0.3)
        elapsed = trio.current_time() - start
    assert same_index == index
    assert entry is not None and entry.value == b"v"
    assert 0.25 < elapsed < 3


@pytest.mark.parametrize("bad", ["/leading", "", "a//b", "a/../b", "./a", "a/."])
async def test_kv_bad_keys_refused_before_any_request(
    consul_settings: ConsulSettings, bad: str
) -> None:
    async with client_for(consul_settings) as consul:
        with pytest.raises(ValueError, match="key"):
            await consul.kv_get(bad)
        with pytest.raises(ValueError, match="key"):
            await consul.kv_put(bad, b"x")


# -- agent services, checks and health ----------------------------------------------------


@asynccontextmanager
async def http_health_server() -> AsyncIterator[int]:
    """A real HTTP server answering 200 to every request (for http and tcp checks)."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    data += chunk
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def agent_checks(settings: ConsulSettings) -> dict[str, dict[str, str]]:
    """The local agent's checks, read with the raw HTTP API (independent of our client)."""
    request = urllib.request.Request(
        f"{settings.address}/v1/agent/checks", headers={"X-Consul-Token": settings.token or ""}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


async def wait_passing(
    consul: ConsulClient,
    name: str,
    ready: Callable[[tuple[ServiceInstance, ...]], bool],
    timeout_s: float = 15,
) -> tuple[ServiceInstance, ...]:
    """Follow the health endpoint with blocking queries until *ready* holds."""
    index = 0
    with trio.fail_after(timeout_s):
        while True:
            index, instances = await consul.health_service(name, index=index, wait_s=2)
            if ready(instances):
                return instances


async def test_register_http_tcp_ttl_checks_and_health_passing_only(
    consul_settings: ConsulSettings,
) -> None:
    name = unique("web")
    async with client_for(consul_settings) as consul, http_health_server() as port:
        target = f"127.0.0.1:{port}"
        registration = ServiceRegistration(
            name=name,
            service_id=f"{name}-1",
            address="127.0.0.1",
            port=port,
            tags=("blue", "v1"),
            meta={"meshd": "1"},
            checks=(
                CheckDefinition(kind="http", target=f"http://{target}/health", interval_s=1),
                CheckDefinition(kind="tcp", target=target, interval_s=1, timeout_s=1),
                CheckDefinition(kind="ttl", ttl_s=30),
            ),
        )
        await consul.service_register(registration)
        try:
            checks = agent_checks(consul_settings)
            assert {
                check_id: checks[check_id]["Type"] for check_id in checks if name in check_id
            } == {
                f"service:{name}-1:1": "http",
                f"service:{name}-1:2": "tcp",
                f"service:{name}-1:3": "ttl",
            }
            # The TTL check starts critical: the instance is not passing yet.
            _, instances = await consul.health_service(name)
            assert instances == ()
            # Several checks are named service:<id>:<n> by Consul.
            await consul.check_pass(f"service:{name}-1:3", note="ready")
            (instance,) = await wait_passing(consul, name, bool)
            assert instance.service_id == f"{name}-1"
            assert instance.service_name == name
            assert (instance.address, instance.port) == ("127.0.0.1", port)
            assert instance.tags == ("blue", "v1")
            assert dict(instance.meta) == {"meshd": "1"}
            assert instance.node == "meshd-test"
            await consul.check_fail(f"service:{name}-1:3", note="draining")
            assert (await consul.health_service(name))[1] == ()
        finally:
            await consul.service_deregister(f"{name}-1")
        _, services = await consul.catalog_services()
        assert name not in services


async def test_health_lists_every_instance_with_its_tags(consul_settings: ConsulSettings) -> None:
    name = unique("api")
    async with client_for(consul_settings) as consul:
        for number, tags in ((1, ("canary",)), (2, ())):
            await consul.service_register(
                ServiceRegistration(
                    name=name,
                    service_id=f"{name}-{number}",
                    port=9000 + number,
                    address="127.0.0.1",
                    tags=tags,
                )  # fmt: skip
            )
        try:
            instances = await wait_passing(consul, name, lambda found: len(found) == 2)
            assert [(i.service_id, i.tags) for i in instances] == [
                (f"{name}-1", ("canary",)),
                (f"{name}-2", ()),
            ]
            _, services = await consul.catalog_services()
            assert services[name] == ("canary",)
        finally:
            for number in (1, 2):
                await consul.service_deregister(f"{name}-{number}")


async def test_reregistration_replaces_checks(consul_settings: ConsulSettings) -> None:
    name = unique("svc")
    async with client_for(consul_settings) as consul:
        ttl = CheckDefinition(kind="ttl", ttl_s=60)
        await consul.service_register(ServiceRegistration(name=name, port=1, checks=(ttl,)))
        try:
            assert (await consul.health_service(name))[1] == ()
            # Same service without the (critical) TTL check: it must pass now.
            await consul.service_register(ServiceRegistration(name=name, port=1))
            (instance,) = (await consul.health_service(name))[1]
            assert instance.service_id == name
        finally:
            await consul.service_deregister(name)


async def test_unknown_ids_are_rejected_with_their_name(consul_settings: ConsulSettings) -> None:
    async with client_for(consul_settings) as consul:
        with pytest.raises(ConsulRequestRejected, match="no-such-check") as caught:
            await consul.check_pass("no-such-check")
        assert caught.value.status >= 400
        with pytest.raises(ConsulRequestRejected, match="no-such-service"):
            await consul.service_deregister("no-such-service")


async def test_catalog_nodes_and_cluster_info(
    consul_settings: ConsulSettings, consul_agent: ConsulAgentProcess
) -> None:
    async with client_for(consul_settings) as consul:
        index, nodes = await consul.catalog_nodes()
        assert index > 0
        assert [(n.node, n.address, n.datacenter) for n in nodes] == [
            ("meshd-test", "127.0.0.1", "dc1")
        ]
        assert await consul.datacenter() == consul_agent.datacenter
        assert (await consul.leader()).startswith("127.0.0.1:")
        _, services = await consul.catalog_services()
        assert "consul" in services


async def test_node_lookup_by_address_and_its_services(consul_settings: ConsulSettings) -> None:
    registration = ServiceRegistration(
        name="lookup-svc", service_id="lookup-svc-1", address="198.18.9.9", port=7443
    )
    async with client_for(consul_settings) as consul:
        await consul.service_register(registration)
        try:
            _, nodes = await consul.catalog_nodes(address="127.0.0.1")
            assert [n.node for n in nodes] == ["meshd-test"]
            _, none = await consul.catalog_nodes(address="198.18.250.250")
            assert none == ()
            services = await consul.catalog_node_services("meshd-test")
            found = [s for s in services if s.service == "lookup-svc"]
            assert [(s.service_id, s.address, s.port) for s in found] == [
                ("lookup-svc-1", "198.18.9.9", 7443)
            ]
            assert await consul.catalog_node_services("no-such-node") == ()
            with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6"):
                await consul.catalog_nodes(address='1.2.3.4" or Address != "')
        finally:
            await consul.service_deregister("lookup-svc-1")


# -- sessions and locks -----------------------------------------------------------------------


async def test_session_lock_acquire_release_renew_destroy(
    consul_settings: ConsulSettings, consul_kv_prefix: str
) -> None:
    key = consul_kv_prefix + "leader"
    async with client_for(consul_settings) as consul:
        first = await consul.session_create("meshd-leader", ttl_s=15)
        second = await consul.session_create("meshd-leader", ttl_s=10, lock_delay_s=0)
        assert first != second
        assert await consul.kv_put(key, b"me", acquire=first) is True
        assert await consul.kv_put(key, b"them", acquire=second) is False
        _, entry = await consul.kv_get(key)
        assert entry is not None and (entry.value, entry.session) == (b"me", first)
        await consul.session_renew(first)
        assert await consul.kv_put(key, b"me", release=first) is True
        _, entry = await consul.kv_get(key)
        assert entry is not None and entry.session is None
        await consul.session_destroy(first)
        await consul.session_destroy(second)
        with pytest.raises(ConsulNotFound, match=first) as caught:
            await consul.session_renew(first)
        assert caught.value.status == 404


@pytest.mark.parametrize("ttl_s", [5, 86401])
async def test_session_ttl_outside_consul_range_refused(
    consul_settings: ConsulSettings, ttl_s: float
) -> None:
    async with client_for(consul_settings) as consul:
        with pytest.raises(ValueError, match="ttl_s"):
            await consul.session_create("x", ttl_s=ttl_s)


# -- ACLs, TLS and the environment ----------------------------------------------------------


@pytest.mark.parametrize("token", [None, "00000000-0000-0000-0000-00000000dead"])
async def test_acl_denied_names_address_and_key_never_token(
    consul_agent: ConsulAgentProcess, consul_kv_prefix: str, token: str | None
) -> None:
    settings = consul_agent.settings(token=token)
    key = consul_kv_prefix + "secret"
    async with client_for(settings) as consul:
        with pytest.raises(ConsulACLDenied) as caught:
            await consul.kv_put(key, b"x")
    message = str(caught.value)
    assert consul_agent.http_address in message
    assert key in message
    assert caught.value.status == 403
    assert consul_agent.token not in message
    if token:
        assert token not in message
    assert isinstance(caught.value, ConsulError)


async def test_https_with_consul_cacert_from_env(
    consul_agent: ConsulAgentProcess, consul_kv_prefix: str
) -> None:
    env = {
        "CONSUL_HTTP_ADDR": consul_agent.https_address,
        "CONSUL_CACERT": str(consul_agent.ca_file),
        "CONSUL_HTTP_TOKEN": consul_agent.token,
    }
    settings = ConsulSettings.from_env(env)
    assert settings.scheme == "https"
    async with client_for(settings) as consul:
        assert await consul.kv_put(consul_kv_prefix + "tls", b"ok")
        assert (await consul.kv_get(consul_kv_prefix + "tls"))[1] is not None


async def test_https_without_the_ca_is_refused(consul_agent: ConsulAgentProcess) -> None:
    settings = ConsulSettings(address=consul_agent.https_address, token=consul_agent.token)
    async with client_for(settings) as consul:
        with pytest.raises(ConsulUnreachable, match="CERTIFICATE_VERIFY_FAILED") as caught:
            await consul.kv_get("meshd/x")
    assert consul_agent.https_address in str(caught.value)
    # ...unless verification is switched off, like CONSUL_HTTP_SSL_VERIFY=false.
    insecure = ConsulSettings.from_env(
        {
            **consul_agent.env(),
            "CONSUL_HTTP_ADDR": consul_agent.https_address,
            "CONSUL_HTTP_SSL_VERIFY": "false",
        }  # fmt: skip
    )
    async with client_for(insecure) as consul:
        await consul.kv_get("meshd/x")


async def test_explicit_settings_beat_python_consul2_environment(
    consul_settings: ConsulSettings,
    consul_kv_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # python-consul2's own constructor would let these override explicit arguments.
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "not-an-address")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "00000000-0000-0000-0000-00000000dead")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        async with client_for(consul_settings) as consul:
            assert await consul.kv_put(consul_kv_prefix + "env", b"explicit")


# -- transport faults ----------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_names_address_key_and_cause() -> None:
    address = f"http://127.0.0.1:{closed_port()}"
    async with client_for(ConsulSettings(address=address)) as consul:
        with pytest.raises(ConsulUnreachable) as caught:
            await consul.kv_get("meshd/intentions/web")
    message = str(caught.value)
    assert address in message
    assert "meshd/intentions/web" in message
    assert "refused" in message.lower()


@asynccontextmanager
async def canned_server(answer: bytes | None) -> AsyncIterator[str]:
    """A real socket server: sends *answer* to each request, or (None) never answers."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            if answer is None:
                await trio.sleep_forever()
            await stream.send_all(answer)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


def http_answer(status: str, body: bytes, *, index: str | None = "7") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    if index is not None:
        head += f"X-Consul-Index: {index}\r\n"
    return head.encode() + b"\r\n" + body


@pytest.mark.parametrize(
    ("answer", "error", "needle"),
    [
        (http_answer("200 OK", b"{not json"), ConsulBadResponse, "undecodable"),
        (http_answer("200 OK", b'[{"Key": "k"}]'), ConsulBadResponse, "ModifyIndex"),
        (
            http_answer("200 OK", b'[{"Key": "k", "Value": 5, "ModifyIndex": 1}]'),
            ConsulBadResponse,
            "undecodable",
        ),  # fmt: skip
        (http_answer("200 OK", b"[]", index=None), ConsulBadResponse, "undecodable"),
        (http_answer("200 OK", b"[]", index="banana"), ConsulBadResponse, "X-Consul-Index"),
        (
            http_answer("500 Internal Server Error", b"No cluster leader"),
            ConsulRequestRejected,
            "No cluster leader",
        ),  # fmt: skip
        (http_answer("403 Forbidden", b"Permission denied"), ConsulACLDenied, "ACL denied"),
        (b"garbage\r\n\r\n", ConsulUnreachable, "meshd/k"),
    ],
)
async def test_bad_answers_become_consul_errors(
    answer: bytes, error: type[ConsulError], needle: str
) -> None:
    async with canned_server(answer) as address, client_for(ConsulSettings(address)) as consul:
        with pytest.raises(error, match=needle) as caught:
            await consul.kv_get("meshd/k")
    assert address in str(caught.value)
    assert "/v1/kv/meshd/k" in str(caught.value)


async def test_silent_server_times_out_after_timeout_plus_wait() -> None:
    async with canned_server(None) as address:
        settings = ConsulSettings(address=address, timeout_s=0.2)
        async with client_for(settings) as consul:
            start = trio.current_time()
            with pytest.raises(ConsulTimeout, match="meshd/k"):
                await consul.kv_get("meshd/k")
            plain = trio.current_time() - start
            start = trio.current_time()
            with pytest.raises(ConsulTimeout, match=r"within 0\.\d+"):
                await consul.kv_get("meshd/k", index=5, wait_s=0.4)
            blocking = trio.current_time() - start
    assert 0.15 < plain < 1.5
    # A blocking query may last wait * 17/16 before Consul answers: 0.2 + 0.425.
    assert 0.6 < blocking < 2.5
