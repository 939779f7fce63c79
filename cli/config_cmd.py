"""``meshctl config read|write mesh``: the mesh-wide settings document in Consul KV.

``write`` validates the whole document before anything is sent and stores its canonical
rendering with check-and-set, so a concurrent change by another operator is never overwritten:
by default against the version read just before writing, or against ``--cas INDEX`` (the
``ModifyIndex`` shown by ``read``) to guard a read-edit-write cycle that spans minutes.
"""

from __future__ import annotations

from typing import IO

import click
import trio

from cli.intention import prefix_option
from meshd.consul import ConsulSettings, open_consul
from meshd.errors import MeshdError
from meshd.meshconfig import (
    MeshConfig,
    load_mesh_config,
    mesh_config_key,
    mesh_config_to_json,
    parse_mesh_config,
    render_mesh_config,
)


class MeshConfigConflictError(MeshdError):
    """The mesh config document changed between reading and writing; nothing was written."""


@click.group("config")
def config() -> None:
    """Read and write mesh-wide configuration documents."""


@config.command("read")
@click.argument("kind", type=click.Choice(["mesh"]))
@prefix_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table for people, json (the document as stored) for scripts.",
)
def read(kind: str, prefix: str, fmt: str) -> None:
    """Show the mesh config (KIND is 'mesh'); defaults if it was never written."""
    key = mesh_config_key(prefix)

    async def run() -> tuple[bytes | None, int]:
        async with open_consul(ConsulSettings.from_env()) as consul:
            _, entry = await consul.kv_get(key)
        return (None, 0) if entry is None else (entry.value, entry.modify_index)

    raw, index = trio.run(run)
    loaded = load_mesh_config(key, raw)
    if loaded.error is not None:
        raise MeshdError(f"{loaded.error}; agents fail closed (default deny, strict mTLS)")
    if fmt == "json":
        click.echo(render_mesh_config(loaded.config).decode(), nl=False)
        return
    for name, value in mesh_config_to_json(loaded.config).items():
        if name not in ("Kind", "Version"):
            click.echo(f"{name + ':':<19}{value}")
    source = f"{key} (ModifyIndex {index})" if raw is not None else f"{key} not set: defaults"
    click.echo(f"{'Source:':<19}{source}")


@config.command("write")
@click.argument("kind", type=click.Choice(["mesh"]))
@click.argument("file", type=click.File("rb"))
@prefix_option
@click.option(
    "--cas",
    type=click.IntRange(min=0),
    default=None,
    help="Write only if the stored ModifyIndex is this (0: only if absent).",
)
def write(kind: str, file: IO[bytes], prefix: str, cas: int | None) -> None:
    """Validate FILE (or '-' for stdin) and store it as the mesh config (KIND is 'mesh')."""
    key = mesh_config_key(prefix)
    name = getattr(file, "name", "-")
    label = "<stdin>" if name in ("-", "<stdin>") else str(name)
    new = parse_mesh_config(f"{key} (from {label})", file.read())
    trio.run(_write, key, new, cas)
    click.echo(f"Wrote {key}")


async def _write(key: str, new: MeshConfig, cas: int | None) -> None:
    async with open_consul(ConsulSettings.from_env()) as consul:
        if cas is None:
            _, entry = await consul.kv_get(key)
            cas = 0 if entry is None else entry.modify_index
        if not await consul.kv_put(key, render_mesh_config(new), cas=cas):
            raise MeshConfigConflictError(
                f"{key} changed since ModifyIndex {cas} (another operator?); nothing was "
                "written: read it again and reapply your change"
            )
