"""Key files: 0600 from creation, atomic, and refused when group or others can read them."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path

import pytest

from meshd.keyfile import KeyFileError, read_secret, write_public, write_secret


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_secret_is_0600_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    write_secret(path, b"secret")
    assert mode(path) == 0o600
    assert read_secret(path) == b"secret"
    assert os.listdir(tmp_path) == ["k.key"]  # no temporary file left behind


def test_secret_is_never_visible_with_a_wider_mode(tmp_path: Path) -> None:
    """Watch the directory while writing: every file ever seen is 0600 (and never chmod'ed)."""
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for name in os.listdir(tmp_path):
                with contextlib.suppress(FileNotFoundError):  # renamed meanwhile
                    seen.add(mode(tmp_path / name))

    old = os.umask(0)  # the mode must come from open(), not from the umask
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(200):
            write_secret(tmp_path / "k.key", b"x" * i)
    finally:
        stop.set()
        watcher.join(5)
        os.umask(old)
    assert seen == {0o600}


def test_public_is_0644_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_public(tmp_path / "c.pem", b"cert")
    finally:
        os.umask(old)
    assert mode(tmp_path / "c.pem") == 0o644


def test_overwrite_false_refuses_existing(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    write_secret(path, b"one", overwrite=False)
    with pytest.raises(KeyFileError, match="already exists"):
        write_secret(path, b"two", overwrite=False)
    assert read_secret(path) == b"one"
    assert os.listdir(tmp_path) == ["k.key"]


@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o644, 0o660, 0o602])
def test_read_secret_refuses_group_or_other_access(tmp_path: Path, bad_mode: int) -> None:
    path = tmp_path / "k.key"
    write_secret(path, b"secret")
    os.chmod(path, bad_mode)  # the test makes it unsafe on purpose
    with pytest.raises(KeyFileError, match=f"mode {bad_mode:04o}"):
        read_secret(path)


def test_read_secret_refuses_symlinks_and_missing(tmp_path: Path) -> None:
    write_secret(tmp_path / "real.key", b"secret")
    (tmp_path / "link.key").symlink_to(tmp_path / "real.key")
    with pytest.raises(KeyFileError, match="cannot open"):
        read_secret(tmp_path / "link.key")
    with pytest.raises(KeyFileError, match="cannot open"):
        read_secret(tmp_path / "missing.key")
