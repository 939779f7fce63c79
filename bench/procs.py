"""Child processes, free ports and per-process CPU from /proc.

Every process the benchmark starts goes through :class:`Processes`, which remembers its PID
and ends exactly those PIDs (SIGTERM, then SIGKILL) on every exit path. Nothing is ever ended
by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds; resolution 1/CLK_TCK."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; fields after the closing paren are fixed.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_of(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds of each live PID in ``pids``."""
    out: dict[int, float] = {}
    for pid in pids:
        try:
            out[pid] = cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return out


def wait_port(host: str, port: int, *, timeout: float) -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


@dataclass
class Child:
    """A started process and where its output goes."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


class Processes:
    """Owns every child process of the run; :meth:`stop_all` ends them by PID."""

    def __init__(self, logdir: Path) -> None:
        self._logdir = logdir
        self._children: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        pass_fds: Sequence[int] = (),
    ) -> Child:
        """Start ``argv`` with stdout/stderr to ``<logdir>/<name>.log``.

        ``pass_fds`` stay open in the child under the same numbers (e.g. a listening socket
        shared by several processes); every other descriptor is closed.
        """
        log = self._logdir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                pass_fds=tuple(pass_fds),
                start_new_session=True,  # a Ctrl-C at the terminal reaches only us
            )
        child = Child(name, proc, log)
        self._children.append(child)
        return child

    def check_alive(self, child: Child) -> None:
        """Raise with the tail of its log if ``child`` has exited."""
        if child.proc.poll() is not None:
            tail = child.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{tail}")

    def wait_listening(self, child: Child, host: str, port: int, *, timeout: float) -> None:
        """Wait until ``child`` accepts on ``host:port``; fail at once if it exits."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive(child)
            try:
                wait_port(host, port, timeout=0.0)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
            else:
                return

    def wait_output(self, child: Child, marker: str, *, timeout: float) -> None:
        """Wait until ``marker`` appears in ``child``'s log; fail at once if it exits."""
        deadline = time.monotonic() + timeout
        while marker not in child.log.read_text(errors="replace"):
            self.check_alive(child)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} did not print {marker!r} after {timeout}s")
            time.sleep(0.1)

    def stop_all(self, grace: float = 3.0) -> None:
        """SIGTERM every live child, wait up to ``grace`` s, then SIGKILL the rest."""
        live = [c for c in self._children if c.proc.poll() is None]
        for c in live:
            _signal(c.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in live:
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(c.pid, signal.SIGKILL)
                c.proc.wait(timeout=5)
        self._children.clear()


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
