"""One behaviour suite, two PBXs: every test here runs once per backend (see backends.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.behaviour.backends import AsteriskBackend, Backend, FreeswitchBackend


@pytest.fixture(params=["asterisk", "freeswitch"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "asterisk":
        made: Backend = AsteriskBackend(tmp_path, request.getfixturevalue("asterisk_lab"))
    else:
        made = FreeswitchBackend(tmp_path, os.environ.get("CALLBRIDGE_TEST_FREESWITCH") or None)
    try:
        yield made
    finally:
        await made.close()
