"""Installing, removing and inspecting the redirect rules (driver for :mod:`meshd.redirect`).

The rules themselves are rendered by the core; this module only runs ``iptables-save`` and
``iptables-restore --noflush`` (``ip6tables-*`` for IPv6), with argument lists and the payload
on stdin. Each family is one atomic restore. The families are applied IPv4 first, then IPv6;
should the IPv6 restore fail, IPv4 keeps its new rules and the error says so.

:func:`verify` combines a comparison of the installed rules with the spec and the live probe
of :mod:`agent.redirect_probe`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

from agent.childenv import child_environment
from agent.redirect_probe import ProbeResult, probe
from meshd.errors import MeshdError
from meshd.redirect import (
    Family,
    RedirectSpec,
    RedirectStatus,
    drift,
    parse_status,
    render_removal,
    render_rules,
)

FAMILIES: tuple[Family, ...] = (4, 6)
_TOOLS: dict[Family, tuple[str, str]] = {
    4: ("iptables-save", "iptables-restore"),
    6: ("ip6tables-save", "ip6tables-restore"),
}
#: Where the probe dials unless told otherwise (documentation ranges; need a route).
DEFAULT_PROBE_TARGETS: Mapping[Family, tuple[str, int]] = {
    4: ("192.0.2.1", 80),
    6: ("2001:db8::1", 80),
}
_TIMEOUT = 30.0
_ATTEMPTS = 3


class RedirectError(MeshdError):
    """Rules could not be read, installed or removed, or the probe failed; says which."""


@dataclass(frozen=True)
class Change:
    """The payload one family needed (``""``: nothing to do) and whether it was restored."""

    family: Family
    payload: str
    applied: bool


def _run(argv: list[str], stdin: str | None = None) -> str:
    # Other tools' rules may carry any bytes (a comment in Latin-1): they pass through as
    # surrogates, and go back to iptables-restore unchanged if a payload ever quotes them.
    try:
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, encoding="utf-8", errors="surrogateescape",
            timeout=_TIMEOUT, check=False, env=child_environment(),
        )  # fmt: skip
    except FileNotFoundError as exc:
        raise RedirectError(f"{argv[0]} not found: install iptables") from exc
    except subprocess.TimeoutExpired as exc:
        raise RedirectError(f"{' '.join(argv)} did not finish in {_TIMEOUT:.0f} s") from exc
    except OSError as exc:  # e.g. out of file descriptors or processes: a pipe, a fork
        raise RedirectError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    if proc.returncode != 0:
        stderr = proc.stderr.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        why = " ".join(stderr.split()) or "no message"
        raise RedirectError(f"{' '.join(argv)} failed (exit {proc.returncode}): {why}")
    return proc.stdout


def read_rules(family: Family) -> str:
    """The family's current ruleset as ``iptables-save`` prints it.

    Raises:
        RedirectError: the tool is missing or failed (its stderr is in the message).
    """
    return _run([_TOOLS[family][0]])


def restore(family: Family, payload: str) -> None:
    """Feed *payload* to ``iptables-restore --noflush`` (one atomic transaction).

    Raises:
        RedirectError: the tool rejected the payload (its stderr is in the message).
    """
    _run([_TOOLS[family][1], "--noflush"], stdin=payload)


def _settled(save: str) -> str:
    # Comment lines carry a timestamp; they say nothing about the ruleset.
    return "\n".join(line for line in save.splitlines() if not line.startswith("#"))


def _apply_family(spec: RedirectSpec, family: Family, dry_run: bool) -> Change:
    for attempt in range(1, _ATTEMPTS + 1):
        current = read_rules(family)
        payload = render_rules(spec, family, current)
        if dry_run:
            return Change(family, payload, applied=False)
        try:
            restore(family, payload)
        except RedirectError:
            # A -D of a rule someone removed since our read fails the whole (atomic) restore;
            # re-read and try again, but only if the ruleset did move underneath us.
            if attempt == _ATTEMPTS or _settled(read_rules(family)) == _settled(current):
                raise
            continue
        return Change(family, payload, applied=True)
    raise AssertionError("unreachable")  # pragma: no cover


def apply(
    spec: RedirectSpec, *, dry_run: bool = False, families: tuple[Family, ...] = FAMILIES
) -> tuple[Change, ...]:
    """Install *spec*'s rules, replacing ours atomically per family; idempotent.

    Args:
        spec: what to capture.
        dry_run: render against the current rules but change nothing.
        families: which address families to manage (both unless testing).

    Returns:
        One :class:`Change` per family, with the payload that was (or would be) restored.

    Raises:
        RedirectError: reading or restoring failed; earlier families stay applied.
    """
    changes = []
    for family in families:
        try:
            changes.append(_apply_family(spec, family, dry_run))
        except RedirectError as exc:
            done = ", ".join(f"IPv{c.family}" for c in changes) or "nothing"
            raise RedirectError(f"IPv{family}: {exc} (already applied: {done})") from exc
    return tuple(changes)


def remove(*, dry_run: bool = False, families: tuple[Family, ...] = FAMILIES) -> tuple[Change, ...]:
    """Delete our tagged rules and ``MESHD_*`` chains, and nothing else.

    Raises:
        RedirectError: reading or restoring failed.
    """
    changes = []
    for family in families:
        payload = render_removal(read_rules(family))
        if payload and not dry_run:
            restore(family, payload)
        changes.append(Change(family, payload, applied=bool(payload) and not dry_run))
    return tuple(changes)


@dataclass(frozen=True)
class FamilyStatus:
    """What one family holds of ours, and (given a spec) how it differs from the spec."""

    family: Family
    status: RedirectStatus
    problems: tuple[str, ...]


def status(
    spec: RedirectSpec | None = None, *, families: tuple[Family, ...] = FAMILIES
) -> tuple[FamilyStatus, ...]:
    """Inspect the installed rules; with *spec*, also list every difference from it.

    Raises:
        RedirectError: ``iptables-save`` failed.
    """
    result = []
    for family in families:
        save = read_rules(family)
        problems = drift(spec, family, save) if spec is not None else ()
        result.append(FamilyStatus(family, parse_status(save), problems))
    return tuple(result)


def repair(spec: RedirectSpec, *, families: tuple[Family, ...] = FAMILIES) -> tuple[str, ...]:
    """Re-apply *spec* where the installed rules drifted (flushed or edited by another tool).

    The running agent calls this every ``[redirect] check_interval`` (:func:`keep_applied`)
    so that a foreign flush is repaired and reported rather than ignored.

    Returns:
        The problems found (``"IPv4: ..."``), empty when the rules were intact.

    Raises:
        RedirectError: reading or re-applying failed.
    """
    found = status(spec, families=families)
    broken = tuple(s.family for s in found if s.problems)
    if broken:
        apply(spec, families=broken)
    return tuple(f"IPv{s.family}: {p}" for s in found for p in s.problems)


async def keep_applied(
    spec: RedirectSpec,
    *,
    interval: float,
    on_checked: Callable[[tuple[str, ...]], None],
    on_failed: Callable[[str], None],
) -> None:
    """Every *interval* seconds, :func:`repair` the rules in a worker thread; forever.

    *on_checked* gets the problems that were found and fixed after each check that
    succeeded (empty while the rules are intact); *on_failed* the error when reading or
    re-applying failed (the next round tries again).
    """
    while True:
        await trio.sleep(interval)
        try:
            problems = await trio.to_thread.run_sync(repair, spec)
        except (MeshdError, OSError) as exc:  # also iptables-save output it cannot read
            on_failed(str(exc))
            continue
        on_checked(problems)


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify`: probe results and differences from the spec."""

    probes: tuple[ProbeResult, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether the rules match the spec and every probe behaved as the spec asks."""
        return not self.problems and all(p.ok for p in self.probes)


async def verify(
    spec: RedirectSpec,
    *,
    targets: Sequence[tuple[Family, tuple[str, int]]] = tuple(DEFAULT_PROBE_TARGETS.items()),
    timeout: float = 2.0,
) -> VerifyReport:
    """Check the installed rules against *spec*, then prove interception with live probes.

    Both families' rules are compared whatever the probes: a probe adds proof for its
    family, and a family without one is still checked.

    Args:
        spec: the spec the rules should implement.
        targets: ``(family, (address, port))`` the rules must capture (each needs a route);
            every one is probed.
        timeout: seconds each probe may take.

    Raises:
        RedirectError: ``iptables-save`` failed.
        ProbeError: a probe cannot run (outbound port busy, excluded target).
    """
    found = await trio.to_thread.run_sync(status, spec)
    problems = tuple(f"IPv{s.family}: {p}" for s in found for p in s.problems)
    probes = [await probe(spec, f, t, timeout=timeout) for f, t in targets]
    return VerifyReport(tuple(probes), problems)
