"""Who opened a connection: ``agent.sockowner`` against the real kernel, and the parser
against what a broken or hostile reply could look like.

Clients are real processes run as other users (``setpriv``), on real loopback sockets.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.setup import service_uids
from agent.sockowner import (
    NLMSG_ERROR,
    SOCK_DIAG_BY_FAMILY,
    Owner,
    SocketOwners,
    build_request,
    parse_reply,
)
from meshd.config import ConfigError, ServiceConfig
from meshlab.mesh import APP_PYTHON, as_user

OTHER_UID = 64322
# Connect, print the local port, then hold the connection until stdin closes.
CLIENT = (
    "import socket,sys\n"
    "s=socket.create_connection((sys.argv[1],int(sys.argv[2])))\n"
    "print(s.getsockname()[1],flush=True)\n"
    "sys.stdin.read()\n"
)


Address = tuple[str, int]


@contextmanager
def client_as(
    uid: int, host: str, family: socket.AddressFamily
) -> Iterator[tuple[Address, Address, socket.socket]]:
    """A connection from a process of *uid*: (its address, the server's, the accepted socket)."""
    with socket.socket(family) as server:
        server.bind((host, 0))
        server.listen()
        argv = as_user(uid, [APP_PYTHON, "-c", CLIENT, host, str(server.getsockname()[1])])
        with subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        ) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdout.readline()
                server.settimeout(10)
                conn, peer = server.accept()
                with conn:
                    yield peer[:2], server.getsockname()[:2], conn
            finally:
                proc.stdin.close()
                proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("host", "family"), [("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)]
)
def test_the_owner_of_a_client_socket_is_the_user_that_opened_it(
    host: str, family: socket.AddressFamily
) -> None:
    owners = SocketOwners()
    try:
        with client_as(OTHER_UID, host, family) as (client, server, _conn):
            assert owners.owner(client, server) == Owner(OTHER_UID)
            # The accepted end is this process's (root's) own socket: another socket.
            assert owners.owner(server, client) == Owner(0)
            # A tuple that matches no socket is unknown, never anybody's.
            gone = owners.owner((client[0], 1), server)
            assert gone.uid is None and "gone" in gone.reason
    finally:
        owners.close()


def test_an_ipv4_client_seen_through_a_dual_stack_listener_is_asked_as_ipv4() -> None:
    owners = SocketOwners()
    try:
        with socket.socket(socket.AF_INET6) as server:
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            server.bind(("::", 0))
            server.listen()
            port = server.getsockname()[1]
            with socket.create_connection(("127.0.0.1", port)) as client:
                conn, peer = server.accept()
                with conn:
                    assert peer[0] == "::ffff:127.0.0.1"
                    assert owners.owner(peer[:2], ("127.0.0.1", port)) == Owner(0)
                    assert client.getsockname()[1] == peer[1]
    finally:
        owners.close()


def test_a_closed_client_in_time_wait_is_unknown_not_root() -> None:
    """The kernel reports uid 0 for a TIME_WAIT socket: that must not read as root."""
    owners = SocketOwners()
    try:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            port = str(server.getsockname()[1])
            argv = as_user(OTHER_UID, [APP_PYTHON, "-c", CLIENT, "127.0.0.1", port])
            with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdout.readline()
                conn, client = server.accept()
                with conn:
                    assert owners.owner(client, server.getsockname()) == Owner(OTHER_UID)
                    proc.stdin.close()  # the client closes first ...
                    proc.wait(timeout=10)
                    conn.settimeout(10)
                    assert conn.recv(1) == b""
            # ... so once the accepted end closes too, the client's end waits in TIME_WAIT.
            deadline = time.monotonic() + 5
            found = owners.owner(client, server.getsockname())
            while found.uid is not None and time.monotonic() < deadline:
                time.sleep(0.05)
                found = owners.owner(client, server.getsockname())
        assert found == Owner(None, "the client's socket is closed (TIME_WAIT keeps no owner)")
    finally:
        owners.close()


def test_many_lookups_use_one_netlink_socket() -> None:
    owners = SocketOwners()
    try:
        fds = len(list(Path("/proc/self/fd").iterdir()))
        with client_as(OTHER_UID, "127.0.0.1", socket.AF_INET) as (client, server, _conn):
            results = {owners.owner(client, server) for _ in range(200)}
        assert results == {Owner(OTHER_UID)}
        assert len(list(Path("/proc/self/fd").iterdir())) == fds + 1
    finally:
        owners.close()


def test_requests_name_the_exact_socket() -> None:
    request = build_request(("10.0.0.1", 40000), ("10.0.0.2", 9090), seq=7)
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", request)
    assert (length, kind, flags, seq) == (len(request), SOCK_DIAG_BY_FAMILY, 1, 7)
    family, protocol = request[16], request[17]
    assert (family, protocol) == (socket.AF_INET, socket.IPPROTO_TCP)
    sport, dport = struct.unpack_from("!HH", request, 24)
    assert (sport, dport) == (40000, 9090)
    assert request[28:32] == bytes([10, 0, 0, 1]) and request[44:48] == bytes([10, 0, 0, 2])
    with pytest.raises(ValueError, match="different address families"):
        build_request(("10.0.0.1", 1), ("::1", 2), seq=1)
    with pytest.raises(ValueError):
        build_request(("not-an-address", 1), ("10.0.0.2", 2), seq=1)


def header(length: int, kind: int, seq: int) -> bytes:
    return struct.pack("=IHHII", length, kind, 0, seq, 0)


def diag_msg(state: int, uid: int) -> bytes:
    return struct.pack("=BBBB", 2, state, 0, 0) + bytes(48) + struct.pack("=IIIII", 0, 0, 0, uid, 9)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (header(16 + 72, SOCK_DIAG_BY_FAMILY, 5) + diag_msg(1, 1001), Owner(1001)),
        (header(16 + 72, SOCK_DIAG_BY_FAMILY, 4) + diag_msg(1, 1001), None),  # not ours
        (b"\x01\x02", Owner(None, "sock_diag: short reply (2 bytes)")),
        (header(500, SOCK_DIAG_BY_FAMILY, 5) + diag_msg(1, 1001),
         Owner(None, "sock_diag: reply length 500 of 88 bytes")),
        (header(16 + 10, SOCK_DIAG_BY_FAMILY, 5) + diag_msg(1, 1001)[:10],
         Owner(None, "sock_diag: unexpected reply (type 20, 10 bytes)")),
        (header(16 + 72, 3, 5) + diag_msg(1, 1001),
         Owner(None, "sock_diag: unexpected reply (type 3, 72 bytes)")),
        (header(16 + 4, NLMSG_ERROR, 5) + struct.pack("=i", -2),
         Owner(None, "the client's socket is gone (No such file or directory)")),
        (header(16 + 4, NLMSG_ERROR, 5) + struct.pack("=i", 0),
         Owner(None, "sock_diag: empty acknowledgement")),
        (header(16 + 72, SOCK_DIAG_BY_FAMILY, 5) + diag_msg(6, 0),
         Owner(None, "the client's socket is closed (TIME_WAIT keeps no owner)")),
    ],
)  # fmt: skip
def test_replies_that_are_not_a_clean_answer_give_no_owner(
    data: bytes, expected: Owner | None
) -> None:
    assert parse_reply(data, 5) == expected


def test_service_users_resolve_and_may_not_be_the_proxy_user(tmp_path: Path) -> None:
    web = ServiceConfig("web", 8080, user="1001", source=tmp_path / "web.toml")
    admin = ServiceConfig("admin", 8081, user="root", source=tmp_path / "admin.toml")
    plain = ServiceConfig("plain", 8082)
    assert service_uids((web, admin, plain), proxy=998) == {"web": 1001, "admin": 0}
    with pytest.raises(ConfigError, match=r"admin.toml: service.user: 'root' is proxy.user"):
        service_uids((admin,), proxy=0)
    nobody = ServiceConfig("x", 1, user="no-such-user-here", source=tmp_path / "x.toml")
    with pytest.raises(ConfigError, match="x.toml: service.user: no such user 'no-such-user-here'"):
        service_uids((nobody,), proxy=998)
