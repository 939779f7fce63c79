"""SPIFFE IDs: one spelling per identity, everything else refused with a reason."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.identity import IdentityError, SpiffeId, parse_spiffe_id

TD = "9f86d081-884c-4d63-a5c2-0c2b1a5e0e2b.consul"
GOOD = f"spiffe://{TD}/ns/default/dc/dc1/svc/web"

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join).filter(lambda d: len(d) <= 253)


@given(td=domains, dc=labels, svc=labels)
def test_parse_inverts_format(td: str, dc: str, svc: str) -> None:
    identity = SpiffeId(td, dc, svc)
    assert parse_spiffe_id(identity.uri) == identity
    assert parse_spiffe_id(identity.uri).uri == identity.uri


@given(st.text(max_size=120))
def test_parse_never_crashes_and_only_accepts_canonical(text: str) -> None:
    try:
        identity = parse_spiffe_id(text)
    except IdentityError:
        return
    assert identity.uri == text


def test_the_consul_form() -> None:
    assert parse_spiffe_id(GOOD) == SpiffeId(TD, "dc1", "web")
    assert str(SpiffeId(TD, "dc1", "web")) == GOOD


BAD = {
    "upper-case scheme": (GOOD.replace("spiffe", "SPIFFE"), "must start with"),
    "other scheme": (GOOD.replace("spiffe", "https"), "must start with"),
    "upper-case trust domain": (GOOD.replace(TD, TD.upper()), "not a lower-case DNS name"),
    "port": (GOOD.replace(TD, TD + ":8443"), "port"),
    "userinfo": (GOOD.replace(TD, "user@" + TD), "userinfo"),
    "query": (GOOD + "?x=1", "query"),
    "fragment": (GOOD + "#x", "fragment"),
    "percent-encoding": (GOOD.replace("web", "w%65b"), "percent-encoding"),
    "trailing slash": (GOOD + "/", "empty or dot"),
    "double slash": (GOOD.replace("/svc/", "//svc/"), "empty or dot"),
    "dot segment": (GOOD.replace("/svc/web", "/svc/./web"), "empty or dot"),
    "dot-dot segment": (GOOD.replace("/svc/web", "/svc/x/../web"), "empty or dot"),
    "trailing-dot trust domain": (GOOD.replace(TD, TD + "."), "bad label ''"),
    "empty trust domain": ("spiffe:///ns/default/dc/dc1/svc/web", "1-253"),
    "other namespace": (GOOD.replace("/ns/default", "/ns/prod"), "namespace 'prod'"),
    "missing dc": (f"spiffe://{TD}/ns/default/svc/web", "not a service identity"),
    "extra segment": (GOOD + "/x", "not a service identity"),
    "swapped keys": (f"spiffe://{TD}/ns/default/svc/dc1/dc/web", "not a service identity"),
    "upper-case service": (GOOD.replace("web", "Web"), "service 'Web' is not a DNS label"),
    "underscore service": (GOOD.replace("web", "w_b"), "not a DNS label"),
    "leading hyphen": (GOOD.replace("web", "-web"), "not a DNS label"),
    "64-char label": (GOOD.replace("web", "a" * 64), "not a DNS label"),
    "non-ASCII digit": (GOOD.replace("dc1", "dc\u0661"), "datacenter"),
    "non-ASCII letter": (GOOD.replace("web", "w\u00e9b"), "not a DNS label"),
    "whitespace": (GOOD + " ", "not a DNS label"),
    "newline": (GOOD + "\n", "not a DNS label"),
    "too long": ("spiffe://" + "a" * 2100, "longer than 2048"),
}


@pytest.mark.parametrize("case", BAD)
def test_non_canonical_ids_are_refused(case: str) -> None:
    uri, reason = BAD[case]
    with pytest.raises(IdentityError, match=reason):
        parse_spiffe_id(uri)


def test_construction_validates() -> None:
    with pytest.raises(IdentityError, match="service"):
        SpiffeId(TD, "dc1", "Web")
