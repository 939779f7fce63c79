"""The operator-facing commands: ``meshctl token`` and ``meshd serve`` (a real process)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from click.testing import CliRunner

from cli.ca import ca as ca_cli
from cli.token import token_cli
from meshd.bootstrap import TokenRecord, parse_token, token_key
from meshd.consul.client import open_consul

pytestmark = pytest.mark.consul
TD = "33333333-4444-5555-6666-777777777777.consul"


def _invoke(group, env, *args: str) -> str:
    result = CliRunner().invoke(group, list(args), env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


async def test_token_create_list_revoke(consul_agent, consul_settings, consul_kv_prefix,
                                        tmp_path: Path) -> None:  # fmt: skip
    env = consul_agent.env()
    prefix = ("--kv-prefix", consul_kv_prefix)
    out = tmp_path / "web-1.token"
    old_umask = os.umask(0)  # the file must be 0600 by construction, not by umask
    try:
        await trio.to_thread.run_sync(
            lambda: _invoke(token_cli, env, "create", "--host", "web-1", "--service", "web",
                            "--service", "api", "--ttl", "30m", "--output", str(out), *prefix)
        )  # fmt: skip
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    token = parse_token(out.read_text())
    async with open_consul(consul_settings) as consul:
        _, entry = await consul.kv_get(token_key(token.token_id, consul_kv_prefix))
        assert entry is not None and token.secret.encode() not in entry.value
        record = TokenRecord.from_json(entry.value)
        assert record.services == {"web", "api"} and record.host == "web-1"
        assert 1790 <= record.expires - record.created <= 1800
    listed = await trio.to_thread.run_sync(
        lambda: _invoke(token_cli, env, "list", "--format", "json", *prefix)
    )
    (row,) = json.loads(listed)
    assert row["id"] == token.token_id and row["state"] == "valid"
    assert token.secret not in listed
    await trio.to_thread.run_sync(
        lambda: _invoke(token_cli, env, "revoke", token.token_id, *prefix)
    )
    listed = await trio.to_thread.run_sync(lambda: _invoke(token_cli, env, "list", *prefix))
    assert "revoked" in listed and token.secret not in listed
    # Printed once to stdout when no --output is given; refused to overwrite a file.
    printed = await trio.to_thread.run_sync(
        lambda: _invoke(token_cli, env, "create", "--host", "h", "--service", "web", *prefix)
    )
    assert parse_token(printed.strip().splitlines()[0]).token_id != token.token_id
    again = CliRunner().invoke(token_cli, ["create", "--host", "h", "--service", "web",
                                           "--output", str(out), *prefix], env=env)  # fmt: skip
    assert again.exit_code != 0 and out.read_text().strip() == token.reveal()


def _meshctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``meshctl`` as operators run it (its console entry point), in a process of its own."""
    cmd = [sys.executable, "-c", "from cli.main import main; main()", *args]
    return subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


TTL_BOUND = "Invalid value for '--ttl': token TTL must be at most 7 days"
BAD_FOLDER = "KV prefix 'a//b': expected a KV folder like 'meshd/'"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("token", "create", "--ttl", "5x"), "Invalid value for '--ttl': expected a duration"),
        (("token", "create", "--ttl", "8d"), TTL_BOUND),
        (("token", "create", "--ttl", "9" * 400 + "d"), TTL_BOUND),
        (("token", "create", "--ttl", "0s"), "Invalid value for '--ttl': token TTL must be more"),
        (("token", "create", "--kv-prefix", "a//b"), f"for '--kv-prefix': {BAD_FOLDER}"),
        (("token", "list", "--kv-prefix", "meshd/../x"), "Invalid value for '--kv-prefix'"),
        (("token", "create", "--service", "meshd"), "meshctl: error: service 'meshd' is reserved"),
        (("intention", "list", "--prefix", "a//b"), f"for '--prefix': {BAD_FOLDER}"),
        (("status", "--prefix", "./x"), "Invalid value for '--prefix'"),
    ],
)  # fmt: skip
def test_bad_token_and_prefix_arguments_are_one_line_errors(
    consul_agent, consul_kv_prefix, args: tuple[str, ...], error: str
) -> None:
    """A usage error names the option and why, on one line, with no traceback, and
    nothing is written (a huge TTL used to store "expires": Infinity, a token that never
    expires, in a document that is not JSON)."""
    if args[:2] == ("token", "create"):
        args = (*args, "--host", "h1", "--service", "web")
        if "--kv-prefix" not in args:
            args = (*args, "--kv-prefix", consul_kv_prefix)
    done = _meshctl(consul_agent.env(), *args)
    assert done.returncode in (1, 2), done
    assert "Traceback" not in done.stderr and error in done.stderr, done.stderr
    assert done.stdout == ""
    assert len([line for line in done.stderr.splitlines() if "rror" in line]) == 1, done.stderr
    written = httpx.get(f"{consul_agent.http_address}/v1/kv/{consul_kv_prefix}?keys=true",
                        headers={"X-Consul-Token": consul_agent.token})  # fmt: skip
    assert written.status_code == 404  # no key under the test's folder


