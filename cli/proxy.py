"""``meshctl proxy snapshot``: what one host's agent is enforcing, read from the agent.

Run on the host (the admin endpoint listens on loopback only). The snapshot is decoded and
checked exactly as the agent reads it, and interpreted by the same code the proxies use
(:func:`meshd.dataplane.build_view`): an invalid mesh config shows the fail-closed settings
in force, an invalid intentions document the denial it causes, a missing bundle that no
peer can be verified. It holds only public material.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import click
import httpx

from cli.intention import format_option
from cli.output import table
from meshd.dataplane import DataPlaneView, build_view
from meshd.snapshot import Snapshot, SnapshotFormatError, from_json

ADMIN_DEFAULT = "127.0.0.1:15000"
TIMEOUT_S = 5.0
MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024
ENDPOINTS_SHOWN = 4


@click.group("proxy")
def proxy() -> None:
    """Look at this host's agent: the snapshot its proxies enforce."""


@proxy.command("snapshot")
@click.option(
    "--admin",
    default=ADMIN_DEFAULT,
    envvar="MESHD_ADMIN_ADDR",
    show_default=True,
    help="The agent's admin endpoint, host:port (env MESHD_ADMIN_ADDR).",
)
@format_option
def snapshot_cmd(admin: str, fmt: str) -> None:
    """Show the snapshot this host's proxies use: services, endpoints, policy, CA (json: as
    the agent serves it)."""
    raw = _fetch(admin)
    try:
        snapshot = from_json(raw)
    except SnapshotFormatError as exc:
        raise click.ClickException(f"{admin}: {exc}") from None
    if fmt == "json":
        click.echo(json.dumps(json.loads(raw), indent=2, sort_keys=True))
        return
    click.echo(render(build_view(snapshot), now=time.time()))


def _fetch(admin: str) -> bytes:
    url = f"http://{admin}/snapshot"
    try:
        with (
            httpx.Client(trust_env=False, timeout=TIMEOUT_S) as http,
            http.stream("GET", url) as reply,
        ):
            body = b""
            for chunk in reply.iter_bytes():
                body += chunk
                if len(body) > MAX_SNAPSHOT_BYTES:
                    raise click.ClickException(f"{url}: more than {MAX_SNAPSHOT_BYTES} bytes")
    except httpx.HTTPError as exc:
        raise click.ClickException(
            f"{url}: {exc or type(exc).__name__} (is the agent running on this host?)"
        ) from None
    if reply.status_code == 503:
        raise click.ClickException(f"{url}: the agent has no snapshot yet")
    if reply.status_code != 200:
        raise click.ClickException(f"{url}: HTTP {reply.status_code}")
    return body


def render(view: DataPlaneView, *, now: float) -> str:
    """The table form of *view* (its snapshot as the proxies interpret it)."""
    snap: Snapshot = view.snapshot
    built = dt.datetime.fromtimestamp(snap.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    mesh = view.mesh
    lines = [
        f"Snapshot: version {snap.version}, built {built} UTC ({now - snap.created_at:.0f} s ago)",
        f"Mesh config: mTLS {mesh.mtls_mode.value}, default {mesh.default_action.value},"
        f" outbound {mesh.outbound_policy.value}"
        + (f" (fail-closed: {view.mesh_error})" if view.mesh_error else ""),
    ]
    if view.bundle is None:
        lines.append(f"Trust bundle: NONE, no peer can be verified ({view.bundle_error})")
    else:
        states = ", ".join(sorted(r.state for r in view.bundle.roots))
        lines.append(f"Trust bundle: {view.bundle.trust_domain}, roots: {states}")
    lines += ["", "Local services:"]
    services: list[tuple[str, ...]] = [
        (s.name, s.service_id, str(s.port), s.protocol,
         "-" if s.uid is None else str(s.uid), ", ".join(s.upstreams) or "-")
        for s in snap.local_services
    ]  # fmt: skip
    header = ("NAME", "ID", "PORT", "PROTOCOL", "UID", "UPSTREAMS")
    lines.append(table(header, services) if services else "  none")
    lines += ["", "Upstreams (passing endpoints):"]
    rows: list[tuple[str, ...]] = []
    for name in sorted(snap.upstreams):
        endpoints = snap.upstreams[name].endpoints
        shown = ", ".join(f"{e.address}:{e.port}" for e in endpoints[:ENDPOINTS_SHOWN])
        more = len(endpoints) - ENDPOINTS_SHOWN
        rows.append((name, str(len(endpoints)), shown + (f", +{more}" if more > 0 else "")))
    lines.append(table(("SERVICE", "ENDPOINTS", "ADDRESSES"), rows) if rows else "  none")
    invalid = {d.destination: d.reason for d in view.policy.invalid}
    lines += ["", "Intentions (documents by destination):"]
    documents: list[tuple[str, ...]] = [
        (name, "INVALID: denies everyone: " + invalid[name] if name in invalid else "valid")
        for name in sorted(snap.intentions_raw)
    ]
    lines.append(table(("DESTINATION", "DOCUMENT"), documents) if documents else "  none")
    lines.append(f"Default action where no document applies: {view.policy.default_action.value}")
    return "\n".join(lines)
