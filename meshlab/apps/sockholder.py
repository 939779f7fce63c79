"""What systemd does for ``meshd-agent.socket``, for labs that have no systemd in them.

``sockholder.py --listen HOST:PORT [--listen ...] -- COMMAND...`` opens the listening
sockets (backlog 4096, IPv6 ones v6-only, as ``systemd/meshd-agent.socket`` says), then runs
COMMAND with them as fds 3.. and ``LISTEN_FDS``/``LISTEN_PID`` set, as systemd socket
activation does. The sockets stay open here for as long as this process lives, so between
two runs of COMMAND the kernel keeps queueing connections on them instead of refusing.

* SIGHUP: restart COMMAND (``systemctl restart``): SIGTERM it, wait until it has exited,
  start it again.
* SIGTERM: stop COMMAND the same way, then exit.
* COMMAND exits by itself (a crash, ``kill -9``): with ``--restart-sec S`` it is started
  again after S seconds (``Restart=always``, ``RestartSec=S`` of
  ``systemd/meshd-agent.service``); without, this process exits with its status.

One JSON line on stdout per event (``{"holder": "started", "pid": N}``, ``"exited"`` with
``"status"``), the command's own output interleaved. The command gets SIGKILL if this
process dies first (``PR_SET_PDEATHSIG``): no agent outlives its sockets' holder.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading

FIRST_FD = 3  # SD_LISTEN_FDS_START
BACKLOG = 4096
STOP_GRACE_S = 60.0
PR_SET_PDEATHSIG = 1


def _emit(**fields: object) -> None:
    sys.stdout.write(json.dumps({"holder": fields.pop("event"), **fields}) + "\n")
    sys.stdout.flush()


def _listen(spec: str) -> socket.socket:
    host, _, port = spec.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, int(port)))
    sock.listen(BACKLOG)
    return sock


def _start(command: list[str], fds: list[int]) -> subprocess.Popen[bytes]:
    libc = ctypes.CDLL(None, use_errno=True)
    targets = list(range(FIRST_FD, FIRST_FD + len(fds)))

    def in_child() -> None:
        # Move the sockets to 3.. (via high numbers: a source may sit on a target).
        for i, fd in enumerate(fds):
            os.dup2(fd, 200 + i)
        for i, target in enumerate(targets):
            os.dup2(200 + i, target)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    env = {**os.environ, "LISTEN_FDS": str(len(fds))}
    # systemd sets LISTEN_PID to the service's PID; sh knows its own and exec keeps it.
    argv = ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *command]
    return subprocess.Popen(argv, env=env, pass_fds=targets, preexec_fn=in_child)  # noqa: PLW1509


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", action="append", required=True, metavar="HOST:PORT")
    parser.add_argument("--restart-sec", type=float, default=None, metavar="S")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    sockets = [_listen(spec) for spec in args.listen]
    fds = [s.fileno() for s in sockets]
    wanted: list[str] = []
    wake = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        wanted.append("restart" if signum == signal.SIGHUP else "stop")
        wake.set()

    signal.signal(signal.SIGHUP, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    child = _start(command, fds)
    _emit(event="started", pid=child.pid)
    while True:
        status = child.poll()
        if status is not None:
            _emit(event="exited", pid=child.pid, status=status)
            if args.restart_sec is None:
                return status
            if wake.wait(args.restart_sec) and "stop" in wanted:
                return 0
            wanted.clear()  # a restart asked for meanwhile is this one
            child = _start(command, fds)
            _emit(event="started", pid=child.pid)
            continue
        wake.wait(0.2)
        wake.clear()
        while wanted:
            what = wanted.pop(0)
            child.send_signal(signal.SIGTERM)
            try:
                status = child.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
                status = child.wait()
            _emit(event="exited", pid=child.pid, status=status)
            if what == "stop":
                return 0
            child = _start(command, fds)
            _emit(event="started", pid=child.pid)


if __name__ == "__main__":
    sys.exit(main())
