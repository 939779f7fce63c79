"""The exception of the configuration boundary."""

from __future__ import annotations

from meshd.errors import MeshdError


class ConfigError(MeshdError):
    """A configuration file is missing, unreadable, not TOML, or holds an invalid value.

    The message is exactly one line, ``"<file>: <dotted.key>: <problem>"``, for example
    ``"web.toml: service.prot: unknown key (did you mean 'port'?)"``. Errors about the file
    as a whole (not found, unreadable) have no key: ``"<file>: <problem>"``; TOML syntax
    errors use ``line N`` in place of the key.

    Attributes:
        file: the file as the caller named it.
        key: the dotted key (``proxy.outbound_port``, ``service.checks[0].path``), or
            ``line N`` for syntax errors, or ``""`` for the whole file.
        problem: what is wrong and what was expected.
    """

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}" if key else file
        # One line, always: operators grep logs and run_cli prints this verbatim.
        super().__init__(" ".join(f"{where}: {problem}".split()))
