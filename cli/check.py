"""``meshctl check``: is the running mesh healthy, control plane and every agent?

The mesh-wide half is ``meshctl status``'s reading of Consul (servers, agents, roots,
documents, services), one ``FAIL`` line per problem it names. The other half asks each
agent Consul lists, on its metrics port (:mod:`cli.scrape`), what it enforces right now,
and judges that with :mod:`meshd.agenthealth`: a snapshot in force, no invalid document,
a valid certificate for every meshed service of its node, renewals on time, Consul
watches answering, redirect rules left alone. ``meshd-agent check`` is the preflight of
one host before it runs; this is the health of the running fleet. Read only.
"""

from __future__ import annotations

import time

import click
import trio

from cli.intention import format_option, prefix_option
from cli.scrape import http_client, metrics_target, scrape
from cli.status import Catalog, read_mesh
from meshd.agenthealth import agent_checks
from meshd.checks import Check, exit_status, render_checks
from meshd.consul import ConsulSettings, open_consul
from meshd.meshstatus import MeshStatus
from meshd.registry import AGENT_SERVICE, META_PROXY_PORT


@click.command("check")
@prefix_option
@format_option
@click.pass_context
def check(ctx: click.Context, prefix: str, fmt: str) -> None:
    """Check the control plane and every agent's metrics; exit 1 on a FAIL."""
    checks = trio.run(_checks, prefix)
    click.echo(render_checks(checks, fmt))
    ctx.exit(exit_status(checks))


async def _checks(prefix: str) -> list[Check]:
    async with open_consul(ConsulSettings.from_env()) as consul:
        status, catalog = await read_mesh(consul, prefix)
    checks = [Check("mesh", "FAIL", problem) for problem in status.problems]
    if not checks:
        checks.append(Check("mesh", "ok", _mesh_summary(status)))
    agents = sorted(catalog.get(AGENT_SERVICE, ()), key=lambda a: (a.node, a.service_id))
    meshed = _meshed_by_node(catalog)
    targets = [metrics_target(agent) for agent in agents]
    async with http_client() as http:
        read = await scrape(http, sorted({t for t in targets if t is not None}))
    now = time.time()
    for agent, target in zip(agents, targets, strict=True):
        name = f"agent {agent.node}"
        if target is None:
            checks.append(Check(name, "warn", "serves no metrics port: not checked"))
        elif target in read.failed:
            checks.append(Check(name, "FAIL", f"metrics port {target}: {read.failed[target]}"))
        else:
            services = sorted(meshed.get(agent.node, ()))
            checks += agent_checks(name, read.pages[target], services=services, now=now)
    return checks


def _meshed_by_node(catalog: Catalog) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, instances in catalog.items():
        for instance in instances:
            if META_PROXY_PORT in instance.meta:
                found.setdefault(instance.node, set()).add(name)
    return found


def _mesh_summary(status: MeshStatus) -> str:
    meshed = sum(1 for s in status.services if s.meshed)
    return (
        f"{status.servers.passing} meshd server(s), {status.agents.passing} agent(s) and"
        f" {meshed} meshed service(s) passing; {len(status.roots)} root(s),"
        f" {status.intentions} intentions document(s), all valid"
    )
