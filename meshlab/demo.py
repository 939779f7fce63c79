"""The one-command demo: a whole meshd mesh on this machine, a guided tour, and a clean exit.

``python -m meshlab.demo [--keep]`` (normally through ``scripts/demo``, as root):

1. a Consul server and three "hosts" (network namespaces on a bridge, each with a Consul
   client agent), a meshd server as the mesh's CA;
2. on each host meshd-agent, run as a user of its own (:data:`DEMO_AGENT_UID`, with the
   shipped unit's capabilities, as the unit runs it as ``meshd``), and an unchanged
   ``python3 -m http.server`` (web, api, db) as ``nobody``; the agent's iptables rules
   intercept every other user's traffic, root's included;
3. intentions web → api and api → db, then real calls with curl, with a packet capture of
   the link and the agents' access-log lines to show the traffic crossed hosts over mTLS;
4. a deny intention web → api and the call refused, root's as well;
5. how to poke at it, then teardown (``--keep``: only after Ctrl-C).

Everything it starts is ended by PID and every namespace and link it made is deleted; it
checks that before it says so. Exit status: 0 success, 1 a step failed, 2 cannot run here.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from meshlab.mesh import ADMIN_PORT, APP_PYTHON, REPO, Mesh, ServiceSpec, as_app_user
from meshlab.netns import Host, Lab, LabUnavailable, Process, open_lab

LAB_NAME = "dm"
SERVICES = (
    ServiceSpec("web", 8080, upstreams=("api",)),
    ServiceSpec("api", 9090, upstreams=("db",)),
    ServiceSpec("db", 5432),
)
PORTS = {s.name: s.port for s in SERVICES}
CURL_TIMEOUT_S = 3
#: The agents' uid (the proxy user; no passwd entry needed): only it bypasses the rules.
DEMO_AGENT_UID = 64321
SCHEME = "http" + "://"


class DemoFailed(RuntimeError):
    """A step of the tour did not do what it should."""


# -- output ------------------------------------------------------------------------------------


def say(text: str = "") -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say()
    say(f"==> {title}")


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.rstrip("\n").splitlines())


# -- signals: Ctrl-C, SIGTERM and SIGHUP all lead to the same teardown --------------------------


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def catch_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)


def ignore_signals() -> None:
    """Teardown must not be interrupted half-way (a second Ctrl-C would leave things behind)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


# -- the pieces --------------------------------------------------------------------------------


def app_curl_argv(
    host: Host, address: str, port: int, path: str = "/", *, as_root: bool = False
) -> list[str]:
    """curl from *host* as the application user, or as root (meshed just the same)."""
    url = f"{SCHEME}{address}:{port}{path}"
    argv = ["curl", "-sS", "--max-time", str(CURL_TIMEOUT_S), url]
    return host.exec_argv(argv if as_root else as_app_user(argv))


def curl(
    host: Host, address: str, port: int, *, as_root: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        app_curl_argv(host, address, port, as_root=as_root),
        capture_output=True,
        text=True,
        timeout=CURL_TIMEOUT_S + 5,
        check=False,
    )


