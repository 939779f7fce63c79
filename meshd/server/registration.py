"""meshd registers itself in Consul as service ``meshd`` (with a TCP check) so agents find it.

The registration is renewed periodically, because a restarted Consul agent without
persisted state forgets it; it is removed on shutdown (shielded, bounded) so agents stop
dialling a server that is going away.
"""

from __future__ import annotations

import logging

import trio

from meshd.consul.client import ConsulClient
from meshd.consul.errors import ConsulError
from meshd.consul.model import CheckDefinition, ServiceRegistration
from meshd.registry import SERVER_SERVICE

REREGISTER_S = 60.0
log = logging.getLogger("meshd.server.registration")


def meshd_registration(
    *, name: str, advertise_address: str, port: int, check_interval_s: float = 10.0
) -> ServiceRegistration:
    """The Consul registration of one meshd server.

    Args:
        name: the server's name; the service id is ``meshd-<name>``.
        advertise_address: the address agents dial; ``""`` lets Consul use the node's.
        port: the HTTPS API port.
        check_interval_s: how often Consul's TCP check runs.

    Returns:
        The registration, with a TCP check on the API port (run by the local agent).
    """
    target_host = advertise_address or "127.0.0.1"
    if ":" in target_host:
        target_host = f"[{target_host}]"
    check = CheckDefinition(
        kind="tcp",
        target=f"{target_host}:{port}",
        interval_s=check_interval_s,
        timeout_s=min(5.0, check_interval_s),
        name="meshd API port",
        deregister_after_s=3600.0,
    )
    return ServiceRegistration(
        name=SERVER_SERVICE,
        service_id=f"{SERVER_SERVICE}-{name}",
        address=advertise_address or None,
        port=port,
        tags=("ca",),
        checks=(check,),
    )


async def serve_registration(
    consul: ConsulClient,
    registration: ServiceRegistration,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep *registration* in Consul until cancelled, then deregister it.

    Raises:
        ConsulError: the first registration failed (later failures are logged and retried).
    """
    await consul.service_register(registration)
    task_status.started()
    try:
        while True:
            await trio.sleep(REREGISTER_S)
            try:
                await consul.service_register(registration)
            except ConsulError as exc:
                log.warning("re-registering %s failed: %s", registration.effective_id, exc)
    finally:
        with trio.move_on_after(2.0, shield=True):
            try:
                await consul.service_deregister(registration.effective_id)
            except ConsulError as exc:
                log.warning("deregistering %s failed: %s", registration.effective_id, exc)
