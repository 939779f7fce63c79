"""The real ``meshd-agent run`` against the scale catalog: idle RSS and CPU.

Runs without a CA or meshd server (certificates cannot be issued, so it reports
``cert_failed`` and proxies nothing) and with ``[redirect] enabled = false`` (no iptables):
what is measured is the agent's footprint with its full runtime loaded (proxies listening,
admin endpoint, registration, snapshot pipeline over the declared upstreams).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.scale_consul import TestConsul, free_port, service_name
from bench.scale_proc import cpu_s, rss_mb
from meshlab.devconsul import stop_process

STOP_GRACE_S = 5.0


def _config(workdir: Path, consul: TestConsul, upstreams: int) -> Path:
    state, services = workdir / "fullagent-state", workdir / "fullagent-services.d"
    state.mkdir(mode=0o700)
    services.mkdir()
    names = ", ".join(f'"{service_name(i)}"' for i in range(upstreams))
    (services / "client.toml").write_text(
        f'[service]\nname = "scale-agent-client"\nport = {free_port()}\n'
        f'address = "127.0.0.1"\nupstreams = [{names}]\n'
    )
    config = workdir / "agent.toml"
    config.write_text(
        f'[agent]\nnode_name = "{consul.node_name}"\nstate_dir = "{state}"\n'
        f'services_dir = "{services}"\nbootstrap_token_file = "{workdir}/bootstrap.token"\n'
        f'[consul]\naddress = "{consul.address}"\n'
        f"[proxy]\noutbound_port = {free_port()}\ninbound_port = {free_port()}\n"
        f'admin_port = {free_port()}\nuser = "{os.getuid()}"\n'
        f'metrics_port = {free_port()}\nmetrics_address = "127.0.0.1"\n'
        "[redirect]\nenabled = false\n"
    )
    return config


def measure_full_agent(
    consul: TestConsul, workdir: Path, *, upstreams: int, idle_s: float
) -> dict[str, Any]:
    """Start ``meshd-agent run``, wait *idle_s*, read RSS/CPU, stop it by PID.

    Returns ``{"rss_mb", "cpu_s", "idle_s", "events": {event: count}, "ready": bool}``, or
    ``{"error": ...}`` when the agent exits or cannot start.
    """
    executable = Path(sys.executable).parent / "meshd-agent"
    if not executable.exists():
        return {"error": f"{executable} not installed"}
    config = _config(workdir, consul, upstreams)
    out = workdir / "meshd-agent.out"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            [str(executable), "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    result: dict[str, Any] = {}
    try:
        started = time.monotonic()
        deadline = started + idle_s
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        if proc.poll() is not None:
            result["error"] = f"exited with {proc.returncode}"
        else:
            result["rss_mb"] = rss_mb(proc.pid)
            result["cpu_s"] = cpu_s(proc.pid)
            result["idle_s"] = time.monotonic() - started
    finally:
        stop_process(proc, grace_s=STOP_GRACE_S)
    events: collections.Counter[str] = collections.Counter()
    text = out.read_text(errors="replace")
    for line in text.splitlines():
        try:
            events[str(json.loads(line).get("event", "?"))[:60]] += 1
        except (ValueError, AttributeError):
            events["(not JSON)"] += 1
    result["events"] = dict(events.most_common(6))
    result["ready"] = "agent_ready" in events
    if "error" in result:
        result["error"] += ": " + " | ".join(text.strip().splitlines()[-2:])[:200]
    return result
