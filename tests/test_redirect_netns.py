"""Redirect rules in a real kernel: two network namespaces joined by a veth pair.

``host`` (198.18.0.1, 2001:db8::1) gets the rules; ``peer`` (198.18.0.2, 2001:db8::2) plays
a remote machine. Servers answer with what they are (``real``, ``outbound``, ``inbound``) and,
behind the redirect, with the original destination they saw: a connection proves where it
landed. The root namespace's rules are never touched: every iptables call runs in a
namespace these tests created and delete.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from agent import redirect as driver
from agent.origdst import OriginalDestinationError, original_destination
from meshd.redirect import CONSUL_PORTS, RedirectSpec

pytestmark = pytest.mark.netns

HOST = f"meshd-t-rhost-{os.getpid()}"
PEER = f"meshd-t-rpeer-{os.getpid()}"
# A container or VM on host, routed through it (198.19.0.2, 2001:db9::2).
GUEST = f"meshd-t-rguest-{os.getpid()}"
# The redirect group run the way meshd-agent runs it, without importing the rest of the agent
# (keeps 20 restarts quick); one test goes through the real console script.
AGENT = sys.executable
_GROUP = (
    "-c",
    "from agent.redirect_cli import redirect_cli as g; from meshd.console import "
    "run_cli; import sys; sys.argv[1:2] = []; run_cli(g, 'meshd-agent redirect')",
)
CONSOLE_SCRIPT = str(Path(sys.executable).parent / "meshd-agent")
PROXY_UID, EXCLUDED_UID, APP_UID = 1234, 2345, 3456
SPEC = [
    "--proxy-uid",
    str(PROXY_UID),
    "--capture-port",
    "8080",
    "--exclude-outbound-port",
    "9999",
    "--exclude-uid",
    str(EXCLUDED_UID),
]
PROBES = ["--probe", "198.18.0.2:80", "--probe", "[2001:db8::2]:80"]
_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def run(*argv: str, ns: str = HOST, check: bool = True, **kw: object) -> str:
    if argv[:2] == (AGENT, "redirect"):
        argv = (AGENT, *_GROUP, *argv[1:])
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        **kw,
    )  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exit {proc.returncode}: {proc.stdout}{proc.stderr}")
    return str(proc.stdout + proc.stderr)


def ruleset(family: int = 4) -> str:
    """The namespace's full ruleset, minus the timestamp comments and tables holding nothing
    but empty built-in chains (iptables-restore creates a table it is given and never deletes
    one; an empty table is no rule)."""
    text = run("iptables-save" if family == 4 else "ip6tables-save")
    blocks = "".join(ln for ln in text.splitlines(True) if not ln.startswith("#")).split("COMMIT\n")
    kept = [
        b
        for b in blocks
        if any(ln.startswith(("-A", ":MESHD")) for ln in b.splitlines())
        or (b.strip() and "-A " in b)
    ]
    return "COMMIT\n".join(kept) + ("COMMIT\n" if kept else "")


def both() -> tuple[str, str]:
    return ruleset(4), ruleset(6)


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, timeout=10, capture_output=True)


def _delete_namespaces() -> None:
    for ns in (HOST, PEER, GUEST):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)


def _namespace(ns: str) -> None:
    _ip("netns", "add", ns)
    _ip("-n", ns, "link", "set", "lo", "up")


def _wire(a: tuple[str, str], b: tuple[str, str], v4: str, v6: str) -> None:
    """A veth pair between namespaces ``(ns, device)`` *a* and *b*: *a* gets ``<v4>.1`` and
    ``<v6>1``, *b* ``.2`` and ``2`` (prefixes /24 and /64)."""
    _ip("-n", a[0], "link", "add", a[1], "type", "veth", "peer", "name", b[1], "netns", b[0])
    for (ns, dev), n in ((a, 1), (b, 2)):
        _ip("-n", ns, "addr", "add", f"{v4}.{n}/24", "dev", dev)
        _ip("-n", ns, "addr", "add", f"{v6}{n}/64", "dev", dev, "nodad")
        _ip("-n", ns, "link", "set", dev, "up")


@pytest.fixture
def hosts() -> Iterator[None]:
    _delete_namespaces()
    try:
        _namespace(HOST)
        _namespace(PEER)
        _wire((HOST, "va"), (PEER, "vb"), "198.18.0", "2001:db8::")
        yield
    finally:
        _delete_namespaces()
    root = subprocess.run(["iptables-save"], capture_output=True, text=True, check=False)
    assert "MESHD" not in root.stdout, "meshd rules leaked into the root namespace"


@pytest.fixture
def routed_guest(hosts: None) -> None:
    """GUEST behind host on a second veth; host forwards between GUEST and peer."""
    run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
    _namespace(GUEST)
    _wire((HOST, "vc"), (GUEST, "vd"), "198.19.0", "2001:db9::")
    _ip("-n", GUEST, "route", "add", "198.18.0.0/24", "via", "198.19.0.1")
    _ip("-n", GUEST, "-6", "route", "add", "2001:db8::/64", "via", "2001:db9::1")
    _ip("-n", PEER, "route", "add", "198.19.0.0/24", "via", "198.18.0.1")
    _ip("-n", PEER, "-6", "route", "add", "2001:db9::/64", "via", "2001:db8::1")


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block (socket creation, forks) in namespace *ns*, on this thread only."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        yield
    finally:
        if _libc.setns(own, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.close(own)
        os.close(target)


async def listener(ns: str, host: str, port: int) -> trio.socket.SocketType:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with inside(ns):
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    await sock.bind((host, port))
    sock.listen(16)
    return sock


async def serve(sock: trio.socket.SocketType, label: str) -> None:
    """Answer each connection with *label* and the original (or the real) destination."""
    with sock:
        while True:
            await _answer(sock, label)


async def _answer(sock: trio.socket.SocketType, label: str) -> None:
    conn, _ = await sock.accept()
    with conn:
        try:
            host, port = original_destination(conn)
        except OriginalDestinationError:
            host, port = conn.getsockname()[:2]  # not redirected: where it really landed
        await conn.send(f"{label} {host} {port}".encode())


async def ask(ns: str, host: str, port: int, uid: int | None = None, timeout: int = 2) -> str:
    """Connect from *ns* (as *uid*, via setpriv, when given) and return the answer."""
    client = (
        "import socket,sys\nh,p=sys.argv[1],int(sys.argv[2])\n"
        "s=socket.socket(socket.AF_INET6 if ':' in h else socket.AF_INET)\n"
        f"s.settimeout({timeout})\n"
        "try:\n s.connect((h,p));print(s.recv(200).decode())\n"
        "except OSError as e:\n print('error',type(e).__name__)\n"
    )
    argv = ["ip", "netns", "exec", ns]
    if uid is not None:
        argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    argv += [sys.executable, "-I", "-c", client, host, str(port)]
    proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    return (proc.stdout.decode().strip() or proc.stderr.decode()).strip()


def test_apply_is_atomic_idempotent_and_remove_touches_only_ours(hosts: None) -> None:
    run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "99", "-j", "ACCEPT")
    run("ip6tables", "-A", "OUTPUT", "-p", "tcp", "--dport", "99", "-j", "ACCEPT")
    before = both()
    run(AGENT, "redirect", "apply", *SPEC)
    first = both()
    for chain in ("MESHD_INBOUND", "MESHD_REDIRECT_IN", "MESHD_OUTPUT", "MESHD_REDIRECT_OUT"):
        assert f":{chain} - [0:0]" in first[0] and f":{chain} - [0:0]" in first[1]
    assert "--dport 99 -j ACCEPT" in first[0]
    for _ in range(20):
        run(AGENT, "redirect", "apply", *SPEC)
        assert both() == first
    assert "installed" in run(CONSOLE_SCRIPT, "redirect", "status", *SPEC)
    run(CONSOLE_SCRIPT, "redirect", "remove")
    assert both() == before
    assert "nothing to do" in run(AGENT, "redirect", "remove")


async def test_live_redirect_v4_v6_and_exclusions(hosts: None) -> None:
    run(AGENT, "redirect", "apply", *SPEC)
    async with trio.open_nursery() as nursery:
        for host in ("127.0.0.1", "::1"):
            nursery.start_soon(serve, await listener(HOST, host, 15001), "outbound")
        for host in ("0.0.0.0", "::"):
            nursery.start_soon(serve, await listener(HOST, host, 15006), "inbound")
            nursery.start_soon(serve, await listener(HOST, host, 22), "real")
        for host in ("0.0.0.0", "::"):
            for port in (80, 22, 9999):
                nursery.start_soon(serve, await listener(PEER, host, port), "real")
        for addr in ("198.18.0.2", "2001:db8::2"):
            assert await ask(HOST, addr, 80) == f"outbound {addr} 80"  # root is captured
            assert await ask(HOST, addr, 80, uid=APP_UID) == f"outbound {addr} 80"
            assert await ask(HOST, addr, 80, uid=PROXY_UID) == f"real {addr} 80"
            assert await ask(HOST, addr, 80, uid=EXCLUDED_UID) == f"real {addr} 80"
            assert await ask(HOST, addr, 9999) == f"real {addr} 9999"  # excluded port
            assert await ask(HOST, addr, 22) == f"real {addr} 22"  # SSH never captured
        for addr in ("198.18.0.1", "2001:db8::1"):
            assert await ask(PEER, addr, 8080) == f"inbound {addr} 8080"
            assert await ask(PEER, addr, 22) == f"real {addr} 22"
            # the proxy dialling a meshed port of its own host meets the inbound proxy
            assert await ask(HOST, addr, 8080, uid=PROXY_UID) == f"inbound {addr} 8080"
        nursery.cancel_scope.cancel()


def test_another_tools_rule_in_any_encoding_is_read_kept_and_left_alone(hosts: None) -> None:
    """A foreign rule whose comment is not UTF-8 (iptables keeps any bytes) made every read
    of the rules raise UnicodeDecodeError, which ended the agent at start-up and at its
    next rule check."""
    comment = b"caf\xe9"  # Latin-1
    add = ["-A", "INPUT", "-p", "tcp", "--dport", "99", "-m", "comment", "--comment"]
    subprocess.run(
        ["ip", "netns", "exec", HOST, "iptables", *add, os.fsdecode(comment), "-j", "ACCEPT"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip

    def saved() -> bytes:
        return subprocess.run(
            ["ip", "netns", "exec", HOST, "iptables-save", "-t", "filter"],
            check=True, capture_output=True, timeout=30,
        ).stdout  # fmt: skip

    assert b'"caf\xe9"' in saved()
    run(AGENT, "redirect", "apply", *SPEC)
    assert "installed" in run(AGENT, "redirect", "status", *SPEC)
    run("iptables", "-t", "nat", "-F", "MESHD_OUTPUT")
    spec = RedirectSpec(  # what the CLI makes of SPEC
        proxy_uid=PROXY_UID, inbound_ports=(8080,), exclude_uids=(EXCLUDED_UID,),
        exclude_outbound_ports=(*CONSUL_PORTS, 9999),
    )  # fmt: skip
    with inside(HOST):
        problems = driver.repair(spec)
    assert problems and "MESHD_OUTPUT" in " ".join(problems)
    assert "installed" in run(AGENT, "redirect", "status", *SPEC)
    run(AGENT, "redirect", "remove")
    assert b'"caf\xe9"' in saved() and b"MESHD" not in saved()


async def test_traffic_the_host_only_routes_is_never_captured(routed_guest: None) -> None:
    """A container on host calling another machine on a port host meshes reaches that
    machine: PREROUTING sees routed traffic too, and capturing it would hand the
    container's call to host's inbound proxy (and so to host's own service)."""
    run(AGENT, "redirect", "apply", *SPEC)
    async with trio.open_nursery() as nursery:
        for host in ("0.0.0.0", "::"):
            nursery.start_soon(serve, await listener(HOST, host, 15006), "inbound")
            nursery.start_soon(serve, await listener(PEER, host, 8080), "real")
        # (The first hop through a fresh router can lose a SYN to neighbour discovery:
        # the retransmission comes a second later.)
        for addr in ("198.18.0.2", "2001:db8::2"):
            assert await ask(GUEST, addr, 8080, timeout=8) == f"real {addr} 8080"
        for addr in ("198.19.0.1", "2001:db9::1", "198.18.0.1"):  # host itself: captured
            assert await ask(GUEST, addr, 8080, timeout=8) == f"inbound {addr} 8080"
        nursery.cancel_scope.cancel()


async def test_ipv6_refuse_mode_resets_instead_of_bypassing(hosts: None) -> None:
    run(AGENT, "redirect", "apply", *SPEC, "--ipv6", "refuse")
    assert "MESHD" not in run("ip6tables-save", "-t", "nat")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, await listener(HOST, "127.0.0.1", 15001), "outbound")
        for port in (80, 9999):
            nursery.start_soon(serve, await listener(PEER, "::", port), "real")
        assert await ask(HOST, "2001:db8::2", 80) == "error ConnectionRefusedError"
        assert await ask(HOST, "2001:db8::2", 80, uid=APP_UID) == "error ConnectionRefusedError"
        assert await ask(HOST, "2001:db8::2", 80, uid=PROXY_UID) == "real 2001:db8::2 80"
        assert await ask(HOST, "2001:db8::2", 9999) == "real 2001:db8::2 9999"
        assert await ask(HOST, "198.18.0.2", 80) == "outbound 198.18.0.2 80"
        nursery.cancel_scope.cancel()
    out = run(AGENT, "redirect", "verify", *SPEC, "--ipv6", "refuse", *PROBES)
    assert "IPv6: ok: refused" in out
    run(AGENT, "redirect", "apply", *SPEC)  # switching back leaves nothing in filter
    assert "MESHD" not in run("ip6tables-save", "-t", "filter")


