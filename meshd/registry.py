"""How meshd marks what it registers in Consul, for the agent that writes it and the tools
that read it back (``meshctl status``, ``meshctl services``)."""

from __future__ import annotations

SERVER_SERVICE = "meshd"  # the control plane's instances
AGENT_SERVICE = "meshd-agent"  # one per host; its port is the metrics port (0: none)
META_VERSION = "meshd"  # in every meshd registration: the meshd version that made it
META_PROXY_PORT = "meshd-proxy-port"  # a meshed service: where its inbound proxy listens
META_PROTOCOL = "meshd-protocol"  # a meshed service: tcp or http
META_METRICS_PORT = "meshd-metrics-port"  # an agent: its metrics port, when it serves one
