"""``meshctl status`` and ``meshctl services``: the mesh as Consul holds it, at a glance.

Both read only: the catalog with every instance's health, the trust bundle, the mesh
config and the intentions documents (loaded exactly as the agents load them, so an invalid
document shows as the denial the agents enforce). ``status`` exits 1 when it finds a
problem (:mod:`meshd.meshstatus` says what counts), so a script or a monitoring check can
run it as it is.

Consul accepts service names that its HTTP API cannot address (``a//b``, ``..``: Go's
router cleans such a path and reads another name, or none). Their health is not read:
``status`` names them as a problem (it cannot vouch for what it did not see) and
``services`` leaves them out with a note on stderr. Every other name, ``a/b`` included, is
read as itself (:func:`meshd.consul.model.check_name`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

import click
import trio

from cli.intention import format_option, prefix_option
from cli.output import table
from meshd.consul import ConsulClient, ConsulSettings, ServiceInstance, open_consul
from meshd.consul.model import check_name
from meshd.errors import MeshdError
from meshd.intentions import documents_from_kv, intentions_prefix
from meshd.meshconfig import load_mesh_config, mesh_config_key, mesh_config_to_json
from meshd.meshstatus import LISTED, MeshStatus, ServiceSummary, mesh_status, summarize_service
from meshd.trustbundle import TrustBundle, bundle_key

READ_CONCURRENCY = 16  # health reads in flight at once (one per service)
EXIT_PROBLEMS = 1


@click.command("status")
@prefix_option
@format_option
@click.pass_context
def status(ctx: click.Context, prefix: str, fmt: str) -> None:
    """Show the control plane, agents, CA, documents and services; exit 1 on a problem."""
    found = trio.run(_read_status, prefix)
    if fmt == "json":
        click.echo(json.dumps(_status_json(found), indent=2))
    else:
        click.echo(_status_text(found))
    if found.problems:
        ctx.exit(EXIT_PROBLEMS)


@click.command("services")
@format_option
def services(fmt: str) -> None:
    """List the catalog's services: instances by health, and how many are meshed."""
    found, unreadable = trio.run(_read_services)
    if unreadable:
        click.echo(f"note: left out, {_unreadable(unreadable)}", err=True)
    summaries = [summarize_service(name, instances) for name, instances in found.items()]
    if fmt == "json":
        click.echo(json.dumps([_service_json(s) for s in summaries], indent=2))
        return
    header = ("SERVICE", "INSTANCES", "PASSING", "WARNING", "CRITICAL", "MESHED", "PROTOCOL")
    rows = [
        (
            s.name,
            str(s.instances),
            str(s.passing),
            str(s.warning),
            str(s.critical),
            str(s.meshed),
            ",".join(s.protocols) or "-",
        )
        for s in summaries
    ]
    click.echo(table(header, rows))


# -- reading -------------------------------------------------------------------------------


Catalog = dict[str, tuple[ServiceInstance, ...]]


async def _read_services() -> tuple[Catalog, tuple[str, ...]]:
    async with open_consul(ConsulSettings.from_env()) as consul:
        return await _all_instances(consul)


async def _all_instances(consul: ConsulClient) -> tuple[Catalog, tuple[str, ...]]:
    """Every service of the catalog with all of its instances, each with its health; and
    the names Consul's HTTP API cannot address, whose health is not read."""
    _, names = await consul.catalog_services()
    readable = [name for name in names if _addressable(name)]
    found: Catalog = {}
    limiter = trio.CapacityLimiter(READ_CONCURRENCY)

    async def read(name: str) -> None:
        async with limiter:
            _, found[name] = await consul.health_service(name, passing_only=False)

    async with trio.open_nursery() as nursery:
        for name in readable:
            nursery.start_soon(read, name)
    return dict(sorted(found.items())), tuple(sorted(set(names) - set(readable)))


def _addressable(name: str) -> bool:
    try:
        check_name("service name", name)
    except ValueError:
        return False
    return True


def _unreadable(names: tuple[str, ...]) -> str:
    shown = ", ".join(repr(name) for name in names[:LISTED])
    more = f" and {len(names) - LISTED} more" if len(names) > LISTED else ""
    return (
        f"service(s) {shown}{more}: Consul's HTTP API cannot address the name (an empty,"
        " '.' or '..' segment between '/'), so their health was not read; rename them"
    )


async def _read_status(prefix: str) -> MeshStatus:
    async with open_consul(ConsulSettings.from_env()) as consul:
        found, _ = await read_mesh(consul, prefix)
    return found


