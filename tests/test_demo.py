"""The README's demo command, end to end: ``scripts/demo`` as a subprocess, as CI runs it.

Each run carries a unique marker in its environment, which every process it starts inherits
(Consul, meshd, agents, apps, tcpdump, curl), so afterwards a scan of /proc finds anything
of that run still alive, whatever else runs on the machine. Namespaces and root-namespace
iptables rules are compared before and after.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshlab.netns import LabUnavailable, require_root_netns

pytestmark = [pytest.mark.netns, pytest.mark.consul]

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "scripts" / "demo"
RUN_TIMEOUT_S = 240.0
TEARDOWN_TIMEOUT_S = 60.0
MARK_VAR = "MESHD_DEMO_TEST_MARK"


@dataclass
class Machine:
    """What the demo must leave as it found it."""

    namespaces: set[str]
    root_rules: set[str]


def machine_state() -> Machine:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True)
    return Machine(
        {line.split()[0] for line in netns.stdout.splitlines() if line.strip()},
        {line for line in rules.stdout.splitlines() if "MESHD" in line},
    )


def marked_processes(mark: str) -> list[str]:
    """Live processes whose environment carries *mark* (children inherit it)."""
    found = []
    needle = f"{MARK_VAR}={mark}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{proc.name}: {cmdline[:200]}")
    return found


@dataclass
class DemoRun:
    proc: subprocess.Popen[bytes]
    output: Path
    mark: str

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # Ask it to tear down (it handles SIGTERM like Ctrl-C), then insist.
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=TEARDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            pytest.fail(f"scripts/demo did not finish in {timeout_s}s:\n{self.text()[-4000:]}")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[Machine, list[DemoRun]]]:
    """Start runs of scripts/demo with a marker; afterwards check nothing of them is left."""
    try:
        require_root_netns()
    except LabUnavailable as exc:
        pytest.fail(str(exc))
    before = machine_state()
    runs: list[DemoRun] = []
    yield before, runs
    for run in runs:
        if run.proc.poll() is None:  # a failed test left it running: end it by its PID
            os.kill(run.proc.pid, signal.SIGTERM)
            run.proc.wait(timeout=TEARDOWN_TIMEOUT_S)
        left = marked_processes(run.mark)
        assert left == [], f"processes of the demo still running: {left}"
    after = machine_state()
    new_ns = {n for n in after.namespaces - before.namespaces if n.startswith("meshd-dm")}
    assert new_ns == set(), f"namespaces left behind: {new_ns}"
    assert after.root_rules <= before.root_rules, after.root_rules - before.root_rules


def start(runs: list[DemoRun], tmp_path: Path, *args: str) -> DemoRun:
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env[MARK_VAR] = mark
    output = tmp_path / f"demo-{len(runs)}.out"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", str(DEMO), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
            start_new_session=True,
        )
    run = DemoRun(proc, output, mark)
    runs.append(run)
    return run


def lab_namespaces(text: str) -> set[str]:
    return set(re.findall(r"meshd-dm\d+-[a-z]+", text))


def test_demo_tours_the_mesh_and_leaves_nothing_behind(
    demo: tuple[Machine, list[DemoRun]], tmp_path: Path
) -> None:
    _, runs = demo
    run = start(runs, tmp_path)
    status = run.wait(RUN_TIMEOUT_S)
    text = run.text()
    assert status == 0, text[-4000:]
    # Traffic crossed hosts, and only as TLS.
    assert "hello from api" in text and "hello from db" in text
    assert re.search(r"mTLS on the wire: TLS handshake seen, [1-9]\d* TLS application-data", text)
    assert "plaintext HTTP on the wire: no" in text
    assert re.search(
        r"api agent: direction=inbound source=web destination=api outcome=closed", text
    )
    # The deny refused the call.
    assert "REFUSED: web -> api" in text
    assert re.search(
        r"api agent: direction=inbound source=web destination=api outcome=refused"
        r" reason=denied: web -> api denied by intention",
        text,
    )
    assert "curl: (" in text.split("==> Deny", 1)[1]
    # The agents run as a user of their own, so root's call is meshed and refused too.
    assert "root's call is refused too: only uid 64321 (the agents) bypasses" in text
    # How to poke at it, then a clean teardown.
    assert "meshctl intention list" in text and "/metrics" in text
    assert "Teardown clean" in text and text.rstrip().endswith("Demo OK.")
    namespaces = lab_namespaces(text)
    assert len(namespaces) >= 3, text[-2000:]
    assert namespaces.isdisjoint(machine_state().namespaces)


def test_demo_keep_stays_up_until_ctrl_c_then_tears_down(
    demo: tuple[Machine, list[DemoRun]], tmp_path: Path
) -> None:
    _, runs = demo
    run = start(runs, tmp_path, "--keep")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for _ in range(int(RUN_TIMEOUT_S * 5)):
        if "To tear it down" in run.text() or run.proc.poll() is not None:
            break
        assert time.monotonic() < deadline, run.text()[-4000:]
        time.sleep(0.2)
    assert run.proc.poll() is None, run.text()[-4000:]
    # Still up a moment later: the namespaces exist and the mesh answers.
    time.sleep(1)
    namespaces = lab_namespaces(run.text())
    assert len(namespaces) >= 3
    assert namespaces <= machine_state().namespaces
    assert run.proc.poll() is None
    os.kill(run.proc.pid, signal.SIGINT)  # scripts/demo execs python: this is the demo itself
    status = run.wait(TEARDOWN_TIMEOUT_S)
    text = run.text()
    assert status == 0, text[-4000:]
    assert "Interrupted" in text and "Teardown clean" in text
    assert namespaces.isdisjoint(machine_state().namespaces)
