"""A TTS engine that hangs is killed and reaped after `[tts] timeout`; later utterances go on
(issue 7, section 3)."""

from __future__ import annotations

import asyncio
import shutil
import stat
from pathlib import Path

import pytest

from bridge.config import Settings
from bridge.lab.harness import wait_for
from bridge.speech.tts import FliteTts, TtsTimeout, make_tts

pytestmark = pytest.mark.skipif(shutil.which("flite") is None, reason="flite not installed")


class HangingOnce(FliteTts):
    """flite, except that the text "hang" runs an engine that never finishes."""

    def __init__(self, script: Path, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.script = script

    def argv(self, text: str) -> list[str]:
        return [str(self.script)] if text == "hang" else super().argv(text)


@pytest.fixture
def hanging_engine(tmp_path: Path) -> tuple[Path, Path]:
    pidfile = tmp_path / "engine.pid"
    script = tmp_path / "hang-tts"
    script.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 600\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, pidfile


def _exists(pid: int) -> bool:
    """True while the process exists, zombie included (a zombie was not reaped)."""
    return Path(f"/proc/{pid}").exists()


async def test_a_hung_engine_is_killed_reaped_and_the_next_utterance_is_spoken(
    hanging_engine: tuple[Path, Path],
) -> None:
    script, pidfile = hanging_engine
    tts = HangingOnce(script, timeout=2.0)
    with pytest.raises(TtsTimeout, match="did not finish within 2 s"):
        await tts.synthesize("hang")
    pid = int(pidfile.read_text())
    assert not _exists(pid)  # killed and reaped before the error was raised
    pcm = await tts.synthesize("Putting you through.")
    assert len(pcm) > 8000  # half a second of speech at 8 kHz


async def test_one_hung_utterance_does_not_hold_up_the_ones_queued_behind_it(
    hanging_engine: tuple[Path, Path],
) -> None:
    """The session synthesises one utterance at a time (in order): the transfer message
    queued behind a hung sentence is spoken once the engine is given up on."""
    script, pidfile = hanging_engine
    tts = HangingOnce(script, timeout=2.0)
    order = asyncio.Lock()
    results: list[str] = []

    async def say(text: str) -> None:
        async with order:
            try:
                await tts.synthesize(text)
                results.append(text)
            except TtsTimeout:
                results.append(f"failed: {text}")

    await asyncio.gather(say("hang"), say("Putting you through."))
    assert results == ["failed: hang", "Putting you through."]
    assert not _exists(int(pidfile.read_text()))


async def test_a_cancelled_synthesis_kills_the_engine(hanging_engine: tuple[Path, Path]) -> None:
    script, pidfile = hanging_engine
    tts = HangingOnce(script, timeout=60)
    task = asyncio.ensure_future(tts.synthesize("hang"))
    await wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), "engine started")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not _exists(int(pidfile.read_text()))


def test_the_timeout_is_a_setting_passed_to_the_engine() -> None:
    settings = Settings.model_validate({"tts": {"timeout": 2.5}})
    tts = make_tts(settings.tts.engine, timeout=settings.tts.timeout)
    assert isinstance(tts, FliteTts) and tts.timeout == 2.5
