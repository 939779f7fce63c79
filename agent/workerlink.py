"""The link between the agent and its data-path worker processes (``[proxy] workers``).

Design note (docs/adr/011-worker-processes.md). The agent and each worker share one
``AF_UNIX`` stream socketpair. Frames are ``4-byte big-endian length | 1-byte kind |
payload``; the kind says how to read the payload:

* ``S``: a snapshot, exactly as :func:`meshd.snapshot.to_json` writes it (agent → worker);
* ``J``: one JSON object with a ``type`` (both ways): ``hello``, ``certs``, ``start`` and
  ``drain`` from the agent; ``ready``, ``report`` and ``unknown`` from a worker.

What crosses the link is what the proxies read and nothing more: the snapshot (public
material), each local service's certificate chain and the *path* of its 0600 key (the key
itself never crosses), the proxy settings, and back the worker's counters. A frame that is
too large, of an unknown kind, or not what its kind says is a :class:`WorkerLinkError`
naming what is wrong; the agent then ends that worker and starts another.

Metrics: a worker reports its registry's samples (not the ``_created`` timestamps) every
second and when it stops; :class:`MergedMetrics` adds them to the agent's own samples of
the same name and labels, so ``/metrics`` shows one set of totals for the host.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from agent.tlscontexts import CertifiedKey
from meshd.errors import MeshdError

# Bounds what one frame may make the reader buffer, should a length be corrupt. A snapshot
# carries every intentions document, up to 512 KiB each in Consul: room for thousands.
MAX_FRAME = 256 * 1024 * 1024
_HEAD = struct.Struct(">IB")
KIND_JSON = ord("J")
KIND_SNAPSHOT = ord("S")

# One reported sample: metric sample name, labels, value.
ReportedSample = tuple[str, dict[str, str], float]


class WorkerLinkError(MeshdError):
    """A frame on the agent-worker link is malformed; the message names what is wrong."""


class Link:
    """Framed messages over a connected ``trio.SocketStream``; one reader, one writer."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def send_json(self, message: Mapping[str, Any]) -> None:
        """Send one ``J`` frame."""
        await self._send(KIND_JSON, json.dumps(message, separators=(",", ":")).encode())

    async def send_snapshot(self, snapshot_json: bytes) -> None:
        """Send one ``S`` frame (the bytes of :func:`meshd.snapshot.to_json`)."""
        await self._send(KIND_SNAPSHOT, snapshot_json)

    async def _send(self, kind: int, payload: bytes) -> None:
        if len(payload) + 1 > MAX_FRAME:
            raise WorkerLinkError(f"frame of {len(payload)} bytes is above {MAX_FRAME}")
        async with self._send_lock:
            await self._stream.send_all(_HEAD.pack(len(payload) + 1, kind) + payload)

    async def receive(self) -> tuple[int, bytes] | None:
        """The next frame as (kind, payload); None when the other side closed cleanly.

        Raises:
            WorkerLinkError: a length out of bounds, or the link ended inside a frame.
        """
        header = await self._read_exactly(_HEAD.size)
        if header is None:
            return None
        length, kind = _HEAD.unpack(header)
        if not 1 <= length <= MAX_FRAME:
            raise WorkerLinkError(f"frame length {length} is outside 1..{MAX_FRAME}")
        payload = await self._read_exactly(length - 1)
        if payload is None:
            raise WorkerLinkError("the link ended inside a frame")
        return kind, payload

    async def receive_json(self) -> dict[str, Any] | None:
        """The next frame, which must be a ``J`` frame; None at a clean end."""
        frame = await self.receive()
        if frame is None:
            return None
        kind, payload = frame
        if kind != KIND_JSON:
            raise WorkerLinkError(f"expected a JSON frame, got kind {kind!r}")
        return decode_json(payload)

    async def _read_exactly(self, count: int) -> bytes | None:
        buf = self._buffer
        while len(buf) < count:
            chunk = await self._stream.receive_some(max(65536, count - len(buf)))
            if not chunk:
                if buf:
                    raise WorkerLinkError("the link ended inside a frame")
                return None
            buf += chunk
        data = bytes(buf[:count])
        del buf[:count]
        return data

    async def aclose(self) -> None:
        """Close the stream (the other side reads a clean end)."""
        await self._stream.aclose()


