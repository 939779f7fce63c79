"""Endpoint choice: round robin, and outlier ejection after consecutive connect failures."""

from __future__ import annotations

import pytest

from meshd.balancer import (
    BASE_EJECTION_S,
    EJECT_AFTER,
    MAX_EJECTION_S,
    TRIAL_S,
    Outliers,
    RetryBudget,
    RoundRobin,
)

ABC = ("a", "b", "c")


def fail(rr: RoundRobin, endpoint: str, now: float, times: int = EJECT_AFTER) -> None:
    for _ in range(times):
        rr.outliers.failed(endpoint, now)


def test_ejection_needs_consecutive_failures_and_a_success_clears_them() -> None:
    out = Outliers()
    assert EJECT_AFTER == 2
    assert out.failed("a", 0.0) is None
    out.succeeded("a")
    assert out.failed("a", 1.0) is None  # the count started again
    ejection = out.failed("a", 2.0)
    assert ejection is not None and (ejection.seconds, ejection.failures) == (BASE_EJECTION_S, 2)
    assert out.ejected("a", 2.0) and out.ejected("a", 2.0 + BASE_EJECTION_S - 0.01)
    assert not out.ejected("a", 2.0 + BASE_EJECTION_S)
    assert not out.ejected("b", 2.0)
    assert out.ejections_total == 1


def test_ejected_endpoints_go_last_and_come_back_when_the_ejection_ends() -> None:
    rr = RoundRobin()
    fail(rr, "a", now=100.0)
    orders = [rr.attempt_order("api", ABC, now=101.0) for _ in range(3)]
    # The rotation moves on as usual; "a" is only moved behind the others.
    assert orders == [("b", "c", "a"), ("b", "c", "a"), ("c", "b", "a")]
    assert rr.attempt_order("api", ABC, now=101.0, max_attempts=2) == ("b", "c")
    assert rr.statistics(now=101.0).ejected == ("a",)
    later = 100.0 + BASE_EJECTION_S
    assert rr.statistics(now=later).ejected == ()
    rr.outliers.succeeded("a")  # (its trial connected)
    assert [rr.attempt_order("api", ABC, now=later) for _ in range(2)] == [
        ("b", "c", "a"),
        ("c", "a", "b"),  # ejected, it would be ("c", "b", "a")
    ]
    assert rr.statistics().ejections == 1


def test_on_probation_one_caller_takes_a_trial_and_the_others_keep_away() -> None:
    rr = RoundRobin()
    fail(rr, "a", now=0.0)
    ended = BASE_EJECTION_S
    assert rr.attempt_order("api", ABC, now=ended) == ("a", "b", "c")  # the trial
    # Until the trial's outcome (or TRIAL_S), everyone else treats "a" as ejected.
    assert rr.attempt_order("api", ABC, now=ended + 0.5) == ("b", "c", "a")
    assert rr.attempt_order("api", ABC, now=ended + 0.5) == ("c", "b", "a")
    # A trial that never reports (its caller gave up) frees the endpoint after TRIAL_S.
    assert rr.attempt_order("api", ABC, now=ended + TRIAL_S) == ("a", "b", "c")
    # The trial fails: ejected again at once, for twice as long.
    ejection = rr.outliers.failed("a", ended + TRIAL_S + 1)
    assert ejection is not None and ejection.seconds == 2 * BASE_EJECTION_S
    # The trial succeeds: a clean record, the plain rotation.
    rr.outliers.succeeded("a")
    assert not rr.outliers.flagged()
    assert rr.attempt_order("api", ABC, now=ended + TRIAL_S + 2) == ("b", "c", "a")
    assert rr.attempt_order("api", ABC, now=ended + TRIAL_S + 2) == ("c", "a", "b")


def test_probation_one_failure_after_an_ejection_ejects_again_for_twice_as_long() -> None:
    out = Outliers()
    now = 0.0
    expected = BASE_EJECTION_S
    for _ in range(12):
        ejection = out.failed("a", now) or out.failed("a", now)
        assert ejection is not None and ejection.seconds == min(expected, MAX_EJECTION_S)
        # A failure while still ejected (a connect that was already under way) changes
        # nothing: no new ejection, no longer ejection.
        assert out.failed("a", now + 1) is None
        assert out.ejected("a", now + ejection.seconds - 0.01)
        now += ejection.seconds
        assert not out.ejected("a", now)
        expected *= 2
    assert expected > MAX_EJECTION_S  # the cap was reached and held
    out.succeeded("a")
    assert out.failed("a", now) is None  # a clean record again: two failures needed


