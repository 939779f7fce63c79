"""The redirect rule builder, without a kernel: rules are parsed back and evaluated.

A tiny interpreter walks the rendered chains the way netfilter would for one TCP connection
(first packet), and a tiny ruleset model applies restore payloads to ``iptables-save`` text.
Both refuse any token they do not know, so a rule the builder starts emitting that they cannot
judge fails the suite instead of passing unexamined.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.iptsave import SaveFormatError, parse_save
from meshd.redirect import (
    CHAINS,
    CONSUL_PORTS,
    RedirectSpec,
    RedirectSpecError,
    drift,
    parse_status,
    render_removal,
    render_rules,
)

# ---------------------------------------------------------------- a ruleset model


def tables_of(payload: str) -> dict[str, dict[str, list[tuple[str, ...]]]]:
    """Parse a save text into {table: {chain: [rule tokens]}} (chains in order)."""
    out: dict[str, dict[str, list[tuple[str, ...]]]] = {}
    for name, table in parse_save(payload).items():
        chains: dict[str, list[tuple[str, ...]]] = {c: [] for c in table.chains}
        for rule in table.rules:
            chains[rule.chain].append(rule.tokens)
        out[name] = chains
    return out


BUILTIN = {
    "nat": ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
    "filter": ["INPUT", "FORWARD", "OUTPUT"],
}


def restore_noflush(state: str, payload: str) -> str:
    """Apply an ``iptables-restore --noflush`` payload to a save text, like the kernel."""
    tables = tables_of(state)
    table: dict[str, list[tuple[str, ...]]] = {}
    for line in payload.splitlines():
        if line.startswith("*"):
            table = tables.setdefault(line[1:], {c: [] for c in BUILTIN[line[1:]]})
        elif line.startswith(":"):
            table[line[1:].split()[0]] = []
        elif line == "COMMIT":
            continue
        else:
            op, chain, *rest = shlex.split(line)
            if op == "-A":
                table[chain].append(tuple(rest))
            elif op == "-I":
                table[chain].insert(int(rest[0]) - 1, tuple(rest[1:]))
            elif op == "-D":
                table[chain].remove(tuple(rest))  # ValueError = restore would fail
            elif op == "-F":
                table[chain].clear()
            elif op == "-X":
                assert not any(r[-1] == chain for rules in table.values() for r in rules)
                del table[chain]
            else:
                raise AssertionError(f"unknown payload line {line!r}")
    return to_save(tables)


def to_save(tables: dict[str, dict[str, list[tuple[str, ...]]]]) -> str:
    """Render the model as save text; a table holding nothing but empty built-ins is left
    out (the kernel keeps it once touched, which says nothing about the rules)."""
    lines = []
    for name, chains in sorted(tables.items()):
        if list(chains) == BUILTIN[name] and not any(chains.values()):
            continue
        lines.append(f"*{name}")
        lines += [f":{c} {'ACCEPT' if c in BUILTIN[name] else '-'} [0:0]" for c in chains]
        for chain, rules in chains.items():
            lines += [f"-A {chain} {shlex.join(r)}" for r in rules]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- a packet interpreter


@dataclass(frozen=True)
class Conn:
    """The first packet of a TCP connection, as the rules see it."""

    dst: str
    dport: int
    uid: int | None = None  # None: arriving from the network
    in_if: str = ""
    out_if: str = ""
    local: bool = True  # addressed to this host (False: only routed through it)


def _local(value: str, conn: Conn) -> bool:
    assert value == "LOCAL", value
    return conn.local


# What each match option tests of the connection (the value is the option's argument).
_MATCH: dict[str, Callable[[str, Conn], bool]] = {
    "-d": lambda v, c: ipaddress.ip_address(c.dst) in ipaddress.ip_network(v),
    "-i": lambda v, c: c.in_if == v,
    "-o": lambda v, c: c.out_if == v,
    "-p": lambda v, c: v == "tcp",
    "--uid-owner": lambda v, c: c.uid == int(v),
    "--dport": lambda v, c: c.dport == int(v),
    "--dst-type": _local,
    "--ctstate": lambda v, c: "NEW" in v.split(","),
    "-m": lambda v, c: True,
    "--comment": lambda v, c: True,
}


def _matches(tokens: tuple[str, ...], conn: Conn) -> tuple[bool, tuple[str, ...]]:
    i, ok, negate = 0, True, False
    while i < len(tokens):
        tok = tokens[i]
        if tok == "!":
            negate, i = True, i + 1
            continue
        if tok == "-j":
            return ok, tokens[i + 1 :]
        assert tok in _MATCH, f"interpreter does not know {tok!r}"
        ok = ok and (_MATCH[tok](tokens[i + 1], conn) != negate)
        negate, i = False, i + 2
    raise AssertionError(f"rule without target: {tokens}")


def evaluate(save: str, table: str, hook: str, conn: Conn) -> tuple[str, ...] | None:
    """The terminal verdict (``("REDIRECT", "--to-ports", "15001")``…) or None (accept)."""
    chains = tables_of(save).get(table, {})

    def walk(chain: str, depth: int) -> tuple[str, ...] | None | str:
        assert depth < 10, "jump loop"
        for rule in chains.get(chain, []):
            ok, target = _matches(rule, conn)
            if not ok:
                continue
            if target[0] == "RETURN":
                return "return"
            if target[0] in chains:
                result = walk(target[0], depth + 1)
                if result != "return":
                    return result
                continue
            assert target[0] in ("REDIRECT", "REJECT"), target
            return target
        return "return" if depth else None

    result = walk(hook, 0)
    return None if result == "return" else result  # type: ignore[return-value]


# ---------------------------------------------------------------- strategies

PORTS = st.sampled_from([22, 80, 443, 8080, 8500, 8600, 9000, 15000, 15001, 15006, 15020])
UIDS = st.integers(min_value=0, max_value=4)
CIDRS = st.sampled_from(["10.0.0.0/8", "198.18.0.0/24", "fd00::/8", "2001:db8::/64"])
ADDRS = st.sampled_from(
    [
        "10.1.2.3",
        "198.18.0.7",
        "127.0.0.1",
        "192.0.2.1",
        "fd00::1",
        "2001:db8::9",
        "::1",
        "2001:db9::1",
    ]
)


@st.composite
def specs(draw: st.DrawFn) -> RedirectSpec:
    base = RedirectSpec(
        proxy_uid=draw(UIDS),
        exclude_uids=tuple(draw(st.lists(UIDS, max_size=3))),
        exclude_inbound_ports=tuple(draw(st.lists(PORTS, max_size=3))),
        exclude_outbound_ports=tuple(draw(st.lists(PORTS, max_size=3))),
        exclude_outbound_cidrs=tuple(draw(st.lists(CIDRS, max_size=3, unique=True))),
        ipv6=draw(st.sampled_from(["redirect", "refuse"])),
    )
    excluded = set(base.inbound_excludes) | set(base.outbound_excludes)
    capture = [p for p in draw(st.lists(PORTS, max_size=4)) if p not in excluded]
    return RedirectSpec(**{**_fields(base), "inbound_ports": tuple(capture)})


def _fields(spec: RedirectSpec) -> dict[str, object]:
    names = (
        "proxy_uid",
        "exclude_uids",
        "exclude_inbound_ports",
        "exclude_outbound_ports",
        "exclude_outbound_cidrs",
        "ipv6",
    )
    return {n: getattr(spec, n) for n in names}


def _excluded_dst(spec: RedirectSpec, dst: str) -> bool:
    addr = ipaddress.ip_address(dst)
    nets = spec.excluded_cidrs(addr.version)  # type: ignore[arg-type]
    return addr.is_loopback or any(addr in ipaddress.ip_network(n) for n in nets)


def _where(spec: RedirectSpec, family: int) -> tuple[str, str, str]:
    if family == 6 and spec.ipv6 == "refuse":
        return "filter", "INPUT", "OUTPUT"
    return "nat", "PREROUTING", "OUTPUT"


# ---------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(spec=specs(), dst=ADDRS, dport=PORTS, uid=UIDS, out_if=st.sampled_from(["lo", "eth0"]))
def test_outbound_never_redirects_excluded_traffic(
    spec: RedirectSpec, dst: str, dport: int, uid: int, out_if: str
) -> None:
    family = ipaddress.ip_address(dst).version
    save = restore_noflush("", render_rules(spec, family))  # type: ignore[arg-type]
    table, _, hook = _where(spec, family)
    verdict = evaluate(save, table, hook, Conn(dst, dport, uid=uid, out_if=out_if))
    proxy_to_local_mesh = (
        uid == spec.proxy_uid
        and out_if == "lo"
        and not ipaddress.ip_address(dst).is_loopback
        and dport in spec.capture_ports
    )
    excluded = (
        uid in (spec.proxy_uid, *spec.exclude_uids)
        or dport in spec.outbound_excludes
        or _excluded_dst(spec, dst)
    )
    if proxy_to_local_mesh:
        assert verdict is not None and verdict[-1] != str(spec.outbound_port)
    elif excluded:
        assert verdict is None
    elif table == "filter":
        assert verdict == ("REJECT", "--reject-with", "tcp-reset")  # refused, not bypassed
    else:
        assert verdict == ("REDIRECT", "--to-ports", str(spec.outbound_port))


@settings(max_examples=300, deadline=None)
@given(
    spec=specs(),
    dst=ADDRS,
    dport=PORTS,
    in_if=st.sampled_from(["lo", "eth0", "docker0"]),
    local=st.booleans(),
)
def test_inbound_captures_exactly_the_meshed_ports(
    spec: RedirectSpec, dst: str, dport: int, in_if: str, local: bool
) -> None:
    """Only connections to this host: one it routes (a container calling another machine
    on a port meshed here) passes untouched."""
    family = ipaddress.ip_address(dst).version
    save = restore_noflush("", render_rules(spec, family))  # type: ignore[arg-type]
    table, hook, _ = _where(spec, family)
    verdict = evaluate(save, table, hook, Conn(dst, dport, in_if=in_if, local=local))
    if (
        in_if == "lo"
        or not local
        or dport not in spec.capture_ports
        or dport in spec.inbound_excludes
    ):
        assert verdict is None
    elif table == "filter":
        assert verdict == ("REJECT", "--reject-with", "tcp-reset")
    else:
        assert verdict == ("REDIRECT", "--to-ports", str(spec.inbound_port))
    assert 22 not in spec.capture_ports


@settings(max_examples=100, deadline=None)
@given(spec=specs(), family=st.sampled_from([4, 6]), seed=st.randoms())
def test_render_is_deterministic_and_order_free(spec: RedirectSpec, family: int, seed) -> None:
    shuffled = {
        k: tuple(seed.sample(v, len(v))) if isinstance(v, tuple) else v
        for k, v in {**_fields(spec), "inbound_ports": spec.inbound_ports}.items()
    }
    other = RedirectSpec(**shuffled)  # type: ignore[arg-type]
    assert render_rules(spec, family) == render_rules(spec, family)  # type: ignore[arg-type]
    assert render_rules(other, family) == render_rules(spec, family)  # type: ignore[arg-type]


FOREIGN = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -p tcp -m tcp --dport 99 -m comment --comment "meshd lookalike" -j ACCEPT
-A DOCKER -i docker0 -j RETURN
COMMIT
"""


