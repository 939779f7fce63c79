"""Bootstrap tokens and renewal timing: pure functions, tables of positive and negative cases."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from meshd import pki
from meshd.bootstrap import (
    MAX_TTL_S,
    TokenError,
    TokenRecord,
    authorize_csr_by_token,
    key_fingerprint,
    new_token,
    parse_token,
    token_key,
)
from meshd.renewal import Phase, backoff, next_check, phase, renew_at

NOW = 1_800_000_000.0
KEY_A, KEY_B = "a" * 64, "b" * 64  # key fingerprints


def make(**overrides: object):
    token, record = new_token(host="web-1", services=["web", "api"], now=NOW, ttl_s=3600)
    return token, dataclasses.replace(record, **overrides) if overrides else record


def test_token_round_trips_through_its_text() -> None:
    token, _ = make()
    text = token.reveal()
    assert text.startswith("mtk_") and parse_token(text + "\n") == token


def test_token_repr_and_str_never_show_the_secret() -> None:
    token, record = make()
    for shown in (repr(token), str(token), repr(record), str(record)):
        assert token.secret not in shown
    assert record.digest.hex() not in repr(record)


def test_record_stores_a_salted_hash_not_the_secret() -> None:
    token, record = make()
    data = record.to_json()
    assert token.secret.encode() not in data
    assert TokenRecord.from_json(data) == record
    _, other = new_token(host="web-1", services=["web"], now=NOW, ttl_s=60)
    assert other.salt != record.salt


@pytest.mark.parametrize(
    "text",
    [
        "",
        "mtk_",
        "mtk_0123456789abcdef",
        "mtk_0123456789ABCDEF." + "a" * 43,
        "tok_0123456789abcdef." + "a" * 43,
        "mtk_0123456789abcdef." + "a" * 42,
        "mtk_0123456789abcdef." + "a" * 43 + "=",
        "mtk_0123456789abcdef.." + "a" * 42,
    ],
)
def test_malformed_tokens_are_refused_without_echo(text: str) -> None:
    with pytest.raises(TokenError) as info:
        parse_token(text)
    assert "a" * 20 not in str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b"{}",
        b'{"version": 2}',
        b'{"version": 1, "id": "0123456789abcdef", "host": "h", "services": ["web"]}',
    ],
)
def test_malformed_records_are_refused(data: bytes) -> None:
    with pytest.raises(TokenError):
        TokenRecord.from_json(data)


def test_record_refuses_bad_scope() -> None:
    _, record = make()
    with pytest.raises(TokenError):
        dataclasses.replace(record, services=frozenset())
    with pytest.raises(TokenError):
        dataclasses.replace(record, host="bad host")
    with pytest.raises(TokenError):
        dataclasses.replace(record, consumed=frozenset({"db"}))
    with pytest.raises(TokenError):
        new_token(host="h", services=["web"], now=NOW, ttl_s=0)
    with pytest.raises(TokenError):
        token_key("../etc")


def test_no_token_names_the_control_plane() -> None:
    """svc/meshd is the identity agents trust as the CA: no token may grant it, and a
    record naming it (written to KV by other means) does not parse."""
    with pytest.raises(TokenError, match="'meshd' is reserved for the control plane"):
        new_token(host="h", services=["web", "meshd"], now=NOW, ttl_s=60)
    _, record = make()
    doc = json.loads(record.to_json())
    doc["services"] = ["meshd"]
    with pytest.raises(TokenError, match="reserved"):
        TokenRecord.from_json(json.dumps(doc).encode())
    new_token(host="h", services=["meshd-api"], now=NOW, ttl_s=60)  # only the exact name


@pytest.mark.parametrize("ttl_s", [MAX_TTL_S + 1, 1e300, math.inf, math.nan, -1.0])
def test_token_lifetime_is_bounded(ttl_s: float) -> None:
    with pytest.raises(TokenError, match="token TTL must be"):
        new_token(host="h", services=["web"], now=NOW, ttl_s=ttl_s)


def test_a_week_is_the_longest_token() -> None:
    _, record = new_token(host="h", services=["web"], now=NOW, ttl_s=MAX_TTL_S)
    assert MAX_TTL_S == 7 * 86400 and TokenRecord.from_json(record.to_json()) == record
    with pytest.raises(TokenError, match="longer than 7 days"):
        dataclasses.replace(record, expires=NOW + MAX_TTL_S + 60)


@pytest.mark.parametrize(
    ("field", "value"), [("expires", "Infinity"), ("expires", "NaN"), ("created", "-Infinity")]
)
def test_records_with_non_finite_times_are_refused(field: str, value: str) -> None:
    """json.loads reads Infinity and NaN; a record holding them is invalid, not eternal."""
    _, record = make()
    data = record.to_json().replace(
        f'"{field}": {getattr(record, field)!r}'.encode(), f'"{field}": {value}'.encode()
    )
    assert value.encode() in data
    with pytest.raises(TokenError, match="finite"):
        TokenRecord.from_json(data)
    with pytest.raises(TokenError, match="finite"):
        dataclasses.replace(record, **{field: float(value)})


def test_authorized_for_its_host_and_services() -> None:
    token, record = make()
    for service in ("web", "api"):
        decision = authorize_csr_by_token(record, token.secret, "web-1", service, NOW + 1)
        assert decision.allowed, decision.reason


@pytest.mark.parametrize(
    ("overrides", "secret", "host", "service", "now", "reason"),
    [
        ({}, "wrong", "web-1", "web", NOW, "does not match"),
        ({"revoked": True}, None, "web-1", "web", NOW, "revoked"),
        ({}, None, "web-1", "web", NOW + 3600, "expired"),
        ({}, None, "web-1", "web", NOW - 1, "not valid yet"),
        ({}, None, "web-2", "web", NOW, "not for host"),
        ({}, None, "web-1", "db", NOW, "does not cover"),
        ({"consumed": frozenset({"web"})}, None, "web-1", "web", NOW, "already used"),
    ],
)
def test_refusals_name_the_reason(overrides, secret, host, service, now, reason) -> None:
    token, record = make(**overrides)
    decision = authorize_csr_by_token(record, secret or token.secret, host, service, now)
    assert not decision.allowed
    assert reason in decision.reason
    assert token.secret not in decision.reason


def test_consume_refuses_replay_but_keeps_other_services() -> None:
    token, record = make()
    used = TokenRecord.from_json(record.consume("web", KEY_A).to_json())
    assert not authorize_csr_by_token(used, token.secret, "web-1", "web", NOW).allowed
    assert authorize_csr_by_token(used, token.secret, "web-1", "api", NOW).allowed
    assert TokenRecord.from_json(used.revoke().to_json()).revoked


def test_a_consumed_service_is_signed_again_only_for_its_key() -> None:
    token, record = make()
    used = TokenRecord.from_json(record.consume("web", KEY_A).to_json())
    assert used.key_for("web") == KEY_A and used.key_for("api") is None
    assert used.consume("web", KEY_A) == used  # a retry changes nothing
    again = authorize_csr_by_token(used, token.secret, "web-1", "web", NOW, key=KEY_A)
    assert again.allowed and again.retry, again.reason
    first = authorize_csr_by_token(used, token.secret, "web-1", "api", NOW, key=KEY_A)
    assert first.allowed and not first.retry
    for key in (KEY_B, None):
        other = authorize_csr_by_token(used, token.secret, "web-1", "web", NOW, key=key)
        assert not other.allowed and "already used for service 'web' with another key" in (
            other.reason
        )
    # Everything else still applies to a retry: secret, revocation, expiry, host.
    refusals = [
        (dataclasses.replace(used, revoked=True), token.secret, "web-1", NOW, "revoked"),
        (used, token.secret, "web-1", NOW + 3600, "expired"),
        (used, token.secret, "web-2", NOW, "not for host"),
        (used, "wrong", "web-1", NOW, "does not match"),
    ]
    for rec, secret, host, now, reason in refusals:
        decision = authorize_csr_by_token(rec, secret, host, "web", now, key=KEY_A)
        assert not decision.allowed and reason in decision.reason


def test_a_record_without_consumed_keys_allows_no_retry() -> None:
    """Records written before keys were kept name consumed services only."""
    token, record = make()
    doc = json.loads(record.consume("web", KEY_A).to_json())
    del doc["consumed_keys"]
    old = TokenRecord.from_json(json.dumps(doc).encode())
    assert old.consumed == {"web"} and old.key_for("web") is None
    decision = authorize_csr_by_token(old, token.secret, "web-1", "web", NOW, key=KEY_A)
    assert not decision.allowed and decision.reason.endswith("already used for service 'web'")
    assert authorize_csr_by_token(old, token.secret, "web-1", "api", NOW, key=KEY_A).allowed


@pytest.mark.parametrize(
    "consumed_keys",
    [
        {"api": KEY_A},  # not consumed
        {"web": "A" * 64},  # not lower-case hex
        {"web": KEY_A[:-1]},
        {"web": 5},
        ["web", KEY_A],
    ],
)
def test_malformed_consumed_keys_make_the_record_invalid(consumed_keys: object) -> None:
    _, record = make()
    doc = json.loads(record.consume("web", KEY_A).to_json())
    doc["consumed_keys"] = consumed_keys
    with pytest.raises(TokenError, match="consumed"):
        TokenRecord.from_json(json.dumps(doc).encode())


def test_key_fingerprint_is_the_sha256_of_the_public_key_info() -> None:
    key = pki.generate_key().public_key()
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    assert key_fingerprint(key) == hashlib.sha256(der).hexdigest()
    assert key_fingerprint(pki.generate_key().public_key()) != key_fingerprint(key)


# -- renewal timing ---------------------------------------------------------------------


@pytest.mark.parametrize(("jitter", "expected"), [(0.0, 1050.0), (0.5, 1060.0), (1.0, 1070.0)])
def test_renew_at_is_50_to_70_percent_of_lifetime(jitter: float, expected: float) -> None:
    assert renew_at(1000.0, 1100.0, jitter) == pytest.approx(expected)


@given(
    nb=st.floats(0, 2e9),
    life=st.floats(0, 1e7),
    jitter=st.floats(0, 1),
)
def test_renew_at_always_inside_the_window(nb: float, life: float, jitter: float) -> None:
    at = renew_at(nb, nb + life, jitter)
    assert nb + 0.5 * life - 1e-3 <= at <= nb + 0.7 * life + 1e-3


def test_renew_at_refuses_bad_jitter() -> None:
    with pytest.raises(ValueError):
        renew_at(0, 1, 1.5)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (0.0, Phase.FRESH),
        (59.9, Phase.FRESH),
        (60.0, Phase.RENEW),
        (99.9, Phase.RENEW),
        (100.0, Phase.EXPIRED),
        (1e9, Phase.EXPIRED),
    ],
)
def test_phase(now: float, expected: Phase) -> None:
    assert phase(now, 60.0, 100.0) is expected


@pytest.mark.parametrize(
    ("now", "wake", "expected"),
    [
        (0.0, 100.0, 5.0),
        (98.0, 100.0, 2.0),
        (100.0, 100.0, 0.0),
        (200.0, 100.0, 0.0),
        # a clock stepped backwards still wakes within one step
        (-1e6, 100.0, 5.0),
    ],
)
def test_next_check_is_bounded(now: float, wake: float, expected: float) -> None:
    assert next_check(now, wake, max_step=5.0) == expected


def test_backoff_is_capped_and_jittered() -> None:
    assert backoff(0, base=1, cap=60, jitter_fraction=0) == 0.5
    assert backoff(0, base=1, cap=60, jitter_fraction=1) == 1
    assert backoff(3, base=1, cap=60, jitter_fraction=1) == 8
    assert backoff(1000, base=1, cap=60, jitter_fraction=1) == 60
    assert backoff(1000, base=1, cap=60, jitter_fraction=0) == 30
    with pytest.raises(ValueError):
        backoff(-1, base=1, cap=1, jitter_fraction=0)


# -- rate limiter and request parsing (pure) -----------------------------------------------


def test_rate_limiter_refills_and_stays_bounded() -> None:
    from meshd.server.ratelimit import RateLimiter

    limiter = RateLimiter(rate_per_s=1.0, burst=2, max_clients=3)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [True, True, False]
    assert limiter.take("b", 0.0)  # other clients are not affected
    assert not limiter.take("a", 0.5) and limiter.take("a", 1.6)
    assert not limiter.take("a", 0.0)  # a clock going backwards refills nothing
    for client in "cdef":
        limiter.take(client, 2.0)
    stats = limiter.statistics()
    assert stats.clients == 3 and stats.limited == 3


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_sign_request_parser_only_raises_api_errors(body: bytes) -> None:
    from meshd.signapi import ApiError, parse_sign_request

    try:
        parse_sign_request(body)
    except ApiError as exc:
        assert exc.status in (400, 413)


@given(
    st.dictionaries(
        st.sampled_from(["csr", "service", "host", "ttl_s", "extra"]),
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    )
)
def test_sign_request_parser_accepts_only_the_documented_shape(doc: dict) -> None:
    import json

    from meshd.signapi import ApiError, parse_sign_request

    try:
        request = parse_sign_request(json.dumps(doc).encode())
    except ApiError:
        return
    assert set(doc) - {"ttl_s"} == {"csr", "service", "host"}
    assert request.service == doc["service"] and request.host == doc["host"]
