"""What every system shares: the nginx upstream and a throw-away PKI for the mTLS pairs.

Topology for every system (all on loopback)::

    generator ──▶ [client-side proxy] ──mTLS──▶ [server-side proxy] ──▶ nginx

``direct`` leaves out both proxies. The proxies of each system stay up for the whole run so
that cells of different systems can be interleaved; idle proxies cost nothing measurable.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import trustme

from bench.procs import Processes, free_port, wait_port

HOST = "127.0.0.1"
# The upstream's response body; small and fixed so the proxies, not nginx, dominate.
BODY = b"ok\n"
SERVER_NAME = "bench-upstream.mesh"
CLIENT_NAME = "bench-client.mesh"

_NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen {host}:{port} backlog=4096 reuseport;
        location / {{ default_type text/plain; return 200 "ok\\n"; }}
    }}
}}
"""


@dataclass(frozen=True)
class Pki:
    """PEM files of one CA and a client and server leaf (key and chain in one file each)."""

    ca: Path
    server: Path
    client: Path


def make_pki(directory: Path) -> Pki:
    """Write a fresh CA, a server leaf and a client leaf (EC keys) under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    server = ca.issue_cert(SERVER_NAME, key_type=trustme.KeyType.ECDSA)
    client = ca.issue_cert(CLIENT_NAME, key_type=trustme.KeyType.ECDSA)
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "client.pem")
    ca.cert_pem.write_to_path(str(pki.ca))
    for leaf, path in ((server, pki.server), (client, pki.client)):
        path.touch(mode=0o600)
        leaf.private_key_and_cert_chain_pem.write_to_path(str(path))
    return pki


def start_nginx(procs: Processes, workdir: Path) -> tuple[tuple[str, int], int]:
    """Start nginx (one worker, keep-alive) serving ``BODY``; return (address, master PID)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    d = workdir / "nginx"
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(dir=d, host=HOST, port=port))
    child = procs.start("nginx", [nginx, "-c", str(conf), "-p", str(d)])
    wait_port(HOST, port, timeout=10)
    procs.check_alive(child)
    return (HOST, port), child.pid