def decode_json(payload: bytes) -> dict[str, Any]:
    """A ``J`` payload: one JSON object with a string ``type``."""
    try:
        message = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WorkerLinkError(f"a JSON frame is not valid JSON: {exc!r}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise WorkerLinkError("a JSON frame is not an object with a string 'type'")
    return message


def field_of(message: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """``message[key]``, which must be of *kind* (bool is never an int here)."""
    value = message.get(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise WorkerLinkError(f"{message.get('type')!r} message: {key!r} must be {names}")
    return value


# ---------------------------------------------------------------- certificates


def certs_message(
    services: Iterable[str], current: Callable[[str], CertifiedKey | None]
) -> dict[str, Any]:
    """The ``certs`` message: every local service that has a valid certificate now."""
    certs = {}
    for service in services:
        cert = current(service)
        if cert is not None:
            certs[service] = {
                "chain_pem": cert.chain_pem.decode("ascii"),
                "key_path": str(cert.key_path),
                "not_before": cert.not_before,
                "not_after": cert.not_after,
                "serial": cert.serial,
            }
    return {"type": "certs", "certs": certs}


def parse_certs(message: Mapping[str, Any]) -> dict[str, CertifiedKey]:
    """The certificates of a ``certs`` message."""
    raw = field_of(message, "certs", dict)
    found = {}
    for service, entry in raw.items():
        if not isinstance(entry, dict):
            raise WorkerLinkError(f"'certs' message: the entry for {service!r} is not an object")
        try:
            chain = field_of(entry, "chain_pem", str).encode("ascii")
        except UnicodeEncodeError:
            raise WorkerLinkError(f"'certs' message: {service!r} chain is not PEM") from None
        found[service] = CertifiedKey(
            service=service,
            chain_pem=chain,
            key_path=Path(field_of(entry, "key_path", str)),
            not_before=float(field_of(entry, "not_before", (int, float))),
            not_after=float(field_of(entry, "not_after", (int, float))),
            serial=int(field_of(entry, "serial", int)),
        )
    return found


class LinkedCredentials:
    """The worker's credential source: the latest ``certs`` message, expiry checked."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._certs: dict[str, CertifiedKey] = {}

    def replace(self, certs: dict[str, CertifiedKey]) -> None:
        """Use *certs* from now on (services missing from it have none)."""
        self._certs = certs

    def current(self, service: str) -> CertifiedKey | None:
        """The certificate to present for *service*, or None (none, or expired)."""
        cert = self._certs.get(service)
        if cert is None or self._clock() >= cert.not_after:
            return None
        return cert


# ---------------------------------------------------------------- metrics


def registry_samples(registry: CollectorRegistry) -> list[ReportedSample]:
    """What a worker reports: every sample but the ``_created`` timestamps."""
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    ]


def parse_report(message: Mapping[str, Any]) -> list[ReportedSample]:
    """The samples of a ``report`` message."""
    samples = []
    for item in field_of(message, "samples", list):
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not isinstance(item[0], str)
            or not isinstance(item[1], dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in item[1].items())
            or isinstance(item[2], bool)
            or not isinstance(item[2], int | float)
        ):
            raise WorkerLinkError("'report' message: a sample is not [name, {labels}, number]")
        samples.append((item[0], item[1], float(item[2])))
    return samples


class MergedMetrics:
    """The agent's registry with its workers' reported samples added (a collector).

    ``generate_latest(MergedMetrics(...))`` renders the host's totals: a sample a worker
    reports is added to the agent's sample of the same name and labels, or appended to its
    family when the agent has none yet. Samples of families the agent does not know are
    dropped (a worker runs the same code, so there are none).
    """

    def __init__(
        self, registry: CollectorRegistry, reports: Callable[[], Iterable[list[ReportedSample]]]
    ) -> None:
        self._registry = registry
        self._reports = reports

    def collect(self) -> Iterator[Metric]:
        extra: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for report in self._reports():
            for name, labels, value in report:
                key = (name, frozenset(labels.items()))
                extra[key] = extra.get(key, 0.0) + value
        for family in self._registry.collect():
            if not extra:
                yield family
                continue
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                key = (s.name, frozenset(s.labels.items()))
                add = extra.pop(key, 0.0)
                merged.samples.append(s._replace(value=s.value + add) if add else s)
            for key in [k for k in extra if _member(family, k[0])]:
                merged.samples.append(Sample(key[0], dict(key[1]), extra.pop(key)))
            yield merged


def _member(family: Metric, sample_name: str) -> bool:
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "gauge": ("",),
    }.get(family.type, ("",))
    return any(sample_name == family.name + suffix for suffix in suffixes)
