"""Fixtures: the multi-host network-namespace lab (see :mod:`meshlab.netns`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshlab.netns import Lab, LabUnavailable, open_lab


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A three-host lab (web, api, db) shared by one test module. Fails, never skips."""
    try:
        with open_lab("t", ("web", "api", "db")) as the_lab:
            yield the_lab
    except LabUnavailable as exc:
        pytest.fail(str(exc))
