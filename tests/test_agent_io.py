"""The agent's small I/O parts: admin endpoint, sd_notify, socket activation, accept loop,
the rule driver and the proxy-user check."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from agent.accesslog import JsonLog
from agent.admin import MAX_METRICS_CONNECTIONS, AdminSources, route, serve_admin, serve_metrics
from agent.listener import inherited_sockets, open_listener, serve_accept_loop
from agent.metrics import AgentMetrics
from agent.setup import require_running_as
from meshd.admission import ConnectionLimits
from meshd.config import ConfigError
from meshd.sdnotify import notify, watchdog_interval_s


def sources(*, ready: bool = True, snap: bytes | None = b'{"version": 1}') -> AdminSources:
    metrics = AgentMetrics()
    metrics.connections.labels("outbound", "web", "api", "closed").inc()
    return AdminSources(
        metrics=metrics, ready=lambda: ready, stats=lambda: {"x": 1}, snapshot_json=lambda: snap
    )


def test_admin_routes() -> None:
    metrics = route(sources(), "GET", "/metrics")
    assert metrics.startswith(b"HTTP/1.1 200 OK")
    assert b'meshd_tcp_connections_total{destination="api",direction="outbound"' in metrics
    assert route(sources(ready=False), "GET", "/ready").startswith(b"HTTP/1.1 503")
    assert route(sources(), "GET", "/ready?verbose").startswith(b"HTTP/1.1 200")
    assert route(sources(snap=None), "GET", "/snapshot").startswith(b"HTTP/1.1 503")
    body = route(sources(), "GET", "/stats").split(b"\r\n\r\n", 1)[1]
    assert json.loads(body) == {"x": 1}
    assert route(sources(), "POST", "/metrics").startswith(b"HTTP/1.1 405")
    assert route(sources(), "GET", "/../etc/passwd").startswith(b"HTTP/1.1 404")


async def test_admin_serves_over_tcp_and_rejects_garbage() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_admin, sources(), "127.0.0.1", 0)
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := await stream.receive_some(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b"ready\n")
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(b"\x16\x03\x01 not http\r\n\r\n")
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 400")
        nursery.cancel_scope.cancel()


async def get(port: int, path: str) -> bytes:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        reply = b""
        while chunk := await stream.receive_some(4096):
            reply += chunk
    return reply


async def test_the_metrics_port_serves_the_metrics_alone_to_a_bounded_number_of_clients() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, sources(), "127.0.0.1", 0)
        reply = await get(port, "/metrics")
        assert reply.startswith(b"HTTP/1.1 200 OK") and b"meshd_tcp_connections_total{" in reply
        for path in ("/snapshot", "/stats", "/ready", "/"):  # loopback's only
            assert (await get(port, path)).startswith(b"HTTP/1.1 404"), path
        # Clients that send nothing hold their slot for the request deadline; one more than
        # the limit is closed on arrival, and the held ones still get their answer.
        held = [
            await trio.open_tcp_stream("127.0.0.1", port) for _ in range(MAX_METRICS_CONNECTIONS)
        ]
        await trio.sleep(0.2)
        async with await trio.open_tcp_stream("127.0.0.1", port) as extra:
            with trio.fail_after(2):
                assert await extra.receive_some(4096) == b""  # closed without a word
        for stream in held:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            with trio.fail_after(2):
                assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200 OK")
            await stream.aclose()
        assert (await get(port, "/metrics")).startswith(b"HTTP/1.1 200 OK")
        nursery.cancel_scope.cancel()


def _reset(port: int, request: bytes) -> None:
    """Connect, send *request* (maybe nothing), and close with a reset (SO_LINGER 0)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        if request:
            sock.sendall(request)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("serve", [serve_admin, serve_metrics], ids=["admin", "metrics"])
async def test_clients_that_reset_or_never_read_leave_the_endpoint_serving(serve) -> None:
    """A scrape that times out and resets, or anyone on the network doing so to the metrics
    port, used to end the listener, and with it the agent (trio passes a handler's error
    on). A handler whose source raises answers 500 and the endpoint goes on."""
    big = sources()
    for i in range(20_000):  # a page of about 3 MB: more than the socket buffers hold
        big.metrics.connections.labels("inbound", f"s{i}", "api", "closed").inc()
    broken = dataclasses.replace(big, stats=lambda: 1 / 0)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, broken, "127.0.0.1", 0)
        await trio.to_thread.run_sync(_reset, port, b"")
        await trio.to_thread.run_sync(_reset, port, b"GET /metrics HTTP/1.1\r\n\r\n")
        await trio.to_thread.run_sync(_reset, port, b"GET /metrics HTTP/1.1\r\n")  # half a head
        await trio.sleep(0.3)
        reply = await get(port, "/metrics")
        assert reply.startswith(b"HTTP/1.1 200 OK") and len(reply) > 1_000_000
        if serve is serve_admin:
            assert (await get(port, "/stats")).startswith(b"HTTP/1.1 500")
            assert (await get(port, "/ready")).startswith(b"HTTP/1.1 200")
        nursery.cancel_scope.cancel()


