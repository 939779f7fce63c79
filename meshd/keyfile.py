"""Writing and reading key and certificate files safely.

A secret file is created with mode 0600 by ``open(O_CREAT | O_EXCL, 0o600)`` under a
temporary name in the destination directory, written, fsynced and renamed into place, then
the directory is fsynced. It is never chmod'ed: there is no instant at which another user
could open it, and a crash leaves either the old file or the new one, never half of one.
Reading refuses a secret that group or others can access, as ssh does, because such a key
must be presumed disclosed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from meshd.errors import MeshdError

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class KeyFileError(MeshdError):
    """A key or certificate file could not be written or is unsafe to read."""


def write_secret(path: Path, data: bytes, *, overwrite: bool = True) -> None:
    """Atomically write *data* to *path* with mode 0600 from the moment it exists.

    Args:
        path: destination; its directory must exist.
        data: the secret bytes (never logged).
        overwrite: if false, refuse when *path* already exists (checked atomically).

    Raises:
        KeyFileError: the file exists and *overwrite* is false, or the write failed.
    """
    _write_atomic(path, data, SECRET_MODE, overwrite=overwrite)


def write_public(path: Path, data: bytes, *, overwrite: bool = True) -> None:
    """Atomically write public *data* (certificates, bundles) to *path* with mode 0644.

    Args:
        path: destination; its directory must exist.
        data: the bytes.
        overwrite: if false, refuse when *path* already exists.

    Raises:
        KeyFileError: the file exists and *overwrite* is false, or the write failed.
    """
    _write_atomic(path, data, PUBLIC_MODE, overwrite=overwrite)


def read_secret(path: Path) -> bytes:
    """Read a secret file, refusing one that group or others could read or write.

    Args:
        path: the file; symbolic links are not followed.

    Returns:
        The file's bytes.

    Raises:
        KeyFileError: missing, not a regular file, a symlink, or mode allows group/other.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyFileError(f"cannot open secret file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"secret file {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"secret file {path} has mode {mode:04o}: it must not be accessible by group "
                f"or others (expected {SECRET_MODE:04o}); treat the key as disclosed"
            )
        return handle.read()


def _write_atomic(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, _OPEN_FLAGS, mode)
    except OSError as exc:
        raise KeyFileError(f"cannot create {tmp}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode != SECRET_MODE:
                # Public files only: undo the umask so readers elsewhere can open them.
                os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _install(tmp, path, overwrite=overwrite)
        _fsync_directory(directory)
    except OSError as exc:  # a full disk, an I/O error: the caller's to handle, by name
        raise KeyFileError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _install(tmp: Path, path: Path, *, overwrite: bool) -> None:
    try:
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the name exists, so "refuse to overwrite" holds even in a race.
            os.link(tmp, path)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; refusing to overwrite it") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror}") from exc


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
