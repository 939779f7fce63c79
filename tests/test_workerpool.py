"""The agent's worker pool against worker processes that misbehave (fault injection).

The workers here are small scripts that speak the link's framing (``agent.workerlink``:
length, kind, payload) and then die, or stall, or record what they were sent. The pool,
the snapshot holder and the certifier are the agent's own.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import trio

from agent.accesslog import JsonLog
from agent.certifier import Certifier
from agent.holder import SnapshotHolder
from agent.tlscontexts import CertifiedKey
from agent.worker import WorkerPool
from agent.workerlink import Link, certs_message
from meshd.config.agent import ProxyConfig
from meshd.snapshot import Snapshot, make_snapshot, to_json

# Reads the link like a worker would, up to 'start', then as the test asks.
_READER = """
import json, os, socket, struct, sys, time
s = socket.socket(fileno=int(sys.argv[sys.argv.index("--link-fd") + 1]))
buf = b""
def frame():
    global buf
    while len(buf) < 5 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
        chunk = s.recv(1 << 20)
        if not chunk:
            sys.exit(0)
        buf += chunk
    n, kind = struct.unpack(">IB", buf[:5])
    payload, buf = buf[5:4 + n], buf[4 + n:]
    return kind, payload
"""

DIES_WHILE_THE_LINK_IS_FULL = (
    _READER
    + """
while True:
    kind, payload = frame()
    if kind == ord("J") and json.loads(payload)["type"] == "start":
        break
time.sleep(0.6)  # does not read: the agent's sends fill the socket
os._exit(9)      # as a crash or kill -9 would
"""
)

RECORDS_CERTS = (
    _READER
    + """
out = open(sys.argv[1], "w", buffering=1)
while True:
    kind, payload = frame()
    if kind == ord("J"):
        message = json.loads(payload)
        if message["type"] == "certs":
            out.write(json.dumps({k: v["serial"] for k, v in message["certs"].items()}) + "\\n")
        if message["type"] == "start":
            time.sleep(1.0)  # busy: the link is not read for a moment
"""
)


def snapshot(version: int, size: int) -> Snapshot:
    return make_snapshot(version=version, created_at=time.time(), intentions_raw={"d": b"x" * size})


def certifier(tmp_path: Path, services: list[str]) -> Certifier:
    async def no_endpoints() -> list:
        return []

    return Certifier(
        state_dir=tmp_path, token_file=tmp_path / "token", host="h1", datacenter="dc1",
        services=services, endpoints=no_endpoints, bundle=lambda: None,
    )  # fmt: skip


def install(c: Certifier, service: str, serial: int) -> None:
    now = time.time()
    key = CertifiedKey(service, b"chain", Path(f"/k/{service}.key"), now - 60, now + 86400, serial)
    c._install(service, key, received=now)


def script(tmp_path: Path, name: str, text: str) -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return [sys.executable, "-I", str(path)]


async def test_a_worker_that_dies_while_the_agent_sends_to_it_is_restarted(tmp_path: Path) -> None:
    """A sender task of the pool met the dead worker's link (EPIPE) and its error ended
    the pool's nursery, and the agent with it. Now the worker is started again."""
    holder = SnapshotHolder(snapshot(1, 10))
    pool = WorkerPool(
        count=1, proxy=ProxyConfig(), kv_prefix="meshd/", snapshots=holder,
        certifier=certifier(tmp_path, []), services=[], on_unknown=lambda a, p: None,
        log=JsonLog(level="error"),
        argv=script(tmp_path, "dies.py", DIES_WHILE_THE_LINK_IS_FULL),
    )  # fmt: skip
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.serve, [])
            await trio.sleep(0.3)
            for version in range(2, 6):  # about 1 MB each: more than the socket holds
                holder.publish(snapshot(version, 1_000_000))
                await trio.sleep(0.05)
            while pool.status[0].starts < 2:
                await trio.sleep(0.1)
            pool.begin_drain(0.1)
            await pool.wait_stopped()
            nursery.cancel_scope.cancel()
    assert pool.status[0].starts >= 2
    assert "exit status" in str(pool.status[0].last_exit)


