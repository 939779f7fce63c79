"""Compiling intentions documents into a frozen policy, and the pure ``authorize()``.

Semantics are Consul's (https://developer.hashicorp.com/consul/docs/connect/intentions):

=========================  =====================  ==========
source                     destination            precedence
=========================  =====================  ==========
exact                      exact                  9
``*``                      exact                  8
exact                      ``*``                  6
``*``                      ``*``                  5
=========================  =====================  ==========

Intentions are evaluated in precedence order, deny before allow at equal precedence, then by
source name (only to make the order total); the first one that matches the source decides.
If none matches, the mesh's default action applies (default deny).

Design notes, each a deliberate fail-closed choice:

* **L7 sources deny at L4.** A source with ``Permissions`` matches at its precedence and
  denies the connection. It must not fall through to a lower-precedence intention or the
  default: with default deny and one L7 *deny* permission, falling through to an allow is
  Consul's CVE-2021-36213. The L7 proxy can read the permissions from the decision's
  ``intention`` once it enforces them.
* **Invalid documents deny.** An invalid document for destination D denies every source of D.
  An invalid ``*`` document is a barrier at the place its intentions would be evaluated: a
  source already decided by D's own (precedence 9/8) intentions keeps that decision, which the
  ``*`` document could not have changed; every other source of every destination is denied
  instead of reaching the ``*`` document or the default.
* **Anonymous peers** (plaintext in permissive mTLS mode, ``source=None``) proved no
  identity, so any identity could be behind them. They are allowed only if *every* identity
  would be allowed to reach the destination; otherwise they get the deny that some identity
  would get. This is stricter than Consul (which does not apply intentions to plaintext at all)
  and never lets plaintext sidestep a deny written for a named source.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meshd.intentions.document import (
    WILDCARD,
    IntentionsDocument,
    InvalidDocument,
    SourceIntention,
    is_service_name,
)
from meshd.intentions.permissions import Permission
from meshd.intentions.schema import Action

PRECEDENCE_EXACT_EXACT = 9
PRECEDENCE_WILDCARD_SOURCE = 8
PRECEDENCE_WILDCARD_DESTINATION = 6
PRECEDENCE_WILDCARD_WILDCARD = 5


def precedence(source: str, destination: str) -> int:
    """Consul's precedence of an intention from *source* to *destination* (either may be ``*``)."""
    if destination == WILDCARD:
        return (
            PRECEDENCE_WILDCARD_WILDCARD if source == WILDCARD else PRECEDENCE_WILDCARD_DESTINATION
        )
    return PRECEDENCE_WILDCARD_SOURCE if source == WILDCARD else PRECEDENCE_EXACT_EXACT


@dataclass(frozen=True)
class MatchedIntention:
    """One intention in evaluation order: the ``Sources`` entry of one document, resolved."""

    source: str
    destination: str
    precedence: int
    action: Action | None
    permissions: tuple[Permission, ...] = ()
    description: str = ""

    @property
    def l4_action(self) -> Action:
        """What this intention does to a TCP connection: L7 sources deny (see module notes)."""
        return Action.DENY if self.permissions or self.action is None else self.action


@dataclass(frozen=True)
class Barrier:
    """An invalid document in the evaluation order: every source reaching it is denied."""

    destination: str
    key: str
    reason: str


