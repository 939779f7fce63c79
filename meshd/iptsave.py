"""Reading ``iptables-save`` text into values (sans-IO).

``iptables-save`` prints one block per table: ``*table``, chain declarations
(``:NAME POLICY [packets:bytes]``), rules (``-A CHAIN <match and target>``) and ``COMMIT``.
This module turns that text into frozen values so the redirect builder can find the rules and
chains meshd owns, without a shell or a regular expression per rule. Comment lines (``#``),
which carry a timestamp, are ignored.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from meshd.errors import MeshdError

#: The chains iptables creates itself, per table; everything else is user-defined.
BUILTIN_CHAINS: dict[str, frozenset[str]] = {
    "filter": frozenset({"INPUT", "FORWARD", "OUTPUT"}),
    "nat": frozenset({"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}),
    "mangle": frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}),
    "raw": frozenset({"PREROUTING", "OUTPUT"}),
    "security": frozenset({"INPUT", "FORWARD", "OUTPUT"}),
}


class SaveFormatError(MeshdError):
    """``iptables-save`` output that this parser cannot read; the message names the line."""


@dataclass(frozen=True)
class SavedRule:
    """One ``-A CHAIN ...`` line.

    Attributes:
        chain: the chain the rule is appended to.
        text: everything after ``-A CHAIN `` exactly as saved, so that ``-D CHAIN <text>``
            deletes this very rule.
        tokens: ``text`` split like a shell would (quotes removed).
    """

    chain: str
    text: str
    tokens: tuple[str, ...]

    @property
    def target(self) -> str:
        """The ``-j`` target, or ``""`` for a rule without one."""
        for flag, value in zip(self.tokens, self.tokens[1:], strict=False):
            if flag in ("-j", "--jump", "-g", "--goto"):
                return value
        return ""

    def has_comment(self, comment: str) -> bool:
        """Whether the rule carries ``-m comment --comment <comment>`` exactly."""
        return any(
            flag == "--comment" and value == comment
            for flag, value in zip(self.tokens, self.tokens[1:], strict=False)
        )


@dataclass(frozen=True)
class SavedTable:
    """One ``*table`` block: declared chains (in order) and rules (in order)."""

    name: str
    chains: tuple[str, ...]
    rules: tuple[SavedRule, ...]

    def rules_in(self, chain: str) -> tuple[SavedRule, ...]:
        """The rules of *chain*, in evaluation order."""
        return tuple(rule for rule in self.rules if rule.chain == chain)

    def is_builtin(self, chain: str) -> bool:
        """Whether *chain* is one iptables creates itself in this table."""
        return chain in BUILTIN_CHAINS.get(self.name, frozenset())


def parse_save(text: str) -> dict[str, SavedTable]:
    """Parse ``iptables-save`` (or ``ip6tables-save``) output.

    Args:
        text: the full output; empty text means no tables.

    Returns:
        The tables by name.

    Raises:
        SaveFormatError: a line outside a table, an unterminated table, or an unknown line.
    """
    tables: dict[str, SavedTable] = {}
    current: str | None = None
    chains: list[str] = []
    rules: list[SavedRule] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*") and current is None:
            current, chains, rules = line[1:], [], []
        elif current is None:
            raise SaveFormatError(f"iptables-save line {number}: {line!r} is outside a table")
        elif line == "COMMIT":
            tables[current] = SavedTable(current, tuple(chains), tuple(rules))
            current = None
        elif line.startswith(":"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            rules.append(_parse_rule(line, number))
        else:
            raise SaveFormatError(f"iptables-save line {number}: cannot read {line!r}")
    if current is not None:
        raise SaveFormatError(f"iptables-save: table {current!r} has no COMMIT")
    return tables


def _parse_rule(line: str, number: int) -> SavedRule:
    parts = line.split(None, 2)
    if len(parts) < 2:
        raise SaveFormatError(f"iptables-save line {number}: rule without a chain: {line!r}")
    text = parts[2] if len(parts) == 3 else ""
    try:
        tokens = tuple(shlex.split(text))
    except ValueError as exc:
        raise SaveFormatError(f"iptables-save line {number}: {exc}: {line!r}") from exc
    return SavedRule(chain=parts[1], text=text, tokens=tokens)
