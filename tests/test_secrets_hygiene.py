"""Issue 3 / SECURITY-TESTS C: no key or token in logs, repr, argv, environment or metrics.

One lab (module-scoped): ``meshctl ca init``, ``meshd serve`` and ``meshd-agent run`` on a
namespace host, started the way an operator starts them, with a Consul ACL token given as a
0600 file (``[consul] token_file``, ``CONSUL_HTTP_TOKEN_FILE`` for meshctl) and the host's
bootstrap token written by ``meshctl token create --output``. The agent runs with
``iptables-*`` wrappers first in its ``PATH`` that record the environment and argv each
child process receives, then exec the real tool.

Then every place a secret could escape is searched for every secret: the Consul token, the
bootstrap token (whole, and its secret part), and each private key file's PEM body (CA
root, signing CA, the agent's service key), plus any ``PRIVATE KEY`` armour at all.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import ssl
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from agent import redirect
from agent.tlscontexts import CertifiedKey
from cli.token import list_tokens
from meshd import cadir
from meshd.bootstrap import parse_token
from meshd.config import load_agent_config, load_server_config
from meshd.consul import ConsulSettings, open_consul
from meshd.keyfile import read_secret
from meshd.server.ca import SigningAuthority
from meshlab.mesh import BIN, MESHD_PORT, TRUST_DOMAIN, Mesh, MeshHost, ServiceSpec
from meshlab.netns import LabUnavailable, open_lab

pytestmark = [pytest.mark.netns, pytest.mark.consul]

WEB_PORT = 8080
CHILD_TOOLS = ("iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore")


class HygieneMesh(Mesh):
    """The lab mesh, with a Consul ACL token file for every component, and outputs kept."""

    def __init__(self, lab, consul_token_file: Path) -> None:  # type: ignore[no-untyped-def]
        super().__init__(lab)
        self.consul_token_file = consul_token_file
        self.outputs: list[tuple[tuple[str, ...], str]] = []

    def consul_env(self) -> dict[str, str]:
        env = super().consul_env()
        env["CONSUL_HTTP_TOKEN_FILE"] = str(self.consul_token_file)
        return env

    def meshctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = super().meshctl(*args, check=check)
        self.outputs.append((args, res.stdout + res.stderr))
        return res

    def start_control_plane(self) -> None:
        ca_dir = self.workdir / "ca"
        self.meshctl("ca", "init", "--dir", str(ca_dir), "--trust-domain", TRUST_DOMAIN)
        config = self.workdir / "meshd.toml"
        config.write_text(
            f'[server]\nlisten = "0.0.0.0:{MESHD_PORT}"\n'
            f'advertise_address = "{self.lab.server_address}"\nname = "meshd-1"\n'
            f'[ca]\ndir = "{ca_dir}"\nleaf_ttl = "24h"\n'
            '[consul]\naddress = "http://127.0.0.1:8500"\n'
            f'token_file = "{self.consul_token_file}"\n'
            '[log]\nlevel = "debug"\n'
        )
        assert self.lab.server is not None
        self.meshd = self.lab.server.spawn(
            "meshd", [str(BIN / "meshd"), "serve", "--config", str(config)], env=_clean_env()
        )
        self.wait_passing("meshd", 1, timeout_s=30)

    def _write_agent_files(self, mh: MeshHost, proxy: Mapping[str, str | int]) -> None:
        super()._write_agent_files(mh, proxy)
        toml = mh.dir / "agent.toml"
        text = toml.read_text()
        consul = '[consul]\naddress = "http://127.0.0.1:8500"\n'
        assert consul in text
        text = text.replace(consul, f'{consul}token_file = "{self.consul_token_file}"\n')
        toml.write_text(text.replace('[log]\nlevel = "info"', '[log]\nlevel = "debug"'))


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}


def write_tool_wrappers(wrap_dir: Path, record_dir: Path) -> None:
    """Shell wrappers that record each child's environment and argv, then exec the tool."""
    wrap_dir.mkdir()
    record_dir.mkdir()
    for tool in CHILD_TOOLS:
        real = shutil.which(tool)
        assert real is not None, f"{tool} not installed"
        script = wrap_dir / tool
        script.write_text(
            "#!/bin/sh\n"
            f'cat /proc/$$/environ > "{record_dir}/{tool}.$$.environ"\n'
            f'cat /proc/$$/cmdline > "{record_dir}/{tool}.$$.cmdline"\n'
            f'exec "{real}" "$@"\n'
        )
        script.chmod(0o755)