Step = MatchedIntention | Barrier


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`authorize`.

    Attributes:
        allowed: whether the connection may proceed.
        reason: one line for logs and ``meshctl intention check``.
        intention: the intention that decided, or ``None`` (default action, invalid document,
            malformed name).
        precedence: the deciding intention's precedence, or ``None``.
    """

    allowed: bool
    reason: str
    intention: MatchedIntention | None = None
    precedence: int | None = None


@dataclass(frozen=True)
class Policy:
    """Compiled intentions: immutable, shared freely between tasks and connections.

    Attributes:
        default_action: applies when no intention matches.
        orders: evaluation order per destination that has a document (valid or not).
        fallback: evaluation order for destinations without a document of their own.
        invalid: the invalid documents, sorted by destination.
    """

    default_action: Action = Action.DENY
    orders: Mapping[str, tuple[Step, ...]] = field(default_factory=lambda: MappingProxyType({}))
    fallback: tuple[Step, ...] = ()
    invalid: tuple[InvalidDocument, ...] = ()

    def evaluation_order(self, destination: str) -> tuple[Step, ...]:
        """The intentions (and barriers) consulted for *destination*, first to last."""
        return self.orders.get(destination, self.fallback)


def compile_policy(
    documents: Mapping[str, IntentionsDocument | InvalidDocument],
    *,
    default_action: Action = Action.DENY,
) -> Policy:
    """Compile intentions documents into a :class:`Policy`.

    Args:
        documents: destination (or ``*``) to its parsed document or the reason it is invalid,
            as :func:`meshd.intentions.documents_from_kv` returns.
        default_action: the mesh default, from the mesh config document.

    Returns:
        The policy. The result does not depend on the order of *documents* or of sources.
    """
    documents = {d: _check_name(d, doc) for d, doc in documents.items()}
    wildcard = documents.get(WILDCARD)
    wild_steps = _steps(WILDCARD, wildcard) if wildcard is not None else ()
    orders: dict[str, tuple[Step, ...]] = {}
    for destination in sorted(documents):
        if destination == WILDCARD:
            continue
        document = documents[destination]
        own = _steps(destination, document)
        orders[destination] = own if isinstance(document, InvalidDocument) else own + wild_steps
    invalid = tuple(
        sorted(
            (d for d in documents.values() if isinstance(d, InvalidDocument)),
            key=lambda d: d.destination,
        )
    )
    return Policy(
        default_action=default_action,
        orders=MappingProxyType(orders),
        fallback=wild_steps,
        invalid=invalid,
    )


def _check_name(
    destination: str, document: IntentionsDocument | InvalidDocument
) -> IntentionsDocument | InvalidDocument:
    """A document filed under the wrong destination is invalid, never applied elsewhere."""
    if isinstance(document, InvalidDocument) or document.name == destination:
        return document
    reason = f"document for {document.name!r} given as the document for {destination!r}"
    return InvalidDocument(
        destination=destination, key=f"(intentions/{destination})", reason=reason
    )


def _steps(destination: str, document: IntentionsDocument | InvalidDocument) -> tuple[Step, ...]:
    if isinstance(document, InvalidDocument):
        return (Barrier(destination=destination, key=document.key, reason=document.reason),)
    rules = [_resolve(destination, source) for source in document.sources]
    rules.sort(key=lambda r: (-r.precedence, r.l4_action != Action.DENY, r.source))
    return tuple(rules)


def _resolve(destination: str, source: SourceIntention) -> MatchedIntention:
    return MatchedIntention(
        source=source.name,
        destination=destination,
        precedence=precedence(source.name, destination),
        action=source.action,
        permissions=source.permissions,
        description=source.description,
    )


def authorize(policy: Policy, source: str | None, destination: str) -> Decision:
    """Decide whether *source* may open a connection to *destination*. Pure.

    Args:
        policy: the compiled policy.
        source: the peer's verified service name, or ``None`` for an anonymous (plaintext,
            permissive-mode) peer.
        destination: the local service being connected to.

    Returns:
        The decision, with the intention that decided it. Malformed names are denied.
    """
    if not is_service_name(destination):
        return Decision(False, f"destination {destination!r} is not a service name")
    steps = policy.evaluation_order(destination)
    if source is None:
        return _authorize_anonymous(policy, steps, destination)
    if not is_service_name(source):
        return Decision(False, f"source {source!r} is not a service name")
    for step in steps:
        if isinstance(step, Barrier):
            return _barrier_decision(step, destination)
        if step.source in (source, WILDCARD):
            return _intention_decision(step, source, destination)
    return _default_decision(policy, f"{source} -> {destination}")


def _authorize_anonymous(policy: Policy, steps: tuple[Step, ...], destination: str) -> Decision:
    """Allow only if every identity is allowed; else return the deny some identity gets."""
    decided: set[str] = set()
    for step in steps:
        if isinstance(step, Barrier):
            return _barrier_decision(step, destination)
        if step.source in decided:
            continue  # that identity was decided by an earlier intention
        decided.add(step.source)
        pair = f"anonymous -> {destination}"
        if step.l4_action == Action.DENY:
            if step.source == WILDCARD:
                reason = f"{pair} denied by {_describe(step)}"
            else:
                reason = (
                    f"{pair} denied: the peer could be {step.source}, denied by {_describe(step)}"
                )
            return Decision(False, reason, step, step.precedence)
        if step.source == WILDCARD:
            reason = f"{pair} allowed: every identity is allowed (the rest by {_describe(step)})"
            return Decision(True, reason, step, step.precedence)
    return _default_decision(policy, f"anonymous -> {destination}")


def _intention_decision(step: MatchedIntention, source: str, destination: str) -> Decision:
    if step.permissions:
        reason = (
            f"{source} -> {destination} matches {_describe(step)} which has L7 permissions; "
            "denied at L4"
        )
        return Decision(False, reason, step, step.precedence)
    allowed = step.l4_action == Action.ALLOW
    verb = "allowed" if allowed else "denied"
    return Decision(
        allowed, f"{source} -> {destination} {verb} by {_describe(step)}", step, step.precedence
    )


def _barrier_decision(step: Barrier, destination: str) -> Decision:
    if step.destination == WILDCARD:
        reason = (
            f"{destination}'s own intentions do not decide and the wildcard intentions "
            f"document is invalid, so deny: {step.reason}"
        )
    else:
        reason = f"{destination} denies everyone: its intentions document is invalid: {step.reason}"
    return Decision(False, reason)


def _default_decision(policy: Policy, pair: str) -> Decision:
    allowed = policy.default_action == Action.ALLOW
    return Decision(
        allowed,
        f"no intention matches {pair}; mesh default action is {policy.default_action.value}",
    )


def _describe(step: MatchedIntention) -> str:
    action = "l7" if step.permissions else step.l4_action.value
    return f"intention {step.source} -> {step.destination} ({action}, precedence {step.precedence})"
