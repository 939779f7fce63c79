"""The report of a check command: one line per check, ``ok``, ``warn`` or ``FAIL``.

``meshd-agent check`` (one host, before it runs) and ``meshctl check`` (the running mesh)
print the same shape, so a rollout or a monitoring job reads both alike: a table for
people, ``--format json`` for scripts, and exit status 1 when any line says ``FAIL``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["ok", "warn", "FAIL"]
EXIT_FAILED = 1


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, its status, and why."""

    name: str
    status: Status
    detail: str


def render_checks(checks: Sequence[Check], fmt: str) -> str:
    """*checks* as ``table`` (aligned lines) or ``json`` (a list of objects)."""
    if fmt == "json":
        return json.dumps([asdict(c) for c in checks], indent=2)
    width = max((len(c.name) for c in checks), default=0)
    width = max(14, min(width, 40))
    return "\n".join(f"{c.status:<5} {c.name:<{width}} {c.detail}" for c in checks)


def exit_status(checks: Sequence[Check]) -> int:
    """1 when any check failed, else 0 (warnings do not fail)."""
    return EXIT_FAILED if any(c.status == "FAIL" for c in checks) else 0
