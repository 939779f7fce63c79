"""``meshd-agent run``: start the agent from its configuration files."""

from __future__ import annotations

import os
from collections.abc import Awaitable
from pathlib import Path

import click
import trio

from agent import redirect
from agent.accesslog import JsonLog, install_json_logging
from agent.certifier import endpoints_from_addresses
from agent.runtime import AgentHandle, AgentOptions, serve_agent
from agent.setup import proxy_uid, redirect_spec, require_running_as, service_uids
from meshd.config import load_agent_config, load_service_dir
from meshd.consul import ConsulSettings, open_consul
from meshd.redirect_spec import RedirectSpec

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=Path("/etc/meshd/agent.toml"),
    show_default=True,
    help="The agent's configuration file.",
)


@click.command("run")
@config_option
def run_cmd(config_path: Path) -> None:
    """Run the agent: register services, intercept traffic, proxy it over mTLS."""
    config = load_agent_config(config_path)
    services = load_service_dir(Path(config.agent.services_dir), missing_ok=True)
    settings = ConsulSettings.from_config(config.consul, file=str(config_path))
    uid = proxy_uid(config, str(config_path))
    users = service_uids(services, uid)
    spec = None
    if config.redirect.enabled:
        require_running_as(uid, str(config_path), euid=os.geteuid())
        spec = redirect_spec(config, services, uid)
    log = JsonLog(level=config.log.level)
    install_json_logging(log, config.log.level)
    options = AgentOptions(
        config=config,
        services=services,
        service_uids=users,
        close_denied=config.proxy.close_denied,
        meshd_endpoints=(
            endpoints_from_addresses(config.meshd.addresses) if config.meshd.addresses else None
        ),
    )

    async def main() -> None:
        failed: list[redirect.RedirectError] = []
        async with open_consul(settings) as consul, trio.open_nursery() as nursery:

            async def run_agent(task_status: trio.TaskStatus[AgentHandle]) -> None:
                await serve_agent(consul, options, log=log, task_status=task_status)
                nursery.cancel_scope.cancel()  # the agent has drained: stop watching rules

            handle: AgentHandle = await nursery.start(run_agent)
            if spec is not None:
                # Rules go in only once the proxies listen: a redirected connection then
                # always finds a proxy. They stay when the agent exits (see runtime).
                try:
                    changes = await trio.to_thread.run_sync(redirect.apply, spec)
                except redirect.RedirectError as exc:
                    # Without its rules this host must not stay in Consul as serving its
                    # services: the orderly stop deregisters them first, then the error
                    # ends the agent (systemd's Restart= tries again).
                    log.event("redirect_apply_failed", level="error", error=str(exc))
                    failed.append(exc)
                    handle.request_stop()
                else:
                    applied = [f"IPv{c.family}" for c in changes if c.applied]
                    log.event("redirect_applied", changed=applied)
                    nursery.start_soon(keep_rules, spec, config.redirect.check_interval, handle)
        if failed:
            raise failed[0]

    def keep_rules(spec: RedirectSpec, interval: float, handle: AgentHandle) -> Awaitable[None]:
        def checked(problems: tuple[str, ...]) -> None:
            handle.metrics.redirect_check_failing.set(0)
            if problems:
                handle.metrics.redirect_repairs.inc()
                log.event("redirect_repaired", level="warning", problems=list(problems))

        def failed(error: str) -> None:
            handle.metrics.redirect_check_failures.inc()
            handle.metrics.redirect_check_failing.set(1)
            log.event("redirect_check_failed", level="error", error=error)

        return redirect.keep_applied(spec, interval=interval, on_checked=checked, on_failed=failed)

    trio.run(main)
