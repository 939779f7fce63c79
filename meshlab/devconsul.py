"""A private ``consul agent -dev`` on loopback, for the tests and the benchmarks.

One class serves the test fixtures (``tests/plugins/consul_agent.py``: ACLs and HTTPS on
top) and the scale benchmark (``bench/scale_consul.py``: a catalog of 1000 services on
top): it writes the agent's JSON configuration into a work directory, starts the binary
with its output in ``consul.log`` there, waits until the agent has a leader and its own
node's ``serfHealth`` check passes, and ends it by PID (SIGTERM, then SIGKILL after a
grace period). Every port is given explicitly (0 would let Consul pick, and nobody could
reach it), and a failed start reports the tail of the log.

The namespaced lab (:mod:`meshlab.netns`) runs its Consul agents through ``ip netns exec``
and does not use this class; it shares :func:`stop_process`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

CONSUL = "consul"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_CHARS = 4000


def free_ports(count: int) -> list[int]:
    """*count* distinct ports free for both TCP and UDP on 127.0.0.1 a moment ago.

    Consul's serf and DNS ports take both protocols, so a port counts only when both binds
    succeed; all are held until the last is found, so none is returned twice.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(tcp)
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            held.append(udp)
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def stop_process(
    process: subprocess.Popen[bytes], *, grace_s: float, sig: int = signal.SIGTERM
) -> int | None:
    """End *process* by its PID: *sig*, up to *grace_s* to exit, then SIGKILL.

    Returns its exit status; a process that has already ended is only reaped.
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=grace_s)
    return process.returncode


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (a zombie counts until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class DevConsul:
    """One ``consul agent -dev`` process: its configuration, log, readiness and end.

    Args:
        workdir: where ``consul.json``, ``consul.log`` and the data directory go.
        node_name: the agent's node name (readiness waits for this node's serfHealth).
        ports: Consul's ``ports`` block; every port the agent would open must be given
            (a free one, or -1 to disable it).
        extra: further top-level configuration (``acl``, ``limits``, TLS files...).
        token: sent as ``X-Consul-Token`` on the readiness and :meth:`get_json` requests
            (needed when ACLs deny anonymous reads).
        log_level: Consul's log level.
        new_session: start the agent in its own session, so a Ctrl-C at the terminal
            reaches only its parent (the benchmarks).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        node_name: str,
        ports: Mapping[str, int],
        extra: Mapping[str, object] | None = None,
        token: str | None = None,
        log_level: str = "info",
        new_session: bool = False,
        start_timeout_s: float = START_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        if "http" not in ports:
            raise ValueError("ports must include the HTTP port")
        self.workdir = workdir
        self.node_name = node_name
        self.datacenter = "dc1"
        self.token = token
        self.http_address = f"http://127.0.0.1:{ports['http']}"
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._new_session = new_session
        config: dict[str, object] = {
            "node_name": node_name,
            "datacenter": self.datacenter,
            "bind_addr": "127.0.0.1",
            "client_addr": "127.0.0.1",
            "disable_update_check": True,
            "log_level": log_level,
            "ports": dict(ports),
            **(extra or {}),
        }
        self.config_file = workdir / "consul.json"
        self.config_file.write_text(json.dumps(config))
        self.log_file = workdir / "consul.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """PID of the running agent, or None."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start the agent and wait (bounded) until it has a leader and its node is healthy.

        Raises:
            RuntimeError: the agent exited, or was not ready in time (it is stopped then);
                the message carries the tail of its log.
        """
        if self._process is not None:
            raise RuntimeError(f"consul agent {self.node_name} is already running")
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    CONSUL,
                    "agent",
                    "-dev",
                    f"-config-file={self.config_file}",
                    f"-data-dir={self.workdir / 'data'}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self._new_session,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the agent by PID (SIGTERM, then SIGKILL after the grace period)."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, grace_s=self.stop_timeout_s)

    def restart(self) -> None:
        """Stop and start again on the same ports (state is lost: dev mode)."""
        self.stop()
        self.start()

    def get_json(self, path: str, *, timeout_s: float = 2.0) -> object:
        """GET *path* on the HTTP API with the agent's token and decode the JSON body.

        Raises:
            OSError: connection failures, and HTTP errors (``path: HTTP <code> <reason>``).
            ValueError: the body is not JSON.
        """
        headers = {"X-Consul-Token": self.token} if self.token else {}
        request = urllib.request.Request(self.http_address + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            # An HTTPError holds the response and its socket; close it here, or the
            # garbage collector reports the socket as unclosed somewhere later.
            exc.close()
            raise OSError(f"{path}: HTTP {exc.code} {exc.reason}") from None

    def log_tail(self) -> str:
        """The end of the agent's log (for error messages)."""
        try:
            return self.log_file.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except FileNotFoundError:
            return ""

    def _ready(self) -> bool:
        checks = self.get_json(f"/v1/health/node/{self.node_name}")
        return (
            isinstance(checks, list)
            and bool(self.get_json("/v1/status/leader"))
            and any(
                isinstance(c, dict)
                and c.get("CheckID") == "serfHealth"
                and c.get("Status") == "passing"
                for c in checks
            )
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last: object = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                code = self._process.returncode
                raise RuntimeError(f"consul exited ({code}):\n{self.log_tail()}")
            try:
                if self._ready():
                    return
            except (OSError, ValueError) as exc:
                last = exc
            time.sleep(0.05)
        raise RuntimeError(
            f"consul not ready in {self.start_timeout_s} s ({last}):\n{self.log_tail()}"
        )