@settings(max_examples=150, deadline=None)
@given(a=specs(), b=specs(), family=st.sampled_from([4, 6]))
def test_apply_is_idempotent_switches_cleanly_and_removes_only_ours(
    a: RedirectSpec, b: RedirectSpec, family: int
) -> None:
    def apply(state: str, spec: RedirectSpec) -> str:
        return restore_noflush(state, render_rules(spec, family, state))  # type: ignore[arg-type]

    once = apply(FOREIGN, a)
    assert apply(once, a) == once
    assert drift(a, family, once) == ()  # type: ignore[arg-type]
    assert parse_status(once).installed and not parse_status(once).duplicate_jumps
    switched = apply(once, b)
    assert switched == apply(FOREIGN, b)  # no leftovers from a (even across tables)
    assert restore_noflush(switched, render_removal(switched)) == restore_noflush(FOREIGN, "")
    assert render_removal(restore_noflush(FOREIGN, "")) == ""


@pytest.mark.parametrize(("before", "after"), [("redirect", "refuse"), ("refuse", "redirect")])
def test_switching_ipv6_between_tables_never_passes_through_no_rules(
    before: str, after: str
) -> None:
    """ip6tables-restore commits table by table. Killed after the first COMMIT of a switch
    between redirect (nat) and refuse (filter), the ruleset must still capture IPv6: the
    new table's rules go in before the old table's come out (both at once fail closed)."""
    old = RedirectSpec(proxy_uid=7, inbound_ports=(8080,), ipv6=before)  # type: ignore[arg-type]
    new = RedirectSpec(proxy_uid=7, inbound_ports=(8080,), ipv6=after)  # type: ignore[arg-type]
    state = restore_noflush(FOREIGN, render_rules(old, 6, FOREIGN))
    payload = render_rules(new, 6, state)
    first = payload[: payload.index("COMMIT\n") + len("COMMIT\n")]
    partial = parse_save(restore_noflush(state, first))
    ours = {
        name for name, table in partial.items()
        if any(rule.chain.startswith("MESHD_") for rule in table.rules)
    }  # fmt: skip
    assert ours == {"nat", "filter"}, (first, ours)


