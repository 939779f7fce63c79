"""A plain TCP application for tests: it knows nothing about the mesh.

``echo.py --port P [--bind ADDR] [--mode echo|whoami]``: in ``echo`` mode every connection gets
its bytes back (half-close honoured: after the client's FIN it closes too); in ``whoami``
mode each connection gets one line ``<name> <local-addr> <local-port> <peer-addr>\n`` first
and is then echoed, so a test can tell which instance answered and from where it was called.
Prints ``ready`` on stdout once listening. With ``--log-connections`` it also prints
``conn <peer-addr> bytes=<n>`` when each connection ends (``n``: bytes received from it), so a
test can prove what reached the application, down to zero bytes.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading


def _plain(address: str) -> str:
    """An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d; report a.b.c.d."""
    return address.removeprefix("::ffff:")


def _serve_one(conn: socket.socket, mode: str, name: str, log_connections: bool) -> None:
    received = 0
    peer = ("?",)
    try:
        with conn:
            peer = conn.getpeername()
            if mode == "whoami":
                local = conn.getsockname()
                conn.sendall(f"{name} {_plain(local[0])} {local[1]} {_plain(peer[0])}\n".encode())
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                received += len(data)
                conn.sendall(data)
    except OSError:
        pass  # a reset peer; still logged below
    finally:
        if log_connections:
            print(f"conn {_plain(str(peer[0]))} bytes={received}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="::")
    parser.add_argument("--mode", choices=("echo", "whoami"), default="echo")
    parser.add_argument("--name", default=socket.gethostname())
    parser.add_argument("--log-connections", action="store_true")
    args = parser.parse_args()
    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.bind((args.bind, args.port))
    server.listen(512)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(
            target=_serve_one, args=(conn, args.mode, args.name, args.log_connections), daemon=True
        ).start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