async def test_renewals_while_the_link_is_busy_all_reach_the_worker(tmp_path: Path) -> None:
    """Two certificates renewed while a big snapshot is on its way: the certifier replaces
    its change event at each install, and the pool used to wait on the new one after
    sending, so the second renewal never reached the worker (which then served b's old
    certificate until it expired)."""
    record = tmp_path / "certs.log"
    feed = certifier(tmp_path, ["a", "b"])
    install(feed, "a", 1)
    install(feed, "b", 1)
    holder = SnapshotHolder(snapshot(1, 10))
    pool = WorkerPool(
        count=1, proxy=ProxyConfig(), kv_prefix="meshd/", snapshots=holder, certifier=feed,
        services=["a", "b"], on_unknown=lambda a, p: None, log=JsonLog(level="error"),
        argv=[*script(tmp_path, "records.py", RECORDS_CERTS), str(record)],
    )  # fmt: skip
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.serve, [])
            await trio.sleep(0.3)
            holder.publish(snapshot(2, 2_000_000))  # the link is busy for a while
            await trio.sleep(0.05)
            install(feed, "a", 2)
            await trio.sleep(0.05)
            install(feed, "b", 2)
            deadline = trio.current_time() + 10
            while trio.current_time() < deadline:
                seen = record.read_text().splitlines() if record.exists() else []
                if seen and json.loads(seen[-1]) == {"a": 2, "b": 2}:
                    break
                await trio.sleep(0.1)
            pool.begin_drain(0.1)
            await pool.wait_stopped()  # this worker ignores 'drain': it is killed
            nursery.cancel_scope.cancel()
    assert json.loads(record.read_text().splitlines()[-1]) == {"a": 2, "b": 2}


async def test_workers_get_neither_consuls_variables_nor_systemds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Consul ACL token given to the agent as CONSUL_HTTP_TOKEN reached every worker
    process's environment. The worker here is the real one (``python -m agent.worker``)."""
    token = str(uuid.uuid4())
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", token)
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    pool = WorkerPool(
        count=1, proxy=ProxyConfig(), kv_prefix="meshd/", snapshots=SnapshotHolder(snapshot(1, 10)),
        certifier=certifier(tmp_path, []), services=[], on_unknown=lambda a, p: None,
        log=JsonLog(level="error"),
    )  # fmt: skip
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.serve, [])
            while pool.status[0].pid is None:
                await trio.sleep(0.05)
            environ = Path(f"/proc/{pool.status[0].pid}/environ").read_bytes().split(b"\0")
            pool.begin_drain(0.1)
            await pool.wait_stopped()
            nursery.cancel_scope.cancel()
    assert any(v.startswith(b"PATH=") for v in environ), environ  # the worker's real one
    assert not [v for v in environ if v.startswith((b"CONSUL_", b"NOTIFY_SOCKET="))]
    assert token.encode() not in b"\0".join(environ)


async def test_a_worker_that_cannot_read_a_frame_ends_at_once(tmp_path: Path) -> None:
    """ADR 011: a frame the worker cannot read ends it, never a guess. It used to log the
    error, then serve its open connections on the policy it held for a whole drain_timeout
    (30 s by default) while still reporting, so the agent saw nothing wrong. The worker here
    is the real one; the test plays the agent's side of the link."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "agent.worker", "--link-fd", str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    theirs.close()
    link = Link(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
    try:
        with trio.fail_after(30):
            await link.send_json(
                {"type": "hello", "index": 1, "kv_prefix": "meshd/",
                 "proxy": dataclasses.asdict(ProxyConfig()), "listeners": []}
            )  # fmt: skip
            await link.send_snapshot(to_json(snapshot(1, 10)))
            await link.send_json(certs_message([], lambda service: None))
            await link.send_json({"type": "start"})
            while (message := await link.receive_json()) is not None:
                if message["type"] == "ready":
                    break
            began = trio.current_time()
            await link.send_snapshot(b"{not a snapshot")
            status = await process.wait()
            took = trio.current_time() - began
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await link.aclose()
    assert process.stderr is not None
    errors = (await process.stderr.receive_some()).decode()
    assert status == 1, errors
    assert took < 5.0, took
    assert '"event":"worker_link_failed"' in errors and "does not parse" in errors, errors
