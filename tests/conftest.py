"""Fixtures shared by the Asterisk integration tests and the two-PBX behaviour suite.

Without the chroot from scripts/install-asterisk.sh the Asterisk tests are skipped on a
developer machine but FAIL under CI (env CI set): a silently skipped suite proves nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

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


def _orphan_media(channel: dict[str, Any], ids: set[str]) -> bool:
    """An externalMedia channel (`cbmedia-<caller>-<n>`) whose caller is gone."""
    cid = channel["id"]
    return cid.startswith("cbmedia-") and cid[len("cbmedia-") :].rsplit("-", 1)[0] not in ids


@pytest.fixture(autouse=True)
def _asterisk_left_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that used the session's Asterisk leaves no channel in it.

    The lab is shared by every module of the session: a channel a test leaves (a killed SIPp
    caller sent no BYE, a dialled leg nobody hung up) lives on into later tests, which then
    see a caller they never made (a daemon sends it to the fallback, a test counting
    channels finds two). Autouse, so it is torn down after the test's own fixtures (daemons
    stopped). It waits for what is still hanging up, then hangs up what is left and fails
    the test that left it, so a leak is reported where it happens.

    One leftover is by design and only cleaned up: the media channel of a caller that is
    gone. The daemon releases it after recording the end; a test that stops the daemon just
    after its caller left can stop it first, and the next daemon drops such channels when
    it connects (test_caller_leaving_while_the_daemon_is_down_leaves_nothing_behind).
    """
    yield
    if "asterisk_lab" not in request.fixturenames:
        return
    lab = request.getfixturevalue("asterisk_lab")
    if lab.pid is None:  # the lab did not start: nothing to check
        return
    deadline = time.monotonic() + 10
    while True:
        status, channels = lab.ari("GET", "/channels")
        channels = channels if status == 200 else []
        ids = {c["id"] for c in channels}
        leaked = [c for c in channels if not _orphan_media(c, ids)]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # polls a condition: channels still hanging up
    for channel in channels:
        lab.ari("DELETE", f"/channels/{channel['id']}")
    if leaked:
        names = [(c["name"], c["dialplan"]["context"], c["dialplan"]["app_name"]) for c in leaked]
        pytest.fail(f"the test left channels in the shared Asterisk: {names}", pytrace=False)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """The loop the tests run on: the daemon's default (`event_loop`, uvloop), or the one
    CALLBRIDGE_TEST_EVENT_LOOP names ("asyncio" runs the suite on the standard loop)."""
    from bridge.config import Settings
    from bridge.eventloop import loop_factory

    name = (
        os.environ.get("CALLBRIDGE_TEST_EVENT_LOOP")
        or Settings.model_fields["event_loop"].get_default()
    )
    return {name: loop_factory(name)}
