"""``meshd-agent check``: everything ``meshd-agent run`` will need on this host, checked
before it runs (a preflight for installs and rollouts).

Each check reads and never changes anything: the configuration files, the proxy user, the
certificates or bootstrap token, the state directory, Consul (reachable, a leader, the
mesh's KV readable, a trust bundle, a meshd server to sign), the iptables tools and the
proxies' ports. Every line says ``ok``, ``warn`` or ``FAIL`` with the reason; the command
exits 1 when anything fails, so a rollout can gate on it.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import click
import trio

from agent.run_cli import config_option
from agent.setup import proxy_uid, service_uids
from meshd.checks import Check, exit_status, render_checks
from meshd.config import AgentConfig, ServiceConfig, load_agent_config, load_service_dir
from meshd.consul import ConsulSettings, open_consul
from meshd.errors import MeshdError
from meshd.keyfile import read_secret
from meshd.registry import SERVER_SERVICE
from meshd.trustbundle import bundle_key

TOOLS = ("iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore")


@click.command("check")
@config_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def check_cmd(ctx: click.Context, config_path: Path, fmt: str) -> None:
    """Check what the agent needs on this host; exit 1 if anything fails."""
    checks = list(_checks(config_path))
    click.echo(render_checks(checks, fmt))
    ctx.exit(exit_status(checks))


def _checks(config_path: Path) -> Iterator[Check]:
    try:
        config = load_agent_config(config_path)
    except MeshdError as exc:
        yield Check("config", "FAIL", str(exc))
        return
    yield Check("config", "ok", str(config_path))
    try:
        services = load_service_dir(Path(config.agent.services_dir), missing_ok=True)
    except MeshdError as exc:
        yield Check("services", "FAIL", str(exc))
        return
    names = [s.name for s in services]
    yield Check(
        "services",
        "ok" if names else "warn",
        ", ".join(names) if names else f"none in {config.agent.services_dir}: nothing to mesh",
    )
    user, uid = _user(config, config_path)
    yield user
    if uid is not None and any(s.user for s in services):
        yield _service_users(services, uid)
    yield _state_dir(Path(config.agent.state_dir), uid)
    yield from _credentials(config, names, uid)
    yield from trio.run(_consul, config, config_path, uid)
    if config.redirect.enabled:
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        yield Check(
            "iptables",
            "FAIL" if missing else "ok",
            f"not found: {', '.join(missing)}" if missing else "iptables and ip6tables tools",
        )
    yield from _ports(config)


def _user(config: AgentConfig, config_path: Path) -> tuple[Check, int | None]:
    """The proxy user's line, and its uid (None when it does not resolve)."""
    try:
        uid = proxy_uid(config, str(config_path))
    except MeshdError as exc:
        return Check("proxy user", "FAIL", str(exc)), None
    euid = os.geteuid()
    if config.redirect.enabled and euid not in (uid, 0):
        detail = (
            f"{config.proxy.user} is uid {uid}, this check runs as uid {euid}: the"
            " agent must run as proxy.user or it refuses to intercept"
        )
        return Check("proxy user", "warn", detail), uid
    if config.redirect.enabled and euid != uid:
        detail = (
            f"{config.proxy.user} (uid {uid}): the agent must run as this user"
            " (systemd/meshd-agent.service does, as meshd)"
        )
        return Check("proxy user", "ok", detail), uid
    return Check("proxy user", "ok", f"{config.proxy.user} (uid {uid})"), uid


def _service_users(services: tuple[ServiceConfig, ...], uid: int) -> Check:
    try:
        users = service_uids(services, uid)
    except MeshdError as exc:
        return Check("service users", "FAIL", str(exc))
    named = ", ".join(f"{s.name} as uid {users[s.id]}" for s in services if s.id in users)
    return Check("service users", "ok", f"{named}: other users' connections get no identity")


def _not_owned(path: Path, owner: int, uid: int | None) -> str:
    """Why the agent, running as *uid*, cannot use *path* owned by *owner*; empty if it can."""
    if uid is None or uid in (owner, 0):
        return ""
    return f"{path} belongs to uid {owner}, and the agent runs as proxy.user (uid {uid})"