def curl_until(
    host: Host, address: str, port: int, *, ok: bool, timeout_s: float = 15.0
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Call until the outcome is *ok* (bounded in time and attempts); result and elapsed s."""
    started = time.monotonic()
    res = curl(host, address, port)
    for _ in range(150):
        if (res.returncode == 0) == ok or time.monotonic() - started > timeout_s:
            break
        time.sleep(0.1)
        res = curl(host, address, port)
    return res, time.monotonic() - started


def make_sites(root: Path) -> dict[str, Path]:
    """One document root per service, readable by the application user."""
    root.chmod(0o755)
    sites = {}
    for spec in SERVICES:
        site = root / spec.name
        site.mkdir(mode=0o755)
        (site / "index.html").write_text(f"hello from {spec.name}\n")
        (site / "index.html").chmod(0o644)
        sites[spec.name] = site
    return sites


def start_http_app(mesh: Mesh, name: str, port: int, site: Path) -> Process:
    """``python3 -m http.server`` as the application user: it knows nothing of the mesh."""
    argv = [APP_PYTHON, "-I", "-u", "-m", "http.server", str(port), "--directory", str(site)]
    proc = mesh.hosts[name].host.spawn(f"http{port}", as_app_user(argv))
    mesh.hosts[name].apps.append(proc)
    deadline = time.monotonic() + 15
    while "Serving HTTP" not in proc.log():
        if not proc.alive() or time.monotonic() > deadline:
            raise DemoFailed(f"http.server on {name}:{port} did not start: {proc.log()}")
        time.sleep(0.1)
    return proc


@contextlib.contextmanager
def capture(host: Host, pcap: Path, bpf: str) -> Iterator[Path]:
    """tcpdump on *host*'s eth0 into *pcap* during the block (a process the lab ends by PID)."""
    argv = ["tcpdump", "-Z", "root", "--immediate-mode", "-U", "-i", "eth0", "-w", str(pcap), bpf]
    proc = host.spawn("tcpdump", argv)
    deadline = time.monotonic() + 10
    while "listening on" not in proc.log():
        if not proc.alive() or time.monotonic() > deadline:
            raise DemoFailed(f"tcpdump did not start: {proc.log()}")
        time.sleep(0.05)
    try:
        yield pcap
    finally:
        time.sleep(0.5)
        proc.stop(signal.SIGINT)


def wait_access(
    mesh: Mesh, name: str, wanted: Callable[[dict[str, Any]], bool], *, timeout_s: float = 5.0
) -> list[dict[str, Any]]:
    """The access lines on host *name* that are *wanted*, waiting (bounded) for at least one.

    An agent writes a connection's line just after the connection ends, so a line can trail
    the client's view of it by a few milliseconds.
    """
    deadline = time.monotonic() + timeout_s
    found: list[dict[str, Any]] = []
    for _ in range(int(timeout_s / 0.1) + 1):
        found = [r for r in mesh.events(name, "access") if wanted(r)]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return found


def show_access(record: dict[str, Any], host: str) -> str:
    fields = ["direction", "source", "destination", "outcome", "reason"]
    fields += ["bytes_sent", "bytes_received"]
    shown = " ".join(f"{k}={record[k]}" for k in fields if record.get(k) not in (None, ""))
    return f"{host} agent: {shown}"


def meshctl_show(mesh: Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    res = mesh.meshctl(*args, check=False)
    say(f"$ meshctl {shlex.join(args)}")
    say(indent(res.stdout + res.stderr))
    return res


# -- the tour ----------------------------------------------------------------------------------


def build(mesh: Mesh, sites: dict[str, Path]) -> None:
    lab = mesh.lab
    step("Control plane: meshctl ca init, then meshd serve (the CA) next to the Consul server")
    mesh.start_control_plane()
    assert lab.server is not None
    say(f"    Consul server and meshd at {lab.server_address} (namespace {lab.server.netns})")
    step(
        f"Hosts: meshd-agent (as uid {DEMO_AGENT_UID}, the unit's capabilities) and an"
        " unchanged app (python3 -m http.server, as nobody) on each"
    )
    for spec in SERVICES:
        mesh.add_host(spec.name, [spec], agent_uid=DEMO_AGENT_UID)
        start_http_app(mesh, spec.name, spec.port, sites[spec.name])
        mesh.start_agent(spec.name)
    for spec in SERVICES:
        mesh.wait_passing(spec.name, 1)
    say(mesh.describe())
    say("    Each agent registered its service in Consul, got a certificate from meshd and")
    say("    installed iptables rules (MESHD_* chains) that send the app's traffic to its proxies.")


def allow_and_call(mesh: Mesh, workdir: Path) -> None:
    web, api, db = (mesh.lab.hosts[n] for n in ("web", "api", "db"))
    step("Intentions (Consul KV, meshd/intentions/<destination>): web -> api, api -> db")
    mesh.meshctl("intention", "create", "web", "api", "--allow", "--description", "demo")
    mesh.meshctl("intention", "create", "api", "db", "--allow", "--description", "demo")
    meshctl_show(mesh, "intention", "list")

    step("Traffic: curl on host web (as user nobody) -> api, while tcpdump watches web's link")
    pcap = workdir / "web-api.pcap"
    with capture(web, pcap, f"tcp port {PORTS['api']}"):
        res, _ = curl_until(web, api.address, PORTS["api"], ok=True)
    say(f"$ {shlex.join(app_curl_argv(web, api.address, PORTS['api']))}")
    say(indent(res.stdout + res.stderr))
    if res.returncode != 0 or "hello from api" not in res.stdout:
        raise DemoFailed(f"web -> api did not get through: {res.stderr.strip()}")
    raw = pcap.read_bytes()
    handshake = b"\x16\x03\x01" in raw or b"\x16\x03\x03" in raw
    records = raw.count(b"\x17\x03\x03")
    cleartext = b"GET / HTTP" in raw or b"hello from api" in raw
    dump = subprocess.run(
        ["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True, timeout=30, check=False
    )
    say(f"    tcpdump on web's eth0 ({len(dump.stdout.splitlines())} packets), first lines:")
    say(indent("\n".join(dump.stdout.splitlines()[:6]), "      "))
    say(
        f"    mTLS on the wire: TLS handshake {'seen' if handshake else 'NOT seen'}, "
        f"{records} TLS application-data records, "
        f"plaintext HTTP on the wire: {'YES' if cleartext else 'no'}"
    )
    if not handshake or records == 0 or cleartext:
        raise DemoFailed("the capture does not show mTLS-only traffic between web and api")
    out = wait_access(
        mesh, "web", lambda r: r["direction"] == "outbound" and r["destination"] == "api"
    )
    good = wait_access(
        mesh,
        "api",
        lambda r: r["direction"] == "inbound" and r["source"] == "web" and r["outcome"] == "closed",
    )
    if not out or not good:
        raise DemoFailed("the agents' access logs do not show web -> api")
    say("    The agents' access logs (source = the SPIFFE identity verified in the peer's cert):")
    say(indent(show_access(out[-1], "web")))
    say(indent(show_access(good[-1], "api")))

    step("Second hop: curl on host api -> db")
    res, _ = curl_until(api, db.address, PORTS["db"], ok=True)
    say(indent(res.stdout + res.stderr))
    if res.returncode != 0 or "hello from db" not in res.stdout:
        raise DemoFailed(f"api -> db did not get through: {res.stderr.strip()}")


def deny_and_call(mesh: Mesh) -> None:
    web, api = mesh.lab.hosts["web"], mesh.lab.hosts["api"]
    step("Deny: meshctl intention create web api --deny --replace")
    mesh.meshctl("intention", "create", "web", "api", "--deny", "--replace")
    res, elapsed = curl_until(web, api.address, PORTS["api"], ok=False, timeout_s=5)
    say(f"$ {shlex.join(app_curl_argv(web, api.address, PORTS['api']))}")
    say(indent((res.stdout + res.stderr) or f"(exit {res.returncode})"))
    if res.returncode == 0:
        raise DemoFailed("web -> api still gets through after the deny")
    refused = wait_access(
        mesh,
        "api",
        lambda r: r["direction"] == "inbound" and "denied: web -> api" in str(r.get("reason")),
    )
    say(f"    REFUSED: web -> api (first refusal {elapsed:.2f}s after meshctl returned)")
    if not refused:
        raise DemoFailed("api's agent logged no refusal for web -> api")
    say(indent(show_access(refused[-1], "api")))
    as_root = curl(web, api.address, PORTS["api"], as_root=True)
    say(f"$ {shlex.join(app_curl_argv(web, api.address, PORTS['api'], as_root=True))}")
    say(indent((as_root.stdout + as_root.stderr) or f"(exit {as_root.returncode})"))
    if as_root.returncode == 0:
        raise DemoFailed("root on web bypasses the mesh: its call to api got through")
    say(f"    root's call is refused too: only uid {DEMO_AGENT_UID} (the agents) bypasses")
    check = meshctl_show(mesh, "intention", "check", "web", "api")
    if check.returncode != 2:
        raise DemoFailed(f"meshctl intention check web api: exit {check.returncode}, wanted 2")
    res, _ = curl_until(api, mesh.lab.hosts["db"].address, PORTS["db"], ok=True, timeout_s=5)
    say(f"    api -> db is unaffected: {res.stdout.strip() or res.stderr.strip()}")
    if res.returncode != 0:
        raise DemoFailed("api -> db stopped working after a deny for web -> api")


def poke_help(mesh: Mesh, keep: bool) -> str:
    lab = mesh.lab
    web, api = lab.hosts["web"], lab.hosts["api"]
    consul = f"CONSUL_HTTP_ADDR={SCHEME}{lab.server_address}:8500"
    meshctl = f"{consul} {REPO / '.venv/bin/meshctl'}"
    admin = f"{SCHEME}127.0.0.1:{ADMIN_PORT}"
    lines = [
        "How to poke at it (as root, on this machine):",
        f"  # call api from host web (every user but the agents' uid {DEMO_AGENT_UID} is meshed):",
        f"  {shlex.join(app_curl_argv(web, api.address, PORTS['api']))}",
        "  # intentions and mesh settings:",
        f"  {meshctl} intention list",
        f"  {meshctl} intention create web api --allow --replace",
        f"  {meshctl} intention check web api; echo $?",
        f"  {meshctl} config read mesh",
        "  # an agent's metrics, snapshot and redirect rules:",
        f"  ip netns exec {api.netns} curl -s {admin}/metrics | grep '^meshd_'",
        f"  ip netns exec {api.netns} curl -s {admin}/snapshot",
        f"  ip netns exec {api.netns} iptables-save | grep MESHD",
        "  # the link: only TLS crosses it",
        f"  ip netns exec {web.netns} tcpdump -nn -i eth0 -X tcp port {PORTS['api']}",
        f"  # logs (agents' JSON access lines, Consul, meshd): {lab.workdir}/",
    ]
    if keep:
        lines += ["", "To tear it down: press Ctrl-C here (or kill -TERM the demo's PID)."]
    else:
        lines += ["", "This run tears everything down now; `scripts/demo --keep` leaves it up."]
    return "\n".join(lines)


def wait_for_interrupt(mesh: Mesh) -> None:
    """--keep: run until Ctrl-C/SIGTERM; complain if a process the demo started dies."""
    while True:
        time.sleep(1)
        for name, mh in mesh.hosts.items():
            if mh.agent is not None and not mh.agent.alive():
                raise DemoFailed(f"the agent on {name} exited:\n{mh.agent.log()[-2000:]}")


# -- teardown check ----------------------------------------------------------------------------


def leftovers(lab: Lab) -> list[str]:
    """What of *lab* still exists after its teardown (namespaces, links, processes)."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    ours = f"meshd-{lab.tag}-"
    found += [f"namespace {n}" for n in netns.stdout.split() if n.startswith(ours)]
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=False)
    found += [
        f"link {lab.bridge}"
        for line in links.stdout.splitlines()
        if line.split()[:1] == [lab.bridge]
    ]
    hosts = [*lab.hosts.values(), *([lab.server] if lab.server else [])]
    found += [f"process {p.pid} ({p.name})" for h in hosts for p in h.processes if p.alive()]
    return found


def run(keep: bool) -> int:
    catch_signals()
    sites_root = Path(tempfile.mkdtemp(prefix="meshd-demo-sites-"))
    lab_ref: Lab | None = None
    status = 0
    try:
        step("Lab: a Consul server and three hosts (network namespaces), a Consul agent on each")
        with open_lab(LAB_NAME, [s.name for s in SERVICES]) as lab:
            lab_ref = lab
            try:
                mesh = Mesh(lab)
                build(mesh, make_sites(sites_root))
                allow_and_call(mesh, lab.workdir)
                deny_and_call(mesh)
                step("Done: traffic crossed hosts over mTLS, and the deny intention refused it")
                say(poke_help(mesh, keep))
                if keep:
                    wait_for_interrupt(mesh)
            except KeyboardInterrupt as exc:
                say(f"\nInterrupted ({exc or 'SIGINT'}).")
                status = 0 if keep else 130
            except (DemoFailed, TimeoutError, RuntimeError, subprocess.SubprocessError) as exc:
                say(f"\nDEMO FAILED: {exc}")
                if isinstance(exc, subprocess.CalledProcessError):
                    say(indent(f"{exc.stdout or ''}{exc.stderr or ''}"))
                status = 1
            finally:
                ignore_signals()
                step("Teardown: stopping every process the demo started, deleting namespaces")
    except LabUnavailable as exc:
        say(f"DEMO CANNOT RUN HERE: {exc}")
        return 2
    except (TimeoutError, RuntimeError, subprocess.SubprocessError) as exc:
        say(f"\nDEMO FAILED while building the lab (it has been torn down): {exc}")
        status = 1
    except KeyboardInterrupt:
        ignore_signals()
        say("\nInterrupted while building the lab; it has been torn down.")
        status = 130
    finally:
        ignore_signals()
        shutil.rmtree(sites_root, ignore_errors=True)
    if lab_ref is not None:
        left = leftovers(lab_ref)
        if left:
            say(f"TEARDOWN INCOMPLETE: {', '.join(left)}")
            return 1
        say(f"Teardown clean: no namespaces, links or processes of lab {lab_ref.tag} left.")
    if status == 0:
        say("Demo OK.")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo", description="Bring up a small meshd mesh on this machine and tour it."
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave the mesh running until Ctrl-C, then tear down"
    )
    args = parser.parse_args(argv)
    return run(args.keep)


if __name__ == "__main__":
    sys.exit(main())
