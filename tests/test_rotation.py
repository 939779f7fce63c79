"""Root rotation: the phase table, its guards, and a mixed fleet that never stops trusting."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd import pki
from meshd.identity import SpiffeId
from meshd.peer import PeerRejected, verify_peer
from meshd.rotation import (
    TRANSITIONS,
    Event,
    Phase,
    RotationError,
    add_cross_signatures,
    next_phase,
    phase_of,
    publish_new_root,
    retire_old_root,
    switch_signing,
)
from meshd.trustbundle import BundleRoot, RootState, TrustBundle, fingerprint
from tests.plugins.pki import TRUST_DOMAIN, MeshCa, make_mesh_ca

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(days=300)  # rotation starts
T2 = T1 + dt.timedelta(days=1)  # signing switches to the new root
LEAF_TTL = dt.timedelta(hours=24)
DER = serialization.Encoding.DER


def leaf_chain(signing: pki.CertificateAuthority, service: str, now: dt.datetime) -> list[bytes]:
    identity = SpiffeId(TRUST_DOMAIN, "dc1", service)
    csr = pki.build_csr(pki.generate_key(), identity)
    leaf = pki.sign_leaf(signing, csr, identity, now=now, ttl=LEAF_TTL)
    return [c.public_bytes(DER) for c in (leaf, signing.cert, *signing.chain)]


def accepts(bundle: TrustBundle, chain: list[bytes], now: dt.datetime) -> bool:
    try:
        verify_peer(
            chain, bundle, role="server", trust_domain=TRUST_DOMAIN, expected_service=None, now=now
        )
    except PeerRejected:
        return False
    return True


def test_every_event_outside_the_table_is_refused() -> None:
    for phase in Phase:
        for event in Event:
            if event in TRANSITIONS[phase]:
                assert next_phase(phase, event) is TRANSITIONS[phase][event]
            else:
                with pytest.raises(RotationError, match=f"cannot {event} while {phase}"):
                    next_phase(phase, event)


def test_full_rotation_with_a_mixed_fleet() -> None:
    old: MeshCa = make_mesh_ca(now=T0)
    b0 = old.bundle
    assert phase_of(b0) is Phase.STABLE
    new_root = pki.make_root(TRUST_DOMAIN, now=T1, ttl=dt.timedelta(days=3650))

    with pytest.raises(RotationError, match="cannot switch-signing while stable"):
        switch_signing(b0, now=T1, old_leaves_valid_until=T1)
    b1 = publish_new_root(b0, new_root.cert, now=T1)
    assert phase_of(b1) is Phase.NEW_ROOT_PUBLISHED
    assert b1.root(fingerprint(new_root.cert)).state is RootState.ROTATING_IN
    assert b1.active.cert == old.root.cert
    with pytest.raises(RotationError, match="cannot publish-new-root"):
        publish_new_root(b1, new_root.cert, now=T1)

    with pytest.raises(RotationError, match="not the bundle's active root"):
        add_cross_signatures(b1, new_root, old.root, now=T1)
    b2 = add_cross_signatures(b1, old.root, new_root, now=T1)
    assert phase_of(b2) is Phase.CROSS_SIGNED
    old_to_new = next(c for c in b2.intermediates if c.issuer == old.root.cert.subject)

    # The new signing CA presents the cross certificate, for peers that hold only the old root.
    fresh = pki.make_signing_ca(new_root, now=T2, ttl=dt.timedelta(days=90))
    new_signing = pki.CertificateAuthority(TRUST_DOMAIN, fresh.cert, fresh.key, (old_to_new,))
    last_old_leaf = leaf_chain(old.signing, "web", T2)  # the old CA's final issuance
    b3 = switch_signing(
        b2, now=T2, old_leaves_valid_until=T2 + LEAF_TTL, new_signing_ca=new_signing.cert
    )
    assert phase_of(b3) is Phase.NEW_ROOT_SIGNING
    assert b3.active.cert == new_root.cert
    new_leaf = leaf_chain(new_signing, "api", T2)

    # Zero refusals during the overlap: every bundle generation accepts both hierarchies.
    during = T2 + dt.timedelta(hours=1)
    for bundle in (b0, b1, b2, b3):
        assert accepts(bundle, last_old_leaf, during), phase_of(bundle)
        assert accepts(bundle, new_leaf, during), phase_of(bundle)
    # A peer holding only the new root trusts old leaves via the new->old cross certificate
    # in the bundle's intermediates.
    new_only = TrustBundle(
        TRUST_DOMAIN, (BundleRoot(new_root.cert, RootState.ACTIVE),), b3.intermediates
    )
    assert accepts(new_only, last_old_leaf, during)
    assert not accepts(replace(new_only, intermediates=()), last_old_leaf, during)

    with pytest.raises(RotationError, match="still has leaves valid until"):
        retire_old_root(b3, now=T2 + LEAF_TTL)
    b4 = retire_old_root(b3, now=T2 + LEAF_TTL + dt.timedelta(seconds=1))
    assert phase_of(b4) is Phase.STABLE
    assert b4.root(fingerprint(old.root.cert)).state is RootState.RETIRED
    assert old.root.cert not in b4.trusted_roots()
    assert all(old.root.cert.subject not in (c.subject, c.issuer) for c in b4.intermediates)
    after = T2 + LEAF_TTL + dt.timedelta(minutes=5)
    assert accepts(b4, leaf_chain(new_signing, "api", after), after)
    # The retired root no longer anchors anything, even a still-valid old-hierarchy leaf.
    assert not accepts(b4, leaf_chain(old.signing, "web", after), after)

    # The next rotation drops the retired root from the bundle.
    newer = pki.make_root(TRUST_DOMAIN, now=after, ttl=dt.timedelta(days=3650))
    b5 = publish_new_root(b4, newer.cert, now=after)
    assert [r.state for r in b5.roots] == [RootState.ACTIVE, RootState.ROTATING_IN]
    assert TrustBundle.from_json(b5.to_json()) == b5


def test_publish_refuses_a_root_not_valid_now() -> None:
    old = make_mesh_ca(now=T0)
    later = pki.make_root(TRUST_DOMAIN, now=T1, ttl=dt.timedelta(days=10))
    with pytest.raises(RotationError, match="not valid now"):
        publish_new_root(old.bundle, later.cert, now=T0)


def test_bundle_round_trip_keeps_the_phase() -> None:
    old = make_mesh_ca(now=T0)
    new_root = pki.make_root(TRUST_DOMAIN, now=T1, ttl=dt.timedelta(days=3650))
    b1 = publish_new_root(old.bundle, new_root.cert, now=T1)
    b2 = add_cross_signatures(b1, old.root, new_root, now=T1)
    b3 = switch_signing(b2, now=T2, old_leaves_valid_until=T2 + LEAF_TTL)
    for bundle in (old.bundle, b1, b2, b3):
        assert phase_of(TrustBundle.from_json(bundle.to_json())) is phase_of(bundle)
    assert isinstance(b3.roots[0].cert, x509.Certificate)


EVENTS = ["publish", "cross", "switch", "retire", "issue", "wait"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(EVENTS), max_size=14))
def test_any_event_sequence_keeps_every_live_leaf_trusted(events: list[str]) -> None:
    """Whatever order operators try steps in, no unexpired leaf is ever refused."""
    mesh = make_mesh_ca(now=T0)
    bundle, signing, now = mesh.bundle, mesh.signing, T1
    roots = {fingerprint(mesh.root.cert): mesh.root}
    leaves: list[tuple[list[bytes], dt.datetime]] = []
    for event in events:
        before = bundle
        try:
            if event == "publish":
                new_root = pki.make_root(TRUST_DOMAIN, now=now, ttl=dt.timedelta(days=3650))
                bundle = publish_new_root(bundle, new_root.cert, now=now)
                roots[fingerprint(new_root.cert)] = new_root
            elif event == "cross":
                incoming = next(r for r in bundle.roots if r.state is RootState.ROTATING_IN)
                bundle = add_cross_signatures(
                    bundle, roots[bundle.active.id], roots[incoming.id], now=now
                )
            elif event == "switch":
                bundle = switch_signing(bundle, now=now, old_leaves_valid_until=now + LEAF_TTL)
                signing = pki.make_signing_ca(roots[bundle.active.id], now=now, ttl=LEAF_TTL * 90)
            elif event == "retire":
                bundle = retire_old_root(bundle, now=now)
            elif event == "issue":
                leaves.append((leaf_chain(signing, "web", now), now + LEAF_TTL))
            else:
                now += dt.timedelta(hours=13)
        except (RotationError, StopIteration):
            assert bundle == before  # a refused step changes nothing
        assert sum(r.state is RootState.ACTIVE for r in bundle.roots) == 1
        assert signing.cert.issuer == bundle.active.cert.subject
        for chain, not_after in leaves:
            if now < not_after:
                assert accepts(bundle, chain, now), (event, phase_of(bundle))
