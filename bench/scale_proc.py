"""Memory and CPU of a process from /proc, for the scale benchmark."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    """``VmRSS`` (or ``VmHWM``, the peak) of *pid* in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise ValueError(f"{field_name} not in /proc/{pid}/status")


def cpu_s(pid: int) -> float:
    """utime + stime of *pid* (all its threads) in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK
