"""The configuration model: every key kind, defaults, errors, services.d, examples."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.config import (
    AgentConfig,
    CAConfig,
    CheckConfig,
    ConfigError,
    ConsulConfig,
    ControlPlaneConfig,
    HostPort,
    LogConfig,
    NodeConfig,
    ProxyConfig,
    RedirectConfig,
    ServerConfig,
    ServerSection,
    ServiceConfig,
    format_duration,
    load_agent_config,
    load_server_config,
    load_service_dir,
    load_service_file,
    parse_agent_config,
    parse_duration,
    parse_server_config,
    parse_service_config,
)
from meshd.consul.model import check_key, kv_folder
from meshd.errors import MeshdError

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
WEB = '[service]\nname = "web"\nport = 8080\n'


def error_of(parse: Callable[[str], object], text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message
    return message


def attr(value: object, dotted: str) -> object:
    for name in dotted.split("."):
        value = getattr(value, name)
    return value


# --- defaults -------------------------------------------------------------------------


def test_empty_agent_file_gives_documented_defaults() -> None:
    config = parse_agent_config("")
    assert config == AgentConfig()
    assert config.agent.node_name == socket.gethostname()
    assert config.agent.datacenter == "dc1"
    assert config.agent.state_dir == Path("/var/lib/meshd")
    assert config.agent.services_dir == Path("/etc/meshd/services.d")
    assert config.agent.bootstrap_token_file == Path("/etc/meshd/bootstrap.token")
    assert config.consul.address is None  # CONSUL_HTTP_ADDR, else http://127.0.0.1:8500
    assert (config.consul.token_file, config.consul.ca_file) == (None, None)
    assert config.consul.kv_prefix == "meshd/"
    assert config.meshd.addresses == ()
    proxy = config.proxy
    assert (proxy.outbound_port, proxy.inbound_port, proxy.admin_port) == (15001, 15006, 15000)
    assert (proxy.user, proxy.idle_timeout, proxy.connect_timeout) == ("meshd", 3600.0, 2.0)
    assert proxy.drain_timeout == 30.0
    assert proxy.engine == "epoll"
    assert proxy.close_denied is True
    assert config.redirect.enabled is True
    assert config.redirect.exclude_inbound_ports == config.redirect.exclude_uids == ()
    assert config.redirect.ipv6 == "redirect"
    assert config.redirect.check_interval == 10.0
    assert config.log.level == "info"


def test_empty_server_file_gives_documented_defaults() -> None:
    config = parse_server_config("")
    assert config == ServerConfig()
    assert config.server.listen == HostPort("0.0.0.0", 8555)
    assert str(config.server.listen) == "0.0.0.0:8555"
    assert config.server.advertise_address == ""  # wildcard: Consul uses the node address
    assert config.server.name == socket.gethostname()
    assert config.ca.dir == Path("/var/lib/meshd/ca")
    assert (config.ca.leaf_ttl, config.ca.max_leaf_ttl) == (86400.0, 259200.0)
    assert config.ca.csr_rate_per_minute == 60


def test_minimal_service_defaults() -> None:
    service = parse_service_config(WEB)
    assert (service.name, service.id, service.port) == ("web", "web", 8080)
    assert (service.address, service.protocol, service.tags) == ("", "tcp", ())
    assert dict(service.meta) == {}
    assert service.upstreams == ()
    assert service.checks == (CheckConfig(kind="tcp", interval=10.0, timeout=2.0),)


# --- valid values, one per key kind ---------------------------------------------------

AGENT_VALID = [
    ("[agent]\nnode_name = 'db-7.rack2'", "agent.node_name", "db-7.rack2"),
    ("[agent]\ndatacenter = 'eu-west_1'", "agent.datacenter", "eu-west_1"),
    ("[agent]\nstate_dir = '/srv/meshd'", "agent.state_dir", Path("/srv/meshd")),
    ("[consul]\naddress = 'https://consul:8501'", "consul.address", "https://consul:8501"),
    ("[consul]\naddress = '10.0.0.5:8500'", "consul.address", "http://10.0.0.5:8500"),
    ("[consul]\ntoken_file = '/t'", "consul.token_file", Path("/t")),
    ("[consul]\nkv_prefix = 'mesh/prod'", "consul.kv_prefix", "mesh/prod/"),
    ("[meshd]\naddresses = ['https://m:8501/']", "meshd.addresses", ("https://m:8501",)),
    ("[proxy]\nadmin_port = 65535", "proxy.admin_port", 65535),
    ("[proxy]\nuser = '998'", "proxy.user", "998"),
    ("[proxy]\nidle_timeout = '1h30m'", "proxy.idle_timeout", 5400.0),
    ("[proxy]\nconnect_timeout = '250ms'", "proxy.connect_timeout", 0.25),
    ("[proxy]\ndrain_timeout = '0s'", "proxy.drain_timeout", 0.0),
    ("[proxy]\nengine = 'epoll'", "proxy.engine", "epoll"),
    ("[proxy]\nengine = 'trio'", "proxy.engine", "trio"),
    ("[proxy]\nclose_denied = false", "proxy.close_denied", False),
    ("[proxy]\nworkers = 4", "proxy.workers", 4),
    ("[redirect]\nenabled = false", "redirect.enabled", False),
    ("[redirect]\nexclude_inbound_ports = [443, 22, 443]", "redirect.exclude_inbound_ports",
     (22, 443)),
    ("[redirect]\nexclude_uids = [1000, 0]", "redirect.exclude_uids", (0, 1000)),
    ("[redirect]\nexclude_outbound_cidrs = ['fd00::/8', '10.0.0.0/8', '1.2.3.4']",
     "redirect.exclude_outbound_cidrs",
     tuple(map(ipaddress.ip_network, ["1.2.3.4/32", "10.0.0.0/8", "fd00::/8"]))),
    ("[redirect]\nipv6 = 'refuse'", "redirect.ipv6", "refuse"),
    ("[redirect]\ncheck_interval = '1m'", "redirect.check_interval", 60.0),
    ("[log]\nlevel = 'debug'", "log.level", "debug"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "dotted", "expected"), AGENT_VALID)
def test_agent_valid_values(text: str, dotted: str, expected: object) -> None:
    assert attr(parse_agent_config(text), dotted) == expected


SERVER_VALID = [
    ("[server]\nlisten = '10.0.0.1:9000'", "server.listen", HostPort("10.0.0.1", 9000)),
    ("[server]\nlisten = '10.0.0.1:9000'", "server.advertise_address", "10.0.0.1"),
    ("[server]\nlisten = '[::]:8501'", "server.advertise_address", ""),
    ("[server]\nadvertise_address = 'meshd.internal'", "server.advertise_address",
     "meshd.internal"),
    ("[server]\nname = 'meshd-2'", "server.name", "meshd-2"),
    ("[ca]\nleaf_ttl = '1h'", "ca.leaf_ttl", 3600.0),
    ("[ca]\nleaf_ttl = '3d'\nmax_leaf_ttl = '720h'", "ca.max_leaf_ttl", 2592000.0),
    ("[ca]\ncsr_rate_per_minute = 600", "ca.csr_rate_per_minute", 600),
    ("[consul]\nca_file = '/ca.pem'", "consul.ca_file", Path("/ca.pem")),
    ("[log]\nlevel = 'error'", "log.level", "error"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "dotted", "expected"), SERVER_VALID)
def test_server_valid_values(text: str, dotted: str, expected: object) -> None:
    assert attr(parse_server_config(text), dotted) == expected


def test_service_with_every_key() -> None:
    service = parse_service_config(
        WEB + "id = 'web-2'\naddress = '10.1.2.3'\nprotocol = 'http'\ntags = ['a', 'b']\n"
        "upstreams = ['api']\nmeta = { version = '1' }\nuser = 'web'\n"
        "[[service.checks]]\nkind = 'http'\npath = '/healthz?full=1'\ninterval = '5s'\n"
        "deregister_after = '1m'\n[[service.checks]]\nkind = 'ttl'\nttl = '30s'\n"
    )
    assert (service.id, service.address, service.protocol) == ("web-2", "10.1.2.3", "http")
    assert service.user == "web"
    assert (service.tags, service.upstreams, dict(service.meta)) == (
        ("a", "b"),
        ("api",),
        {"version": "1"},
    )
    assert service.checks == (
        CheckConfig(kind="http", path="/healthz?full=1", interval=5.0, deregister_after=60.0),
        CheckConfig(kind="ttl", ttl=30.0),
    )
    hash(service)  # usable as a dict key / in sets despite the meta mapping


# --- errors: wrong type, out of range, unknown key ------------------------------------

AGENT_ERRORS = [
    ("[proxy]\noutbound_port = 'abc'",
     "proxy.outbound_port: expected an integer 1-65535, got 'abc'"),
    ("[proxy]\noutbound_port = 0", "proxy.outbound_port: expected an integer 1-65535, got 0"),
    ("[proxy]\ninbound_port = 65536", "proxy.inbound_port: expected an integer 1-65535"),
    ("[proxy]\nadmin_port = true", "proxy.admin_port: expected an integer 1-65535, got true"),
    ("[proxy]\nadmin_port = 15001", "proxy.admin_port: same port as proxy.outbound_port"),
    ("[proxy]\nusr = 1", "proxy.usr: unknown key (did you mean 'user'?)"),
    ("[proxy]\noutbound = 1", "proxy.outbound: unknown key (did you mean 'outbound_port'?)"),
    ("[proxy]\nidle_timeout = 10", "proxy.idle_timeout: expected a duration with a unit"),
    ("[proxy]\nidle_timeout = '10'", "(add a unit)"),
    ("[proxy]\nidle_timeout = '500ms'", "proxy.idle_timeout: expected at least 1s"),
    ("[proxy]\nconnect_timeout = '2m'", "expected at least 10ms and at most 1m, got '2m'"),
    ("[proxy]\nuser = ''", "proxy.user: expected a user name or numeric uid"),
    ("[proxy]\nengine = 'uring'", "proxy.engine: expected one of 'trio', 'epoll', got 'uring'"),
    ("[proxy]\nworkers = 0", "proxy.workers: expected an integer 1-64, got 0"),
    ("[proxy]\nworkers = 'auto'", "proxy.workers: expected an integer 1-64, got 'auto'"),
    ("[agent]\nnode_name = 'a b'", "agent.node_name: expected a node name"),
    ("[agent]\ndatacenter = 'DC1'", "agent.datacenter: expected a datacenter name"),
    ("[agent]\nstate_dir = 5", "agent.state_dir: expected a path, got 5"),
    ("[agent]\nnodename = 'x'", "agent.nodename: unknown key (did you mean 'node_name'?)"),
    ("[consul]\naddress = 'ftp://x'", "consul.address: expected a URL like 'http://host"),
    ("[consul]\naddress = 'http://x:8500/v1'", "consul.address: expected a URL"),
    ("[consul]\ntoken = 'secret'", "consul.token: unknown key (did you mean 'token_file'?)"),
    ("[consul]\nkv_prefix = '/abs'", "consul.kv_prefix: expected a KV folder"),
    ("[meshd]\naddresses = 'https://m:1'", "meshd.addresses: expected an array, got"),
    ("[meshd]\naddresses = ['https://m']", "meshd.addresses[0]: expected a URL like"),
    ("[meshd]\naddresses = ['https://m:1', 'https://m:1']",
     "meshd.addresses[1]: duplicate address 'https://m:1'"),
    ("[meshd]\naddress = []", "meshd.address: unknown key (did you mean 'addresses'?)"),
    ("[redirect]\nenabled = 'yes'", "redirect.enabled: expected true or false, got 'yes'"),
    ("[redirect]\ncheck_interval = '0s'",
     "redirect.check_interval: expected at least 1s and at most 1h, got '0s'"),
    ("[redirect]\nexclude_outbound_ports = [22, 0]",
     "redirect.exclude_outbound_ports[1]: expected an integer 1-65535, got 0"),
    ("[redirect]\nexclude_uids = [-1]", "redirect.exclude_uids[0]: expected an integer 0-"),
    ("[redirect]\nexclude_outbound_cidrs = ['10.0.0.1/8']",
     "redirect.exclude_outbound_cidrs[0]: host bits set in '10.0.0.1/8' "
     "(did you mean '10.0.0.0/8'?)"),
    ("[redirect]\nexclude_outbound_cidrs = ['nope']",
     "redirect.exclude_outbound_cidrs[0]: expected a CIDR like '10.0.0.0/8', got 'nope'"),
    ("[redirect]\nipv6 = 'bypass'",
     "redirect.ipv6: expected one of 'redirect', 'refuse', got 'bypass'"),
    ("[log]\nlevel = 'warn'",
     "log.level: expected one of 'debug', 'info', 'warning', 'error', got 'warn'"),
    ("[log]\nlevel = 3", "log.level: expected one of"),
    ("proxy = 5", "proxy: expected a table, got 5"),
    ("[proxi]", "proxi: unknown key (did you mean 'proxy'?)"),
    ("zzz = 1", "zzz: unknown key (known keys: agent, consul, log, meshd, proxy, redirect)"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), AGENT_ERRORS)
def test_agent_errors_name_file_key_and_problem(text: str, expected: str) -> None:
    message = error_of(parse_agent_config, text)
    assert message.startswith("agent.toml: ")
    assert expected in message


def test_error_message_is_exact() -> None:
    with pytest.raises(ConfigError) as info:
        parse_agent_config("[proxy]\noutbound_port = 'abc'\n")
    assert (
        str(info.value) == "agent.toml: proxy.outbound_port: expected an integer 1-65535, got 'abc'"
    )
    assert isinstance(info.value, MeshdError)
    assert (info.value.file, info.value.key) == ("agent.toml", "proxy.outbound_port")


SERVER_ERRORS = [
    ("[server]\nlisten = '8501'", "server.listen: expected 'host:port'"),
    ("[server]\nlisten = 'host:99999'", "server.listen: expected 'host:port'"),
    ("[server]\nadvertise_address = '0.0.0.0'", "server.advertise_address: cannot advertise"),
    ("[server]\nadvertise_address = 'bad host'", "expected an IP address or host name"),
    ("[ca]\nleaf_ttl = '30m'", "ca.leaf_ttl: expected at least 1h and at most 720h, got '30m'"),
    ("[ca]\nmax_leaf_ttl = '1000h'", "ca.max_leaf_ttl: expected at least 1h and at most 720h"),
    ("[ca]\nleaf_ttl = '96h'", "ca.leaf_ttl: '96h' exceeds ca.max_leaf_ttl ('72h')"),
    ("[ca]\ncsr_rate_per_minute = 0", "ca.csr_rate_per_minute: expected an integer 1-100000"),
    ("[ca]\nleaf = '1h'", "ca.leaf: unknown key (did you mean 'leaf_ttl'?)"),
    ("[servr]", "servr: unknown key (did you mean 'server'?)"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), SERVER_ERRORS)
def test_server_errors(text: str, expected: str) -> None:
    message = error_of(parse_server_config, text)
    assert message.startswith("meshd.toml: ")
    assert expected in message


def test_kv_prefix_with_a_dot_or_dot_dot_segment_is_refused_at_load() -> None:
    """Consul's HTTP router would redirect or misread a key under such a folder, so it
    used to fail only at run time (a ValueError from the Consul client). Dots inside a
    segment are fine."""
    for prefix in ("./x", "x/.", "a/../b", "a/./b/", "..", "../", "meshd/.."):
        for parse in (parse_server_config, parse_agent_config):
            message = error_of(parse, f"[consul]\nkv_prefix = '{prefix}'")
            assert "consul.kv_prefix: expected a KV folder like 'meshd/'" in message, message
            assert "no empty, '.' or '..' segment" in message and repr(prefix) in message
    for prefix, folder in ((".meshd", ".meshd/"), ("a/..b/c.", "a/..b/c./"), ("...", ".../")):
        assert parse_server_config(f"[consul]\nkv_prefix = '{prefix}'").consul.kv_prefix == folder


@given(st.text(alphabet="a./_-", max_size=12))
def test_every_kv_prefix_the_config_accepts_is_a_folder_consul_keys_can_live_under(
    prefix: str,
) -> None:
    try:
        folder = parse_server_config(f"[consul]\nkv_prefix = '{prefix}'").consul.kv_prefix
    except ConfigError:
        return
    assert kv_folder(prefix) == folder
    check_key(f"{folder}ca/bundle")


CHECK = "[[service.checks]]\n"
SERVICE_ERRORS = [
    ("", "service: required table is missing"),
    ("[service]\nport = 1", "service.name: required key is missing"),
    ('[service]\nname = "web"', "service.port: required key is missing"),
    (WEB + "prot = 1", "service.prot: unknown key (did you mean 'port'?)"),
    ("[service]\nname = 'Web'\nport = 1", "service.name: expected a service name"),
    ("[service]\nname = '-web'\nport = 1", "service.name: expected a service name"),
    ("[service]\nname = '" + "a" * 64 + "'\nport = 1", "service.name: expected a service"),
    (WEB.replace("8080", "'8080'"), "service.port: expected an integer 1-65535, got '8080'"),
    (WEB + "id = 'a/b'", "service.id: expected a service id"),
    (WEB + "address = 'not an address'", "service.address: expected an IP address or host"),
    (WEB + "protocol = 'grpc'", "service.protocol: expected one of 'tcp', 'http', got 'grpc'"),
    (WEB + "tags = 'a'", "service.tags: expected an array, got 'a'"),
    (WEB + "tags = ['a', 1]", "service.tags[1]: expected a tag"),
    (WEB + "meta = ['a']", "service.meta: expected a table of strings, got an array"),
    (WEB + "meta = { v = 1 }", "service.meta.v: expected a string of at most 512"),
    (WEB + "meta = { consul-x = 'a' }", "service.meta.consul-x: expected a meta key"),
    (WEB + "upstreams = ['API']", "service.upstreams[0]: expected a service name"),
    (WEB + "upstreams = ['a', 'a']", "service.upstreams[1]: duplicate upstream 'a'"),
    (WEB + "user = 'a b'", "service.user: expected a user name or numeric uid"),
    (WEB + "user = 1001", "service.user: expected a user name or numeric uid"),
    (WEB + "checks = 1", "service.checks: expected an array of tables, got 1"),
    (WEB + CHECK + "path = '/'", "service.checks[0].kind: required key is missing"),
    (WEB + CHECK + "kind = 'grpc'", "service.checks[0].kind: expected one of 'http', 'tcp'"),
    (WEB + CHECK + "kind = 'http'", "service.checks[0].path: required key is missing"),
    (WEB + CHECK + "kind = 'http'\npath = 'healthz'",
     "service.checks[0].path: expected a path starting with '/'"),
    (WEB + CHECK + "kind = 'tcp'\npath = '/'",
     "service.checks[0].path: not allowed on a tcp check (only on http)"),
    (WEB + CHECK + "kind = 'ttl'", "service.checks[0].ttl: required key is missing"),
    (WEB + CHECK + "kind = 'ttl'\nttl = '5s'\ninterval = '5s'",
     "service.checks[0].interval: not allowed on a ttl check"),
    (WEB + CHECK + "kind = 'tcp'\nttl = '5s'", "service.checks[0].ttl: not allowed on a tcp"),
    (WEB + CHECK + "kind = 'tcp'\ninterval = '500ms'", "checks[0].interval: expected at least 1s"),
    (WEB + CHECK + "kind = 'tcp'\nderegister_after = '30s'",
     "service.checks[0].deregister_after: expected at least 1m"),
    (WEB + CHECK + "kind = 'tcp'\n" + CHECK + "kind = 'tcp'\ntimeout = 2",
     "service.checks[1].timeout: expected a duration"),
    (WEB + CHECK + "kind = 'tcp'\nkindd = 1",
     "service.checks[0].kindd: unknown key (did you mean 'kind'?)"),
    ("[agent]\n" + WEB, "agent: unknown key"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), SERVICE_ERRORS)
def test_service_errors(text: str, expected: str) -> None:
    message = error_of(parse_service_config, text)
    assert message.startswith("service.toml: ")
    assert expected in message


# --- files: TOML syntax, missing, unreadable, relative paths ---------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[proxy\n", "agent.toml: line 1: invalid TOML: "),
        ("[log]\nlevel = 'info'\nlevel = 'debug'\n", "agent.toml: line 3: invalid TOML: "),
        ("[proxy]\noutbound_port = \n", "agent.toml: line 2: invalid TOML: Invalid value"),
    ],
)
def test_toml_syntax_errors_name_the_line(text: str, expected: str) -> None:
    assert error_of(parse_agent_config, text).startswith(expected)


def test_file_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "agent.toml"
    with pytest.raises(ConfigError, match=f"^{missing}: file not found$"):
        load_agent_config(missing)
    with pytest.raises(ConfigError, match=f"^{tmp_path}: is a directory"):
        load_server_config(tmp_path)
    missing.write_bytes(b"[log]\nlevel = '\xff'\n")
    with pytest.raises(ConfigError, match=f"^{missing}: line 2: invalid TOML: not UTF-8"):
        load_agent_config(missing)
    assert load_agent_config(tmp_path / "nope.toml", missing_ok=True) == AgentConfig()
    assert load_server_config(tmp_path / "nope.toml", missing_ok=True) == ServerConfig()


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text("[agent]\nservices_dir = 'services.d'\n")
    config = load_agent_config(tmp_path / "agent.toml")
    assert config.agent.services_dir == tmp_path / "services.d"


def test_tokens_are_never_read_into_config(tmp_path: Path) -> None:
    (tmp_path / "consul.token").write_text("s3cr3t-token")
    (tmp_path / "agent.toml").write_text("[consul]\ntoken_file = 'consul.token'\n")
    config = load_agent_config(tmp_path / "agent.toml")
    assert config.consul.token_file == tmp_path / "consul.token"
    assert "s3cr3t" not in repr(config)


# --- services.d -----------------------------------------------------------------------


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_service_dir_sorted_by_id_ignoring_other_files(tmp_path: Path) -> None:
    write(tmp_path, "z.toml", WEB.replace("web", "api"))
    write(tmp_path, "a.toml", WEB)
    write(tmp_path, "b.toml", WEB + "id = 'web-2'\n")
    write(tmp_path, "README.md", "not toml [")
    write(tmp_path, "old.toml.bak", "not toml [")
    write(tmp_path, ".a.toml", "not toml [")  # editor leftovers are dot-files
    (tmp_path / "sub.toml").mkdir()
    services = load_service_dir(tmp_path)
    assert [s.id for s in services] == ["api", "web", "web-2"]
    assert services[0].source == tmp_path / "z.toml"


def test_service_dir_duplicate_id_names_both_files(tmp_path: Path) -> None:
    first = write(tmp_path, "a.toml", WEB)
    second = write(tmp_path, "b.toml", WEB.replace("8080", "9090"))
    with pytest.raises(ConfigError) as info:
        load_service_dir(tmp_path)
    assert str(info.value) == (
        f"{second}: service.id: duplicate service id 'web', also declared in {first}"
    )


def test_service_dir_invalid_file_is_named(tmp_path: Path) -> None:
    bad = write(tmp_path, "web.toml", WEB + "prot = 1\n")
    with pytest.raises(ConfigError) as info:
        load_service_dir(tmp_path)
    assert str(info.value) == f"{bad}: service.prot: unknown key (did you mean 'port'?)"
    assert load_service_file(write(tmp_path, "x.toml", WEB)).source == tmp_path / "x.toml"


def test_service_dir_missing(tmp_path: Path) -> None:
    assert load_service_dir(tmp_path / "nope", missing_ok=True) == ()
    with pytest.raises(ConfigError, match="nope: directory not found$"):
        load_service_dir(tmp_path / "nope")
    with pytest.raises(ConfigError, match="f.toml: not a directory$"):
        load_service_dir(write(tmp_path, "f.toml", WEB))


# --- durations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("10s", 10.0), ("5m", 300.0), ("24h", 86400.0), ("1d", 86400.0),
     ("1h30m", 5400.0), ("1.5s", 1.5), ("0s", 0.0), ("2m0.25s", 120.25), ("1m5ms", 60.005)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10", "0", "", "10 s", "-1s", "+1s", "1S", "s", "1.s", "1w"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration with a unit like '500ms'"):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**10))
def test_duration_round_trip(millis: int) -> None:
    seconds = millis / 1000
    text = format_duration(seconds)
    assert parse_duration(text) == seconds
    assert format_duration(parse_duration(text)) == text


@given(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["ms", "s", "m", "h"])),
                min_size=1, max_size=4))  # fmt: skip
def test_duration_parts_add_up(parts: list[tuple[int, str]]) -> None:
    scale = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
    text = "".join(f"{n}{unit}" for n, unit in parts)
    assert parse_duration(text) == sum(n * scale[unit] for n, unit in parts) / 1000


# --- documented examples --------------------------------------------------------------


def test_examples_parse_and_differ_from_defaults() -> None:
    agent = load_agent_config(EXAMPLES / "agent.toml")
    assert agent.meshd.addresses and agent.redirect.ipv6 == "refuse"
    services = load_service_dir(EXAMPLES / "services.d")
    assert [s.name for s in services] == ["web"]
    assert services[0].protocol == "http" and len(services[0].checks) == 2
    server = load_server_config(EXAMPLES / "meshd.toml")
    assert server.consul.ca_file is not None and server.server.name == "meshd-1"


SECTIONS = [
    ("agent", NodeConfig), ("consul", ConsulConfig), ("meshd", ControlPlaneConfig),
    ("proxy", ProxyConfig), ("redirect", RedirectConfig), ("log", LogConfig),
    ("server", ServerSection), ("ca", CAConfig), ("service", ServiceConfig),
    ("service.checks", CheckConfig),
]  # fmt: skip


def test_docs_mention_every_section_and_key() -> None:
    doc = (EXAMPLES.parent / "configuration.md").read_text()
    for section, cls in SECTIONS:
        assert f"[{section}]" in doc, section
        for field in dataclasses.fields(cls):
            if field.name != "source":
                assert f"`{field.name}`" in doc, f"{section}.{field.name}"