def test_verify_proves_interception_and_catches_a_foreign_flush(hosts: None) -> None:
    run(AGENT, "redirect", "apply", *SPEC)
    out = run(AGENT, "redirect", "verify", *SPEC, *PROBES)
    assert "IPv4: ok: redirected" in out and "IPv6: ok: redirected" in out
    run("iptables", "-t", "nat", "-F", "MESHD_OUTPUT")  # another tool "cleans up"
    status = run(AGENT, "redirect", "status", *SPEC, check=False)
    assert "MESHD_OUTPUT has 0 rules" in status and "error" in status
    out = run(AGENT, "redirect", "verify", *SPEC, *PROBES, check=False)
    assert "IPv4: FAIL" in out and "IPv6: ok" in out and "verify failed" in out
    run(AGENT, "redirect", "apply", *SPEC)
    assert "FAIL" not in run(AGENT, "redirect", "verify", *SPEC, *PROBES)
    # An IPv4 probe alone still has the IPv6 rules compared (they used to be skipped), and
    # every probe given is made, two of one family included.
    run("ip6tables", "-t", "nat", "-F", "MESHD_OUTPUT")
    v4_only = ["--probe", "198.18.0.2:80", "--probe", "198.18.0.2:81"]
    out = run(AGENT, "redirect", "verify", *SPEC, *v4_only, check=False)
    assert "MESHD_OUTPUT has 0 rules" in out and "verify failed" in out, out
    assert "198.18.0.2:80" in out and "198.18.0.2:81" in out, out
    assert "not ADDRESS:PORT" in run(AGENT, "redirect", "verify", *SPEC, "--probe",
                                     "198.18.0.2:70000", check=False)  # fmt: skip
    run(AGENT, "redirect", "apply", *SPEC)
    # root excluded too: the probe dials as nobody instead, and still sees the redirect
    run(AGENT, "redirect", "apply", *SPEC, "--exclude-uid", "0")
    assert "FAIL" not in run(AGENT, "redirect", "verify", *SPEC, "--exclude-uid", "0", *PROBES)


