"""Fixtures shared by the Asterisk integration tests and the two-PBX behaviour suite.

Without the chroot from scripts/install-asterisk.sh the Asterisk tests are skipped on a
developer machine but FAIL under CI (env CI set): a silently skipped suite proves nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from bridge.lab.asterisk import AsteriskLab, LabUnavailable


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"Asterisk lab unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"Asterisk lab unavailable: {reason}")


@pytest.fixture(scope="session")
def asterisk_lab() -> Iterator[AsteriskLab]:
    """One real Asterisk for the whole session (starts in about a second)."""
    lab = AsteriskLab()
    try:
        lab.check_installed()
    except LabUnavailable as exc:
        _unavailable(str(exc))
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()