def _state_dir(path: Path, uid: int | None) -> Check:
    try:
        info = path.stat()
    except FileNotFoundError:
        parent = next((p for p in path.parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK):
            return Check("state dir", "ok", f"{path} (will be created)")
        return Check("state dir", "FAIL", f"{path} does not exist and {parent} is not writable")
    except OSError as exc:
        return Check("state dir", "FAIL", f"{path}: {exc.strerror}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        return Check("state dir", "warn", f"{path} has mode {mode:04o}; 0700 keeps keys private")
    foreign = _not_owned(path, info.st_uid, uid)
    if foreign:
        # systemd's StateDirectory= gives it to the unit's user on start, recursively, but
        # only when the directory itself is another user's.
        return Check("state dir", "warn", f"{foreign}: it cannot write there unless systemd's"
                     " StateDirectory= hands it over at start")  # fmt: skip
    return Check("state dir", "ok", str(path))


def _credentials(config: AgentConfig, services: list[str], uid: int | None) -> Iterator[Check]:
    """A cached certificate for each service, or a usable bootstrap token for the rest."""
    certs = Path(config.agent.state_dir) / "certs"
    cached = [s for s in services if (certs / f"{s}.pem").exists()]
    if cached:
        yield Check("certificates", "ok", f"cached for {', '.join(cached)}")
    if len(cached) == len(services):
        return
    token_file = Path(config.agent.bootstrap_token_file)
    try:
        read_secret(token_file)
    except MeshdError as exc:
        others = ", ".join(s for s in services if s not in cached)
        yield Check("token", "FAIL", f"no certificate yet for {others}, and {exc}")
        return
    foreign = _not_owned(token_file, token_file.lstat().st_uid, uid)
    if foreign:
        yield Check("token", "FAIL", f"{foreign}: it cannot read a 0600 file of another user")
        return
    yield Check("token", "ok", f"{token_file} (0600)")


async def _consul(config: AgentConfig, config_path: Path, uid: int | None) -> list[Check]:
    try:
        settings = ConsulSettings.from_config(config.consul, file=str(config_path))
    except MeshdError as exc:
        return [Check("consul", "FAIL", str(exc))]
    token_file = config.consul.token_file  # read above, so it exists
    foreign = "" if token_file is None else _not_owned(token_file, token_file.lstat().st_uid, uid)
    if foreign:
        return [Check("consul", "FAIL", f"token_file: {foreign}: it cannot read it (0600)")]
    found: list[Check] = []
    key = bundle_key(config.consul.kv_prefix)
    try:
        async with open_consul(settings) as consul:
            # Only reads the agent itself makes (no agent:read, which it does not need).
            leader = await consul.leader()
            found.append(
                Check(
                    "consul",
                    "ok" if leader else "FAIL",
                    f"{settings.address}: leader {leader or 'none: the catalog cannot change'}",
                )
            )
            _, bundle = await consul.kv_get(key)
            found.append(
                Check("trust bundle", "ok", key)
                if bundle is not None
                else Check("trust bundle", "FAIL", f"nothing at {key}")
            )
            if not config.meshd.addresses:
                _, servers = await consul.health_service(SERVER_SERVICE)
                found.append(
                    Check("meshd servers", "ok", f"{len(servers)} passing in Consul")
                    if servers
                    else Check("meshd servers", "FAIL", "none passing in Consul: no certificates")
                )
    except MeshdError as exc:
        found.append(Check("consul", "FAIL", str(exc)))
    return found


def _ports(config: AgentConfig) -> Iterator[Check]:
    proxy = config.proxy
    ports = [
        ("outbound port", proxy.outbound_port, "127.0.0.1"),
        ("inbound port", proxy.inbound_port, "127.0.0.1"),
        ("admin port", proxy.admin_port, "127.0.0.1"),
    ]
    if proxy.metrics_port:
        # Where it will listen: every address, unless metrics_address says one.
        every = "0.0.0.0"  # noqa: S104
        ports.append(("metrics port", proxy.metrics_port, proxy.metrics_address or every))
    for name, port, host in ports:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            try:
                sock.bind((host, port))
            except OSError as exc:
                yield Check(name, "warn", f"{port}: {exc.strerror} (is the agent running?)")
                continue
        yield Check(name, "ok", str(port))
