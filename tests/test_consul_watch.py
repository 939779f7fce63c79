"""Watch: Consul blocking queries by Consul's rules, against real agents and injected faults."""

from __future__ import annotations

import itertools
import math

import pytest
import trio

from meshd.consul import (
    Backoff,
    CheckDefinition,
    ConsulClient,
    ConsulSettings,
    ConsulUnreachable,
    KVEntry,
    ServiceRegistration,
    Watch,
    open_consul,
)
from tests.plugins.consul_agent import ConsulAgentProcess

FAST = Backoff(initial_s=0.05, max_s=0.5)


def kv_watch(consul: ConsulClient, key: str, *, wait_s: float) -> Watch[KVEntry | None]:
    return Watch(
        lambda index, wait: consul.kv_get(key, index=index, wait_s=wait),
        name=f"kv:{key}",
        wait_s=wait_s,
        backoff=FAST,
    )


def value(entry: KVEntry | None) -> bytes | None:
    return None if entry is None else entry.value


# -- against a real Consul -------------------------------------------------------------------


@pytest.mark.consul
async def test_change_wakes_the_watch_within_one_second(
    consul_settings: ConsulSettings, consul_kv_prefix: str
) -> None:
    key = consul_kv_prefix + "wake"
    async with open_consul(consul_settings) as consul:
        await consul.kv_put(key, b"v1")
        watch = kv_watch(consul, key, wait_s=30)
        assert value(await anext(watch)) == b"v1"
        written_at = math.inf

        async def write_later() -> None:
            nonlocal written_at
            await trio.sleep(0.3)  # let the blocking query reach Consul first
            written_at = trio.current_time()
            await consul.kv_put(key, b"v2")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_later)
            with trio.fail_after(5):
                changed = await anext(watch)
        assert value(changed) == b"v2"
        assert trio.current_time() - written_at < 1.0
        stats = watch.statistics()
        assert (stats.changes, stats.errors, stats.resets) == (2, 0, 0)
        assert changed is not None and stats.index == changed.modify_index


@pytest.mark.consul
async def test_quiet_waits_deliver_nothing(
    consul_settings: ConsulSettings, consul_kv_prefix: str
) -> None:
    key = consul_kv_prefix + "quiet"
    async with open_consul(consul_settings) as consul:
        await consul.kv_put(key, b"same")
        watch = kv_watch(consul, key, wait_s=0.3)
        assert value(await anext(watch)) == b"same"
        with trio.move_on_after(1.2) as quiet:
            await anext(watch)
        assert quiet.cancelled_caught, "an unchanged result was delivered"
        stats = watch.statistics()
        # The blocking query returned at least twice with the same result; none delivered.
        assert stats.requests >= 3
        assert stats.changes == 1
        assert stats.errors == 0


@pytest.mark.consul
async def test_health_watch_sees_an_instance_become_passing(
    consul_settings: ConsulSettings,
) -> None:
    name = "watched-" + consul_settings.address.rsplit(":", 1)[1]
    async with open_consul(consul_settings) as consul:
        watch = Watch(
            lambda index, wait: consul.health_service(name, index=index, wait_s=wait),
            name=f"health:{name}",
            wait_s=10,
        )
        assert await anext(watch) == ()
        ttl = CheckDefinition(kind="ttl", ttl_s=30)
        await consul.service_register(ServiceRegistration(name=name, port=7, checks=(ttl,)))
        try:
            await consul.check_pass(f"service:{name}")
            with trio.fail_after(5):
                (instance,) = await anext(watch)
            assert (instance.service_name, instance.port) == (name, 7)
        finally:
            await consul.service_deregister(name)