# ---------------------------------------------------------------- examples


def test_duplicate_and_misplaced_jumps_are_repaired_and_reported() -> None:
    spec = RedirectSpec(proxy_uid=7, inbound_ports=(8080,))
    good = restore_noflush(FOREIGN, render_rules(spec, 4, FOREIGN))
    jump = "-p tcp -m comment --comment meshd -j MESHD_OUTPUT"
    broken = good.replace(f"-A OUTPUT {jump}\n", "") + ""
    broken = restore_noflush(broken, f"*nat\n-A OUTPUT {jump}\n-A OUTPUT {jump}\nCOMMIT\n")
    status = parse_status(broken)
    assert [(j.chain, j.positions) for j in status.duplicate_jumps] == [("OUTPUT", (2, 3))]
    assert any("OUTPUT" in p for p in drift(spec, 4, broken))
    assert restore_noflush(broken, render_rules(spec, 4, broken)) == good


def test_flushed_chain_is_detected() -> None:
    spec = RedirectSpec(proxy_uid=7)
    good = restore_noflush("", render_rules(spec, 4))
    flushed = restore_noflush(good, "*nat\n-F MESHD_OUTPUT\nCOMMIT\n")
    assert drift(spec, 4, good) == ()
    assert ["has 0 rules" in p for p in drift(spec, 4, flushed)] == [True]