@dataclass
class HygieneLab:
    """The running lab and every secret it holds."""

    mesh: HygieneMesh
    consul_token: str
    bootstrap_token: str
    key_files: list[Path]
    record_dir: Path
    secrets: dict[str, bytes] = field(default_factory=dict)
    refusals: dict[str, tuple[int, bytes]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HygieneLab]:
    work = tmp_path_factory.mktemp("hygiene")
    consul_token = str(uuid.uuid4())  # the lab's Consul has no ACLs: it is sent, ignored
    token_file = work / "consul.token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(consul_token + "\n")
    wrap_dir, record_dir = work / "wrap", work / "children"
    write_tool_wrappers(wrap_dir, record_dir)
    try:
        with open_lab("hyg", ("web",)) as netlab:
            mesh = HygieneMesh(netlab, token_file)
            mesh.start_control_plane()
            mh = mesh.add_host("web", [ServiceSpec("web", WEB_PORT)])
            bootstrap = (mh.dir / "bootstrap.token").read_text().strip()
            mesh.meshctl("token", "list")
            mesh.meshctl("token", "list", "--format", "json")
            mesh.meshctl("ca", "roots", "--format", "json")
            mesh.start_app("web", WEB_PORT)
            mesh.start_agent("web", path_first=[wrap_dir])
            mesh.wait_passing("web", 1)
            wait_for_certificate(mesh, "web")
            # Refusals are where secrets slip into logs: a wrong secret for a real token id,
            # and the real token replayed after it was used.
            wrong = f"mtk_{parse_token(bootstrap).token_id}.{secrets.token_urlsafe(32)}"
            refusals = {
                "wrong secret": sign_with_token(netlab.server_address, wrong),
                "replay": sign_with_token(netlab.server_address, bootstrap),
            }
            key_files = sorted((mesh.workdir / "ca").glob("*.key")) + sorted(
                (mh.dir / "state" / "certs").glob("*.key")
            )
            result = HygieneLab(mesh, consul_token, bootstrap, key_files, record_dir)
            result.refusals = refusals
            result.secrets = collect_secrets(result)
            result.secrets["presented wrong secret"] = parse_token(wrong).secret.encode()
            yield result
    except LabUnavailable as exc:
        pytest.fail(str(exc))


def sign_with_token(address: str, token: str) -> tuple[int, bytes]:
    """POST /v1/sign to meshd with *token* as the bearer (as a stolen-token caller would)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only the refusal matters here
    conn = http.client.HTTPSConnection(address, MESHD_PORT, context=ctx, timeout=5)
    try:
        body = json.dumps({"csr": "-", "service": "web", "host": "web"})
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn.request("POST", "/v1/sign", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_for_certificate(mesh: Mesh, host: str) -> None:
    """Until the agent's metrics show the service's certificate expiry (it was issued)."""
    for _ in range(100):  # 20 s
        metrics = mesh.admin(host, "/metrics").stdout
        if 'meshd_cert_expiry_timestamp_seconds{service="web"}' in metrics:
            return
        time.sleep(0.2)
    agent = mesh.hosts[host].agent
    raise AssertionError(f"no certificate issued:\n{agent.log()[-3000:] if agent else ''}")


def pem_body(pem: bytes) -> bytes:
    """The base64 body of a PEM block, without armour or line breaks."""
    lines = [line for line in pem.splitlines() if line and not line.startswith(b"-----")]
    return b"".join(lines)


def collect_secrets(lab: HygieneLab) -> dict[str, bytes]:
    """name -> a byte string whose appearance anywhere is a leak."""
    table = {
        "consul token": lab.consul_token.encode(),
        "bootstrap token": lab.bootstrap_token.encode(),
        "bootstrap secret": parse_token(lab.bootstrap_token).secret.encode(),
        "PEM private key armour": b"PRIVATE KEY",
    }
    assert len(lab.key_files) >= 3, lab.key_files  # root, signing, the service's key
    for path in lab.key_files:
        body = pem_body(path.read_bytes())
        assert len(body) > 100
        # Any 40-character window of the body: a partial or re-wrapped dump is a leak too.
        for start in range(0, len(body) - 40, 20):
            table[f"{path.name} body[{start}:]"] = body[start : start + 40]
    return table


def leaks(lab: HygieneLab, blob: bytes) -> list[str]:
    """Which secrets *blob* contains (also inside base64 fields, as a snapshot holds them)."""
    flat = blob.replace(b"\\n", b"").replace(b"\n", b"")  # PEM lines may have been joined
    hay = [blob, flat, *decoded_base64(blob)]
    return sorted({name for name, value in lab.secrets.items() if any(value in h for h in hay)})


def decoded_base64(blob: bytes) -> list[bytes]:
    """Every run of 24+ base64 characters in *blob* that decodes, decoded."""
    out = []
    for match in re.finditer(rb"[A-Za-z0-9+/_-]{24,}={0,2}", blob):
        text = match.group().replace(b"-", b"+").replace(b"_", b"/")
        with contextlib.suppress(binascii.Error, ValueError):
            out.append(base64.b64decode(text + b"=" * (-len(text) % 4)))
    return out


def our_processes(lab: HygieneLab) -> dict[str, int]:
    mesh = lab.mesh
    agent = mesh.hosts["web"].agent
    assert mesh.meshd is not None and agent is not None
    assert mesh.meshd.alive() and agent.alive()
    return {"meshd": mesh.meshd.pid, "agent": agent.pid}


def test_the_secrets_exist_where_they_belong(lab: HygieneLab) -> None:
    # The search below must be able to find something: each secret is where it belongs.
    mh = lab.mesh.hosts["web"]
    assert lab.consul_token.encode() in read_secret(lab.mesh.consul_token_file)
    assert lab.bootstrap_token.startswith("mtk_")
    assert leaks(lab, (mh.dir / "bootstrap.token").read_bytes()) == [
        "bootstrap secret",
        "bootstrap token",
    ]
    for path in lab.key_files:
        assert "PEM private key armour" in leaks(lab, path.read_bytes())


def test_no_secret_in_any_log_or_command_output(lab: HygieneLab) -> None:
    mesh = lab.mesh
    agent = mesh.hosts["web"].agent
    assert mesh.meshd is not None and agent is not None
    assert "cert_issued" in agent.log()  # the logs are real (and at debug level)
    assert "started" in mesh.meshd.log()
    assert any("token" in args for args, _ in mesh.outputs)
    assert lab.refusals["wrong secret"][0] == 401, lab.refusals
    assert lab.refusals["replay"][0] == 403, lab.refusals
    token_id = parse_token(lab.bootstrap_token).token_id
    refused = [line for line in mesh.meshd.log().splitlines() if '"decision": "deny"' in line]
    assert len([line for line in refused if token_id in line]) >= 2, refused  # logged, by id
    found = {
        "meshd serve log": leaks(lab, mesh.meshd.log().encode()),
        "meshd-agent log": leaks(lab, agent.log().encode()),
    }
    for what, (_, answer) in lab.refusals.items():
        found[f"meshd's answer to {what}"] = leaks(lab, answer)
    for args, output in mesh.outputs:
        found[f"meshctl {' '.join(args[:2])}"] = leaks(lab, output.encode())
    assert {where: names for where, names in found.items() if names} == {}


def test_no_secret_in_argv_or_environment_of_our_processes(lab: HygieneLab) -> None:
    for name, pid in our_processes(lab).items():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"meshd" in cmdline, (name, cmdline)  # it is the process itself
        assert leaks(lab, cmdline) == [], (name, "argv")
        assert leaks(lab, environ) == [], (name, "environment")
        assert b"CONSUL_HTTP_TOKEN=" not in environ


def test_no_secret_in_the_environment_or_argv_of_the_agents_children(lab: HygieneLab) -> None:
    agent = lab.mesh.hosts["web"].agent
    assert agent is not None
    for _ in range(50):  # the rules go in just after the agent is ready
        if '"redirect_applied"' in agent.log():
            break
        time.sleep(0.2)
    records = sorted(lab.record_dir.iterdir())
    restores = [r for r in records if r.name.startswith("iptables-restore.")]
    assert restores, f"the agent ran no iptables-restore: {[r.name for r in records]}"
    for record in records:
        data = record.read_bytes()
        if record.suffix == ".environ":
            assert b"PATH=" in data  # a real environment was recorded
        assert leaks(lab, data) == [], record.name


def test_no_secret_in_the_admin_endpoints(lab: HygieneLab) -> None:
    for path in ("/metrics", "/stats", "/snapshot"):
        res = lab.mesh.admin("web", path)
        assert res.returncode == 0 and len(res.stdout) > 50, (path, res.stderr)
        assert leaks(lab, res.stdout.encode()) == [], path
    assert "meshd_cert_expiry_timestamp_seconds" in lab.mesh.admin("web", "/metrics").stdout
    snapshot = lab.mesh.admin("web", "/snapshot").stdout.encode()
    assert any(b"BEGIN CERTIFICATE" in d for d in decoded_base64(snapshot))  # the bundle


def test_no_secret_in_the_repr_of_config_and_credential_objects(lab: HygieneLab) -> None:
    mesh = lab.mesh
    mh = mesh.hosts["web"]
    agent_config = load_agent_config(mh.dir / "agent.toml")
    server_config = load_server_config(mesh.workdir / "meshd.toml")
    settings = ConsulSettings.from_config(agent_config.consul, file="agent.toml")
    assert settings.token == lab.consul_token  # the object holds it ...
    ca_dir = mesh.workdir / "ca"
    chain_path = mh.dir / "state" / "certs" / "web.pem"
    objects: dict[str, object] = {
        "AgentConfig": agent_config,
        "ServerConfig": server_config,
        "ConsulSettings": settings,
        "ConsulSettings.with_token": settings.with_token(lab.consul_token),
        "BootstrapToken": parse_token(lab.bootstrap_token),
        "root CertificateAuthority": cadir.load(ca_dir, cadir.ROOT),
        "signing CertificateAuthority": cadir.load(ca_dir, cadir.SIGNING),
        "SigningAuthority": SigningAuthority.from_dir(ca_dir, ttl_s=3600, max_ttl_s=3600),
        "CertifiedKey": CertifiedKey(
            "web", chain_path.read_bytes(), mh.dir / "state" / "certs" / "web.key", 0, 0, 1
        ),
    }

    async def records() -> list[object]:
        async with open_consul(ConsulSettings.from_env(mesh.consul_env())) as consul:
            return list(await list_tokens(consul))

    objects["TokenRecords"] = trio.run(records)
    found = {}
    for name, obj in objects.items():
        for text in (repr(obj), str(obj)):
            if names := leaks(lab, text.encode()):
                found[name] = names
    assert found == {}  # ... and never shows it


def test_key_and_token_files_are_private(lab: HygieneLab) -> None:
    mesh = lab.mesh
    mh = mesh.hosts["web"]
    private = [*lab.key_files, mh.dir / "bootstrap.token"]
    for path in private:
        st = path.lstat()
        assert stat.S_ISREG(st.st_mode), path
        assert stat.S_IMODE(st.st_mode) == 0o600, (path, oct(st.st_mode))
    for directory in (mesh.workdir / "ca", mh.dir / "state" / "certs"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    for pem in (mesh.workdir / "ca").glob("*.pem"):  # public material: no key inside
        assert b"PRIVATE KEY" not in pem.read_bytes(), pem
    assert b"PRIVATE KEY" not in (mh.dir / "state" / "certs" / "web.pem").read_bytes()


def test_a_consul_token_in_the_agents_environment_does_not_reach_its_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CONSUL_HTTP_TOKEN is honoured (as by the consul CLI) when an operator sets it for the
    # agent; the iptables tools the agent runs must still not receive it.
    wrap_dir, record_dir = tmp_path / "wrap", tmp_path / "children"
    write_tool_wrappers(wrap_dir, record_dir)
    token = str(uuid.uuid4())
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", token)
    monkeypatch.setenv("PATH", f"{wrap_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}")
    redirect.read_rules(4)  # the agent's own code runs iptables-save
    environs = list(record_dir.glob("iptables-save.*.environ"))
    assert len(environs) == 1, list(record_dir.iterdir())
    child_env = environs[0].read_bytes()
    assert f"PATH={wrap_dir}".encode() in child_env  # it is the child's real environment
    assert token.encode() not in child_env
