"""Recycled 64 KiB buffers for the data path (the epoll engine and TLS connections).

A fresh ``bytearray(65536)`` costs page faults as well as zeroing: about 50 µs on this
machine kind, and a new connection needs three of them on each proxy (two directions and
a TLS read buffer) on its way to the first byte. Buffers whose connection ended go back to
a small free list instead, zeroed first, so no byte of one connection can ever be read
through another's buffer even if a length check were wrong. The engine returns them when
it finishes a connection; every other buffer is simply dropped.

Thread-safe without a lock: ``deque.append``/``pop`` are atomic in CPython. Buffers are
taken on the trio thread and given back on the engine thread.
"""

from __future__ import annotations

import collections

SIZE = 65536
MAX_FREE = 64  # at most 4 MiB kept for reuse
_ZEROS = bytes(SIZE)
_free: collections.deque[bytearray] = collections.deque()


def take() -> bytearray:
    """A zeroed buffer of :data:`SIZE` bytes, recycled when one is free."""
    try:
        return _free.pop()
    except IndexError:
        return bytearray(SIZE)


def give(buffer: object) -> None:
    """Return *buffer* for reuse: only once nothing will read or write it any more.

    Anything that is not a :data:`SIZE`-byte ``bytearray`` (e.g. a caller's own buffer
    size) is left to the garbage collector, as is everything beyond :data:`MAX_FREE`.
    """
    if type(buffer) is not bytearray or len(buffer) != SIZE or len(_free) >= MAX_FREE:
        return
    memoryview(buffer)[:] = _ZEROS  # same size: allowed while views of it exist
    _free.append(buffer)


def free_count() -> int:
    """Buffers waiting for reuse (for tests)."""
    return len(_free)
