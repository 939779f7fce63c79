"""``meshctl token``: bootstrap tokens that entitle a host to its services' first certificates.

``create`` prints the token once (or writes it to a 0600 file created atomically) and
stores only a salted hash in Consul KV; ``list`` shows ids, scope and state, never secrets;
``revoke`` marks a token revoked with a check-and-set write so a concurrent use cannot undo it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import click
import trio

from cli.intention import kv_prefix_param
from meshd.bootstrap import (
    MAX_TTL_S,
    BootstrapToken,
    TokenError,
    TokenRecord,
    check_ttl,
    new_token,
    token_key,
    tokens_folder,
)
from meshd.config import parse_duration
from meshd.consul.client import ConsulClient, open_consul
from meshd.consul.settings import ConsulSettings
from meshd.keyfile import write_secret

DEFAULT_KV_PREFIX = "meshd/"


async def create_token(
    consul: ConsulClient,
    *,
    host: str,
    services: Iterable[str],
    ttl_s: float,
    kv_prefix: str = DEFAULT_KV_PREFIX,
    now: float | None = None,
) -> tuple[BootstrapToken, TokenRecord]:
    """Create a token and store its record (hash only) in Consul KV.

    Raises:
        TokenError: bad host, services or TTL.
        ConsulError: the record could not be written.
    """
    token, record = new_token(
        host=host, services=services, now=time.time() if now is None else now, ttl_s=ttl_s
    )
    if not await consul.kv_put(token_key(record.token_id, kv_prefix), record.to_json(), cas=0):
        raise TokenError(f"token id {record.token_id} already exists; try again")
    return token, record


async def list_tokens(
    consul: ConsulClient, *, kv_prefix: str = DEFAULT_KV_PREFIX
) -> list[TokenRecord]:
    """Every stored token record, by id (unparsable records are skipped).

    Raises:
        ConsulError: the records could not be read.
    """
    _, entries = await consul.kv_list(tokens_folder(kv_prefix))
    records = []
    for entry in entries:
        try:
            records.append(TokenRecord.from_json(entry.value))
        except TokenError:
            continue
    return sorted(records, key=lambda r: r.token_id)


async def revoke_token(
    consul: ConsulClient, token_id: str, *, kv_prefix: str = DEFAULT_KV_PREFIX
) -> TokenRecord:
    """Mark a token revoked (check-and-set, retried on a concurrent change).

    Raises:
        TokenError: no such token, or it kept changing.
        ConsulError: Consul failed.
    """
    key = token_key(token_id, kv_prefix)
    for _ in range(5):
        _, entry = await consul.kv_get(key)
        if entry is None:
            raise TokenError(f"no token {token_id}")
        record = TokenRecord.from_json(entry.value).revoke()
        if await consul.kv_put(key, record.to_json(), cas=entry.modify_index):
            return record
    raise TokenError(f"token {token_id} kept changing; revoke again")


def _describe(record: TokenRecord, now: float) -> dict[str, object]:
    state = "revoked" if record.revoked else "expired" if now >= record.expires else "valid"
    if state == "valid" and record.consumed == record.services:
        state = "used"
    return {
        "id": record.token_id,
        "host": record.host,
        "services": sorted(record.services),
        "consumed": sorted(record.consumed),
        "created": record.created,
        "expires": record.expires,
        "state": state,
    }


_prefix_option = click.option(
    "--kv-prefix",
    default=DEFAULT_KV_PREFIX,
    show_default=True,
    callback=kv_prefix_param,
    help="meshd's Consul KV folder.",
)


def _ttl(ctx: click.Context, param: click.Parameter, value: str) -> float:
    """Click callback: ``--ttl`` in seconds, more than 0 and at most a week."""
    try:
        ttl_s = parse_duration(value)
        check_ttl(ttl_s)
    except (ValueError, TokenError) as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return ttl_s


@click.group("token")
def token_cli() -> None:
    """Create, list and revoke bootstrap tokens."""


@token_cli.command("create")
@click.option("--host", required=True, help="The node name the token is for.")
@click.option("--service", "services", multiple=True, required=True, help="Repeatable.")
@click.option(
    "--ttl",
    "ttl_s",
    default="1h",
    show_default=True,
    callback=_ttl,
    help=f"Lifetime, e.g. 30m, 1h, 2d; at most {MAX_TTL_S / 86400:g}d.",
)
@click.option(
    "--output", type=click.Path(path_type=Path), help="Write the token to this file (0600)."
)
@_prefix_option
def create_cmd(
    host: str, services: tuple[str, ...], ttl_s: float, output: Path | None, kv_prefix: str
) -> None:
    """Create a token for HOST's SERVICEs; shown once (or written to --output)."""

    async def run() -> BootstrapToken:
        async with open_consul(ConsulSettings.from_env()) as consul:
            token, _ = await create_token(
                consul, host=host, services=services, ttl_s=ttl_s, kv_prefix=kv_prefix
            )
            return token

    token = trio.run(run)
    if output is not None:
        write_secret(output, token.reveal().encode("ascii") + b"\n", overwrite=False)
        click.echo(f"token {token.token_id} written to {output}", err=True)
    else:
        click.echo(token.reveal())
        click.echo(f"token {token.token_id}: shown once; it is not stored anywhere", err=True)


@token_cli.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@_prefix_option
def list_cmd(fmt: str, kv_prefix: str) -> None:
    """List tokens: id, host, services, state (never secrets)."""

    async def run() -> list[TokenRecord]:
        async with open_consul(ConsulSettings.from_env()) as consul:
            return await list_tokens(consul, kv_prefix=kv_prefix)

    now = time.time()
    rows = [_describe(r, now) for r in trio.run(run)]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'ID':<18}{'HOST':<24}{'STATE':<9}SERVICES (consumed)")
    for row in rows:
        services = ",".join(row["services"])  # type: ignore[arg-type]
        consumed = ",".join(row["consumed"])  # type: ignore[arg-type]
        click.echo(f"{row['id']:<18}{row['host']:<24}{row['state']:<9}{services} ({consumed})")


@token_cli.command("revoke")
@click.argument("token_id")
@_prefix_option
def revoke_cmd(token_id: str, kv_prefix: str) -> None:
    """Revoke token TOKEN_ID (it can no longer obtain certificates)."""

    async def run() -> TokenRecord:
        async with open_consul(ConsulSettings.from_env()) as consul:
            return await revoke_token(consul, token_id, kv_prefix=kv_prefix)

    record = trio.run(run)
    click.echo(f"token {record.token_id} revoked")
