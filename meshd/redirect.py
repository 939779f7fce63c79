"""Transparent-redirect rules: values in, ``iptables-restore`` text out (sans-IO).

Design note. Everything meshd installs lives in four chains of its own (``MESHD_INBOUND``,
``MESHD_REDIRECT_IN``, ``MESHD_OUTPUT``, ``MESHD_REDIRECT_OUT``) plus one jump rule per hook
(``PREROUTING``/``OUTPUT`` in ``nat``; ``INPUT``/``OUTPUT`` in ``filter`` when IPv6 is
refused). Every rule carries ``-m comment --comment meshd``.

Atomicity: the whole change for one address family is a single ``iptables-restore --noflush``
payload. ``:CHAIN - [0:0]`` creates or flushes our chains inside the same transaction that
refills them, so the kernel switches from the old ruleset to the new one at COMMIT or not at
all; a process killed before COMMIT changes nothing.

Idempotence: a restore payload cannot say "insert unless present", so :func:`render_rules`
takes the current ``iptables-save`` text. Jumps that already sit exactly where they belong are
left alone; duplicates, misplaced or stale copies get ``-D`` lines and the jump one ``-I``.
Applying twice therefore yields the same ruleset as applying once. If the ruleset changes
between the read and the restore, a ``-D`` of a vanished rule fails the whole restore (and
nothing changes); the driver re-reads and retries.

IPv6 is never silently bypassed: in ``redirect`` mode it gets the same rules as IPv4; in
``refuse`` mode the same classification runs in the ``filter`` table and every connection that
would have been redirected is rejected with a TCP reset instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshd.iptsave import SavedRule, SavedTable, parse_save
from meshd.redirect_spec import (
    AGENT_PORTS,
    CONSUL_PORTS,
    SSH_PORT,
    Family,
    Ipv6Mode,
    RedirectSpec,
    RedirectSpecError,
)

__all__ = [
    "AGENT_PORTS",
    "CHAINS",
    "COMMENT",
    "CONSUL_PORTS",
    "SSH_PORT",
    "Desired",
    "Family",
    "Ipv6Mode",
    "JumpStatus",
    "RedirectSpec",
    "RedirectSpecError",
    "RedirectStatus",
    "Rule",
    "desired_state",
    "drift",
    "parse_status",
    "render_removal",
    "render_rules",
]

COMMENT = "meshd"
CHAIN_PREFIX = "MESHD_"
INBOUND = "MESHD_INBOUND"
REDIRECT_IN = "MESHD_REDIRECT_IN"
OUTPUT = "MESHD_OUTPUT"
REDIRECT_OUT = "MESHD_REDIRECT_OUT"
CHAINS = (INBOUND, REDIRECT_IN, OUTPUT, REDIRECT_OUT)
LOOPBACK = {4: "127.0.0.0/8", 6: "::1/128"}
_TABLES = ("nat", "filter")


@dataclass(frozen=True)
class Rule:
    """One rule as ``iptables-save`` prints it (canonical order), without ``-A CHAIN``."""

    chain: str
    tokens: tuple[str, ...]

    @property
    def text(self) -> str:
        """The rule body, ready to follow ``-A CHAIN``."""
        return " ".join(self.tokens)


def _rule(
    chain: str,
    target: tuple[str, ...],
    *,
    dst: str = "",
    not_dst: str = "",
    in_if: str = "",
    out_if: str = "",
    tcp: bool = False,
    not_local: bool = False,
    uid: int | None = None,
    dport: int | None = None,
    new_only: bool = False,
) -> Rule:
    # The order below is the order iptables-save prints, so saved and rendered rules compare
    # token for token.
    tokens: list[str] = []
    if not_dst:
        tokens += ["!", "-d", not_dst]
    if dst:
        tokens += ["-d", dst]
    if in_if:
        tokens += ["-i", in_if]
    if out_if:
        tokens += ["-o", out_if]
    if tcp or dport is not None:
        tokens += ["-p", "tcp"]
    if not_local:
        tokens += ["-m", "addrtype", "!", "--dst-type", "LOCAL"]
    if uid is not None:
        tokens += ["-m", "owner", "--uid-owner", str(uid)]
    if dport is not None:
        tokens += ["-m", "tcp", "--dport", str(dport)]
    if new_only:
        tokens += ["-m", "conntrack", "--ctstate", "NEW"]
    tokens += ["-m", "comment", "--comment", COMMENT, "-j", *target]
    return Rule(chain, tuple(tokens))


@dataclass(frozen=True)
class Desired:
    """The complete owned state of one family: which table, chain contents, hook jumps."""

    table: str
    rules: tuple[Rule, ...]
    jumps: tuple[Rule, ...]


def desired_state(spec: RedirectSpec, family: Family) -> Desired:
    """The chains and jumps *spec* calls for in *family* (the single source of truth)."""
    refuse = family == 6 and spec.ipv6 == "refuse"
    if refuse:
        verdict_in = verdict_out = ("REJECT", "--reject-with", "tcp-reset")
        hooks = (("INPUT", INBOUND), ("OUTPUT", OUTPUT))
    else:
        verdict_in = ("REDIRECT", "--to-ports", str(spec.inbound_port))
        verdict_out = ("REDIRECT", "--to-ports", str(spec.outbound_port))
        hooks = (("PREROUTING", INBOUND), ("OUTPUT", OUTPUT))
    rules = (
        *_inbound_rules(spec),
        _rule(REDIRECT_IN, verdict_in, tcp=True),
        *_outbound_rules(spec, family),
        _rule(REDIRECT_OUT, verdict_out, tcp=True),
    )
    jumps = tuple(_rule(hook, (chain,), tcp=True, new_only=refuse) for hook, chain in hooks)
    return Desired("filter" if refuse else "nat", rules, jumps)


def _inbound_rules(spec: RedirectSpec) -> list[Rule]:
    # Loopback never reaches nat PREROUTING; in filter INPUT (refuse mode) it would, and
    # local clients of local services are not meshed traffic.
    rules = [_rule(INBOUND, ("RETURN",), in_if="lo")]
    # PREROUTING also sees traffic this host only forwards (containers, VMs, VPN clients
    # calling other machines): a meshed port of ours is not theirs to lose.
    rules.append(_rule(INBOUND, ("RETURN",), not_local=True))
    rules += [_rule(INBOUND, ("RETURN",), dport=p) for p in spec.inbound_excludes]
    rules += [_rule(INBOUND, (REDIRECT_IN,), dport=p) for p in spec.capture_ports]
    return rules


def _outbound_rules(spec: RedirectSpec, family: Family) -> list[Rule]:
    loop = LOOPBACK[family]
    # The outbound proxy dialling a meshed port of this host through a host address leaves
    # via lo and would skip PREROUTING: send it to the inbound proxy like a remote caller.
    # (The inbound proxy must therefore reach local applications over loopback.)
    rules = [
        _rule(OUTPUT, (REDIRECT_IN,), not_dst=loop, out_if="lo", uid=spec.proxy_uid, dport=p)
        for p in spec.capture_ports
    ]
    rules.append(_rule(OUTPUT, ("RETURN",), dst=loop))
    rules += [_rule(OUTPUT, ("RETURN",), uid=u) for u in (spec.proxy_uid, *spec.excluded_uids)]
    rules += [_rule(OUTPUT, ("RETURN",), dport=p) for p in spec.outbound_excludes]
    rules += [_rule(OUTPUT, ("RETURN",), dst=net) for net in spec.excluded_cidrs(family)]
    rules.append(_rule(OUTPUT, (REDIRECT_OUT,), tcp=True))
    return rules


def _owned_outside(table: SavedTable) -> list[tuple[SavedRule, int]]:
    """Our rules (tagged, or jumping into a chain of ours) in chains that are not ours.

    Returns:
        ``(rule, 1-based position in its chain)`` pairs.
    """
    found = []
    for chain in table.chains:
        if chain.startswith(CHAIN_PREFIX):
            continue
        for pos, rule in enumerate(table.rules_in(chain), start=1):
            if rule.has_comment(COMMENT) or rule.target.startswith(CHAIN_PREFIX):
                found.append((rule, pos))
    return found


def _jump_in_place(owned: list[tuple[SavedRule, int]], jump: Rule) -> bool:
    mine = [(rule.tokens, pos) for rule, pos in owned if rule.chain == jump.chain]
    return mine == [(jump.tokens, 1)]


def render_rules(spec: RedirectSpec, family: Family, current: str = "") -> str:
    """Render the ``iptables-restore --noflush`` payload that installs *spec*.

    Args:
        spec: what to capture.
        family: 4 for ``iptables-restore``, 6 for ``ip6tables-restore``.
        current: the family's current ``iptables-save`` output ("" for an empty ruleset);
            used to leave correct jumps alone and delete stale or duplicate ones.

    Returns:
        The payload, deterministic for equal inputs.

    Raises:
        SaveFormatError: *current* is not ``iptables-save`` output.
    """
    tables = parse_save(current)
    want = desired_state(spec, family)
    out: list[str] = []
    # iptables-restore commits one table at a time: the wanted table goes first, so that
    # every state in between holds both the old and the new rules (fail closed: refused),
    # never neither (IPv6 let through uncaptured, when switching between redirect and
    # refuse).
    for name in sorted(_TABLES, key=lambda t: t != want.table):
        table = tables.get(name, SavedTable(name, (), ()))
        if name == want.table:
            out += [f"*{name}", *_table_apply(want, table), "COMMIT"]
        else:
            lines = _table_removal(table)
            out += [f"*{name}", *lines, "COMMIT"] if lines else []
    return "\n".join(out) + "\n"


def _table_apply(want: Desired, table: SavedTable) -> list[str]:
    lines = [f":{chain} - [0:0]" for chain in CHAINS]
    lines += [f"-A {rule.chain} {rule.text}" for rule in want.rules]
    stale = [c for c in table.chains if c.startswith(CHAIN_PREFIX) and c not in CHAINS]
    owned = _owned_outside(table)
    for jump in want.jumps:
        if not _jump_in_place(owned, jump):
            lines += [f"-D {r.chain} {r.text}" for r, _ in owned if r.chain == jump.chain]
            lines.append(f"-I {jump.chain} 1 {jump.text}")
    hooks = {jump.chain for jump in want.jumps}
    lines += [f"-D {r.chain} {r.text}" for r, _ in owned if r.chain not in hooks]
    lines += [f"-F {chain}" for chain in stale] + [f"-X {chain}" for chain in stale]
    return lines


def _table_removal(table: SavedTable) -> list[str]:
    lines = [f"-D {r.chain} {r.text}" for r, _ in _owned_outside(table)]
    ours = [c for c in table.chains if c.startswith(CHAIN_PREFIX)]
    return lines + [f"-F {c}" for c in ours] + [f"-X {c}" for c in ours]


def render_removal(save_output: str) -> str:
    """Render the payload that deletes our tagged rules and ``MESHD_*`` chains, nothing else.

    Args:
        save_output: the family's current ``iptables-save`` output.

    Returns:
        The ``iptables-restore --noflush`` payload, or ``""`` when nothing of ours is there.
    """
    out: list[str] = []
    for name, table in sorted(parse_save(save_output).items()):
        lines = _table_removal(table)
        if lines:
            out += [f"*{name}", *lines, "COMMIT"]
    return "\n".join(out) + "\n" if out else ""


@dataclass(frozen=True)
class JumpStatus:
    """Our rules found in one chain that is not ours (normally exactly one jump)."""

    table: str
    chain: str
    targets: tuple[str, ...]
    positions: tuple[int, ...]


@dataclass(frozen=True)
class RedirectStatus:
    """What of ours one family's ruleset holds.

    Attributes:
        chains: ``(table, chain)`` of every ``MESHD_*`` chain present.
        rule_count: rules inside those chains.
        jumps: our rules in other chains, per chain.
    """

    chains: tuple[tuple[str, str], ...]
    rule_count: int
    jumps: tuple[JumpStatus, ...]

    @property
    def installed(self) -> bool:
        """Whether chains of ours exist and something jumps into them."""
        return bool(self.chains) and bool(self.jumps)

    @property
    def duplicate_jumps(self) -> tuple[JumpStatus, ...]:
        """Chains holding more than one rule of ours (left by a non-atomic tool or a bug)."""
        return tuple(j for j in self.jumps if len(j.positions) > 1)


def parse_status(save_output: str) -> RedirectStatus:
    """Summarise what of ours *save_output* (one family's ``iptables-save``) contains."""
    chains: list[tuple[str, str]] = []
    count = 0
    jumps: list[JumpStatus] = []
    for name, table in sorted(parse_save(save_output).items()):
        for chain in table.chains:
            if chain.startswith(CHAIN_PREFIX):
                chains.append((name, chain))
                count += len(table.rules_in(chain))
        per_chain: dict[str, list[tuple[str, int]]] = {}
        for rule, pos in _owned_outside(table):
            per_chain.setdefault(rule.chain, []).append((rule.target, pos))
        jumps += [
            JumpStatus(name, c, tuple(t for t, _ in v), tuple(p for _, p in v))
            for c, v in per_chain.items()
        ]
    return RedirectStatus(tuple(chains), count, tuple(jumps))


def drift(spec: RedirectSpec, family: Family, save_output: str) -> tuple[str, ...]:
    """Differences between the installed ruleset and *spec*; empty when they agree.

    Detects chains flushed or edited by another tool, missing, misplaced or duplicated jumps,
    and leftovers in the wrong table.
    """
    tables = parse_save(save_output)
    want = desired_state(spec, family)
    problems: list[str] = []
    table = tables.get(want.table, SavedTable(want.table, (), ()))
    for chain in CHAINS:
        have = [r.tokens for r in table.rules_in(chain)]
        expect = [r.tokens for r in want.rules if r.chain == chain]
        if chain not in table.chains:
            problems.append(f"{want.table} chain {chain} is missing")
        elif have != expect:
            problems.append(
                f"{want.table} chain {chain} has {len(have)} rules, not the expected "
                f"{len(expect)} (changed or flushed by another tool?)"
            )
    owned = _owned_outside(table)
    for jump in want.jumps:
        if not _jump_in_place(owned, jump):
            found = [pos for rule, pos in owned if rule.chain == jump.chain]
            problems.append(
                f"{want.table} {jump.chain}: expected one jump to {jump.tokens[-1]} at "
                f"position 1, found meshd rules at positions {found}"
            )
    hooks = {jump.chain for jump in want.jumps}
    problems += [
        f"{want.table} {rule.chain}: stray meshd rule at position {pos}"
        for rule, pos in owned
        if rule.chain not in hooks
    ]
    problems += [
        f"{want.table} chain {chain} is not meshd's (stale)"
        for chain in table.chains
        if chain.startswith(CHAIN_PREFIX) and chain not in CHAINS
    ]
    for name, other in sorted(tables.items()):
        if name != want.table and _table_removal(other):
            problems.append(f"{name} table holds meshd rules or chains that do not belong")
    return tuple(problems)
