"""The Ansible role renders configuration the agent and the server accept.

Ansible itself is not run here (no systemd, no managed hosts); what can drift silently is
checked instead. The role's templates are rendered with Jinja2 and the role's defaults plus
the example inventory's variables, then parsed by meshd's own loaders, so a renamed or
retyped key fails here rather than on the first host of a rollout. The files the role
copies must exist, and the agent's ``proxy.user`` must be the user the shipped unit runs
the agent as: otherwise the agent refuses to intercept (``require_running_as``). What that
user must read or write (its 0600 bootstrap token, its state directory) must be its own.
"""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from meshd.config.agent import parse_agent_config
from meshd.config.server import parse_server_config
from meshd.config.service import parse_service_config

REPO = Path(__file__).resolve().parent.parent
ROLES = REPO / "ansible" / "roles"


def render(role: str, template: str, **variables: Any) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(ROLES / role / "templates"),
        undefined=jinja2.StrictUndefined,  # a variable the role does not define fails
        keep_trailing_newline=True,
    )
    env.filters["to_json"] = json.dumps  # Ansible's filter
    return env.get_template(template).render(**variables)


def defaults(role: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {})


def example_hosts() -> dict[str, dict[str, Any]]:
    """Each agent host of ``inventory.example.ini`` with its variables (JSON values parsed)."""
    ini = configparser.ConfigParser(allow_no_value=True, delimiters=(" ",))
    ini.optionxform = str  # type: ignore[assignment,method-assign]
    ini.read(REPO / "ansible" / "inventory.example.ini")
    hosts = {}
    for host, rest in ini.items("meshd_agents"):
        found = dict(re.findall(r"(\w+)='([^']*)'", rest or ""))
        hosts[host] = {key: json.loads(value) for key, value in found.items()}
    return hosts


def unit_user(unit: str) -> str:
    match = re.search(r"^User=(\S+)$", (REPO / "systemd" / unit).read_text(), re.MULTILINE)
    assert match, unit
    return match.group(1)


@pytest.mark.parametrize("host", sorted(example_hosts()))
def test_the_agent_role_renders_configuration_the_agent_accepts(host: str) -> None:
    variables = {**defaults("meshd_agent"), **example_hosts()[host]}
    text = render(
        "meshd_agent",
        "agent.toml.j2",
        inventory_hostname_short=host.split(".")[0],
        **variables,
    )
    config = parse_agent_config(text, file=f"{host}: agent.toml")
    assert config.agent.node_name == host.split(".")[0]
    assert config.proxy.workers == variables["meshd_proxy_workers"]
    # The agent runs as the unit's user, and refuses to intercept as any other.
    assert config.proxy.user == unit_user("meshd-agent.service")
    services = variables["meshd_services"]
    assert services, host
    for item in services:
        service = parse_service_config(
            render("meshd_agent", "service.toml.j2", item=item), file=f"{host}: service"
        )
        assert (service.name, service.port) == (item["name"], item["port"])
        assert service.upstreams == tuple(item.get("upstreams", ()))
        assert service.user == item.get("user", "")


def tasks(role: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load((ROLES / role / "tasks" / "main.yml").read_text()) or [])


def test_what_the_agent_reads_or_writes_belongs_to_the_unit_user() -> None:
    user = unit_user("meshd-agent.service")
    assert user != "root"  # root's own connections would bypass the mesh
    token = [
        t["ansible.builtin.copy"]
        for t in tasks("meshd_agent")
        if t.get("ansible.builtin.copy", {}).get("dest") == "/etc/meshd/bootstrap.token"
    ]
    assert len(token) == 1 and token[0]["mode"] == "0600"
    assert token[0]["owner"] == user  # read_secret as the agent: 0600 of another user fails
    (dirs,) = [t for t in tasks("meshd_common") if t["name"] == "meshd directories"]
    state = [item for item in dirs["loop"] if item["path"] == "/var/lib/meshd"]
    assert state == [{"path": "/var/lib/meshd", "owner": user, "mode": "0700"}]
    unit = (REPO / "systemd" / "meshd-agent.service").read_text()
    assert re.search(r"^StateDirectory=meshd$", unit, re.MULTILINE)


def unit_section(name: str, section: str) -> dict[str, list[str]]:
    """Every key of *section* of the shipped unit *name*, with all its values in order."""
    found: dict[str, list[str]] = {}
    current = ""
    for raw in (REPO / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_restarting_the_agent_keeps_its_sockets_open() -> None:
    """``systemctl restart meshd-agent`` (the role's handler) must leave the socket unit
    running: PartOf= or BindsTo= on the socket would restart it with the service, closing
    the listening sockets and resetting every connection queued while the old agent drained
    (the point of socket activation). Stopping the socket still stops the service
    (Requires=)."""
    socket_unit = unit_section("meshd-agent.socket", "Unit")
    assert not {"PartOf", "BindsTo"} & socket_unit.keys(), socket_unit
    service_unit = unit_section("meshd-agent.service", "Unit")
    assert service_unit["Requires"] == ["meshd-agent.socket"]
    handlers = yaml.safe_load((ROLES / "meshd_agent" / "handlers" / "main.yml").read_text())
    units = {h["name"]: h["ansible.builtin.systemd"]["name"] for h in handlers}
    assert units["restart meshd-agent"] == "meshd-agent.service"
    # Only a changed socket unit restarts the sockets.
    notified = {
        t.get("notify"): t["ansible.builtin.copy"]["src"].rsplit("/", 1)[1]
        for t in tasks("meshd_agent")
        if str(t.get("ansible.builtin.copy", {}).get("src", "")).endswith(".socket")
    }
    assert notified == {"restart meshd-agent sockets": "meshd-agent.socket"}
    assert units["restart meshd-agent sockets"] == "meshd-agent.socket"


def test_the_server_role_renders_configuration_the_server_accepts() -> None:
    variables = defaults("meshd_server")
    text = render("meshd_server", "meshd.toml.j2", inventory_hostname_short="meshd-1", **variables)
    config = parse_server_config(text, file="meshd.toml")
    assert str(config.ca.dir) == variables["meshd_ca_dir"] and config.server.name == "meshd-1"
    host, port = variables["meshd_listen"].rsplit(":", 1)
    assert (config.server.listen.host, config.server.listen.port) == (host, int(port))


def test_every_task_file_parses_and_every_file_it_copies_exists() -> None:
    lists = [*ROLES.glob("*/tasks/main.yml"), *ROLES.glob("*/handlers/main.yml")]
    files = [*sorted(lists), REPO / "ansible" / "site.yml"]
    copied = []
    for path in files:
        for task in yaml.safe_load(path.read_text()) or []:
            assert isinstance(task, dict), path
            copy = task.get("ansible.builtin.copy") or {}
            src = str(copy.get("src", ""))
            if src.startswith("{{ playbook_dir }}/../"):
                for item in task.get("loop") or [None]:
                    name = src.replace("{{ playbook_dir }}/../", "")
                    copied.append(REPO / name.replace("{{ item }}", str(item)))
            template = (task.get("ansible.builtin.template") or {}).get("src")
            if template:
                assert (path.parent.parent / "templates" / template).is_file(), (path, template)
    assert copied and all(path.is_file() for path in copied), copied
