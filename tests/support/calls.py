"""A call service on a REAL SQLite store with a fake PBX that records the verbs it is asked.

Tests push PBX events and commands through the service (as the adapter and the API do) and
assert on the store (history, outcomes, call status, events) and on the verbs the adapter
was asked. Waiting is on conditions (`until`), never on time.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.calls.model import CallStatus, TransferCommand
from bridge.calls.service import CallService
from bridge.calls.session import CallSession
from bridge.calls.store import CallStore
from bridge.calls.transfer import Transfer
from bridge.config import Settings
from bridge.errors import NotFound
from bridge.pbx.ports import (
    CallArrived,
    DialTarget,
    EventSink,
    ExtensionState,
    MediaAddress,
    PbxEvent,
    TrunkSpec,
)
from bridge.store.db import Database
from tests.support.agent import make_assistant

CALLED = "+31201234567"
CALLER = "+31655501234"
DEST = "+31612345678"  # configured on the test assistant (see tests.support.agent)


class FakePbx:
    """Implements `PbxAdapter`; records every verb. `fail[verb]` is an exception to raise, or
    a list of exceptions raised one per call (then the verb works again)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, Exception | list[Exception]] = {}
        self.sink: EventSink | None = None
        self.media_port = 9
        self.trunks: set[str] = set()
        self.leg_context: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
        # extension_state's answers per endpoint (unset: available)
        self.extensions: dict[str, ExtensionState] = {}

    def _verb(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        exc = self.fail.get(name)
        if isinstance(exc, list):
            if exc:
                raise exc.pop(0)
        elif exc is not None:
            raise exc

    def verbs(self, name: str) -> list[tuple[Any, ...]]:
        return [c[1:] for c in self.calls if c[0] == name]

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    async def start(self, sink: EventSink) -> None:
        self.sink = sink

    async def stop(self) -> None:
        pass

    async def answer(self, channel_id: str) -> None:
        self._verb("answer", channel_id)

    async def hangup(self, channel_id: str) -> None:
        self._verb("hangup", channel_id)

    async def continue_in_dialplan(self, channel_id: str, context: str, extension: str) -> None:
        self._verb("continue_in_dialplan", channel_id, context, extension)

    async def attach_media(self, channel_id: str, local: MediaAddress, codec: str) -> MediaAddress:
        self._verb("attach_media", channel_id)
        return MediaAddress("127.0.0.1", self.media_port)

    async def detach_media(self, channel_id: str) -> None:
        self._verb("detach_media", channel_id)

    async def play_tone(self, channel_id: str, tone: str, playback_id: str) -> None:
        self._verb("play_tone", channel_id, tone, playback_id)

    async def stop_playback(self, playback_id: str) -> None:
        self._verb("stop_playback", playback_id)

    async def originate(
        self,
        leg_id: str,
        target: DialTarget,
        *,
        caller_number: str | None,
        ring_timeout: float,
        variables: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.leg_context[leg_id] = (dict(variables or {}), dict(headers or {}))
        self._verb("originate", leg_id, target, ring_timeout)

    async def connect(self, channel_id: str, leg_id: str) -> None:
        self._verb("connect", channel_id, leg_id)

    async def blind_transfer(
        self, channel_id: str, target: DialTarget, ring_timeout: float
    ) -> None:
        self._verb("blind_transfer", channel_id, target)

    async def provision_trunk(self, trunk: TrunkSpec) -> None:
        self._verb("provision_trunk", trunk.id)

    async def remove_trunk(self, trunk_id: str) -> None:
        self._verb("remove_trunk", trunk_id)

    async def provisioned_trunks(self) -> set[str]:
        return set(self.trunks)

    async def set_variable(self, channel_id: str, name: str, value: str) -> None:
        self._verb("set_variable", channel_id, name, value)

    async def record_outcome(self, channel_id: str, fields: dict[str, str]) -> None:
        self._verb("record_outcome", channel_id, dict(fields))

    async def send_dtmf(self, channel_id: str, digits: str) -> None:
        self._verb("send_dtmf", channel_id, digits)

    async def release(self, channel_id: str) -> None:
        self._verb("release", channel_id)

    async def unbridge(self, channel_id: str, leg_id: str) -> None:
        self._verb("unbridge", channel_id, leg_id)

    async def extension_state(self, endpoint: str) -> ExtensionState:
        self._verb("extension_state", endpoint)
        return self.extensions.get(endpoint, ExtensionState.AVAILABLE)

    # --- warm transfer (issue 9 §2) ---
    async def start_hold(self, channel_id: str, moh_class: str) -> None:
        self._verb("start_hold", channel_id, moh_class)

    async def stop_hold(self, channel_id: str) -> None:
        self._verb("stop_hold", channel_id)

    async def end_brief(self, leg_id: str) -> None:
        self._verb("end_brief", leg_id)


@dataclass
class FakeNumber:
    id: str = "n1"
    number: str = CALLED
    assistant_id: str | None = "a1"
    transfer_trunk_id: str | None = None


class FakeDirectory:
    def __init__(self) -> None:
        self.assistant = make_assistant()
        self.number = FakeNumber()
        self.fail_find: Exception | None = None

    async def find_number(self, number: str) -> FakeNumber | None:
        if self.fail_find is not None:
            raise self.fail_find
        return self.number if number == self.number.number else None

    async def get_number(self, number_id: str) -> FakeNumber:
        if number_id != self.number.id:
            raise NotFound(f"no number {number_id}", field="number_id")
        return self.number

    async def get_assistant(self, assistant_id: str) -> Any:
        if assistant_id != self.assistant.id:
            raise NotFound(f"no assistant {assistant_id}")
        return self.assistant

    async def list_assistants(self) -> list[Any]:
        return [self.assistant]

    async def get_trunk(self, trunk_id: str) -> Any:
        raise NotFound(f"no trunk {trunk_id}", field="transfer_trunk_id")

    async def list_trunks(self) -> list[Any]:
        return []


class FakeTts:
    name = "fake"
    sample_rate = 8000

    def __init__(self) -> None:
        self.texts: list[str] = []

    async def synthesize(self, text: str) -> bytes:
        self.texts.append(text)
        return bytes(320)  # 20 ms


class RecordingConversation:
    """Records what the session tells it, with the call's state at that moment."""

    def __init__(self, session: CallSession) -> None:
        self.session = session
        self.log: list[tuple[Any, ...]] = []

    async def start(self, *, resumed: bool) -> None:
        self.log.append(("start", resumed))

    def on_audio(self, pcm: bytes) -> None:
        pass

    def on_transfer_started(self) -> None:
        self.log.append(("started", self.session.call.status))

    def on_transfer_result(self, transfer: Transfer) -> None:
        self.log.append(
            ("result", transfer.state, self.session.call.status, self.session.media is not None)
        )

    async def close(self) -> None:
        self.log.append(("close",))


async def until(
    predicate: Callable[[], Any | Awaitable[Any]], what: str = "condition", timeout: float = 5.0
) -> Any:
    """Poll `predicate` (plain or async) until it is truthy; fail after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


@dataclass
class CallEnv:
    path: Path
    db: Database
    store: CallStore
    pbx: FakePbx
    directory: FakeDirectory
    tts: FakeTts
    service: CallService
    settings: Settings
    sink: socket.socket
    conversations: list[RecordingConversation] = field(default_factory=list)

    def arrival(self, channel: str = "ch1") -> CallArrived:
        return CallArrived(channel, CALLED, CALLER)

    async def arrive(self, channel: str = "ch1") -> CallSession:
        """A caller arrives; returns its session once the media is attached and the
        conversation started."""
        await self.service.on_pbx_event(self.arrival(channel))
        session = self.service._by_channel[channel]

        def started() -> bool:
            conversation = session.conversation
            return (
                session.media is not None
                and isinstance(conversation, RecordingConversation)
                and bool(conversation.log)
            )

        await until(started, "media attached and conversation started")
        return session

    async def push(self, event: PbxEvent) -> None:
        await self.service.on_pbx_event(event)

    async def transfer(self, session: CallSession, **fields: Any) -> Transfer:
        """Start a transfer through the session's queue; return it once the leg is placed."""
        command = TransferCommand(type="transfer", destination=fields.pop("destination", DEST))
        if fields:
            command = command.model_copy(update=fields)
        before = len(self.pbx.verbs("originate"))
        reply = await session.command(command)
        assert reply["accepted"] == "transfer"
        await until(lambda: len(self.pbx.verbs("originate")) > before, "originate")

        def placed() -> bool:  # the reply comes once recorded, before the dial's end
            run = session.run
            return run is not None and (run.transfer.final or "ring_guard" in session._timers)

        await until(placed, "the leg placed (ring guard set) or the transfer settled")
        assert session.transfer is not None
        return session.transfer

    async def stored(self, call_id: str) -> dict[str, Any]:
        return await self.service.get_call(call_id)

    async def wait_status(self, call_id: str, status: CallStatus) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            call = await self.store.get(call_id)
            return await self.stored(call_id) if call and call.status is status else None

        return await until(check, f"call {call_id} {status.value}")

    def new_service(self, pbx: FakePbx | None = None) -> CallService:
        """A second daemon process on the same database (a restart)."""
        return make_service(self, pbx or FakePbx())

    async def close(self) -> None:
        await self.service.stop()
        await self.db.close()
        self.sink.close()


def make_service(env: CallEnv, pbx: FakePbx) -> CallService:
    pbx.media_port = env.sink.getsockname()[1]
    service = CallService(
        settings=env.settings,
        pbx=pbx,
        pbx_name="asterisk",
        store=env.store,
        directory=env.directory,
        tts=env.tts,
    )

    def factory(session: CallSession) -> RecordingConversation:
        conversation = RecordingConversation(session)
        env.conversations.append(conversation)
        return conversation

    service.conversation_factory = factory
    return service


async def open_env(tmp_path: Path, **transfer: Any) -> CallEnv:
    db = await Database.open(tmp_path / "calls.sqlite3")
    store = CallStore(db)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    settings = Settings(
        database=tmp_path / "calls.sqlite3",
        transfer={"default_route": "PJSIP/{number}@carrier", "ring_timeout": 20, **transfer},
    )
    pbx = FakePbx()
    env = CallEnv(
        path=tmp_path,
        db=db,
        store=store,
        pbx=pbx,
        directory=FakeDirectory(),
        tts=FakeTts(),
        service=None,  # type: ignore[arg-type]
        settings=settings,
        sink=sink,
    )
    env.service = make_service(env, pbx)
    await env.service.start()
    return env
