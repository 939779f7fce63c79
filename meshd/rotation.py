"""Root CA rotation as a table-driven state machine over the trust bundle.

The phase is not stored separately: it is read off the bundle (:func:`phase_of`), so the
one KV document written with check-and-set is the whole state, and no reader can see a
phase that disagrees with the roots it trusts.

=================  ==========================================================
STABLE             one ``active`` root signs; nothing in flight
NEW_ROOT_PUBLISHED the next root is in the bundle as ``rotating-in``; it has
                   signed nothing yet, so every peer learns it before it matters
CROSS_SIGNED       cross certificates (next root under the old one and the old
                   one under the next) are in the bundle's intermediates, so a
                   peer that holds only one of the two roots accepts both
                   hierarchies
NEW_ROOT_SIGNING   the next root is ``active`` and its signing CA issues; the
                   old root is ``retiring`` until ``retire_after``, the expiry
                   of the last leaf signed under it
=================  ==========================================================

Retiring (back to STABLE) is refused while ``now <= retire_after``. Every step returns a
new :class:`TrustBundle` and checks that the bundle it built reads back as the phase the
table promised.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import replace

from cryptography import x509

from meshd.errors import MeshdError
from meshd.pki import CertificateAuthority, cross_sign
from meshd.trustbundle import BundleRoot, RootState, TrustBundle

# Under the KV prefix: one key per meshd server, {"leaf_ttl_s": <seconds>} (the lifetime of
# the leaves it signs), so that a rotation keeps the old root long enough.
LEAF_TTL_KEY = "ca/leaf-ttl/"


class RotationError(MeshdError):
    """A rotation step is not allowed now (wrong phase, guard not met, wrong CA)."""


class Phase(enum.StrEnum):
    """Where a root rotation stands."""

    STABLE = "stable"
    NEW_ROOT_PUBLISHED = "new-root-published"
    CROSS_SIGNED = "cross-signed"
    NEW_ROOT_SIGNING = "new-root-signing"


class Event(enum.StrEnum):
    """The steps of a rotation."""

    PUBLISH_NEW_ROOT = "publish-new-root"
    CROSS_SIGN = "cross-sign"
    SWITCH_SIGNING = "switch-signing"
    RETIRE_OLD_ROOT = "retire-old-root"


TRANSITIONS: dict[Phase, dict[Event, Phase]] = {
    Phase.STABLE: {Event.PUBLISH_NEW_ROOT: Phase.NEW_ROOT_PUBLISHED},
    Phase.NEW_ROOT_PUBLISHED: {Event.CROSS_SIGN: Phase.CROSS_SIGNED},
    Phase.CROSS_SIGNED: {Event.SWITCH_SIGNING: Phase.NEW_ROOT_SIGNING},
    Phase.NEW_ROOT_SIGNING: {Event.RETIRE_OLD_ROOT: Phase.STABLE},
}


def next_phase(phase: Phase, event: Event) -> Phase:
    """Look *event* up in :data:`TRANSITIONS`.

    Raises:
        RotationError: the event is not allowed in *phase*.
    """
    try:
        return TRANSITIONS[phase][event]
    except KeyError:
        allowed = ", ".join(TRANSITIONS[phase]) or "nothing"
        raise RotationError(f"cannot {event} while {phase}; allowed: {allowed}") from None


def _with_state(bundle: TrustBundle, state: RootState) -> BundleRoot | None:
    return next((r for r in bundle.roots if r.state is state), None)


def _is_cross(cert: x509.Certificate, subject: x509.Name, issuer: x509.Name) -> bool:
    return cert.subject == subject and cert.issuer == issuer


def phase_of(bundle: TrustBundle) -> Phase:
    """The rotation phase a bundle is in.

    Raises:
        RotationError: the bundle mixes phases (both a rotating-in and a retiring root).
    """
    incoming = _with_state(bundle, RootState.ROTATING_IN)
    retiring = _with_state(bundle, RootState.RETIRING)
    if incoming is not None and retiring is not None:
        raise RotationError("trust bundle has both a rotating-in and a retiring root")
    if retiring is not None:
        return Phase.NEW_ROOT_SIGNING
    if incoming is None:
        return Phase.STABLE
    new, old = incoming.cert.subject, bundle.active.cert.subject
    if any(_is_cross(c, new, old) for c in bundle.intermediates):
        return Phase.CROSS_SIGNED
    return Phase.NEW_ROOT_PUBLISHED


def _step(bundle: TrustBundle, event: Event, result: TrustBundle) -> TrustBundle:
    expected = next_phase(phase_of(bundle), event)
    if phase_of(result) is not expected:  # pragma: no cover - a bug in this module
        raise AssertionError(f"{event} produced {phase_of(result)}, not {expected}")
    return result


def publish_new_root(
    bundle: TrustBundle, new_root: x509.Certificate, *, now: dt.datetime
) -> TrustBundle:
    """Add the next root as ``rotating-in``; it must sign nothing until the switch.

    Args:
        bundle: a STABLE bundle.
        new_root: the next root's certificate (public part only).
        now: the current time; the root must be valid now.

    Returns:
        The NEW_ROOT_PUBLISHED bundle. Retired roots of earlier rotations are dropped.

    Raises:
        RotationError: not STABLE, or the root is not currently valid.
    """
    next_phase(phase_of(bundle), Event.PUBLISH_NEW_ROOT)
    if not new_root.not_valid_before_utc <= now <= new_root.not_valid_after_utc:
        raise RotationError("the new root is not valid now")
    kept = tuple(r for r in bundle.roots if r.state is not RootState.RETIRED)
    result = replace(bundle, roots=(*kept, BundleRoot(new_root, RootState.ROTATING_IN)))
    return _step(bundle, Event.PUBLISH_NEW_ROOT, result)


def add_cross_signatures(
    bundle: TrustBundle,
    old_root: CertificateAuthority,
    new_root: CertificateAuthority,
    *,
    now: dt.datetime,
) -> TrustBundle:
    """Publish both cross certificates, so holders of either root trust both hierarchies.

    Args:
        bundle: a NEW_ROOT_PUBLISHED bundle.
        old_root: the active root, with its key.
        new_root: the rotating-in root, with its key.
        now: the current time.

    Returns:
        The CROSS_SIGNED bundle.

    Raises:
        RotationError: wrong phase, or the CAs are not the bundle's active and next roots.
    """
    next_phase(phase_of(bundle), Event.CROSS_SIGN)
    incoming = _with_state(bundle, RootState.ROTATING_IN)
    if old_root.cert != bundle.active.cert:
        raise RotationError("old_root is not the bundle's active root")
    if incoming is None or new_root.cert != incoming.cert:
        raise RotationError("new_root is not the bundle's rotating-in root")
    crosses = (cross_sign(old_root, new_root, now=now), cross_sign(new_root, old_root, now=now))
    result = replace(bundle, intermediates=(*bundle.intermediates, *crosses))
    return _step(bundle, Event.CROSS_SIGN, result)


def switch_signing(
    bundle: TrustBundle,
    *,
    now: dt.datetime,
    old_leaves_valid_until: dt.datetime,
    new_signing_ca: x509.Certificate | None = None,
) -> TrustBundle:
    """Make the next root active and mark the old one retiring.

    From here leaves are signed under the new root. The caller must have stopped signing
    with the old hierarchy and gives the latest ``notAfter`` any leaf under it can have.

    Args:
        bundle: a CROSS_SIGNED bundle.
        now: the current time.
        old_leaves_valid_until: expiry of the last leaf signed under the old root.
        new_signing_ca: the new signing CA's certificate, added to the intermediates.

    Returns:
        The NEW_ROOT_SIGNING bundle, with ``retire_after`` on the old root.

    Raises:
        RotationError: wrong phase.
    """
    next_phase(phase_of(bundle), Event.SWITCH_SIGNING)
    incoming = _with_state(bundle, RootState.ROTATING_IN)
    if incoming is None or now < incoming.cert.not_valid_before_utc:
        raise RotationError("the new root is not valid yet; peers would refuse its leaves")
    roots = tuple(_switched(r, old_leaves_valid_until) for r in bundle.roots)
    extra = () if new_signing_ca is None else (new_signing_ca,)
    result = replace(bundle, roots=roots, intermediates=(*bundle.intermediates, *extra))
    return _step(bundle, Event.SWITCH_SIGNING, result)


def _switched(root: BundleRoot, retire_after: dt.datetime) -> BundleRoot:
    if root.state is RootState.ACTIVE:
        return BundleRoot(root.cert, RootState.RETIRING, retire_after)
    if root.state is RootState.ROTATING_IN:
        return BundleRoot(root.cert, RootState.ACTIVE)
    return root


def retire_old_root(bundle: TrustBundle, *, now: dt.datetime) -> TrustBundle:
    """Stop trusting the old root once every leaf it signed has expired.

    Args:
        bundle: a NEW_ROOT_SIGNING bundle.
        now: the current time; must be after the old root's ``retire_after``.

    Returns:
        The STABLE bundle: old root ``retired``, and the intermediates that involve it
        (cross certificates, its signing CA) removed.

    Raises:
        RotationError: wrong phase, or a leaf under the old root may still be valid.
    """
    next_phase(phase_of(bundle), Event.RETIRE_OLD_ROOT)
    old = _with_state(bundle, RootState.RETIRING)
    if old is None or old.retire_after is None:
        raise RotationError("the retiring root has no retire_after time")
    if now <= old.retire_after:
        raise RotationError(
            f"root {old.id[:16]} still has leaves valid until {old.retire_after.isoformat()}"
        )
    name = old.cert.subject
    roots = tuple(BundleRoot(r.cert, RootState.RETIRED) if r is old else r for r in bundle.roots)
    inters = tuple(c for c in bundle.intermediates if name not in (c.subject, c.issuer))
    result = replace(bundle, roots=roots, intermediates=inters)
    return _step(bundle, Event.RETIRE_OLD_ROOT, result)