def test_every_rule_is_tagged_and_only_our_chains_are_declared() -> None:
    spec = RedirectSpec(proxy_uid=7, inbound_ports=(80,), exclude_outbound_cidrs=("10.0.0.0/8",))
    for family in (4, 6):
        payload = render_rules(spec, family)  # type: ignore[arg-type]
        rules = [ln for ln in payload.splitlines() if ln.startswith(("-A", "-I"))]
        assert rules and all("-m comment --comment meshd " in ln for ln in rules)
        declared = [ln[1:].split()[0] for ln in payload.splitlines() if ln.startswith(":")]
        assert declared == list(CHAINS)


def test_defaults_exclude_ssh_consul_and_agent_ports() -> None:
    spec = RedirectSpec(proxy_uid=7)
    for port in (22, *CONSUL_PORTS, 15000, 15001, 15006, 15020):
        assert port in spec.outbound_excludes
    assert 22 in RedirectSpec(proxy_uid=7, exclude_outbound_ports=()).outbound_excludes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inbound_ports": (22,)}, "excluded ports"),
        ({"inbound_ports": (8500,)}, "excluded ports"),
        ({"inbound_ports": (0,)}, "not in 1-65535"),
        ({"outbound_port": 15006}, "must differ"),
        ({"exclude_outbound_cidrs": ("10.0.0.1/8",)}, "host bits"),
        ({"exclude_outbound_cidrs": ("nonsense",)}, "does not appear"),
        # iptables-save prints neither as written: the running agent saw drift every check.
        ({"exclude_outbound_cidrs": ("0.0.0.0/0",)}, "every destination"),
        ({"exclude_outbound_cidrs": ("::/0",)}, "every destination"),
        ({"exclude_outbound_cidrs": ("::ffff:10.0.0.0/104",)}, "IPv4-mapped"),
        ({"exclude_uids": (-1,)}, "not a valid user id"),
        ({"ipv6": "ignore"}, "redirect|refuse"),
    ],
)
def test_invalid_specs_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RedirectSpecError, match=message):
        RedirectSpec(proxy_uid=7, **kwargs)  # type: ignore[arg-type]


def test_unreadable_save_output_is_an_error_naming_the_line() -> None:
    with pytest.raises(SaveFormatError, match="line 2"):
        render_rules(RedirectSpec(proxy_uid=7), 4, "*nat\n-Z OUTPUT\nCOMMIT\n")
    with pytest.raises(SaveFormatError, match="no COMMIT"):
        parse_status("*nat\n:OUTPUT ACCEPT [0:0]\n")
