"""The ops page (/ui) in a real headless Chromium (Debian's chromium + chromium-driver, driven
by Selenium) against the real daemon on the lab Asterisk: enter the key, test all destinations,
see a live lab call appear with its transcript, transfer it from the page, see the outcome.

Selenium is synchronous and the daemon runs on this test's event loop: every browser step runs
in a thread (`_in_thread`), so the daemon keeps serving the page meanwhile.

`CALLBRIDGE_SCREENSHOT=docs/ops-page.png` saves the page once the transfer is shown (the
README's screenshot is taken this way).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bridge.lab.rtp import RtpPeer
from bridge.lab.sipp import SippCall, SippUas
from tests.support.daemon import start_daemon
from tests.support.flows import DESTINATION, DID, setup_directory

pytestmark = pytest.mark.asterisk

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 30
T = TypeVar("T")

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("chromium/chromium-driver missing under CI (scripts/setup.sh)")
        pytest.skip("Debian chromium + chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1500",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


async def _in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def _wait(driver: WebDriver, what: str, check: Callable[[WebDriver], Any]) -> Any:
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(check, message=what)


def _text(driver: WebDriver, css: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return " ".join(e.text for e in found)


async def test_a_live_lab_call_is_seen_and_transferred_from_the_page(
    asterisk_lab: Any, tmp_path: Path, browser: WebDriver
) -> None:
    policy = {"allowed_prefixes": ["+31"], "allowed_sip_domains": ["127.0.0.1"]}
    daemon, api = await start_daemon(asterisk_lab, tmp_path, transfer=policy)
    key = api.session.headers["Authorization"].removeprefix("Bearer ")
    base = f"http://127.0.0.1:{daemon.api_port}"
    async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
        uas = SippUas("uas_answer.xml", rtp_port=dest_rtp.port)
        await uas.start()
        caller: SippCall | None = None
        try:
            await setup_directory(api, uas, auth=False)

            def open_page() -> None:
                browser.get(f"{base}/ui/")
                _wait(
                    browser, "the key form", lambda d: d.find_element(By.ID, "key").is_displayed()
                )
                browser.find_element(By.ID, "key").send_keys(key)
                browser.find_element(By.ID, "key-save").click()
                # The trunk as the real Asterisk has it (its PJSIP objects exist).
                _wait(
                    browser,
                    "the trunk row, provisioned",
                    lambda d: (
                        "Office PBX" in _text(d, "#trunks td")
                        and "provisioned on the PBX" in _text(d, "#trunks td.trunk-provisioned")
                    ),
                )

            await _in_thread(open_page)

            # "Test all destinations": the UAS answers the probe (then SIPp's one call is
            # done; a fresh UAS on the same port takes the transfer below).
            def test_all() -> str:
                browser.find_element(By.ID, "test-all").click()
                return str(
                    _wait(
                        browser,
                        "the destination test's outcome",
                        lambda d: (
                            (
                                t := _text(
                                    d, f'#tests tr[data-destination="{DESTINATION}"] td.outcome'
                                )
                            )
                            not in ("", "testing…")
                            and t
                        ),
                    )
                )

            assert await _in_thread(test_all) == "answered"
            await asyncio.wait_for(uas.wait(), 15)
            uas = SippUas("uas_answer.xml", rtp_port=dest_rtp.port, local_port=uas.local_port)
            await uas.start()

            caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=30000)
            await caller.start()

            def watch_and_transfer() -> str:
                row = _wait(
                    browser,
                    "the live call on the page",
                    lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-status="active"]'),
                )[0]
                row.click()
                _wait(
                    browser,
                    "the greeting in the live transcript",
                    lambda d: "Welcome to Acme support" in _text(d, "#transcript"),
                )
                _wait(
                    browser,
                    "the transfer button",
                    lambda d: d.find_element(By.ID, "transfer-btn").is_enabled(),
                )
                options = _text(browser, "#transfer-dest option")
                assert DESTINATION in options and "Human support" in options
                browser.find_element(By.ID, "transfer-btn").click()
                return str(
                    _wait(
                        browser,
                        "the transfer's outcome on the page",
                        lambda d: "bridged" in (t := _text(d, "#call-outcome")) and t,
                    )
                )

            outcome = await _in_thread(watch_and_transfer)
            assert "answered" in outcome, outcome
            # The same call through the API: the page's button used the control API.
            calls = (await api.ok("GET", "/calls"))["data"]
            detail = await api.ok("GET", f"/calls/{calls[0]['id']}")
            assert detail["transfers"][-1]["source"] == "api"
            assert detail["transfers"][-1]["state"] == "bridged"

            def analytics() -> None:
                # The page's range is the last 30 days, not all time (every transfer read at
                # every refresh).
                since = browser.find_element(By.ID, "since").get_attribute("value")
                assert since == (datetime.now(UTC) - timedelta(days=30)).date().isoformat()
                browser.find_element(By.ID, "analytics-refresh").click()
                _wait(
                    browser,
                    "the destination's bar in the analytics chart",
                    lambda d: d.find_elements(
                        By.CSS_SELECTOR, "#chart-destinations .chart-row svg rect.o-answered"
                    ),
                )
                shot = os.environ.get("CALLBRIDGE_SCREENSHOT")
                if shot:
                    browser.save_screenshot(shot)

            await _in_thread(analytics)

            # "End call" on the page hangs the (transferred) call up through the control API.
            def end_call() -> str:
                browser.find_element(By.ID, "end-btn").click()
                return str(
                    _wait(
                        browser,
                        "the call to end on the page",
                        lambda d: (t := _text(d, "#call-status")) == "ended" and t,
                    )
                )

            assert await _in_thread(end_call) == "ended"
            assert (await api.ok("GET", f"/calls/{calls[0]['id']}"))["status"] == "ended"
            assert await asyncio.wait_for(caller.wait(), 10) == 0  # the caller got a BYE
        finally:
            if caller is not None:
                await caller.terminate()
            await uas.stop()
            await api.close()
            await daemon.stop()
