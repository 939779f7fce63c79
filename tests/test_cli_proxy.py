"""``meshctl proxy snapshot`` against the agent's own admin endpoint (real HTTP on loopback).

The endpoint is :func:`agent.admin.serve_admin` itself, serving a snapshot built and
encoded by meshd's own code; the lab test in ``tests/test_mesh_l4.py`` reads a live agent.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio
from click.testing import CliRunner

from agent.admin import AdminSources, serve_admin
from agent.metrics import AgentMetrics
from cli.main import meshctl
from meshd.intentions import Action, IntentionsDocument, SourceIntention, render_document
from meshd.snapshot import Endpoint, LocalService, make_snapshot, to_json
from meshd.snapshot.model import UpstreamSet
from meshlab.devconsul import free_ports
from tests.plugins.pki import MeshCa


@contextmanager
def admin_serving(snapshot_json: Callable[[], bytes | None]) -> Iterator[str]:
    """The agent's admin endpoint on a free loopback port, in a thread; yields host:port."""
    (port,) = free_ports(1)
    sources = AdminSources(
        metrics=AgentMetrics(), ready=lambda: True, stats=dict, snapshot_json=snapshot_json
    )
    running: list[tuple[trio.lowlevel.TrioToken, trio.CancelScope]] = []
    started = threading.Event()

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_admin, sources, "127.0.0.1", port)
                running.append((trio.lowlevel.current_trio_token(), scope))
                started.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        token, scope = running[0]
        token.run_sync_soon(scope.cancel)
        thread.join(10)
        assert not thread.is_alive()


def built(mesh_ca: MeshCa) -> bytes:
    docs = {
        "api": render_document(
            IntentionsDocument(name="api", sources=(SourceIntention("web", action=Action.ALLOW),))
        ),
        "db": b"{not json",
    }
    snapshot = make_snapshot(
        version=7,
        created_at=1_700_000_000.0,
        local_services=(LocalService("web", "web-1", 8080, upstreams=("api",), uid=1001),),
        upstreams=[
            UpstreamSet(
                "api",
                tuple(Endpoint(f"10.0.0.{n}", 9090, f"n{n}", f"api-{n}") for n in range(1, 7)),
            )
        ],
        mesh_config_raw=b"[]",
        intentions_raw=docs,
        trust_bundle_raw=mesh_ca.bundle.to_json(),
    )
    return to_json(snapshot)


def test_the_snapshot_is_shown_as_the_proxies_read_it(mesh_ca: MeshCa) -> None:
    raw = built(mesh_ca)
    with admin_serving(lambda: raw) as admin:
        result = CliRunner().invoke(meshctl, ["proxy", "snapshot", "--admin", admin])
        assert result.exit_code == 0, result.output
        out = result.output
        assert out.startswith("Snapshot: version 7, built 2023-11-14 22:13:20 UTC")
        # An invalid mesh config document: the fail-closed settings, and why.
        assert "Mesh config: mTLS strict, default deny, outbound registry-only (fail-closed:" in out
        assert f"Trust bundle: {mesh_ca.bundle.trust_domain}, roots: active" in out
        assert "web   web-1  8080  tcp       1001  api" in out
        assert (
            "api      6          10.0.0.1:9090, 10.0.0.2:9090, 10.0.0.3:9090, 10.0.0.4:9090, +2"
            in out
        )
        assert "api          valid" in out
        assert "db           INVALID: denies everyone: " in out

        as_json = CliRunner().invoke(
            meshctl, ["proxy", "snapshot", "--admin", admin, "--format", "json"]
        )
        assert as_json.exit_code == 0 and json.loads(as_json.output) == json.loads(raw)


def test_no_agent_no_snapshot_or_a_broken_one_is_one_line_and_exit_1() -> None:
    (closed,) = free_ports(1)
    result = CliRunner().invoke(meshctl, ["proxy", "snapshot", "--admin", f"127.0.0.1:{closed}"])
    assert result.exit_code == 1 and "is the agent running on this host?" in result.output
    assert "Traceback" not in result.output
    with admin_serving(lambda: None) as admin:
        result = CliRunner().invoke(meshctl, ["proxy", "snapshot", "--admin", admin])
        assert result.exit_code == 1 and "the agent has no snapshot yet" in result.output
    with admin_serving(lambda: b'{"format": "something else"}') as admin:
        result = CliRunner().invoke(meshctl, ["proxy", "snapshot", "--admin", admin])
        assert result.exit_code == 1 and f"{admin}: snapshot" in result.output, result.output
