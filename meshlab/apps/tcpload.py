"""A constant-rate TCP client for tests: one connection every 1/rate seconds, each judged.

``tcpload.py --host H --port P --rate R --duration D [--hold S]``: starts connection *i* at
time *i/R* (each in its own thread, so a slow call never delays the next: constant rate),
sends a line, holds the connection open *S* seconds, sends a second line, half-closes,
reads to EOF and checks that both lines came back (a connection cut in flight fails).
One JSON line per call on stdout (``i``, ``t`` = start offset in s, ``s`` = how long the call
took in s, ``ok``, ``who`` = first word of the answer, a whoami app's name, ``err``), then
``{"done": true, "calls": n, "failed": k}``. SIGTERM ends it early, the same way: no new
calls, the started ones finish and are reported. Runs as whatever user starts it (tests
start it as the app user, so its connections are intercepted).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time

_lock = threading.Lock()


def _emit(record: dict[str, object]) -> None:
    with _lock:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


def _call(
    i: int, t: float, host: str, port: int, timeout: float, hold: float, results: list[bool]
) -> None:
    first, second = f"tcpload-{i}-a\n".encode(), f"tcpload-{i}-b\n".encode()
    who, err = "", ""
    began = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(first)
            time.sleep(hold)  # keep the connection open a while: it is in flight
            sock.sendall(second)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        who = data.split(b" ", 1)[0].decode(errors="replace") if data else ""
        if first + second not in data:
            err = f"no echo: {data[:80]!r}"
    except OSError as exc:
        err = f"{type(exc).__name__}: {exc}"
    with _lock:
        results.append(not err)
    took = time.monotonic() - began
    _emit({"i": i, "t": round(t, 3), "s": round(took, 3), "ok": not err, "who": who, "err": err})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--hold", type=float, default=0.0, help="seconds before half-close")
    args = parser.parse_args()
    total = int(args.rate * args.duration)
    results: list[bool] = []
    threads = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    start = time.monotonic()
    _emit({"started": True, "calls": total})
    for i in range(total):
        due = start + i / args.rate
        if stop.wait(max(0.0, due - time.monotonic())):
            break
        thread = threading.Thread(
            target=_call,
            args=(
                i,
                time.monotonic() - start,
                args.host,
                args.port,
                args.timeout,
                args.hold,
                results,
            ),
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(args.timeout + 5)
    _emit({"done": True, "calls": len(results), "failed": results.count(False)})


if __name__ == "__main__":
    main()
