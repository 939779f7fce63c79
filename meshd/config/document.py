"""Reading a TOML file into a :class:`Table` that reports errors by file and dotted key.

Every section parser works on a :class:`Table`: it first declares its known keys (so a
typo is reported as such, with a suggestion, before any "missing key" error), then pulls
each value through a converter from :mod:`meshd.config.fields`.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from meshd.config.errors import ConfigError
from meshd.config.fields import Invalid, show

T = TypeVar("T")

_TOML_POSITION = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$")


class Table:
    """One TOML table, with the file it came from and its dotted location in that file."""

    def __init__(self, data: Mapping[str, Any], *, file: str, base: Path, where: str = "") -> None:
        self.data = data
        self.file = file
        self.base = base  # relative paths in this file are taken relative to it
        self.where = where

    def key(self, name: str) -> str:
        """Return the dotted key of *name* inside this table."""
        return f"{self.where}.{name}" if self.where else name

    def error(self, name: str, problem: str) -> ConfigError:
        """Return (not raise) a :class:`ConfigError` about key *name* of this table."""
        return ConfigError(self.file, self.key(name), problem)

    def only(self, *known: str) -> None:
        """Raise :class:`ConfigError` for the first key not in *known*, suggesting one."""
        for name in self.data:
            if name in known:
                continue
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            if close:
                hint = f"did you mean {close[0]!r}?"
            else:
                hint = "known keys: " + ", ".join(sorted(known))
            raise self.error(name, f"unknown key ({hint})")

    def table(self, name: str) -> Table:
        """The sub-table *name*; an absent one is an empty table."""
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table, got {show(value)}")
        return Table(value, file=self.file, base=self.base, where=self.key(name))

    def tables(self, name: str) -> tuple[Table, ...] | None:
        """The array of tables *name* (``[[name]]``), or None if absent."""
        if name not in self.data:
            return None
        value = self.data[name]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(name, f"expected an array of tables, got {show(value)}")
        return tuple(
            Table(item, file=self.file, base=self.base, where=f"{self.key(name)}[{index}]")
            for index, item in enumerate(value)
        )

    def get(self, name: str, convert: Callable[[object], T], default: T) -> T:
        """Convert the value of *name*, or return *default* if the key is absent.

        Raises:
            ConfigError: the value does not convert.
        """
        if name not in self.data:
            return default
        return self.require(name, convert)

    def require(self, name: str, convert: Callable[[object], T]) -> T:
        """Convert the value of the required key *name*.

        Raises:
            ConfigError: the key is absent or its value does not convert.
        """
        if name not in self.data:
            raise self.error(name, "required key is missing")
        try:
            return convert(self.data[name])
        except Invalid as exc:
            raise ConfigError(self.file, self.key(name) + exc.suffix, exc.problem) from None


def parse_toml(text: str, *, file: str, base: Path) -> Table:
    """Parse TOML *text* into the root :class:`Table`.

    Args:
        text: the document.
        file: how to name the document in errors.
        base: the folder relative paths in the document are relative to.

    Returns:
        The root table.

    Raises:
        ConfigError: *text* is not valid TOML; the error names the line.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_POSITION.match(str(exc))
        if match is None:
            raise ConfigError(file, "", f"invalid TOML: {exc}") from None
        problem = f"invalid TOML: {match['msg']} (column {match['col']})"
        raise ConfigError(file, f"line {match['line']}", problem) from None
    except RecursionError:
        raise ConfigError(file, "", "invalid TOML: nested too deeply") from None
    return Table(data, file=file, base=base)


def read_toml(path: str | Path) -> Table:
    """Read and parse the TOML file at *path*.

    Args:
        path: the file; errors name it as given.

    Returns:
        The root table; relative paths in it resolve against the file's folder.

    Raises:
        ConfigError: the file is missing, unreadable, not UTF-8 or not valid TOML.
    """
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(file, "", "file not found") from None
    except IsADirectoryError:
        raise ConfigError(file, "", "is a directory, expected a TOML file") from None
    except PermissionError:
        raise ConfigError(file, "", "permission denied") from None
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(file, f"line {line}", "invalid TOML: not UTF-8 text") from None
    return parse_toml(text, file=file, base=Path(path).absolute().parent)