@pytest.mark.consul
async def test_index_going_backwards_resets_to_an_immediate_read(
    consul_settings: ConsulSettings,
    consul_kv_prefix: str,
    private_consul_agent: ConsulAgentProcess,
) -> None:
    """Move the watch from one cluster to a younger one, like a restore from an old snapshot."""
    key = consul_kv_prefix + "moved"
    async with (
        open_consul(consul_settings) as old,
        open_consul(private_consul_agent.settings()) as young,
    ):
        await young.kv_put(key, b"young")
        young_index, _ = await young.kv_get(key)
        for number in range(200):  # bounded: the shared agent is usually far ahead already
            await old.kv_put(key, b"old-%d" % number)
            old_index, _ = await old.kv_get(key)
            if old_index > young_index + 10:
                break
        assert old_index > young_index + 10
        target = [old]
        watch = Watch(
            lambda index, wait: target[0].kv_get(key, index=index, wait_s=wait),
            name="moved",
            wait_s=0.5,
        )
        assert value(await anext(watch)) is not None
        target[0] = young
        with trio.fail_after(5):
            assert value(await anext(watch)) == b"young"
        assert watch.statistics().resets == 1
        assert watch.statistics().index == 0
        # Because of the reset the next query is immediate; on the stale index it would sit
        # out the whole wait before seeing this write.
        await young.kv_put(key, b"young-2")
        start = trio.current_time()
        assert value(await anext(watch)) == b"young-2"
        assert trio.current_time() - start < 0.4
        assert watch.statistics().errors == 0


@pytest.mark.consul
async def test_watch_survives_a_consul_restart(private_consul_agent: ConsulAgentProcess) -> None:
    key = "meshd/restart"
    async with open_consul(private_consul_agent.settings()) as consul:
        await consul.kv_put(key, b"before")
        watch = kv_watch(consul, key, wait_s=30)
        assert value(await anext(watch)) == b"before"
        seen: list[bytes | None] = []

        async def follow() -> None:
            async for entry in watch:
                seen.append(value(entry))
                if seen[-1] == b"after":
                    return

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                await trio.sleep(0.2)  # the watch is now blocked inside a query
                await trio.to_thread.run_sync(private_consul_agent.restart)
                # Dev mode lost the data: write the key again on the fresh agent.
                await consul.kv_put(key, b"after")
        assert seen[-1] == b"after"
        stats = watch.statistics()
        assert stats.errors >= 1
        assert (
            stats.last_error is not None and private_consul_agent.http_address in stats.last_error
        )
        assert stats.consecutive_errors == 0


# -- fault injection (hand-written fetch functions) and virtual time -------------------------


class FlakyFetch:
    """Fails with ConsulUnreachable on the listed call numbers; records calls and times."""

    def __init__(self, failing: set[int]) -> None:
        self.failing = failing
        self.calls: list[tuple[int, float]] = []

    async def __call__(self, index: int, wait_s: float) -> tuple[int, str]:
        self.calls.append((index, trio.current_time()))
        if len(self.calls) in self.failing:
            raise ConsulUnreachable("Consul http://127.0.0.1:1: GET /v1/kv/x: refused")
        return 10 + len(self.calls), "same" if len(self.calls) < 8 else "new"


async def test_errors_back_off_capped_then_reset(autojump_clock: trio.testing.MockClock) -> None:
    fetch = FlakyFetch(failing={2, 3, 4, 5, 6})
    watch = Watch(fetch, name="flaky", backoff=Backoff(initial_s=1, max_s=4), jitter=lambda: 1.0)
    assert await anext(watch) == "same"
    assert await anext(watch) == "new"
    times = [at for _, at in fetch.calls]
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(times)]
    # Failed calls 2..6 back off 1, 2, 4, 4, 4; answers follow each other without delay.
    assert gaps == [0, 1, 2, 4, 4, 4, 0]
    indexes = [index for index, _ in fetch.calls]
    assert indexes[:3] == [0, 11, 0]  # after an error the next query is immediate
    assert indexes[-1] == 17
    stats = watch.statistics()
    assert (stats.errors, stats.consecutive_errors, stats.changes) == (5, 0, 2)


async def test_backoff_jitter_is_applied(autojump_clock: trio.testing.MockClock) -> None:
    fetch = FlakyFetch(failing={1})
    watch = Watch(fetch, name="jitter", backoff=Backoff(initial_s=2, max_s=2), jitter=lambda: 0.0)
    assert await anext(watch) == "same"
    assert fetch.calls[1][1] - fetch.calls[0][1] == pytest.approx(1.0)


async def test_bugs_in_fetch_are_not_swallowed() -> None:
    async def broken(index: int, wait_s: float) -> tuple[int, str]:
        raise RuntimeError("a bug, not a Consul error")

    with pytest.raises(RuntimeError, match="a bug"):
        await anext(Watch(broken, name="broken"))


def test_wait_must_be_positive() -> None:
    async def never(index: int, wait_s: float) -> tuple[int, str]:
        raise AssertionError

    with pytest.raises(ValueError, match="wait_s"):
        Watch(never, name="w", wait_s=0)