async def test_token_ttl_and_kv_prefix_at_their_limits(consul_agent, consul_settings,
                                                       consul_kv_prefix) -> None:  # fmt: skip
    """A week is the longest token; a prefix given with a leading '/', as the consul CLI
    allows, names the same folder."""
    done = await trio.to_thread.run_sync(
        lambda: _meshctl(consul_agent.env(), "token", "create", "--host", "h1", "--service",
                         "web", "--ttl", "7d", "--kv-prefix", "/" + consul_kv_prefix)
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    token = parse_token(done.stdout)
    async with open_consul(consul_settings) as consul:
        _, entry = await consul.kv_get(token_key(token.token_id, consul_kv_prefix))
    assert entry is not None
    record = TokenRecord.from_json(entry.value)
    assert record.expires - record.created == pytest.approx(7 * 86400)
    json.loads(entry.value, parse_constant=lambda name: pytest.fail(f"{name} in {entry.value!r}"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _idle_connections(source: str, port: int, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        held.append(sock)
    return held


def _closed_at_once(held: list[socket.socket]) -> int:
    """How many of *held* the server closed within a second (and close them all)."""
    closed = 0
    for sock in held:
        sock.settimeout(1)
        try:
            closed += sock.recv(1) == b""
        except ConnectionResetError:
            closed += 1
        except TimeoutError:
            pass  # held open, waiting for our TLS handshake
        finally:
            sock.close()
    return closed


def test_meshd_serve_process_notifies_systemd_and_answers(
    consul_agent, consul_kv_prefix, tmp_path: Path
) -> None:
    env = {**os.environ, **consul_agent.env()}
    ca_dir = tmp_path / "ca"
    _invoke(ca_cli, consul_agent.env(), "init", "--dir", str(ca_dir), "--trust-domain", TD,
            "--kv-prefix", consul_kv_prefix)  # fmt: skip
    token_file = tmp_path / "consul.token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # secrets are 0600
    os.write(fd, consul_agent.token.encode())
    os.close(fd)
    port = _free_port()
    config = tmp_path / "meshd.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nname = "clitest"\n'
        "max_connections_per_source = 2\n"
        f'[ca]\ndir = "{ca_dir}"\n'
        f'[consul]\naddress = "{consul_agent.http_address}"\ntoken_file = "{token_file}"\n'
        f'kv_prefix = "{consul_kv_prefix}"\n'
    )
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(20)
        env.pop("CONSUL_HTTP_TOKEN")  # meshd must use its token_file, not the environment
        env["NOTIFY_SOCKET"] = str(notify_path)
        cmd = [sys.executable, "-c", "from meshd.server.main import main; main()",
               "serve", "--config", str(config)]  # fmt: skip
        process = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
        try:
            assert notify.recv(64) == b"READY=1"
            ca_pem = (ca_dir / "root-ca.pem").read_bytes().decode()
            ctx = ssl.create_default_context(cadata=ca_pem)
            ctx.check_hostname = False
            answer = httpx.get(f"https://127.0.0.1:{port}/v1/health", verify=ctx, trust_env=False)
            assert answer.json() == {"status": "ok"}
            # [server] max_connections_per_source: of five idle connections from one
            # address two are held, three closed at once; another address is served.
            assert _closed_at_once(_idle_connections("127.0.0.2", port, 5)) == 3
            answer = httpx.get(f"https://127.0.0.1:{port}/v1/health", verify=ctx, trust_env=False)
            assert answer.json() == {"status": "ok"}
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:  # registered in Consul, with its TCP check
                health = httpx.get(f"{consul_agent.http_address}/v1/health/service/meshd",
                                   headers={"X-Consul-Token": consul_agent.token})  # fmt: skip
                if any(e["Service"]["ID"] == "meshd-clitest" for e in health.json()):
                    break
                time.sleep(0.2)
            else:
                pytest.fail("meshd did not register itself in Consul")
        finally:
            process.terminate()
            _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    health = httpx.get(f"{consul_agent.http_address}/v1/agent/services",
                       headers={"X-Consul-Token": consul_agent.token})  # fmt: skip
    assert "meshd-clitest" not in health.json()  # deregistered on SIGTERM
    assert consul_agent.token.encode() not in stderr
    assert b"BEGIN" not in stderr


def _serve_once(
    consul_agent, tmp_path: Path, name: str, ca_dir: Path, kv_prefix: str
) -> subprocess.CompletedProcess[str]:
    """Run ``meshd serve`` (a real process) with a minimal meshd.toml until it exits."""
    config = tmp_path / "meshd.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{_free_port()}"\nname = "{name}"\n'
        f'[ca]\ndir = "{ca_dir}"\n'
        f'[consul]\naddress = "{consul_agent.http_address}"\nkv_prefix = "{kv_prefix}"\n'
    )
    cmd = [sys.executable, "-c", "from meshd.server.main import main; main()",
           "serve", "--config", str(config)]  # fmt: skip
    return subprocess.run(cmd, env={**os.environ, **consul_agent.env()}, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


def test_meshd_serve_without_a_trust_bundle_says_so_in_one_line(
    consul_agent, consul_kv_prefix, tmp_path: Path
) -> None:
    """A start-up error raised inside meshd's nursery (trio wraps it in an exception group)
    is printed like any other: one line, exit 1, no traceback."""
    ca_dir = tmp_path / "ca"
    _invoke(ca_cli, consul_agent.env(), "init", "--dir", str(ca_dir), "--trust-domain", TD,
            "--kv-prefix", consul_kv_prefix)  # fmt: skip
    empty_prefix = consul_kv_prefix.rstrip("/") + "-empty/"
    done = _serve_once(consul_agent, tmp_path, "nobundle", ca_dir, empty_prefix)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("meshd: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "no trust bundle" in done.stderr and "meshctl ca init" in done.stderr


def test_meshd_serve_refuses_a_ca_directory_the_bundle_does_not_trust(
    consul_agent, consul_kv_prefix, tmp_path: Path
) -> None:
    """A CA directory from another `meshctl ca init` (same trust domain: a `--force` whose
    write to Consul was lost) would start and sign leaves no peer can verify. meshd
    refuses to start, naming the directory and the bundle, in one line."""
    published, other = tmp_path / "published", tmp_path / "other"
    _invoke(ca_cli, consul_agent.env(), "init", "--dir", str(published), "--trust-domain", TD,
            "--kv-prefix", consul_kv_prefix)  # fmt: skip
    lost = consul_kv_prefix.rstrip("/") + "-lost/"  # where the second init's bundle went
    _invoke(ca_cli, consul_agent.env(), "init", "--dir", str(other), "--trust-domain", TD,
            "--kv-prefix", lost)  # fmt: skip
    done = _serve_once(consul_agent, tmp_path, "mismatch", other, consul_kv_prefix)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("meshd: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert str(other) in done.stderr and f"{consul_kv_prefix}ca/bundle" in done.stderr
    assert "does not chain to a root" in done.stderr
    # Nothing was published for the server: it never got as far as its leaf lifetime.
    key = f"{consul_kv_prefix}ca/leaf-ttl/mismatch"
    leaf_ttl = httpx.get(f"{consul_agent.http_address}/v1/kv/{key}",
                         headers={"X-Consul-Token": consul_agent.token})  # fmt: skip
    assert leaf_ttl.status_code == 404


@pytest.mark.parametrize("prefix", ["a//b", "./x", "meshd/../x"])
@pytest.mark.parametrize("command", ["init", "roots", "rotate"])
def test_meshctl_ca_bad_kv_prefix_is_a_one_line_usage_error(
    consul_agent, tmp_path: Path, command: str, prefix: str
) -> None:
    """`meshctl ca` has its own --kv-prefix; a folder no Consul key can live under used to
    end in a ValueError traceback (after `init` had created the CA directory)."""
    ca_dir = tmp_path / "ca"
    args = ("ca", command, "--kv-prefix", prefix)
    done = _meshctl(
        consul_agent.env(), *args, *(() if command == "roots" else ("--dir", str(ca_dir)))
    )
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert f"Invalid value for '--kv-prefix': KV prefix {prefix!r}" in done.stderr, done.stderr
    assert len([line for line in done.stderr.splitlines() if "rror" in line]) == 1, done.stderr
    assert not ca_dir.exists()