async def read_mesh(consul: ConsulClient, prefix: str) -> tuple[MeshStatus, Catalog]:
    """What ``meshctl status`` shows, and the catalog it was made from (every service with
    all of its instances)."""
    datacenter = await consul.datacenter()
    leader = await consul.leader()
    instances, unreadable = await _all_instances(consul)
    _, bundle_entry = await consul.kv_get(bundle_key(prefix))
    _, config_entry = await consul.kv_get(mesh_config_key(prefix))
    _, listed = await consul.kv_list(intentions_prefix(prefix))
    raw_bundle = None if bundle_entry is None else bundle_entry.value
    bundle, bundle_error = _bundle(bundle_key(prefix), raw_bundle)
    found = mesh_status(
        datacenter=datacenter,
        leader=leader,
        instances=instances,
        bundle=bundle,
        bundle_error=bundle_error,
        mesh_config=load_mesh_config(
            mesh_config_key(prefix), None if config_entry is None else config_entry.value
        ),
        intentions=documents_from_kv(((e.key, e.value) for e in listed), prefix),
        now=dt.datetime.now(dt.UTC),
    )
    if unreadable:
        found = dataclasses.replace(found, problems=(*found.problems, _unreadable(unreadable)))
    return found, instances


def _bundle(key: str, raw: bytes | None) -> tuple[TrustBundle | None, str | None]:
    if raw is None:
        return None, f"nothing at {key} (run 'meshctl ca init')"
    try:
        return TrustBundle.from_json(raw), None
    except (MeshdError, ValueError) as exc:
        return None, f"{key}: {exc}"


# -- output --------------------------------------------------------------------------------


def _health(s: ServiceSummary) -> str:
    return f"{s.passing} of {s.instances} passing"


def _status_text(found: MeshStatus) -> str:
    config = found.mesh_config.config
    versions = ", ".join(f"{v} x{n}" for v, n in found.agent_versions.items()) or "-"
    meshed = [s for s in found.services if s.meshed]
    roots = ", ".join(f"{r.id[:16]} {r.state} until {r.not_after:%Y-%m-%d}" for r in found.roots)
    lines = [
        f"{'Consul:':<16}datacenter {found.datacenter}, leader {found.leader or 'none'}",
        f"{'meshd servers:':<16}{_health(found.servers)}",
        f"{'Agents:':<16}{_health(found.agents)} (versions: {versions})",
        f"{'Trust domain:':<16}{found.trust_domain or '-'}",
        f"{'Roots:':<16}{roots or '-'}",
        f"{'Mesh config:':<16}mTLS {config.mtls_mode.value}, default {config.default_action.value},"
        f" outbound {config.outbound_policy.value}"
        + (" (invalid: failing closed)" if found.mesh_config.error else ""),
        f"{'Intentions:':<16}{found.intentions} valid documents,"
        f" {len(found.invalid_intentions)} invalid",
        f"{'Services:':<16}{len(meshed)} meshed"
        f" ({sum(s.passing for s in meshed)} of {sum(s.instances for s in meshed)} instances"
        f" passing), {len(found.services) - len(meshed)} not meshed",
    ]
    if found.problems:
        lines += ["", f"Problems ({len(found.problems)}):"]
        lines += [f"  - {p}" for p in found.problems]
    else:
        lines += ["", "No problems found."]
    return "\n".join(lines)


def _service_json(s: ServiceSummary) -> dict[str, Any]:
    return {
        "name": s.name,
        "instances": s.instances,
        "passing": s.passing,
        "warning": s.warning,
        "critical": s.critical,
        "meshed": s.meshed,
        "protocols": list(s.protocols),
        "not_passing_nodes": list(s.not_passing_nodes),
    }


def _status_json(found: MeshStatus) -> Mapping[str, Any]:
    roots: Sequence[Mapping[str, str]] = [
        {"id": r.id, "state": r.state, "not_after": r.not_after.isoformat()} for r in found.roots
    ]
    return {
        "datacenter": found.datacenter,
        "leader": found.leader,
        "servers": _service_json(found.servers),
        "agents": {**_service_json(found.agents), "versions": dict(found.agent_versions)},
        "trust_domain": found.trust_domain,
        "roots": roots,
        "mesh_config": {
            **mesh_config_to_json(found.mesh_config.config),
            "error": None if found.mesh_config.error is None else str(found.mesh_config.error),
        },
        "intentions": {"valid": found.intentions, "invalid": list(found.invalid_intentions)},
        "services": [_service_json(s) for s in found.services],
        "problems": list(found.problems),
    }