async def test_with_no_proxy_listening_nothing_reaches_the_app_unproxied(hosts: None) -> None:
    run(AGENT, "redirect", "apply", *SPEC)  # rules in place, proxies dead (kill -9)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, await listener(HOST, "0.0.0.0", 8080), "app")
        nursery.start_soon(serve, await listener(PEER, "::", 80), "remote")
        assert await ask(PEER, "198.18.0.1", 8080) == "error ConnectionRefusedError"
        assert await ask(HOST, "2001:db8::2", 80, uid=APP_UID) == "error ConnectionRefusedError"
        assert await ask(HOST, "198.18.0.1", 8080, uid=PROXY_UID) == "error ConnectionRefusedError"
        assert await ask(HOST, "127.0.0.1", 8080, uid=PROXY_UID) == "app 127.0.0.1 8080"
        nursery.cancel_scope.cancel()


def test_status_reports_and_apply_repairs_duplicate_jumps(hosts: None) -> None:
    run(AGENT, "redirect", "apply", *SPEC)
    good = both()
    run(
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-m",
        "comment",
        "--comment",
        "meshd",
        "-j",
        "MESHD_OUTPUT",
    )
    out = run(AGENT, "redirect", "status", *SPEC, check=False)
    assert "nat/OUTPUT -> MESHD_OUTPUT, MESHD_OUTPUT at positions [1, 2]" in out
    run(AGENT, "redirect", "apply", *SPEC)
    assert both() == good


