"""The mesh config document: strict parsing, canonical rendering, fail-closed loading."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.intentions import Action
from meshd.meshconfig import (
    DEFAULTS,
    FAIL_CLOSED,
    MeshConfig,
    MeshConfigError,
    MTLSMode,
    OutboundPolicy,
    load_mesh_config,
    mesh_config_key,
    parse_mesh_config,
    render_mesh_config,
)

KEY = "meshd/config/mesh"


def raw(**fields: Any) -> bytes:
    body: dict[str, Any] = {"Kind": "mesh", "Version": 1, **fields}
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def test_defaults_are_the_safe_ones() -> None:
    assert DEFAULTS.mtls_mode is MTLSMode.STRICT
    assert DEFAULTS.default_action is Action.DENY
    assert DEFAULTS.outbound_policy is OutboundPolicy.ALLOW_ANY
    assert 0 < DEFAULTS.tracing_sample_rate <= 1
    assert parse_mesh_config(KEY, raw()) == DEFAULTS


def test_parse_every_field() -> None:
    config = parse_mesh_config(
        KEY,
        raw(
            MTLSMode="permissive",
            DefaultAction="allow",
            OutboundPolicy="registry-only",
            TracingSampleRate=1,
        ),
    )
    assert config == MeshConfig(
        mtls_mode=MTLSMode.PERMISSIVE,
        default_action=Action.ALLOW,
        outbound_policy=OutboundPolicy.REGISTRY_ONLY,
        tracing_sample_rate=1.0,
    )


ERRORS: dict[str, tuple[bytes, str]] = {
    "not JSON": (b"{", "(document): is not valid JSON"),
    "unknown field": (raw(DefaultIntention="allow"), "unknown field 'DefaultIntention'"),
    "snake_case field": (raw(default_action="allow"), "unknown field 'default_action'"),
    "missing Kind": (raw(Kind=None), "Kind: is required"),
    "wrong Kind": (raw(Kind="service-intentions"), "Kind: must be 'mesh'"),
    "missing Version": (raw(Version=None), "Version: is required"),
    "unknown mode": (raw(MTLSMode="off"), "MTLSMode: must be 'strict' or 'permissive', got 'off'"),
    "unknown action": (raw(DefaultAction="permit"), "DefaultAction: must be 'allow' or 'deny'"),
    "unknown outbound": (raw(OutboundPolicy="any"), "OutboundPolicy: must be 'allow-any' or"),
    "rate above 1": (raw(TracingSampleRate=1.5), "TracingSampleRate: must be between 0 and 1"),
    "rate negative": (raw(TracingSampleRate=-0.1), "must be between 0 and 1"),
    "rate boolean": (raw(TracingSampleRate=True), "TracingSampleRate: must be a number"),
    "rate string": (raw(TracingSampleRate="0.5"), "must be a number, got string"),
    "duplicate key": (b'{"Kind": "mesh", "Version": 1, "Version": 1}', "duplicate field"),
}


@pytest.mark.parametrize(("data", "message"), ERRORS.values(), ids=ERRORS.keys())
def test_parse_rejects(data: bytes, message: str) -> None:
    with pytest.raises(MeshConfigError) as info:
        parse_mesh_config(KEY, data)
    assert str(info.value).startswith(f"mesh config document {KEY}: ")
    assert message in str(info.value)


def test_missing_document_means_defaults() -> None:
    loaded = load_mesh_config(KEY, None)
    assert loaded.config == DEFAULTS and loaded.error is None and not loaded.present


def test_invalid_document_fails_closed_with_the_error() -> None:
    loaded = load_mesh_config(KEY, raw(DefaultAction="allow", MTLSMode="permissive", Extra=1))
    assert loaded.config == FAIL_CLOSED
    assert loaded.config.default_action is Action.DENY
    assert loaded.config.mtls_mode is MTLSMode.STRICT
    assert loaded.config.outbound_policy is OutboundPolicy.REGISTRY_ONLY
    assert loaded.error is not None and "unknown field 'Extra'" in str(loaded.error)
    assert loaded.present


def test_valid_document_loads() -> None:
    loaded = load_mesh_config(KEY, raw(DefaultAction="allow"))
    assert loaded.error is None and loaded.config.default_action is Action.ALLOW


def test_key_follows_the_prefix() -> None:
    assert mesh_config_key() == KEY
    assert mesh_config_key("team/meshd") == "team/meshd/config/mesh"
    assert mesh_config_key("") == "config/mesh"


@given(
    mode=st.sampled_from(list(MTLSMode)),
    action=st.sampled_from(list(Action)),
    outbound=st.sampled_from(list(OutboundPolicy)),
    rate=st.floats(min_value=0, max_value=1),
)
def test_render_parse_round_trip(
    mode: MTLSMode, action: Action, outbound: OutboundPolicy, rate: float
) -> None:
    config = MeshConfig(
        mtls_mode=mode, default_action=action, outbound_policy=outbound, tracing_sample_rate=rate
    )
    rendered = render_mesh_config(config)
    assert parse_mesh_config(KEY, rendered) == config
    assert render_mesh_config(parse_mesh_config(KEY, rendered)) == rendered
