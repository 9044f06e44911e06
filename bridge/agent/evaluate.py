"""Run the conversation evaluation set (tests/eval/*.json) through the chat console's code.

Each file holds one assistant (the API's JSON) and caller utterances labelled with what the
assistant must do: `transfer:<destination key>`, `end`, or `answer` (an answer or a
clarifying question: no action). A case may list earlier caller messages (`before`) of the
same conversation, and text its reply must contain (`reply_has`). Every case runs in a new
conversation through `ChatConsole.send`, the code path of `POST /assistants/{id}/chat`.

    python -m bridge.agent.evaluate tests/eval/*.json            # the table (markdown)
    python -m bridge.agent.evaluate --provider ollama --model llama3.1 tests/eval/*.json
    python -m bridge.agent.evaluate --spoken 12 tests/eval/*.json   # spoken variants

`--spoken N` speaks N cases of each file (spread over it, always including the issue's four
questions) with flite (kal, 8 kHz), through G.711 µ-law, and lets whisper (the offline STT,
with the call's vocabulary prompt) hear them: the console then gets what a call would.

`--provider NAME` replaces the assistants' `local` provider with an OpenAI-compatible
endpoint from the configuration (`llm.endpoints.NAME`, else `llm.base_url`), so the same set
measures a real model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.agent.chat import ChatConsole
from bridge.config import AgentSettings
from bridge.directory.models import Assistant
from bridge.llm.base import LlmProvider
from bridge.llm.tools import Toolset

ANSWER = "answer"
END = "end"


@dataclass(frozen=True)
class Case:
    say: str
    expect: str
    before: tuple[str, ...] = ()
    reply_has: str | None = None


@dataclass
class Suite:
    name: str
    assistant: Assistant
    cases: list[Case]


@dataclass
class Outcome:
    suite: str
    case: Case
    got: str
    replies: list[str] = field(default_factory=list)
    heard: str | None = None  # what the STT made of `case.say` (spoken runs)

    @property
    def right(self) -> bool:
        if self.got != self.case.expect:
            return False
        wanted = self.case.reply_has
        return wanted is None or wanted.lower() in " ".join(self.replies).lower()


def load_suite(path: Path, provider: str | None = None, model: str | None = None) -> Suite:
    data = json.loads(path.read_text())
    config = dict(data["assistant"])
    if provider is not None:
        llm = dict(config.get("llm_config") or {})
        llm["provider"] = provider
        llm["model"] = model
        config["llm_config"] = llm
    now = datetime.now(UTC)
    assistant = Assistant.model_validate(
        {**config, "id": data["name"], "created_at": now, "updated_at": now}
    )
    cases = [
        Case(c["say"], c["expect"], tuple(c.get("before", ())), c.get("reply_has"))
        for c in data["cases"]
    ]
    return Suite(data["name"], assistant, cases)


async def run_suite(
    suite: Suite,
    llm_for: Callable[[str, str | None], LlmProvider],
    settings: AgentSettings | None = None,
    say: Callable[[str], Any] | None = None,
) -> list[Outcome]:
    """Every case of `suite` through the console. `say` may turn an utterance into what the
    assistant hears (the spoken benchmark: TTS → G.711 → whisper); sync or async."""

    async def get_assistant(_: str) -> Assistant:
        return suite.assistant

    console = ChatConsole(get_assistant, llm_for, settings or AgentSettings())
    keys = {
        d.target: d.key
        for d in Toolset.from_assistant_tools(
            suite.assistant.llm_config.tools
        ).destinations.values()
    }
    outcomes: list[Outcome] = []
    for case in suite.cases:
        conversation: str | None = None
        heard = case.say
        for text in (*case.before, case.say):
            heard = text if say is None else await _maybe_await(say(text))
            turn = await console.send(suite.assistant.id, heard, conversation)
            conversation = turn.conversation_id
        got = ANSWER
        for action in turn.actions:
            got = END if action["type"] == "end_call" else f"transfer:{keys[action['destination']]}"
        replies = [r for r in turn.replies if r != suite.assistant.first_message]
        outcomes.append(Outcome(suite.name, case, got, replies, heard if say is not None else None))
    return outcomes


async def _maybe_await(value: Any) -> str:
    if asyncio.iscoroutine(value):
        value = await value
    return str(value)


@dataclass
class Scores:
    label: str
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0


def scores(outcomes: Sequence[Outcome]) -> dict[str, Scores]:
    """Per label (`answer`, `end`, `transfer`) precision and recall; a transfer counts as
    right only to the right destination."""
    table = {k: Scores(k) for k in (ANSWER, END, "transfer")}

    def kind(label: str) -> str:
        return "transfer" if label.startswith("transfer:") else label

    for o in outcomes:
        want, got = kind(o.case.expect), kind(o.got)
        if o.got == o.case.expect:
            table[want].tp += 1
        else:
            table[want].fn += 1
            table[got].fp += 1
    return table


def summary(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    answer = [o for o in outcomes if o.case.expect == ANSWER]
    acts = [o for o in outcomes if o.case.expect != ANSWER]
    return {
        "cases": len(outcomes),
        "answer_cases": len(answer),
        "transfers_on_answer": sum(o.got.startswith("transfer:") for o in answer),
        "action_cases": len(acts),
        "action_right": sum(o.got == o.case.expect for o in acts),
        "replies_missing": sum(o.got == o.case.expect and not o.right for o in outcomes),
    }


def markdown(outcomes: Sequence[Outcome]) -> str:
    lines = [
        "| suite | cases | answer/clarify: transferred | transfer/end: right | reply text right |",
        "|---|---:|---:|---:|---:|",
    ]
    suites = list(dict.fromkeys(o.suite for o in outcomes))
    for name in [*suites, "all"]:
        subset = [o for o in outcomes if name == "all" or o.suite == name]
        s = summary(subset)
        with_text = [o for o in subset if o.case.reply_has]
        text_ok = sum(o.right for o in with_text)
        lines.append(
            f"| {name} | {s['cases']} | {s['transfers_on_answer']} / {s['answer_cases']} |"
            f" {s['action_right']} / {s['action_cases']}"
            f" ({_pct(s['action_right'], s['action_cases'])}) |"
            f" {text_ok} / {len(with_text)} |"
        )
    lines += ["", "| label | precision | recall |", "|---|---:|---:|"]
    for sc in scores(outcomes).values():
        lines.append(f"| {sc.label} | {sc.precision:.3f} | {sc.recall:.3f} |")
    wrong = [o for o in outcomes if not o.right]
    if wrong:
        lines += ["", "Wrong:", ""]
        for o in wrong:
            heard = f" (heard {o.heard!r})" if o.heard is not None else ""
            lines.append(
                f"- {o.suite}: {o.case.say!r}{heard} → {o.got} (want {o.case.expect}) {o.replies}"
            )
    return "\n".join(lines)


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f} %" if b else "-"


ISSUE_QUESTIONS = (
    "What are your opening hours?",
    "Where is your office?",
    "Do you have a warranty?",
    "Can I return a product?",
)


def spoken_subset(suite: Suite, n: int) -> Suite:
    """`n` cases spread over the file, plus the issue's four questions where present."""
    step = max(1, len(suite.cases) // max(1, n))
    picked = suite.cases[::step][:n]
    picked += [c for c in suite.cases if c.say in ISSUE_QUESTIONS and c not in picked]
    return Suite(suite.name, suite.assistant, picked)


class SpokenEar:
    """flite → 8 kHz G.711 µ-law → whisper, as a caller's words reach the assistant."""

    def __init__(self, suite: Suite) -> None:
        from bridge.speech.stt import vocabulary_prompt
        from bridge.speech.whisper import WhisperStt

        tools = Toolset.from_assistant_tools(suite.assistant.llm_config.tools)
        self.prompt = vocabulary_prompt(d.description for d in tools.destinations.values())
        self.stt = WhisperStt()
        self.decode_s: list[float] = []

    @staticmethod
    def speak(text: str) -> bytes:
        import io
        import subprocess
        import wave

        from bridge.media import g711
        from bridge.media.resample import resample

        argv = ["flite", "-voice", "kal", "-t", text, "-o", "/dev/stdout"]
        out = subprocess.run(argv, check=True, capture_output=True, timeout=30).stdout
        with wave.open(io.BytesIO(out)) as wav:
            pcm, rate = wav.readframes(wav.getnframes()), wav.getframerate()
        pcm = resample(pcm, rate, 8000)
        return g711.ulaw_decode(g711.ulaw_encode(pcm))

    async def __call__(self, text: str) -> str:
        import time

        pcm = self.speak(text)
        started = time.perf_counter()
        transcript = await self.stt.transcribe(pcm, 8000, self.prompt)
        self.decode_s.append(time.perf_counter() - started)
        return transcript.text.strip()


async def _main(args: argparse.Namespace) -> int:
    from bridge.agent.providers import LlmProviders
    from bridge.config import load_settings

    settings = load_settings(args.config) if args.config else None
    from bridge.config import Settings

    settings = settings or Settings()
    llms = LlmProviders(settings)
    try:
        outcomes: list[Outcome] = []
        decode: list[float] = []
        for path in args.files:
            suite = load_suite(Path(path), args.provider, args.model)
            if args.spoken:
                suite = spoken_subset(suite, args.spoken)
                ear = SpokenEar(suite)
                outcomes += await run_suite(suite, llms.llm_for, settings.agent, say=ear)
                decode += ear.decode_s
            else:
                outcomes += await run_suite(suite, llms.llm_for, settings.agent)
        if decode:
            decode.sort()
            print(
                f"whisper: {len(decode)} utterances, decode p50"
                f" {1000 * decode[len(decode) // 2]:.0f} ms, max {1000 * decode[-1]:.0f} ms\n"
            )
    finally:
        await llms.aclose()
    print(markdown(outcomes))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bridge.agent.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+")
    parser.add_argument("--config", help="TOML configuration (LLM endpoints)")
    parser.add_argument("--provider", help="run with this OpenAI-compatible provider instead")
    parser.add_argument("--model")
    parser.add_argument(
        "--spoken",
        type=int,
        default=0,
        metavar="N",
        help="speak N cases per file through flite, G.711 and whisper",
    )
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
