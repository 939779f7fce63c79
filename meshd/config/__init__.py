"""The configuration model: TOML files in, frozen validated values out.

Raw configuration becomes initialized configuration once, here, at the edge: downstream
code accepts only these frozen types and never sees a raw dict. Every error is a
:class:`ConfigError` whose message is one line, ``"<file>: <dotted.key>: <problem>"``.
Unknown keys are errors (with a "did you mean" suggestion), so a typo never silently falls
back to a default. Files hold token *file paths*, never tokens.

Files: ``agent.toml`` (:func:`load_agent_config`), ``services.d/*.toml``
(:func:`load_service_dir`) and ``meshd.toml`` (:func:`load_server_config`). The keys are
documented in ``docs/configuration.md``.
"""

from meshd.config.agent import (
    AgentConfig,
    ControlPlaneConfig,
    NodeConfig,
    ProxyConfig,
    RedirectConfig,
    load_agent_config,
    parse_agent_config,
)
from meshd.config.common import ConsulConfig, LogConfig
from meshd.config.duration import format_duration, parse_duration
from meshd.config.errors import ConfigError
from meshd.config.fields import HostPort
from meshd.config.server import (
    CAConfig,
    ServerConfig,
    ServerSection,
    load_server_config,
    parse_server_config,
)
from meshd.config.service import (
    CheckConfig,
    ServiceConfig,
    load_service_dir,
    load_service_file,
    parse_service_config,
)

__all__ = [
    "AgentConfig",
    "CAConfig",
    "CheckConfig",
    "ConfigError",
    "ConsulConfig",
    "ControlPlaneConfig",
    "HostPort",
    "LogConfig",
    "NodeConfig",
    "ProxyConfig",
    "RedirectConfig",
    "ServerConfig",
    "ServerSection",
    "ServiceConfig",
    "format_duration",
    "load_agent_config",
    "load_server_config",
    "load_service_dir",
    "load_service_file",
    "parse_agent_config",
    "parse_duration",
    "parse_server_config",
    "parse_service_config",
]
