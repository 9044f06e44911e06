"""The asyncio ESL client against the capture-faithful fake FreeSWITCH event socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from bridge.pbx.freeswitch.esl_client import (
    ConnectionState,
    EslAuthError,
    EslChannelGone,
    EslClient,
    EslCommandError,
    EslConnectionError,
    EslOutboundServer,
    EslOutboundSession,
)
from bridge.pbx.freeswitch.esl_protocol import EslEvent
from tests.support.daemon import wait_for
from tests.support.esl_server import FakeEslServer, capture_messages

PASSWORD = "ClueCon-test"


class Recorder:
    def __init__(self) -> None:
        self.events: list[EslEvent] = []
        self.states: list[ConnectionState] = []
        self.changed = asyncio.Event()

    async def on_event(self, event: EslEvent) -> None:
        self.events.append(event)
        self.changed.set()

    async def on_state(self, state: ConnectionState) -> None:
        self.states.append(state)
        self.changed.set()

    def names(self, uuid: str | None = None) -> list[str]:
        return [e.name for e in self.events if uuid is None or e.unique_id == uuid]

    async def wait_for(self, cond: Callable[[], bool], timeout: float = 3.0) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def server() -> AsyncIterator[FakeEslServer]:
    srv = FakeEslServer(PASSWORD)
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def rec() -> Recorder:
    return Recorder()


@pytest.fixture
async def client(server: FakeEslServer, rec: Recorder) -> AsyncIterator[EslClient]:
    c = EslClient(
        "127.0.0.1",
        server.port,
        PASSWORD,
        on_event=rec.on_event,
        on_state=rec.on_state,
        backoff_initial=0.02,
        backoff_max=0.1,
    )
    await c.connect()
    yield c
    await c.close()


async def test_auth_ok_and_api(client: EslClient, rec: Recorder) -> None:
    status = await client.api("status")
    assert status == capture_messages("auth_ok_api_bgapi")[2].text()
    await rec.wait_for(lambda: rec.states == [ConnectionState.CONNECTED])


async def test_wrong_password_raises_without_retrying(server: FakeEslServer) -> None:
    c = EslClient("127.0.0.1", server.port, "wrong", backoff_initial=0.01)
    with pytest.raises(EslAuthError, match="-ERR invalid"):
        await c.connect(retry=True)
    assert server.commands == ["auth wrong"]
    await c.close()


async def test_unreachable_raises_connection_error() -> None:
    srv = FakeEslServer(PASSWORD)
    port = await srv.start()
    await srv.stop()
    c = EslClient("127.0.0.1", port, PASSWORD)
    with pytest.raises(EslConnectionError):
        await c.connect()
    with pytest.raises(EslConnectionError):
        await c.api("status")
    await c.close()


async def test_api_errors_are_typed(client: EslClient) -> None:
    with pytest.raises(EslChannelGone, match="No such channel"):
        await client.api("uuid_kill 00000000-0000-0000-0000-000000000000")
    with pytest.raises(EslCommandError, match="Command not found") as info:
        await client.api("no_such_command")
    assert info.value.reply == "-ERR no_such_command Command not found!"
    with pytest.raises(EslChannelGone, match="invalid session id"):
        await client.sendmsg("00000000-0000-0000-0000-000000000000", "answer")


async def test_bgapi_matched_by_job_uuid_with_interleaved_events(
    server: FakeEslServer, client: EslClient, rec: Recorder
) -> None:
    await client.subscribe(["CHANNEL_PARK", "CHANNEL_CREATE"])
    server.bgapi_delay = 0.05
    server.set_originate_outcome("7001", "busy")
    jobs = [
        asyncio.create_task(client.bgapi("status")),
        asyncio.create_task(client.bgapi("originate {origination_uuid=leg-1}sofia/x/7001@h &park")),
        asyncio.create_task(client.bgapi("uuid_kill nobody")),
    ]
    caller = await server.call_arrives("1000")  # events while the jobs run
    status, busy, gone = await asyncio.gather(*jobs, return_exceptions=True)
    assert isinstance(status, str) and status.startswith("UP ")
    assert isinstance(busy, EslCommandError) and busy.reply == "-ERR USER_BUSY"
    assert isinstance(gone, EslChannelGone)
    await rec.wait_for(lambda: "CHANNEL_PARK" in rec.names(caller))
    assert "BACKGROUND_JOB" not in rec.names()  # not subscribed by the user


async def test_bgapi_timeout(server: FakeEslServer, client: EslClient) -> None:
    server.bgapi_delay = 1.0
    with pytest.raises(EslCommandError, match="timeout"):
        await client.bgapi("status", wait=0.05)
    assert await client.api("status")  # the connection is still in step


async def test_originate_outcomes_events_and_results(
    server: FakeEslServer, client: EslClient, rec: Recorder
) -> None:
    await client.subscribe(["CHANNEL_HANGUP_COMPLETE", "CHANNEL_ANSWER", "CHANNEL_PARK"])
    server.set_originate_outcome("7002", "decline")
    server.set_originate_outcome("7003", "noanswer")
    result = await client.bgapi("originate {origination_uuid=leg-ok}sofia/x/7000@h &park()")
    assert result == "+OK leg-ok\n"
    for number, reply in (("7002", "-ERR CALL_REJECTED"), ("7003", "-ERR NO_ANSWER")):
        with pytest.raises(EslCommandError) as info:
            await client.bgapi(
                f"originate {{origination_uuid=leg-{number}}}sofia/x/{number}@h &park"
            )
        assert info.value.reply == reply
    await rec.wait_for(lambda: "CHANNEL_HANGUP_COMPLETE" in rec.names("leg-7003"))
    declined = next(e for e in rec.events if e.unique_id == "leg-7002")
    assert declined.variable("sip_term_status") == "603"
    assert declined["Hangup-Cause"] == "CALL_REJECTED"
    assert rec.names("leg-ok") == ["CHANNEL_ANSWER", "CHANNEL_PARK"]


async def test_events_in_order_through_a_call(
    server: FakeEslServer, client: EslClient, rec: Recorder
) -> None:
    await client.subscribe(["ALL"])
    uuid = await server.call_arrives("1000", "+31201234567", variables={"x_tag": "a b"})
    await client.api(f"uuid_answer {uuid}")
    await client.api(f"uuid_broadcast {uuid} tone_stream://%(100,0,440) aleg")
    await rec.wait_for(lambda: "PLAYBACK_STOP" in rec.names(uuid))
    await client.hangup(uuid, "NORMAL_CLEARING")
    await rec.wait_for(lambda: "CHANNEL_DESTROY" in rec.names(uuid))
    assert rec.names(uuid) == [
        "CHANNEL_CREATE",
        "CHANNEL_EXECUTE",
        "CHANNEL_PARK",
        "CHANNEL_ANSWER",
        "CHANNEL_EXECUTE",
        "PLAYBACK_START",
        "PLAYBACK_STOP",
        "CHANNEL_EXECUTE_COMPLETE",
        "CHANNEL_HANGUP",
        "CHANNEL_HANGUP_COMPLETE",
        "CHANNEL_DESTROY",
    ]
    park = rec.events[2]
    assert park.get("Caller-Caller-ID-Number") == "+31201234567"
    assert park.variable("x_tag") == "a b"
    assert park.get("Caller-Destination-Number") == "1000"


async def test_slow_handler_keeps_order_and_does_not_block_commands(
    server: FakeEslServer,
) -> None:
    seen: list[str] = []
    gate = asyncio.Event()
    three = asyncio.Event()

    async def slow(event: EslEvent) -> None:
        if not seen:
            await gate.wait()
        seen.append(event.name)
        if len(seen) == 3:
            three.set()

    c = EslClient("127.0.0.1", server.port, PASSWORD, on_event=slow)
    await c.connect()
    await c.subscribe(["CHANNEL_CREATE", "CHANNEL_PARK", "CHANNEL_EXECUTE"])
    await server.call_arrives()
    assert await c.bgapi("status")  # the reader is free while the handler waits
    gate.set()
    async with asyncio.timeout(2):
        await three.wait()
    assert seen == ["CHANNEL_CREATE", "CHANNEL_EXECUTE", "CHANNEL_PARK"]
    await c.close()


async def test_reconnect_reapplies_subscriptions_and_filters(
    server: FakeEslServer, client: EslClient, rec: Recorder
) -> None:
    await client.subscribe(["CHANNEL_PARK"])
    await client.filter("Caller-Destination-Number", "1000")
    await server.drop_connections()
    await rec.wait_for(lambda: ConnectionState.RESTORED in rec.states)
    assert rec.states == [
        ConnectionState.CONNECTED,
        ConnectionState.LOST,
        ConnectionState.RESTORED,
    ]
    assert client.reconnects == 1
    assert server.commands[-3:] == [
        "event plain CHANNEL_PARK BACKGROUND_JOB",
        "filter Caller-Destination-Number 1000",
        "filter Event-Name BACKGROUND_JOB",
    ]
    await server.call_arrives("2000")  # filtered out
    kept = await server.call_arrives("1000")
    await rec.wait_for(lambda: "CHANNEL_PARK" in rec.names(kept))
    assert rec.names() == ["CHANNEL_PARK"]
    assert (await client.bgapi("status")).startswith("UP ")  # filters keep bgapi working


async def test_reconnect_backs_off_until_freeswitch_is_back(
    server: FakeEslServer, client: EslClient, rec: Recorder
) -> None:
    await server.pause()
    await rec.wait_for(lambda: ConnectionState.LOST in rec.states)
    with pytest.raises(EslConnectionError):
        await client.api("status")
    await wait_for(lambda: client.failed_reconnects >= 2, "two refused reconnects", 3)
    assert ConnectionState.RESTORED not in rec.states
    await server.resume()
    await rec.wait_for(lambda: ConnectionState.RESTORED in rec.states)
    assert await client.api("status")


async def test_password_changed_while_away_gives_up(
    server: FakeEslServer, client: EslClient, rec: Recorder
) -> None:
    server.password = "rotated"
    await server.drop_connections()
    await rec.wait_for(lambda: ConnectionState.AUTH_FAILED in rec.states)
    supervisor = client._supervisor
    assert supervisor is not None
    await wait_for(supervisor.done, "the client to give up", 3)  # nothing left to retry
    assert server.commands.count(f"auth {PASSWORD}") == 2  # one retry, then no storm


async def test_pending_command_fails_when_the_connection_drops(
    server: FakeEslServer, client: EslClient
) -> None:
    server.bgapi_delay = 5.0
    job = asyncio.create_task(client.bgapi("status"))
    await wait_for(lambda: "bgapi status" in server.commands, "the bgapi to be sent", 2)
    await server.drop_connections()
    with pytest.raises(EslConnectionError):
        await job


async def test_close_is_clean(server: FakeEslServer, rec: Recorder) -> None:
    c = EslClient("127.0.0.1", server.port, PASSWORD, on_state=rec.on_state)
    await c.connect()
    await c.close()
    assert rec.states == [ConnectionState.CONNECTED, ConnectionState.CLOSED]
    assert server.commands[-1] == "exit"
    assert not c.connected


async def test_outbound_server_session() -> None:
    """Outbound mode: FreeSWITCH connects to us; replay the captured connect reply."""
    got: list[str] = []

    async def handler(session: EslOutboundSession) -> None:
        got.append(session.uuid or "")
        got.append(await session.execute("answer"))

    srv = EslOutboundServer(handler)
    await srv.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    msgs = capture_messages("outbound_socket")
    connect = msgs[0]
    assert await reader.readuntil(b"\n\n") == b"connect\n\n"
    writer.write("".join(f"{k}: {v}\n" for k, v in connect.headers.items()).encode() + b"\n")
    for _ in range(3):  # myevents plain, linger, sendmsg execute answer
        line = await reader.readuntil(b"\n\n")
        writer.write(b"Content-Type: command/reply\nReply-Text: +OK\n\n")
    assert line.startswith(b"sendmsg\ncall-command: execute\nexecute-app-name: answer")
    async with asyncio.timeout(2):
        assert await reader.read() == b""  # the handler returned: socket closed by us
    assert got == [connect.event().unique_id, "+OK"]
    writer.close()
    await srv.close()


async def test_resync_queries_after_restore(server: FakeEslServer, client: EslClient) -> None:
    """What an adapter does on RESTORED: list the channels it still has, probe one it knew."""
    assert json.loads(await client.api("show channels as json")) == {"row_count": 0}
    uuid = await server.call_arrives("1000", "+31201234567")
    rows = json.loads(await client.api("show channels as json"))["rows"]
    assert [(r["uuid"], r["dest"], r["application"]) for r in rows] == [(uuid, "1000", "park")]
    assert await client.api(f"uuid_exists {uuid}") == "true"
    assert await client.api("uuid_exists 00000000-0000-0000-0000-000000000000") == "false"
