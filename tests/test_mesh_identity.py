"""Two services on one host calling the same upstream, told apart by their users (ADR 006).

Host web runs two services, ``web`` (as ``nobody``) and ``admin`` (as uid 3456), and both
declare ``api`` as an upstream. Without users named, the outbound proxy cannot tell which
of them dialled and refuses both. With ``[service] user`` in their files, it asks the kernel
who opened each intercepted connection (``agent.sockowner``) and presents that service's
certificate, so api's intentions decide per service. web's agent runs as its own uid, as the
shipped unit runs it, so root's connections are intercepted too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from meshlab.mesh import APP_UID, Mesh, ServiceSpec, as_user, exchange_argv
from meshlab.netns import LabUnavailable, open_lab

pytestmark = [pytest.mark.netns, pytest.mark.consul]

WEB_PORT, ADMIN_PORT, API_PORT = 8080, 8081, 9090
ADMIN_UID, STRANGER_UID, AGENT_UID = 3456, 4567, 64323
PAYLOAD = b"who-am-i-4f2a\n"


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    try:
        with open_lab("i", ("web", "api")) as lab:
            the_mesh = Mesh(lab)
            the_mesh.start_control_plane()
            the_mesh.add_host(
                "web",
                [
                    ServiceSpec("web", WEB_PORT, upstreams=("api",), user=str(APP_UID)),
                    ServiceSpec("admin", ADMIN_PORT, upstreams=("api",), user=str(ADMIN_UID)),
                ],
                agent_uid=AGENT_UID,
            )
            the_mesh.add_host("api", [ServiceSpec("api", API_PORT)])
            the_mesh.start_app("api", API_PORT)
            for name in ("web", "api"):
                the_mesh.start_agent(name)
            the_mesh.wait_passing("api", 1)
            the_mesh.meshctl("intention", "create", "web", "api", "--allow")
            the_mesh.meshctl("intention", "create", "admin", "api", "--deny")
            yield the_mesh
    except LabUnavailable as exc:
        pytest.fail(str(exc))


def call_as(mesh: Mesh, uid: int) -> tuple[bool, str]:
    """Call api from host web as *uid*: (echoed cleanly, what came back)."""
    api = mesh.lab.hosts["api"]
    argv = as_user(uid, exchange_argv(api.address, API_PORT, PAYLOAD))
    res = mesh.hosts["web"].host.run(argv, check=False, timeout=15)
    return res.returncode == 0 and PAYLOAD.decode() in res.stdout, res.stdout + res.stderr


def wait_access(mesh: Mesh, host: str, match: dict[str, Any]) -> dict[str, Any]:
    """The first access line on *host* whose fields include *match* (waits up to 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        for record in mesh.events(host, "access"):
            if all(record.get(k) == v for k, v in match.items()):
                return record
        assert time.monotonic() < deadline, (match, mesh.events(host, "access")[-10:])
        time.sleep(0.1)


def test_each_service_calls_with_its_own_identity_chosen_by_its_user(mesh: Mesh) -> None:
    # web's processes (nobody): web's identity, which api allows.
    deadline = time.monotonic() + 15
    ok, out = call_as(mesh, APP_UID)
    while not ok and time.monotonic() < deadline:  # intentions reach both agents
        time.sleep(0.2)
        ok, out = call_as(mesh, APP_UID)
    assert ok, out
    assert out.startswith("api ")
    wait_access(mesh, "web", {"direction": "outbound", "source": "web", "uid": APP_UID,
                              "destination": "api", "outcome": "closed"})  # fmt: skip
    wait_access(mesh, "api", {"direction": "inbound", "source": "web", "outcome": "closed"})

    # admin's processes: admin's identity, which api denies. Same host, same upstream.
    ok, out = call_as(mesh, ADMIN_UID)
    assert not ok and PAYLOAD.decode() not in out, out
    wait_access(mesh, "web", {"direction": "outbound", "source": "admin", "uid": ADMIN_UID,
                              "destination": "api"})  # fmt: skip
    denied = wait_access(mesh, "api", {"direction": "inbound", "outcome": "refused"})
    assert str(denied["reason"]).startswith("denied: ") and "admin" in denied["reason"], denied


@pytest.mark.parametrize("uid", [STRANGER_UID, 0], ids=["another user", "root"])
def test_a_user_no_service_names_gets_no_identity(mesh: Mesh, uid: int) -> None:
    at_api = len(mesh.events("api", "access"))
    ok, out = call_as(mesh, uid)
    assert not ok and PAYLOAD.decode() not in out, out
    refused = wait_access(mesh, "web", {"direction": "outbound", "uid": uid})
    assert refused["outcome"] == "refused", refused
    assert refused["reason"] == f"no local service runs as uid {uid} ([service] user)"
    # Refused before any dial: api's inbound proxy saw no connection from this call.
    time.sleep(0.5)
    assert len(mesh.events("api", "access")) == at_api
