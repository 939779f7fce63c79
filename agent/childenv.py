"""The environment the agent gives the processes it starts (iptables tools, proxy workers).

None of them talks to Consul, so none gets a ``CONSUL_*`` variable: an ACL token given to
the agent as ``CONSUL_HTTP_TOKEN`` must never reach a child. Nor do they get systemd's
variables addressed to the agent's own process: a child must not notify systemd, answer its
watchdog or take the sockets systemd passed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

_SYSTEMD_PER_PROCESS = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                  "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"})  # fmt: skip


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """*environ* (``os.environ`` when omitted) without Consul's or systemd's variables."""
    env = os.environ if environ is None else environ
    return {
        k: v
        for k, v in env.items()
        if not k.upper().startswith("CONSUL_") and k not in _SYSTEMD_PER_PROCESS
    }