def test_restore_killed_before_commit_changes_nothing(hosts: None) -> None:
    run(AGENT, "redirect", "apply", *SPEC)
    old = ruleset(4)
    payload = run(AGENT, "redirect", "apply", *SPEC, "--capture-port", "8081", "--dry-run")
    body = payload.split("<<EOF\n", 1)[1].split("COMMIT", 1)[0]
    with inside(HOST):
        proc = subprocess.Popen(["iptables-restore", "--noflush"], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(body.encode())
    proc.stdin.flush()
    time.sleep(0.2)  # the whole table body is in; only COMMIT is missing
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdin.close()
    assert ruleset(4) == old
    assert ":MESHD" in old and "--dport 8081" in body  # the payload did change something


def _spawn_apply(spec: list[str]) -> subprocess.Popen[bytes]:
    with inside(HOST):  # the child inherits this thread's namespace
        return subprocess.Popen(
            [AGENT, *_GROUP, "redirect", "apply", *spec],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
        )


def test_sigkill_at_random_points_leaves_old_or_new_ruleset(hosts: None) -> None:
    new_spec = [*SPEC, "--capture-port", "8081", "--exclude-cidr", "10.0.0.0/8"]
    started = time.monotonic()
    _spawn_apply(new_spec).wait(timeout=30)
    full = time.monotonic() - started  # kill anywhere from mid-start-up to just after the end
    new = both()
    run(AGENT, "redirect", "apply", *SPEC)
    old = both()
    assert new != old
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    seen = []
    for _ in range(10):
        proc = _spawn_apply(new_spec)
        time.sleep(rng.uniform(0.5 * full, 1.1 * full))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        now = both()
        for family in (0, 1):  # each family is one transaction: old or new, nothing else
            assert now[family] in (old[family], new[family]), f"seed {seed}"
        seen.append("".join("o" if now[i] == old[i] else "n" for i in (0, 1)))
        run(AGENT, "redirect", "apply", *SPEC)
        assert both() == old
    print(f"seed {seed}, run {full:.2f} s, outcomes (IPv4, IPv6 old/new): {seen}")


async def test_every_check_that_cannot_read_the_rules_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The agent's rule check reports each failed round (the agent counts it and sets
    ``meshd_redirect_check_failing``, which ``meshctl check`` fails on) and keeps going."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no iptables-save to be found
    spec = RedirectSpec(proxy_uid=PROXY_UID, inbound_ports=(8080,))
    checked: list[tuple[str, ...]] = []
    failed: list[str] = []
    with trio.move_on_after(1.0):
        await driver.keep_applied(
            spec, interval=0.1, on_checked=checked.append, on_failed=failed.append
        )
    assert checked == [] and len(failed) >= 3, failed
    assert all("iptables-save not found" in f for f in failed), failed


def test_repair_reapplies_after_a_foreign_flush(hosts: None) -> None:
    spec = RedirectSpec(proxy_uid=PROXY_UID, inbound_ports=(8080,))
    with inside(HOST):  # same thread: the driver's iptables run in the test namespace
        driver.apply(spec)
        good = both()
        assert driver.repair(spec) == ()
        run("ip6tables", "-t", "nat", "-F", "MESHD_INBOUND")
        run("iptables", "-t", "nat", "-D", "OUTPUT", "1")
        problems = driver.repair(spec)
        assert both() == good
        assert driver.repair(spec) == ()
    assert [p[:4] for p in problems] == ["IPv4", "IPv6"]
