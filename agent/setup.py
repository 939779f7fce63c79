"""Turning the agent's validated configuration into the values its parts take."""

from __future__ import annotations

import dataclasses
import pwd
from collections.abc import Iterable

from meshd.config import AgentConfig, ConfigError, ServiceConfig
from meshd.redirect_spec import RedirectSpec


def proxy_uid(config: AgentConfig, file: str) -> int:
    """The uid of ``proxy.user`` (a name or a number).

    Raises:
        ConfigError: the user does not exist on this host.
    """
    return _uid(config.proxy.user, file, "proxy.user")


def service_uids(services: Iterable[ServiceConfig], proxy: int) -> dict[str, int]:
    """The uid of each service that names its ``user``, by service id.

    Raises:
        ConfigError: the user does not exist on this host, or is the proxy's (whose
            connections are never intercepted, so could never be told apart).
    """
    uids = {}
    for s in services:
        if s.user:
            file = str(s.source or s.id)
            uid = _uid(s.user, file, "service.user")
            if uid == proxy:
                raise ConfigError(
                    file,
                    "service.user",
                    f"{s.user!r} is proxy.user, whose connections are never intercepted;"
                    " run the service as a user of its own",
                )
            uids[s.id] = uid
    return uids


def _uid(user: str, file: str, key: str) -> int:
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ConfigError(file, key, f"no such user {user!r} on this host") from None


def require_running_as(uid: int, file: str, *, euid: int) -> None:
    """Refuse to intercept unless the agent runs as ``proxy.user``.

    The redirect rules exempt only *uid*'s connections. Run as anyone else, the proxies'
    own upstream dials would be captured by the rules and loop back into the outbound
    proxy, one new connection per turn, until the process runs out of descriptors.

    Raises:
        ConfigError: *euid* (the agent's effective uid) is not *uid*; names the key.
    """
    if euid != uid:
        raise ConfigError(
            file,
            "proxy.user",
            f"is uid {uid}, but the agent runs as uid {euid}: the redirect rules exempt only"
            " proxy.user's connections, so the proxies' own would be captured and loop back"
            " into them; run the agent as that user, or set proxy.user to the one it runs as",
        )


def redirect_spec(config: AgentConfig, services: Iterable[ServiceConfig], uid: int) -> RedirectSpec:
    """The interception rules this configuration asks for."""
    r = config.redirect
    spec = RedirectSpec(
        proxy_uid=uid,
        outbound_port=config.proxy.outbound_port,
        inbound_port=config.proxy.inbound_port,
        inbound_ports=tuple(sorted({s.port for s in services})),
        exclude_uids=tuple(r.exclude_uids),
        exclude_inbound_ports=tuple(r.exclude_inbound_ports),
        exclude_outbound_cidrs=tuple(str(n) for n in r.exclude_outbound_cidrs),
        agent_ports=tuple(p for p in (config.proxy.admin_port, config.proxy.metrics_port) if p),
        ipv6=r.ipv6,
    )
    if r.exclude_outbound_ports:
        spec = dataclasses.replace(
            spec,
            exclude_outbound_ports=tuple(
                sorted({*spec.exclude_outbound_ports, *r.exclude_outbound_ports})
            ),
        )
    return spec