def test_sd_notify_sends_to_the_socket_systemd_names(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        assert notify("READY=1", {"NOTIFY_SOCKET": path})
        assert server.recv(100) == b"READY=1"
    assert not notify("READY=1", {})
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None


def test_socket_activation_takes_listeners_by_address_and_port() -> None:
    v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    v4.bind(("127.0.0.1", 0))
    v4.listen()
    port = v4.getsockname()[1]
    # systemd passes listeners as fds 3, 4, ...; emulate by moving ours there.
    saved = os.dup(3) if _fd_open(3) else None
    os.dup2(v4.fileno(), 3)
    try:
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
        found = inherited_sockets(env)
        assert list(found) == [("127.0.0.1", port)]
        sock = open_listener("127.0.0.1", port, inherited=found)
        assert sock.fileno() == 3 and not sock.getblocking()
        assert inherited_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) == {}
        sock.detach()
    finally:
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)
        v4.close()


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class FlakyListener:
    """Fault injection: accept() fails with EMFILE a few times, then behaves."""

    def __init__(self, real: socket.socket, failures: int) -> None:
        self._real = real
        self.failures = failures

    def fileno(self) -> int:
        return self._real.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self._real.accept()


async def test_accept_loop_backs_off_on_fd_exhaustion_then_serves() -> None:
    real = open_listener("127.0.0.1", 0, inherited={})
    port = real.getsockname()[1]
    out = io.StringIO()
    served = trio.Event()

    async def handler(conn: socket.socket) -> None:
        conn.close()
        served.set()

    flaky = FlakyListener(real, failures=3)
    client = socket.create_connection(("127.0.0.1", port))
    start = trio.current_time()
    async with trio.open_nursery() as conns, trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: serve_accept_loop(flaky, handler, conns, log=JsonLog(out), name="test")
        )  # type: ignore[arg-type]
        with trio.fail_after(5):
            await served.wait()
        nursery.cancel_scope.cancel()
    client.close()
    real.close()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["accept_backoff"] * 3
    assert trio.current_time() - start >= 0.3  # it waited instead of spinning


OUT_OF_FDS = """
import resource
from agent import redirect
resource.setrlimit(resource.RLIMIT_NOFILE, (3, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    redirect.read_rules(4)
except redirect.RedirectError as exc:
    print("RedirectError:", exc)
"""


def test_the_rule_driver_reports_a_tool_it_cannot_start_as_a_redirect_error() -> None:
    # Out of descriptors, subprocess cannot even make its pipe: that OSError must come out
    # as the driver's own error, which the agent's periodic rule check reports and retries
    # (an OSError escaping it once ended the whole agent).
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(
        [sys.executable, "-c", OUT_OF_FDS],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "RedirectError: cannot run iptables-save: Too many open files"


def test_stats_are_json_objects_and_fields_kept_out_of_repr_stay_out() -> None:
    @dataclasses.dataclass(frozen=True)
    class Inner:
        count: int
        secret: str = dataclasses.field(default="s3cret", repr=False)

    @dataclasses.dataclass(frozen=True)
    class Outer:
        inner: Inner
        names: frozenset[str]

    stats = {"x": Outer(Inner(3), frozenset({"b", "a"})), "limits": ConnectionLimits(5)}
    admin = AdminSources(
        metrics=AgentMetrics(), ready=lambda: True, stats=lambda: stats, snapshot_json=lambda: b""
    )
    body = route(admin, "GET", "/stats").split(b"\r\n\r\n", 1)[1]
    assert b"s3cret" not in body
    parsed = json.loads(body)
    assert parsed["x"] == {"inner": {"count": 3}, "names": ["a", "b"]}
    assert parsed["limits"]["max_connections"] == 5  # a plain object, not its repr


def test_the_agent_refuses_to_intercept_unless_it_runs_as_the_proxy_user(tmp_path: Path) -> None:
    """Run as another uid, the proxies' own dials would be captured and loop: the agent
    says so in one line and exits before touching Consul or iptables."""
    with pytest.raises(ConfigError, match=r"proxy\.user: is uid 65534, but the agent runs as"):
        require_running_as(65534, "agent.toml", euid=0)
    require_running_as(0, "agent.toml", euid=0)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nnode_name = "n1"\nstate_dir = "{tmp_path / "state"}"\n'
        f'services_dir = "{tmp_path / "services.d"}"\n[proxy]\nuser = "65534"\n'
        '[consul]\naddress = "http://127.0.0.1:9"\n'
    )
    agent = Path(sys.executable).parent / "meshd-agent"
    run = subprocess.run(
        [str(agent), "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    assert f"{config}: proxy.user: is uid 65534, but the agent runs as uid" in run.stderr
    assert not (tmp_path / "state").exists()  # nothing was started
