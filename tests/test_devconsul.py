"""The private Consul launcher every Consul test and the scale benchmark stand on.

Its success path is exercised by every fixture that starts an agent; these cover what a
fixture never shows: a start that fails reports why and leaves no process behind, and a
stopped agent is gone by its PID.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshlab.devconsul import DevConsul, free_ports, pid_alive, stop_process

pytestmark = pytest.mark.consul


def _running_with(argument: str) -> list[int]:
    """PIDs of live (not zombie) processes with *argument* on their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if any(argument.encode() in a for a in argv) and state != "Z":
            found.append(int(entry.name))
    return found


def _agent(tmp_path: Path, **extra: object) -> DevConsul:
    http, server, serf_lan, serf_wan = free_ports(4)
    ports = {"http": http, "dns": -1, "grpc": -1, "server": server}
    ports |= {"serf_lan": serf_lan, "serf_wan": serf_wan}
    return DevConsul(tmp_path, node_name="devconsul-test", ports=ports, extra=extra)


def test_start_reports_a_consul_that_exits_with_its_log(tmp_path: Path) -> None:
    agent = _agent(tmp_path, not_a_consul_option=1)
    with pytest.raises(RuntimeError, match=r"consul exited \(\d+\)") as raised:
        agent.start()
    assert "not_a_consul_option" in str(raised.value)  # Consul's own complaint, from the log
    assert agent.pid is None
    assert _running_with(str(agent.config_file)) == []


def test_start_stops_an_agent_that_is_not_ready_in_time(tmp_path: Path) -> None:
    # A real agent, given far too little time for a leader: the launcher gives up, says
    # so, and ends the process it started.
    agent = _agent(tmp_path)
    agent.start_timeout_s = 0.0
    with pytest.raises(RuntimeError, match=r"consul not ready in 0\.0 s"):
        agent.start()
    assert agent.pid is None
    assert _running_with(str(agent.config_file)) == []


def test_stop_ends_the_agent_by_pid_and_restart_serves_again(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    agent.start()
    first = agent.pid
    assert first is not None and agent.get_json("/v1/status/leader")
    assert _running_with(str(agent.config_file)) == [first]
    agent.restart()
    assert agent.pid not in (None, first) and not pid_alive(first)
    assert agent.get_json("/v1/status/leader")
    second = agent.pid
    agent.stop()
    assert agent.pid is None and second is not None and not pid_alive(second)
    with pytest.raises(OSError):
        agent.get_json("/v1/status/leader")


def test_stop_process_kills_what_ignores_sigterm() -> None:
    script = "import signal,sys,time;signal.signal(signal.SIGTERM,signal.SIG_IGN);"
    script += "print('ready',flush=True);time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        assert stop_process(proc, grace_s=0.3) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_ports_must_include_http(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HTTP port"):
        DevConsul(tmp_path, node_name="x", ports={"dns": -1})
