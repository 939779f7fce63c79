"""Fixtures: a running mesh in the lab (see :mod:`meshlab.mesh`)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from meshlab.mesh import Mesh, ServiceSpec
from meshlab.netns import LabUnavailable, open_lab

WEB_PORT, API_PORT, DB_PORT = 8080, 9090, 5432
#: web's agent runs as this uid (no passwd entry needed), as the shipped unit runs it as
#: ``meshd``; api's and db's run as root, the proxy user there.
WEB_AGENT_UID = 64321


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    """web → api → db on three hosts, agents running, apps up, no intentions yet.

    web's agent runs as :data:`WEB_AGENT_UID` with the shipped unit's capabilities.
    """
    try:
        with open_lab("m", ("web", "api", "db")) as lab:
            the_mesh = Mesh(lab)
            the_mesh.start_control_plane()
            the_mesh.add_host(
                "web",
                [ServiceSpec("web", WEB_PORT, upstreams=("api",))],
                agent_uid=WEB_AGENT_UID,
            )
            the_mesh.add_host("api", [ServiceSpec("api", API_PORT, upstreams=("db",))])
            the_mesh.add_host("db", [ServiceSpec("db", DB_PORT)])
            for name, port in (("web", WEB_PORT), ("api", API_PORT), ("db", DB_PORT)):
                the_mesh.start_app(name, port)
                the_mesh.start_agent(name)
            for name in ("web", "api", "db"):
                the_mesh.wait_passing(name, 1)
            yield the_mesh
    except LabUnavailable as exc:
        pytest.fail(str(exc))


def wait_for(what: str, cond: object, timeout_s: float = 15.0, detail: object = None) -> None:
    """Poll *cond* (a callable) every 0.1 s until true, at most *timeout_s*.

    *detail*, a callable, says what the state was when it timed out.
    """
    assert callable(cond)
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / 0.1) + 1):
        if cond():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    state = detail() if callable(detail) else ""
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} {state}")
