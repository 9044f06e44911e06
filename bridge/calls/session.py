"""One call: a task and a queue that serialise everything that happens to it.

PBX events, API commands, finished speech and timers all go through the queue, so the
call's state is only ever touched by its own task (no locks). Handlers never wait for long
things: speech and timers report back through the queue.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from bridge import faults, timing
from bridge.calls import handback
from bridge.calls.chain import ChainContext, launch, next_attempt, open_chain
from bridge.calls.items import CommandEnvelope, LegAbandoned, Resume, SpeechDone, TimerFired
from bridge.calls.model import (
    Call,
    CallEvent,
    CallStatus,
    EndCallCommand,
    ReturnCommand,
    SayCommand,
    TransferCommand,
    utcnow,
)
from bridge.calls.outcomes import local_reason
from bridge.calls.transfer import Transfer, TransferEvent, TransferState
from bridge.calls.transferring import (
    TransferDeps,
    TransferRun,
    transfer_accepted,
)
from bridge.errors import BridgeError, Conflict, PbxUnavailable
from bridge.log import get_logger
from bridge.media.rtp import RtpStream
from bridge.pbx.ports import (
    ChannelGone,
    ChannelHungUp,
    DtmfReceived,
    LegAnswered,
    LegFailed,
    LegOutcome,
    LegProgress,
    LegRinging,
    MediaAddress,
    PbxEvent,
)

if TYPE_CHECKING:
    from bridge.calls.conversation import Conversation
    from bridge.calls.service import CallService
    from bridge.directory.models import Assistant

log = get_logger(__name__)

# After a reconnect, how long a transfer whose leg vanished waits for the adapter's late
# report of how the leg ended before it fails back to the assistant.
LEG_LOST_GRACE_S = 2.0
# How long a caller whose media could not be attached (PBX unreachable) waits for the PBX to
# come back before being sent to the fallback.
MEDIA_WAIT_S = 10.0


class CallSession:
    """Implements `bridge.calls.transferring.TransferHost` for the transfer it runs."""

    def __init__(self, service: CallService, call: Call, assistant: Assistant | None) -> None:
        self.service = service
        self.call = call
        self.assistant = assistant
        self.run: TransferRun | None = None  # the call's last transfer, as it runs
        self.transfers_in_call = 0
        self.media: RtpStream | None = None
        self.conversation: Conversation | None = None
        self._speech_order = asyncio.Lock()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._speech_tasks: set[asyncio.Task[None]] = set()
        self._shut = False
        self._untold: Transfer | None = None  # a failed transfer not yet told (no media)
        self._replying: CommandEnvelope | None = None  # the command being handled
        self._replied_at: float | None = None  # when it was answered (monotonic)
        self.greeted = False  # the conversation started once (a resume must not greet again)
        # Hand back (issue 9 §5): the code the destination presses to give the caller back.
        self.handback = handback.settings_for(assistant)
        self._handback_code = handback.CodeListener(self.handback.dtmf)
        self.log = log.bind(call_id=call.id, channel=call.channel_id)

    # --- the transfer -----------------------------------------------------------------------

    @property
    def transfer(self) -> Transfer | None:
        return self.run.transfer if self.run is not None else None

    @transfer.setter
    def transfer(self, transfer: Transfer | None) -> None:
        """Adopt a stored transfer (after a restart): it runs from where it was."""
        self.run = TransferRun(self, self._transfer_deps(), transfer) if transfer else None

    def _transfer_deps(self) -> TransferDeps:
        service = self.service
        return TransferDeps(
            pbx=service.pbx,
            policy=getattr(service, "policy", None),
            track_leg=lambda leg: service.track_leg(leg, self),
            untrack_leg=lambda leg, keep: service.untrack_leg(leg, keep=keep),
            caller_id=service.caller_id_for(self.call),
            sip_headers=dict(service.settings.transfer.sip_headers),
        )

    def _new_transfer_id(self) -> str:
        return str(uuid.uuid4())

    async def start_transfer(
        self,
        command: TransferCommand,
        *,
        source: str,
        label: str | None = None,
    ) -> dict[str, Any]:
        if self.call.status is not CallStatus.ACTIVE:
            raise Conflict(
                f"cannot transfer while the call is {self.call.status.value}", field="type"
            )
        # A transfer may be the first attempt of a fallback chain (issue 9 §3): one transfer
        # against max_per_call, whatever its length.
        chain = self._chain_context(counted=self.transfers_in_call)
        run = await open_chain(self, chain, command, source=source, label=label)
        self.run = run
        self.transfers_in_call += 1
        await launch(self, chain, run)
        return transfer_accepted(self.call.id, run.transfer)

    def _chain_context(self, *, counted: int) -> ChainContext:
        def adopt(run: TransferRun) -> None:
            self.run = run

        return ChainContext(
            deps=self._transfer_deps(),
            settings=self.service.settings.transfer,
            assistant=self.assistant,
            new_id=self._new_transfer_id,
            counted=counted,
            adopt=adopt,
        )

    # TransferHost: what the transfer uses of its call.

    @property
    def has_media(self) -> bool:
        return self.media is not None

    async def save(
        self,
        transfer: Transfer,
        *,
        call: bool = False,
        event: CallEvent | None = None,
        events: list[CallEvent] | None = None,
    ) -> None:
        batch = [*([event] if event is not None else []), *(events or [])]
        await self.service.store.save_state(
            self.call if call else None, transfer, batch or None, call_id=self.call.id
        )

    def set_timer(self, name: str, delay: float, ref: str) -> None:
        self._set_timer(name, delay, ref)

    def cancel_timer(self, name: str) -> None:
        self._cancel_timer(name)

    async def quietly(self, what: str, step: Awaitable[Any]) -> None:
        await self._quietly(what, step)

    async def end(self, reason: str) -> None:
        await self._end(reason)

    async def hang_up(self, reason: str) -> None:
        await self._hangup(reason)

    def transfer_started(self) -> None:
        started = getattr(self.conversation, "on_transfer_started", None)
        if started is not None:
            started()  # the assistant stops its turn and stops listening until the result
        if self.media is not None:
            self.media.flush()  # the assistant stops talking; the message is not interruptible

    def drop_media(self) -> None:
        self._close_media()

    # --- hand back (issue 9 §5): bridge/calls/handback.py ---
    async def return_on_destination_hangup(self, run: TransferRun) -> bool:
        if not self.handback.return_on_destination_hangup:
            return False
        try:
            await handback.hand_back(
                run,
                by=handback.BY_DESTINATION_HANGUP,
                detail=None,
                reason="the destination hung up; the caller is back with the assistant",
            )
        except BridgeError as exc:
            self.log.error("transfer.return_failed", error=str(exc))
            return False  # the caller is hung up, as without the setting
        return True

    async def _on_return_command(self, command: ReturnCommand, source: str) -> dict[str, Any]:
        run = handback.check_returnable(self.run, self.call.status)
        await handback.hand_back(
            run,
            by=handback.BY_API,
            detail=source,
            reason="the caller was handed back through the control API",
            message=command.message,
        )
        return {"id": self.call.id, "accepted": "return", "transfer_id": run.transfer.id}

    async def _on_dtmf(self, event: DtmfReceived) -> None:
        """Digits from the bridged destination's leg may be the hand-back code; the caller's
        own digits (its channel) never are."""
        run = self.run
        if (
            run is None
            or event.channel_id != run.transfer.leg_id
            or run.transfer.state is not TransferState.BRIDGED
            or not self._handback_code.feed(event.digit)
        ):
            return
        code = self._handback_code.code
        try:
            await handback.hand_back(
                run,
                by=handback.BY_AGENT_DTMF,
                detail=code,
                reason=f"the destination handed the caller back (DTMF {code})",
            )
        except BridgeError as exc:
            self.log.error("transfer.return_failed", error=str(exc))

    # --- end hand back ---

    # --- speed (issue 7 §8): the transfer's 202 once it is on record ---
    def transfer_recorded(self) -> None:
        """Answer the command that started the transfer now: it is authorised and on record,
        so the API need not wait for the PBX's round trips (the leg's outcome comes as the
        call's events and webhooks)."""
        envelope = self._replying
        run = self.run
        if envelope is None or envelope.reply.done() or run is None:
            return
        envelope.reply.set_result(transfer_accepted(self.call.id, run.transfer))
        self._replied_at = time.monotonic()

    # --- end speed ---

    # --- warm transfer (issue 9 §2): our media on the leg alone, for the brief ---
    async def open_leg_media(self, leg_id: str, on_audio: Callable[[bytes], None]) -> RtpStream:
        settings = self.service.settings.media
        stream = RtpStream(settings.codec, on_audio=on_audio)
        try:
            host, port = await stream.open(settings.bind_host, self.service.clock)
            advertised = MediaAddress(settings.advertise_host or host, port)
            remote = await self.service.pbx.attach_media(leg_id, advertised, settings.codec)
        except BaseException:
            stream.close()
            raise
        stream.set_remote(remote.host, remote.port, framing=remote.framing, codec=remote.codec)
        return stream

    async def synthesize(self, text: str) -> bytes:
        return await self.service.tts.synthesize(text)

    async def brief_summary(self) -> str | None:
        """The warm brief by the assistant's model, if the conversation can write one."""
        write = getattr(self.conversation, "brief_summary", None)
        return None if write is None else cast("str | None", await write())

    async def caller_words(self) -> list[str]:
        events = await self.service.store.events(self.call.id)
        return [
            str(e.data.get("text") or "")
            for e in events
            if e.kind == "transcript" and e.data.get("role") == "caller"
        ]

    async def transfer_done(self, transfer: Transfer) -> None:
        if transfer.state is TransferState.FAILED and await next_attempt(
            self, self._chain_context(counted=self.transfers_in_call - 1), transfer
        ):
            return  # a fallback chain's next attempt runs (issue 9 §3): nothing to tell yet
        if transfer.state not in (TransferState.FAILED, TransferState.RETURNED):
            if transfer.state is TransferState.BRIDGED and self.conversation is not None:
                self.conversation.on_transfer_result(transfer)
            return
        if self.media is None:  # e.g. after a daemon restart during the transfer
            if not await self._attach_media():
                # Sent to the fallback, or the caller left, or the media waits for the PBX:
                # then the result is told once it is attached (on the `Resume`).
                self._untold = transfer
                return
            if self.conversation is None:
                await self._start_conversation(resumed=True)
        self._tell_result(transfer)

    def _tell_result(self, transfer: Transfer) -> None:
        """The caller is ACTIVE with media: say why, then hand the typed result to the
        conversation, which listens again from now on."""
        self._untold = None
        assert transfer.outcome is not None
        if transfer.state is TransferState.RETURNED:  # hand back (issue 9 §5)
            self.say(handback.return_line(transfer, self.assistant), token="returned")
        else:
            self.say(self.service.failure_message(transfer.outcome), token="transfer_failed")
        if self.conversation is not None:
            self.conversation.on_transfer_result(transfer)

    # --- plumbing ---------------------------------------------------------------------------

    def start(self, first: Any) -> None:
        self._queue.put_nowait(first)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.call.id)

    def post(self, item: Any) -> None:
        self._queue.put_nowait(item)

    async def command(
        self, command: Any, *, source: str = "api", label: str | None = None
    ) -> dict[str, Any]:
        """Run a control command in the call's task; `source` is "api" or "assistant"."""
        if self._shut or self.ended:
            raise Conflict("the call has ended", field="id")  # no task left to answer
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.post(CommandEnvelope(command, reply, source, label))
        return await reply

    @property
    def started(self) -> bool:
        return self._task is not None

    @property
    def ended(self) -> bool:
        return self.call.status is CallStatus.ENDED

    async def _run(self) -> None:
        try:
            while not self.ended:
                item = await self._queue.get()
                try:
                    await self._handle(item)
                except asyncio.CancelledError:
                    # This process stops in the middle of a command: answer it (an API
                    # request must not wait for the server's shutdown timeout).
                    if isinstance(item, CommandEnvelope) and not item.reply.done():
                        item.reply.set_exception(Conflict("callbridge is stopping", field="id"))
                    raise
                except Exception as exc:  # one bad event must not orphan the call
                    self.log.exception("call.handler_failed", item=repr(item)[:200])
                    if isinstance(item, CommandEnvelope) and not item.reply.done():
                        item.reply.set_exception(exc)
                    await self._recover(exc)
        finally:
            # Whatever happened above (even `_end` or the store failing), the call's resources
            # are freed and nobody waits forever for a reply.
            try:
                self._shutdown()
            except Exception:
                self.log.exception("call.shutdown_failed")
            self._fail_pending()

    def _fail_pending(self) -> None:
        """Fail the commands still queued: the call has ended (or this process stops)."""
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, CommandEnvelope) and not item.reply.done():
                item.reply.set_exception(Conflict("the call has ended", field="id"))

    async def _recover(self, exc: Exception) -> None:
        """After an unexpected error, leave the caller somewhere sensible: a transfer in
        flight fails back to the assistant (its leg hung up); a caller without media goes to
        the fallback. If even that fails, the call ends (never half alive)."""
        run = self.run
        if self.ended:
            return
        try:
            if run is None or run.transfer.final:
                if self.call.status is CallStatus.ACTIVE and self.media is None:
                    await self._to_fallback(f"internal error: {exc}")
                return
            await run.fail(
                TransferEvent.ERROR,
                LegOutcome.FAILED,
                reason=local_reason(f"internal error: {exc}"),
                hangup_leg=True,
            )
        except Exception:
            # Even recovering failed (e.g. the store is locked): never leave the caller in
            # the PBX with no session. Send them to the fallback; `_end` never raises.
            self.log.exception("call.recover_failed")
            try:
                await self._to_fallback(f"internal error: {exc}")
            except Exception:
                self.log.exception("call.fallback_failed")
            await self._end(f"internal error: {exc}")

    async def _handle(self, item: Any) -> None:
        if isinstance(item, CommandEnvelope):
            # load2 (issue 7 §8): where a command's time goes, logged as call.command_timing
            span, started = timing.Span(), time.monotonic()
            token = timing.current.set(span)
            self._replying, self._replied_at = item, None
            try:
                result = await self._on_command(item)
                if not item.reply.done():
                    item.reply.set_result(result)
                    self._replied_at = time.monotonic()
            except BridgeError as exc:
                if item.reply.done():  # answered already (see transfer_recorded)
                    self.log.warning("call.command_failed_after_reply", error=str(exc))
                else:
                    item.reply.set_exception(exc)
            finally:
                self._replying = None
                timing.current.reset(token)
                self.log.info(
                    "call.command_timing",
                    type=type(item.command).__name__,
                    queued_ms=round((started - item.posted) * 1000, 1),
                    handled_ms=round((time.monotonic() - started) * 1000, 1),
                    # answered before the end of the handling (a transfer, once recorded)
                    replied_ms=round(((self._replied_at or time.monotonic()) - started) * 1000, 1),
                    **span.fields(),
                )
        elif isinstance(item, ChannelHungUp):
            await self._on_hangup(item)
        elif isinstance(item, LegRinging | LegProgress | LegAnswered | LegFailed):
            if self.run is not None:
                await self.run.on_leg_event(item)
            elif isinstance(item, LegAnswered):  # a leg nobody waits for: do not leave it up
                await self._quietly("hangup_leg", self.service.pbx.hangup(item.channel_id))
        elif isinstance(item, SpeechDone):
            await self._on_speech_done(item)
        elif isinstance(item, TimerFired) and item.name == "media_wait":
            await self._on_media_wait()
        elif isinstance(item, TimerFired):
            if self.run is not None:
                await self.run.on_timer(item)
        elif isinstance(item, Resume):
            await self._on_resume(item)
        elif isinstance(item, LegAbandoned):
            await self._on_leg_abandoned(item)
        elif item == "greet":
            await self._greet()
        elif isinstance(item, DtmfReceived) and item.channel_id != self.call.channel_id:
            # A key on the transfer's leg: a warm transfer's accept / decline (issue 9 §2),
            # or, once bridged, the hand-back code (issue 9 §5).
            run = self.run
            if run is not None and item.channel_id == run.transfer.leg_id:
                if run.transfer.state is TransferState.BRIDGED:
                    await self._on_dtmf(item)
                else:
                    await run.on_leg_dtmf(item.digit)
        elif isinstance(item, PbxEvent):
            pass  # the caller's DTMF, playback ends: not used yet

    async def record(self, kind: str, **data: Any) -> None:
        await self.service.store.add_event(self.call.id, CallEvent(kind, utcnow(), data))

    async def _save(self) -> None:
        await self.service.store.save(self.call)

    async def _persist(
        self, *, call: bool = False, transfer: bool = False, event: CallEvent | None = None
    ) -> None:
        """Save the call and/or its transfer and an event in one transaction."""
        await self.service.store.save_state(
            self.call if call else None,
            self.transfer if transfer else None,
            [event] if event is not None else None,
            call_id=self.call.id,
        )

    def _set_timer(self, name: str, delay: float, ref: str) -> None:
        self._cancel_timer(name)
        loop = asyncio.get_running_loop()
        self._timers[name] = loop.call_later(delay, self.post, TimerFired(name, ref))

    def _cancel_timer(self, name: str) -> None:
        handle = self._timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    # --- call start -------------------------------------------------------------------------

    async def _greet(self) -> None:
        pbx = self.service.pbx
        await faults.point("before_answer")
        try:
            await pbx.answer(self.call.channel_id)
        except ChannelGone:
            await self._end("caller hung up before answer")
            return
        except PbxUnavailable as exc:
            # A short outage as the caller arrives: they still ring in the PBX. Answer on the
            # `Resume` that follows the reconnect; the fallback if it does not come soon.
            self.log.warning("call.answer_waiting_for_pbx", error=str(exc))
            await self.record("call.answer_waiting", error=str(exc))
            self._set_timer("media_wait", MEDIA_WAIT_S, self.call.id)
            return
        self.call.answered_at = utcnow()
        await self._persist(call=True, event=CallEvent("call.answered", utcnow()))
        if not await self._attach_media():
            return
        await self._start_conversation(resumed=False)

    async def _start_conversation(self, *, resumed: bool) -> None:
        """Hand the caller to the assistant's conversation, or just greet without one."""
        factory = self.service.conversation_factory
        if self.conversation is None and factory is not None:
            self.conversation = factory(self)
        self.greeted = True
        if self.conversation is not None:
            await self.conversation.start(resumed=resumed)
        elif not resumed and self.assistant is not None and self.assistant.first_message:
            self.say(self.assistant.first_message, token="greeting")

    async def _attach_media(self) -> bool:
        """Open RTP and have the PBX stream the caller to it. On failure the caller goes to the
        dialplan's fallback: never left in silence."""
        settings = self.service.settings.media
        stream = RtpStream(settings.codec, on_audio=self._on_audio)
        try:
            host, port = await stream.open(settings.bind_host, self.service.clock)
            advertised = MediaAddress(settings.advertise_host or host, port)
            remote = await self.service.pbx.attach_media(
                self.call.channel_id, advertised, settings.codec
            )
        except ChannelGone:
            stream.close()
            await self._end("caller hung up")
            return False
        except PbxUnavailable as exc:
            # The PBX is unreachable (a short outage): the caller is still there. Re-attach on
            # the `Resume` that follows the reconnect; the fallback if it does not come soon.
            stream.close()
            self.log.warning("call.media_waiting_for_pbx", error=str(exc))
            await self.record("call.media_waiting", error=str(exc))
            self._set_timer("media_wait", MEDIA_WAIT_S, self.call.id)
            return False
        except (BridgeError, OSError) as exc:
            stream.close()
            self.log.error("call.media_failed", error=str(exc))
            await self.record("call.media_failed", error=str(exc))
            await self._to_fallback("media could not be attached")
            return False
        stream.set_remote(remote.host, remote.port, framing=remote.framing, codec=remote.codec)
        self.media = stream
        await self.record(
            "media.attached", local=f"{host}:{port}", remote=f"{remote.host}:{remote.port}"
        )
        return True

    async def _on_media_wait(self) -> None:
        if not self.ended and self.media is None and self.call.status is CallStatus.ACTIVE:
            what = "the caller" if self.call.answered_at is None else "media"
            action = "answered" if self.call.answered_at is None else "attached"
            await self._to_fallback(f"{what} could not be {action} (the PBX stayed unreachable)")

    def _on_audio(self, pcm: bytes) -> None:
        """Caller audio, 20 ms at a time, straight to the conversation."""
        if self.conversation is not None:
            self.conversation.on_audio(pcm)

    # --- speech -----------------------------------------------------------------------------

    def say(
        self,
        text: str,
        *,
        token: str = "",
        interruptible: bool = True,
        on_start: Callable[[], None] | None = None,
    ) -> asyncio.Task[None]:
        """Speak `text` to the caller; a `SpeechDone(token)` comes back through the queue.
        The returned task ends when the audio has played or was flushed (the conversation
        awaits it, and cancels it on barge-in before its audio is queued). `on_start` runs
        when the first frame of its audio goes to the caller (the agent's turn latency)."""
        task = asyncio.get_running_loop().create_task(
            self._speak(text, token, interruptible, on_start)
        )
        self._speech_tasks.add(task)
        task.add_done_callback(self._speech_tasks.discard)
        return task

    async def _speak(
        self,
        text: str,
        token: str,
        interruptible: bool,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        try:
            # Synthesis runs one utterance at a time so sentences play in the order said.
            async with self._speech_order:
                synth_started = time.monotonic()
                pcm = await self.service.tts.synthesize(text)
                tts_ms = round((time.monotonic() - synth_started) * 1000)
                media = self.media
                if media is None:
                    self.post(SpeechDone(token, False, "no media"))
                    return
                playout = media.play(pcm, interruptible=interruptible, on_start=on_start)
            await self.record("assistant.said", text=text, tts_ms=tts_ms)
            # Shielded: cancelling this waiter (barge-in) must not destroy the playout's own
            # state (played or flushed), which the media and others still report.
            played = await asyncio.shield(playout.done)
            self.post(SpeechDone(token, played))
        except Exception as exc:
            self.log.error("call.tts_failed", error=str(exc))
            self.post(SpeechDone(token, False, str(exc)))

    async def _on_speech_done(self, done: SpeechDone) -> None:
        if done.error:
            await self.record("speech.failed", token=done.token, error=done.error)
        if done.token == "end_call":
            await self._hangup("ended by command")
        elif self.run is not None and done.token == self.run.token:
            await self.run.on_announced()

    # --- commands ---------------------------------------------------------------------------

    async def _on_command(self, envelope: CommandEnvelope) -> dict[str, Any]:
        command = envelope.command
        status = self.call.status
        if status is CallStatus.ENDED:
            raise Conflict("the call has ended", field="id")
        if isinstance(command, TransferCommand):
            return await self.start_transfer(command, source=envelope.source, label=envelope.label)
        if isinstance(command, SayCommand):
            if status is not CallStatus.ACTIVE or self.media is None:
                raise Conflict(f"cannot speak while the call is {status.value}", field="type")
            self.say(command.message, token="say")
            return {"id": self.call.id, "accepted": "say"}
        if isinstance(command, ReturnCommand):
            return await self._on_return_command(command, envelope.source)
        if isinstance(command, EndCallCommand):
            if command.message and status is CallStatus.ACTIVE and self.media is not None:
                self.media.flush()
                self.say(command.message, token="end_call", interruptible=False)
            else:
                await self._hangup("ended by command")
            return {"id": self.call.id, "accepted": "end_call"}
        raise Conflict(f"unsupported command {command!r}")

    # --- hangups and the end ----------------------------------------------------------------

    async def _on_hangup(self, event: ChannelHungUp) -> None:
        run = self.run
        if event.channel_id == self.call.channel_id:
            # `_end` settles an open transfer (cancelled) and hangs up its leg.
            await self._end("caller hung up", cause=event.cause, cause_text=event.cause_text)
        elif run is not None and run.transfer.leg_id and event.channel_id == run.transfer.leg_id:
            await run.on_leg_hangup(event)

    async def _hangup(self, reason: str) -> None:
        try:
            await self.service.pbx.hangup(self.call.channel_id)
        except ChannelGone:
            pass
        except BridgeError as exc:
            self.log.error("call.hangup_failed", error=str(exc))
        await self._end(reason)

    async def _to_fallback(self, reason: str) -> None:
        try:
            await self.service.pbx.continue_in_dialplan(
                self.call.channel_id,
                self.service.settings.calls.fallback_context,
                self.call.number or "s",
            )
        except (ChannelGone, BridgeError) as exc:
            self.log.error("call.fallback_failed", error=str(exc))
            await self._hangup(f"{reason}: fallback failed")
            return
        await self._end(f"{reason}: sent to the dialplan fallback")

    async def _end(
        self,
        reason: str,
        *,
        cause: int | None = None,
        cause_text: str | None = None,
    ) -> None:
        """The one place a call ends. It settles an open transfer (cancelled), hangs up the
        transfer's leg, stops the ringback and frees the PBX side. It never raises: each step
        is logged and the next one still runs."""
        if self.ended:
            return
        self.call.status = CallStatus.ENDED
        self.call.ended_at = utcnow()
        self.call.end_reason = reason
        events = []
        settled = None
        if self.run is not None:
            settled = await self.run.close(reason)
            if settled is not None:
                events.append(settled)
        ended = {"reason": reason, "cause": cause, "cause_text": cause_text}
        events.append(CallEvent("call.ended", utcnow(), ended))
        try:
            await self.service.store.save_state(
                self.call, self.transfer if settled is not None else None, events
            )
        except Exception:
            self.log.exception("call.end_save_failed")
        self.log.info("call.ended", reason=reason, cause=cause)
        await self._quietly("release", self.service.pbx.release(self.call.channel_id))

    async def _quietly(self, what: str, step: Awaitable[Any]) -> None:
        """Run a clean-up step; log its failure and carry on."""
        try:
            await step
        except ChannelGone:
            pass
        except Exception as exc:
            self.log.warning(f"call.{what}_failed", error=str(exc) or type(exc).__name__)

    def _close_media(self) -> None:
        if self.media is not None:
            self.media.close()
            self.media = None

    async def detach(self) -> None:
        """The daemon stops: drop our side of the call without ending it (the caller stays in
        the PBX and the next daemon resumes the call)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._shutdown()
        self._fail_pending()

    def _shutdown(self) -> None:
        if self._shut:
            return
        self._shut = True
        for name in list(self._timers):
            self._cancel_timer(name)
        for task in self._speech_tasks:
            task.cancel()
        self._close_media()
        if self.conversation is not None:
            conversation, self.conversation = self.conversation, None
            asyncio.get_running_loop().create_task(conversation.close())
        self.service.forget(self)

    # --- resume after a reconnect or restart ------------------------------------------------

    async def _on_resume(self, resume: Resume) -> None:
        await self.record("call.resumed", status=self.call.status.value)
        transfer = self.transfer
        if self.run is not None and await self.run.on_resume(resume, LEG_LOST_GRACE_S):
            return
        if self.call.status is CallStatus.TRANSFERRED:  # no transfer known: nothing to keep
            await self._hangup("destination left while callbridge was disconnected")
            return
        if self.call.answered_at is None:  # the answer waited for the PBX
            self._cancel_timer("media_wait")
            await self._greet()
            return
        if self.media is None:  # a daemon restart (or media that waited for the PBX)
            self._cancel_timer("media_wait")
            if not await self._attach_media():
                return
            await self._start_conversation(resumed=self.greeted)
            if (
                self.run is not None
                and transfer is not None
                and (transfer.state is TransferState.ANNOUNCING)
            ):
                self.post(SpeechDone(self.run.token, True))
            elif transfer is not None and self._untold is transfer:
                self._tell_result(transfer)  # a failed transfer waited for the media

    async def _on_leg_abandoned(self, item: LegAbandoned) -> None:
        await self.record(
            "transfer.abandoned",
            transfer_id=item.transfer_id,
            leg=item.leg_id,
            dialled=item.dialled,
            reason="placed by a daemon that stopped before recording it; hung up",
        )
        if self.call.status is CallStatus.ACTIVE and self.media is not None:
            self.say(self.service.failure_message(LegOutcome.FAILED), token="transfer_failed")
