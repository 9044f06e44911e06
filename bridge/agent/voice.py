"""`VoiceAgent`: one call's conversation (listen, understand, answer, act).

Frames from the session are queued to the agent's own task (`on_audio` only enqueues). That
task runs the turn detector inline (tens of µs per frame) and reacts to its events:

- `SpeechStarted` while the assistant talks or thinks → barge-in: cancel the turn's LLM/TTS
  work and flush the interruptible audio, at once. Not once a transfer or a goodbye is
  decided (`_committed`): that turn plays to the end and its command runs (a known pitfall
  elsewhere is barge-in cancelling the transfer).
- `TurnEnded` → a turn task: STT (off the loop) → LLM stream → each complete sentence to TTS
  and the caller as soon as it is written → tool calls (transfer, end call) as commands
  through the session's queue, the same path as the control API.

Every turn is recorded (`transcript` events) with its latencies. A failing provider is never
silence: an apology, then the configured fallback.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from bridge.agent.dialogue import DEFAULT_PROMPT, Dialogue, refused_transfer_result
from bridge.agent.early import EarlyTranscriber
from bridge.agent.history import history_from_transcript
from bridge.calls.model import CallStatus, EndCallCommand, TransferCommand
from bridge.calls.transfer import Transfer, TransferState
from bridge.config import AgentSettings
from bridge.errors import BridgeError
from bridge.llm.base import ChatMessage, LlmProvider, ToolCall
from bridge.llm.tools import Destination, Toolset, TransferIntent
from bridge.log import get_logger
from bridge.speech.stt import SttProvider, Transcript, vocabulary_prompt
from bridge.speech.vad import SpeechStarted, TurnDetector, TurnEnded

if TYPE_CHECKING:
    from bridge.calls.model import Call
    from bridge.directory.models import Assistant
    from bridge.media.rtp import RtpStream

log = get_logger(__name__)

SAMPLE_RATE = 8000
GAP_CHECK_S = 0.1  # how often to look for a gap in the caller's audio
GAP_S = 0.25  # no caller audio this long (DTX, a silent peer): feed silence to the VAD
MAX_QUEUED_FRAMES = 500  # 10 s of audio: beyond this the agent is stuck; drop, do not grow
__all__ = ["DEFAULT_PROMPT", "AgentSession", "VoiceAgent"]


class AgentSession(Protocol):
    """What the agent needs from `bridge.calls.session.CallSession`."""

    call: Call
    assistant: Assistant | None
    media: RtpStream | None

    def say(
        self,
        text: str,
        *,
        token: str = "",
        interruptible: bool = True,
        on_start: Callable[[], None] | None = None,
    ) -> asyncio.Task[None]: ...

    async def command(
        self, command: Any, *, source: str = "api", label: str | None = None
    ) -> Any: ...

    async def record(self, kind: str, **data: Any) -> None: ...


@dataclass
class _Turn:
    """Timing of one caller turn, in `time.monotonic()` seconds (for transcripts and bench)."""

    ended_at: float
    audio: bytes = b""
    heard: bool = False  # the transcript is in the history
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.monotonic())

    def latencies_ms(self) -> dict[str, int]:
        return {k: round((v - self.ended_at) * 1000) for k, v in self.marks.items()}


class VoiceAgent:
    def __init__(
        self,
        session: AgentSession,
        *,
        llm: LlmProvider,
        stt: SttProvider,
        detector: TurnDetector,
        settings: AgentSettings,
        load_events: Callable[[], Awaitable[Iterable[Any]]] | None = None,
    ) -> None:
        self.session = session
        self._load_events = load_events  # the call's stored events, to resume after a restart
        self.llm = llm
        self.stt = stt
        self.detector = detector
        self.settings = settings
        # The text of the conversation (history, model, tools): the same code as the chat
        # console's; this class adds the audio and carries the actions out on the call.
        self.dialogue = Dialogue(session.assistant, llm, max_tool_rounds=settings.max_tool_rounds)
        self.stt_prompt = vocabulary_prompt(d.description for d in self.destinations)
        # --- speed: turn detection (end of turn by silence and transcript) ---
        self.early = EarlyTranscriber(
            stt,
            self.stt_prompt,
            detector,
            settings.early_stt_ms,
            end_on_transcript=settings.end_turn_on_transcript,
            hold_ms=settings.turn_hold_ms,
        )
        # --- end speed ---
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._turn: asyncio.Task[None] | None = None
        self._speech: list[asyncio.Task[None]] = []
        self._committed = False  # this turn decided a transfer or the end: no barge-in
        self._suspended = False  # a transfer was accepted: not listening until its result
        self._commanding = False  # this agent's own transfer command is under way
        self._stale = False  # the detector holds audio from while we were not listening
        self._pending: dict[str, ToolCall] = {}  # transfer id → the tool call that asked
        self._asking: ToolCall | None = None  # the transfer call whose command is under way
        self._settled: set[str] = set()  # transfer ids with a result
        self._current: _Turn | None = None
        self._carry = b""  # audio of a turn cut off before it was understood
        self._background: set[asyncio.Task[Any]] = set()
        self._last_audio = 0.0
        self._gap_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.log = log.bind(call_id=session.call.id)

    @property
    def destinations(self) -> list[Destination]:
        return self.dialogue.destinations

    @property
    def toolset(self) -> Toolset:
        return self.dialogue.toolset

    @property
    def system(self) -> list[ChatMessage]:
        return self.dialogue.system

    @property
    def history(self) -> list[ChatMessage]:
        return self.dialogue.history

    @history.setter
    def history(self, messages: list[ChatMessage]) -> None:
        self.dialogue.history = messages

    # --- Conversation protocol --------------------------------------------------------------

    async def start(self, *, resumed: bool) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name=f"agent-{self.session.call.id}")
        self._last_audio = loop.time()
        self._gap_timer = loop.call_later(GAP_CHECK_S, self._check_gap)
        if resumed:
            # After a restart the caller is mid-conversation: no second greeting, and the
            # model sees what was said before.
            if self._load_events is not None:
                try:
                    self.history = history_from_transcript(await self._load_events())
                except Exception as exc:
                    self.log.warning("agent.history_not_restored", error=str(exc))
            return
        assistant = self.session.assistant
        greeting = assistant.first_message if assistant is not None else None
        if greeting:
            self._speak(greeting)
            self.history.append(ChatMessage.assistant(greeting))
            await self._transcript("assistant", greeting, greeting=True)

    def on_audio(self, pcm: bytes) -> None:
        if self._inbox.qsize() < MAX_QUEUED_FRAMES:
            self._inbox.put_nowait(pcm)
        self._last_audio = asyncio.get_running_loop().time()

    def on_transfer_started(self) -> None:
        """A transfer was accepted (control API or this assistant): the caller is no longer
        talking to us. Cancel the turn under way (its LLM stream, sentences not yet
        synthesised, interruptible audio already queued) and ignore the caller's audio until
        `on_transfer_result` says the caller is back."""
        if self._closed:
            return
        self._suspended = True
        self._stale = True
        self._carry = b""
        self.early.reset()
        if self._commanding:
            return  # our own transfer: its turn has drained its speech and ends by itself
        turn = self._turn
        thinking = turn is not None and not turn.done()
        if turn is not None and thinking:
            turn.cancel()
        for speech in self._speech:
            speech.cancel()
        self._speech.clear()
        media = self.session.media
        dropped = media.flush() if media is not None else 0
        self.log.info("agent.turn_cancelled", reason="transfer", dropped=dropped)
        self._spawn(
            self.session.record(
                "agent.turn_cancelled", reason="transfer", dropped=dropped, thinking=thinking
            )
        )

    def on_transfer_result(self, transfer: Transfer) -> None:
        asked = transfer.chain_id or transfer.id  # a chain answers for its first attempt
        self._settled.add(asked)
        call = self._pending.pop(asked, None)
        if transfer.state is TransferState.RETURNED:
            call = None  # hand back: the tool call had its result when the bridge was made
        elif call is None and transfer.source == "assistant":
            call = self._asking  # the result came before the command's reply
        result = transfer.result_for_assistant()
        content = json.dumps(result)
        if call is not None:
            self.history.append(ChatMessage.tool(call.id, content))
            self._spawn(
                self._transcript(
                    "tool_result", content, tool="transfer_call", call_id=call.id, **result
                )
            )
        elif transfer.state is TransferState.RETURNED:
            # Hand back (issue 9 §5): after talking to the destination, the caller is back.
            note = (
                f"The caller was transferred to {transfer.label or transfer.destination} and"
                f" has been handed back to you; carry on helping them: {content}"
            )
            self.history.append(ChatMessage.system(note))
        elif transfer.state is not TransferState.BRIDGED:
            # An operator's transfer (control API) failed: the model should know too.
            note = f"A transfer to {transfer.label or transfer.destination} failed: {content}"
            self.history.append(ChatMessage.system(note))
        if transfer.state is not TransferState.BRIDGED:
            # The caller is back with the assistant (the session calls this once the call is
            # active with media again): listen, from a clean detector.
            self._committed = False
            self._suspended = False
            self._stale = True
            self._carry = b""

    async def brief_summary(self) -> str | None:
        """A warm transfer's brief written by this assistant's model from the conversation
        so far (None: the provider cannot, e.g. `local`). The session bounds the time."""
        return await self.dialogue.llm.summarize(list(self.history))

    async def close(self) -> None:
        self._closed = True
        self.early.close()
        if self._gap_timer is not None:
            self._gap_timer.cancel()
        self._inbox.put_nowait(None)
        tasks = [t for t in (self._task, self._turn) if t is not None]
        for task in tasks:
            if task is self._turn and self._committed:
                continue  # a decided transfer / goodbye finishes on its own (shielded)
            task.cancel()
        for speech in self._speech:
            speech.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)  # a committed turn gets a moment to finish

    # --- audio and turn events (the agent's task) -------------------------------------------

    async def _run(self) -> None:
        while True:
            frame = await self._inbox.get()
            if frame is None:
                return
            if not self._listening:
                self._stale = True  # transferring: no turns, and no VAD work either
                continue
            if self._stale:
                self._stale = False
                self.detector.reset()
                self.early.reset()
            try:
                events = self.detector.feed(frame)
            except Exception:
                self.log.exception("agent.vad_failed")
                continue
            if self._listening:
                self.early.observe(frame, events)
                # --- speed: the transcript says the turn is over: end it now ---
                if not any(isinstance(e, TurnEnded) for e in events) and self.early.turn_over():
                    ended = self.detector.end_now()
                    if ended is not None:
                        events.append(ended)
                # --- end speed ---
            for event in events:
                if isinstance(event, SpeechStarted):
                    self._on_speech_started()
                elif isinstance(event, TurnEnded):
                    self._on_turn_ended(event)

    def _check_gap(self) -> None:
        """No audio for a while (a peer that stops sending in silence): the silence still
        counts, or the turn would never end."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        gap = loop.time() - self._last_audio
        if gap >= GAP_S and self._inbox.empty() and self._listening:
            samples = int(min(gap, 1.0) * SAMPLE_RATE)
            self._inbox.put_nowait(b"\x00\x00" * samples)
            self._last_audio = loop.time()
        self._gap_timer = loop.call_later(GAP_CHECK_S, self._check_gap)

    @property
    def _listening(self) -> bool:
        return (
            not self._closed
            and not self._suspended
            and self.session.call.status is CallStatus.ACTIVE
        )

    def _on_speech_started(self) -> None:
        if not self._listening or self._committed:
            return
        media = self.session.media
        thinking = self._turn is not None and not self._turn.done()
        if not thinking and not (media is not None and media.playing):
            return
        if thinking and self._turn is not None:
            self._turn.cancel()
            current = self._current
            if current is not None and not current.heard:
                # Cut off before it was understood (a pause mid-sentence): keep its audio
                # for the next turn, so the caller's words are not lost.
                self._carry = current.audio + b"\x00\x00" * (SAMPLE_RATE // 10)
        for speech in self._speech:
            speech.cancel()  # a sentence still being synthesised never reaches the line
        self._speech.clear()
        dropped = media.flush() if media is not None else 0
        self.log.info("agent.barge_in", dropped=dropped, thinking=thinking)
        self._spawn(self.session.record("agent.barge_in", dropped=dropped, thinking=thinking))

    def _on_turn_ended(self, event: TurnEnded) -> None:
        if not self._listening:
            return  # transferring or ended: the caller is not talking to us
        early = self.early.take()
        if early is not None and self._carry:
            early.cancel()  # it lacks the words of the turn that was cut off
            early = None
        turn = _Turn(time.monotonic(), self._carry + event.audio)
        self._carry = b""
        previous = self._turn
        self._turn = asyncio.get_running_loop().create_task(
            self._take_turn(event, turn, previous, early)
        )
        self._turn.add_done_callback(self._turn_done)

    def _turn_done(self, task: asyncio.Task[None]) -> None:
        """A bug in a turn must be seen (logged), and must not leave the caller in silence."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self.log.error("agent.turn_failed", error=repr(exc), exc_info=exc)
        if self._listening and not self._committed:
            self._speak(self.settings.llm_failure_message)

    # --- one turn ---------------------------------------------------------------------------

    async def _take_turn(
        self,
        event: TurnEnded,
        turn: _Turn,
        previous: asyncio.Task[None] | None,
        early: asyncio.Task[Transcript] | None = None,
    ) -> None:
        if previous is not None and not previous.done():
            await asyncio.gather(previous, return_exceptions=True)  # a committed turn
            if not self._listening or self._committed:
                return
        self._current = turn
        try:
            transcript = await self._transcribe_turn(turn, early)  # speed: holding phrase
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.warning("agent.stt_failed", error=str(exc))
            await self.session.record("agent.stt_failed", error=str(exc))
            self._speak(self.settings.stt_failure_message)
            await self._transcript("assistant", self.settings.stt_failure_message, fallback="stt")
            return
        turn.mark("stt")
        text = transcript.text.strip()
        if not any(c.isalnum() for c in text):
            return  # noise, or words Whisper dropped as no speech: not a turn
        turn.heard = True
        self.history.append(ChatMessage.user(text))
        await self._transcript(
            "caller",
            text,
            confidence=transcript.confidence,
            speech_ms=event.speech_ms,
            turn_end="transcript" if event.by_transcript else None,  # speed: turn detection
            stt_ms=turn.latencies_ms().get("stt"),
        )
        await self._reply(turn)

    # --- speed: STT under load: a holding phrase, never silence ---
    async def _transcribe_turn(
        self, turn: _Turn, early: asyncio.Task[Transcript] | None
    ) -> Transcript:
        """The turn's transcript (the early one if it was started at the pause). When it is
        not in `agent.stt_hold_ms` after the turn ended (the STT queue is long), the caller
        hears `agent.stt_hold_message` meanwhile; past the queue's time budget STT fails
        with SttTimeout and the caller is asked to say it again."""
        work = early or asyncio.ensure_future(
            self.stt.transcribe(turn.audio, SAMPLE_RATE, self.stt_prompt)
        )
        try:
            hold = self.settings.stt_hold_ms / 1000
            if hold > 0 and self.settings.stt_hold_message:
                done, _ = await asyncio.wait({work}, timeout=hold)
                if not done:
                    self._speak(self.settings.stt_hold_message)
                    self.log.info("agent.stt_hold", waited_ms=round(hold * 1000))
                    self._spawn(self.session.record("agent.stt_hold", waited_ms=round(hold * 1000)))
            return await work
        except asyncio.CancelledError:
            work.cancel()
            raise

    # --- end speed ---

    async def _reply(self, turn: _Turn) -> None:
        await self.dialogue.reply(_CallHost(self, turn))

    def _tool_result(self, call: ToolCall, result: dict[str, Any]) -> None:
        content = json.dumps(result)
        self.history.append(ChatMessage.tool(call.id, content))
        self._spawn(self._transcript("tool_result", content, tool=call.name, call_id=call.id))

    async def _transfer(self, intent: TransferIntent, call: ToolCall | None) -> bool:
        """Hand the caller over through the session (same path as the control API). The
        preface is spoken uninterruptibly by the session; the outcome arrives later in
        `on_transfer_result`. True if the model must be asked again (refused)."""
        self._committed = True
        accepted = False
        dest = intent.destination
        try:
            await self._drain_speech()  # what the model said first plays to the end
            # Built inside the try: a preface the command refuses (too long, unspeakable
            # text) is a failed transfer the model hears about, not a dead turn.
            command = TransferCommand(
                type="transfer", destination=dest.target, message=intent.preface
            )
            self._asking = call
            self._commanding = True
            reply = await asyncio.shield(
                self.session.command(command, source="assistant", label=dest.description)
            )
            accepted = True
        except Exception as exc:  # BridgeError (refused), ValidationError, anything
            if not isinstance(exc, BridgeError):
                self.log.error("agent.transfer_failed", error=repr(exc))
            if call is None:
                return False
            self._tool_result(call, refused_transfer_result(exc))
            return True
        finally:
            self._asking = None
            self._commanding = False
            if not accepted:
                self._committed = False  # barge-in works again, whatever happened
        transfer_id = str(reply.get("transfer_id"))
        if call is not None and transfer_id not in self._settled:
            self._pending[transfer_id] = call
        return False

    async def _end_call(self, call: ToolCall, *, spoke: bool) -> None:
        self._committed = True
        self._tool_result(call, {"ended": True})
        ended = False
        try:
            await self._drain_speech()  # the goodbye the model wrote plays to the end
            message = None if spoke else self.settings.goodbye_message
            await asyncio.shield(
                self.session.command(
                    EndCallCommand(type="end_call", message=message), source="assistant"
                )
            )
            ended = True
        except Exception as exc:
            self.log.warning("agent.end_call_failed", error=repr(exc))
        finally:
            if not ended:
                self._committed = False

    async def _llm_failed(self, exc: BaseException) -> None:
        """Never silence: apologise, then transfer to the first destination or keep
        listening, as configured."""
        error_type = type(exc).__name__
        self.log.warning("agent.llm_failed", error=str(exc), error_type=error_type)
        if self._suspended:
            return  # a transfer took the caller: nothing to say
        await self.session.record("agent.llm_failed", error=str(exc), error_type=error_type)
        apology = self.settings.llm_failure_message
        first = self.destinations[0] if self.destinations else None
        if self.settings.on_llm_failure == "transfer_first" and first is not None:
            preface = f"{apology} {first.message or 'Let me put you through to a colleague.'}"
            self.history.append(ChatMessage.assistant(preface))
            await self._transcript("assistant", preface, fallback="transfer_first")
            await self._transfer(TransferIntent(first.key, first, preface), None)
            if self._committed:
                return
            # The transfer was refused (the call is no longer active): just apologise.
        self._speak(apology)
        self.history.append(ChatMessage.assistant(apology))
        await self._transcript("assistant", apology, fallback="apologize")

    # --- helpers ----------------------------------------------------------------------------

    def _speak(self, text: str, on_start: Callable[[], None] | None = None) -> None:
        if self._suspended:
            return  # the caller is being transferred: not a word over it
        self._speech = [t for t in self._speech if not t.done()]
        self._speech.append(self.session.say(text, token="assistant", on_start=on_start))

    async def _drain_speech(self) -> None:
        speech, self._speech = self._speech, []
        if speech:
            await asyncio.gather(*speech, return_exceptions=True)

    async def _transcript(self, role: str, text: str, **data: Any) -> None:
        extra = {k: v for k, v in data.items() if v is not None}
        await self.session.record("transcript", role=role, text=text, **extra)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _CallHost:
    """A `DialogueHost` for one turn of a call: sentences are spoken, actions are commands
    on the call's session, every step a transcript event with the turn's latencies."""

    def __init__(self, agent: VoiceAgent, turn: _Turn) -> None:
        self.agent = agent
        self.turn = turn

    @property
    def suspended(self) -> bool:
        return self.agent._suspended

    def on_token(self) -> None:
        self.turn.mark("llm")

    def say(self, sentence: str) -> None:
        self.turn.mark("say")
        self.agent._speak(sentence, on_start=self._audio_started)

    def _audio_started(self) -> None:
        """The first frame of a reply sentence went to the caller (from the media pacer):
        the turn's latency as the caller hears it, once per turn (`assistant.first_audio`,
        the source of callbridge_turn_latency_seconds)."""
        if "audio" in self.turn.marks:
            return
        self.turn.mark("audio")
        latency = self.turn.latencies_ms()
        self.agent._spawn(
            self.agent.session.record(
                "assistant.first_audio", turn_ms=latency["audio"], latency_ms=latency
            )
        )

    async def transcript(self, role: str, text: str, **data: Any) -> None:
        if role == "assistant" and not data.get("interrupted"):
            data["latency_ms"] = self.turn.latencies_ms()
        await self.agent._transcript(role, text, **data)

    def spawn(self, coro: Awaitable[Any]) -> None:
        self.agent._spawn(coro)

    def waiting(self) -> set[str]:
        return {c.id for c in self.agent._pending.values()}

    async def transfer(self, intent: TransferIntent, call: ToolCall | None) -> bool:
        return await self.agent._transfer(intent, call)

    async def end_call(self, call: ToolCall, *, spoke: bool) -> None:
        await self.agent._end_call(call, spoke=spoke)

    async def llm_failed(self, exc: BaseException) -> None:
        await self.agent._llm_failed(exc)
