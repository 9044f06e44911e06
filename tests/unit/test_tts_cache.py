"""TTS cache: what an assistant says word for word is synthesised once (when it is saved),
and served from memory to every call after."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bridge.directory.models import AssistantIn
from bridge.directory.service import DirectoryService
from bridge.speech.tts import CachedTts, FliteTts, TtsError, assistant_phrases
from bridge.store.db import Database
from tests.support.calls import until
from tests.unit.test_directory import SEED_ASSISTANT


class CountingTts:
    """Counts syntheses; a text's synthesis waits for its gate when one is set."""

    name = "counting"
    sample_rate = 8000

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}

    async def synthesize(self, text: str) -> bytes:
        self.calls.append(text)
        if text in self.gates:
            await self.gates[text].wait()
        if text == "unspeakable":
            raise TtsError("engine failed")
        return text.encode().ljust(320, b"\x00")


async def test_a_text_said_again_is_served_from_memory() -> None:
    inner = CountingTts()
    tts = CachedTts(inner)
    first = await tts.synthesize("Hello.")
    assert await tts.synthesize("Hello.") == first
    assert inner.calls == ["Hello."] and (tts.hits, tts.misses) == (1, 1)


async def test_two_calls_asking_at_once_share_one_synthesis() -> None:
    inner = CountingTts()
    inner.gates["Hi."] = asyncio.Event()
    tts = CachedTts(inner)
    a = asyncio.ensure_future(tts.synthesize("Hi."))
    b = asyncio.ensure_future(tts.synthesize("Hi."))
    await until(lambda: inner.calls, "the synthesis")
    a.cancel()  # one caller barges in: the other still gets its audio
    inner.gates["Hi."].set()
    assert (await b).startswith(b"Hi.") and inner.calls == ["Hi."] and tts.cached("Hi.")


async def test_least_recently_used_audio_goes_past_the_bound() -> None:
    tts = CachedTts(CountingTts(), max_bytes=2 * 320)
    for text in ("one", "two"):
        await tts.synthesize(text)
    await tts.synthesize("one")  # used again: "two" is now the oldest
    await tts.synthesize("three")
    assert tts.cached("one") and tts.cached("three") and not tts.cached("two")


async def test_prime_synthesises_each_text_once_and_skips_failures() -> None:
    inner = CountingTts()
    tts = CachedTts(inner)
    added = await tts.prime(["Welcome.", "Welcome.", "", "unspeakable", "Bye."])
    assert added == 2 and inner.calls == ["Welcome.", "unspeakable", "Bye."]
    assert await tts.prime(["Welcome.", "Bye."]) == 0
    assert (tts.hits, tts.misses) == (0, 0)  # priming is not a caller's miss


def test_the_phrases_of_an_assistant_are_its_greeting_and_transfer_messages() -> None:
    assistant = AssistantIn.model_validate(SEED_ASSISTANT)
    assert assistant_phrases(assistant) == [
        "Welcome to Acme support, how can I help you?",
        "I'm transferring you to one of my colleagues.",
    ]


async def test_saving_an_assistant_primes_its_phrases_with_the_real_engine(
    tmp_path: Path,
) -> None:
    """The daemon's wiring (bridge/app.py): the directory's save hook primes the cache; the
    first call's greeting and the transfer announcement are then hits."""
    db = await Database.open(tmp_path / "dir.sqlite3")
    try:
        tts = CachedTts(FliteTts())
        directory = DirectoryService(db)
        primed: list[asyncio.Task[int]] = []
        directory.on_assistant_saved = lambda a: primed.append(
            asyncio.ensure_future(tts.prime(assistant_phrases(a)))
        )
        made = await directory.create_assistant(AssistantIn.model_validate(SEED_ASSISTANT))
        assert await primed[0] == 2
        greeting = await tts.synthesize("Welcome to Acme support, how can I help you?")
        assert len(greeting) > 8000 and tts.hits == 1 and tts.misses == 0
        await directory.patch_assistant(made.id, {"first_message": "Acme, good morning."})
        assert await primed[1] == 1 and tts.cached("Acme, good morning.")
    finally:
        await db.close()