def test_when_every_endpoint_is_ejected_the_plain_rotation_stays() -> None:
    rr = RoundRobin()
    for endpoint in ABC:
        fail(rr, endpoint, now=0.0)
    assert [rr.attempt_order("api", ABC, now=1.0) for _ in range(2)] == [ABC, ("b", "c", "a")]
    # Ejection reorders, never refuses: one endpoint ejected is still tried.
    rr2 = RoundRobin()
    fail(rr2, "a", now=0.0)
    assert rr2.attempt_order("solo", ("a",), now=1.0) == ("a",)


def test_endpoints_are_told_apart_by_the_key_function() -> None:
    rr = RoundRobin()
    endpoints = [("10.0.0.1", 80, "meta1"), ("10.0.0.2", 80, "meta2")]
    fail(rr, ("10.0.0.1", 80), now=0.0)  # type: ignore[arg-type]
    order = rr.attempt_order("api", endpoints, now=1.0, key=lambda e: (e[0], e[1]))
    assert order == (endpoints[1], endpoints[0])


def test_memory_is_bounded_and_the_oldest_failures_are_forgotten() -> None:
    out = Outliers(max_tracked=3)
    for i in range(5):
        out.failed(f"e{i}", 0.0)
    out.failed("e4", 0.0)  # e4 ejected; e0 and e1 were forgotten
    assert out.ejected_now(0.0) == ["e4"]
    assert out.failed("e0", 0.0) is None  # a fresh record: one failure only
    assert len(out._records) == 3


@pytest.mark.parametrize(
    "settings",
    [
        {"eject_after": 0},
        {"base_ejection_s": 0.0},
        {"base_ejection_s": 10.0, "max_ejection_s": 5.0},
    ],
)
def test_settings_out_of_range_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="outlier settings"):
        Outliers(**settings)  # type: ignore[arg-type]


def test_retry_budget_keeps_a_reserve_when_there_is_no_traffic() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, window_s=10)
    assert [budget.allow_retry("api", 5.0) for _ in range(11)] == [True] * 10 + [False]
    assert budget.refused_total == 1
    assert budget.allow_retry("db", 5.0)  # each destination has its own


def test_retry_budget_is_a_share_of_the_connections_of_the_window() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, window_s=10)
    for _ in range(100):
        budget.connection("api", 0.5)
    allowed = sum(budget.allow_retry("api", 0.5) for _ in range(50))
    assert allowed == 20
    # Nine seconds later the same connections still count, and the spent retries too.
    assert not budget.allow_retry("api", 9.9)
    # At 10 s the first second has left the window: nothing to share, nothing spent.
    assert not budget.allow_retry("api", 10.0)
    for _ in range(10):
        budget.connection("api", 10.0)
    assert [budget.allow_retry("api", 10.2) for _ in range(3)] == [True, True, False]


def test_retry_budget_forgets_the_least_recently_used_destination_first() -> None:
    budget = RetryBudget(ratio=0.0, min_per_s=0.1, window_s=10, max_services=2)
    assert budget.allow_retry("a", 0.0)
    assert budget.allow_retry("b", 0.0)
    assert not budget.allow_retry("a", 0.0)  # a's reserve (1) is spent; a is now newest
    assert budget.allow_retry("c", 0.0)  # forgets b, the least recently used
    assert not budget.allow_retry("a", 0.0)  # a was kept
    assert budget.allow_retry("b", 0.0)  # b starts afresh


def test_retry_budget_settings_out_of_range_are_refused() -> None:
    for settings in ({"ratio": -0.1}, {"min_per_s": -1.0}, {"window_s": 0}):
        with pytest.raises(ValueError, match="retry budget"):
            RetryBudget(**settings)  # type: ignore[arg-type]
