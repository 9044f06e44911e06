"""An asyncio ESL client for FreeSWITCH: inbound (daemon -> :8021) with reconnect, and an
outbound-mode server primitive (the dialplan `socket` app connects to us per call).

Why our own: greenswitch is gevent-based and makes no progress in an asyncio loop, genesis is
heavy and has no reconnect (../shared/FIELD-NOTES.md). This module knows nothing of calls:
it moves commands, replies and events, and the adapter gives them meaning.

Ordering rules it keeps:
- ESL answers commands in order on one connection, so commands are sent one at a time and a
  command that times out poisons the connection (its late reply would answer the next one):
  the connection is dropped and re-established.
- Events, and the connection-state changes, reach the handlers in wire order through one
  queue; a slow handler delays later events but never the reader (bgapi results and command
  replies are resolved by the reader itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid as uuid_mod
from collections.abc import Awaitable, Callable, Iterable
from enum import StrEnum

from bridge.errors import PbxUnavailable
from bridge.log import get_logger
from bridge.pbx.freeswitch.esl_protocol import (
    ContentType,
    EslEvent,
    EslMessage,
    EslParser,
    EslProtocolError,
    encode_api,
    encode_auth,
    encode_bgapi,
    encode_command,
    encode_event,
    encode_execute,
    encode_filter,
    encode_hangup,
    encode_sendmsg,
)

log = get_logger(__name__)

READ_CHUNK = 65536


# --- errors ----------------------------------------------------------------------------------


class EslError(Exception):
    """Base of every ESL client error."""


class EslAuthError(EslError):
    """FreeSWITCH refused the password (or the ACL refused us). Retrying would not help."""


class EslConnectionError(EslError, PbxUnavailable):
    """No usable connection: refused, dropped, timed out, or closed by us."""

    def __init__(self, message: str) -> None:
        EslError.__init__(self, message)
        PbxUnavailable.__init__(self, message)


class EslCommandError(EslError):
    """FreeSWITCH answered `-ERR ...` (or `-USAGE ...`). `reply` is its text, unchanged."""

    def __init__(self, command: str, reply: str) -> None:
        super().__init__(f"{command.split(' ', 1)[0]}: {reply.strip()}")
        self.command = command
        self.reply = reply.strip()


class EslChannelGone(EslCommandError):
    """The command named a channel FreeSWITCH no longer has."""


_GONE_MARKERS = ("no such channel", "invalid session id", "cannot locate session")


def _raise_if_error(command: str, text: str) -> str:
    stripped = text.lstrip()
    if stripped.startswith(("-ERR", "-USAGE")):
        if any(marker in stripped.lower() for marker in _GONE_MARKERS):
            raise EslChannelGone(command, text)
        raise EslCommandError(command, text)
    return text


# --- one connection ----------------------------------------------------------------------------

EventSink = Callable[[EslEvent], None]


class EslConnection:
    """One ESL TCP stream: ordered request/reply, event decoding, bgapi jobs by Job-UUID.

    Used by the inbound client (one per (re)connection) and by each outbound call socket.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        on_event: EventSink,
        command_timeout: float = 30.0,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._on_event = on_event
        self._timeout = command_timeout
        self._parser = EslParser()
        self._ready: list[EslMessage] = []
        self._lock = asyncio.Lock()
        self._reply: asyncio.Future[EslMessage] | None = None
        self._jobs: dict[str, asyncio.Future[EslEvent]] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self._close_reason: str | None = None
        self.closed = asyncio.Event()
        self.disconnect_notice: EslMessage | None = None

    # handshake-time reading (before the reader task runs)
    async def read_message(self, wait: float) -> EslMessage:
        """Read the next message directly; only valid before `start()`."""
        async with asyncio.timeout(wait):
            while not self._ready:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    raise EslConnectionError("connection closed by FreeSWITCH")
                self._ready.extend(self._parser.feed(data))
        return self._ready.pop(0)

    async def send_raw(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    def start(self) -> None:
        """Start the reader task: from now on replies and events are routed by it."""
        self._reader_task = asyncio.create_task(self._read_loop(), name="esl-reader")

    @property
    def is_open(self) -> bool:
        return not self.closed.is_set()

    async def _read_loop(self) -> None:
        reason = "connection closed by FreeSWITCH"
        try:
            pending, self._ready = self._ready, []
            for msg in pending:
                self._route(msg)
            while True:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    break
                for msg in self._parser.feed(data):
                    self._route(msg)
        except EslProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.error("esl_protocol_error", error=str(exc))
        except (OSError, asyncio.IncompleteReadError) as exc:
            reason = f"connection error: {exc}"
        except asyncio.CancelledError:
            reason = self._close_reason or "closed"
        finally:
            self._shutdown(reason)

    def _route(self, msg: EslMessage) -> None:
        ct = msg.content_type
        if ct in (ContentType.COMMAND_REPLY, ContentType.API_RESPONSE):
            fut, self._reply = self._reply, None
            if fut is None or fut.done():
                raise EslProtocolError(f"{ct} with no command waiting: {msg.headers}")
            fut.set_result(msg)
        elif msg.is_event:
            event = msg.event()
            if event.name == "BACKGROUND_JOB" and event.job_uuid:
                job = self._jobs.pop(event.job_uuid, None)
                if job is not None and not job.done():
                    job.set_result(event)
            self._on_event(event)
        elif ct == ContentType.DISCONNECT_NOTICE:
            self.disconnect_notice = msg
            log.info("esl_disconnect_notice", headers=dict(msg.headers), text=msg.text())
        elif ct == ContentType.RUDE_REJECTION:
            self.disconnect_notice = msg
        elif ct == ContentType.LOG_DATA:
            log.debug("esl_log", text=msg.text())
        else:
            raise EslProtocolError(f"unexpected Content-Type {ct!r}")

    def _shutdown(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self._close_reason = self._close_reason or reason
        err = EslConnectionError(self._close_reason)
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(err)
        for job in self._jobs.values():
            if not job.done():
                job.set_exception(err)
        self._jobs.clear()
        self._writer.close()
        self.closed.set()

    async def close(self, reason: str = "closed by us") -> None:
        """Close the socket and fail whatever still waits on it."""
        self._close_reason = self._close_reason or reason
        if self._reader_task is not None and not self._reader_task.done():
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._shutdown(reason)
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await self._writer.wait_closed()

    async def request(self, data: bytes, *, wait: float | None = None) -> EslMessage:
        """Send one command and return its reply (command/reply or api/response)."""
        async with self._lock:
            if self.closed.is_set():
                raise EslConnectionError(self._close_reason or "not connected")
            fut: asyncio.Future[EslMessage] = asyncio.get_running_loop().create_future()
            self._reply = fut
            try:
                await self.send_raw(data)
                async with asyncio.timeout(wait or self._timeout):
                    return await asyncio.shield(fut)
            except TimeoutError:
                # The late reply would be taken for the next command's: drop the stream.
                self._reader_task_cancel("command timed out; stream out of step")
                raise EslConnectionError("command timed out") from None
            except (OSError, ConnectionError) as exc:
                self._shutdown(f"send failed: {exc}")
                raise EslConnectionError(f"send failed: {exc}") from exc

    def _reader_task_cancel(self, reason: str) -> None:
        self._close_reason = self._close_reason or reason
        if self._reader_task is not None:
            self._reader_task.cancel()
        else:
            self._shutdown(reason)

    async def command(self, data: bytes, *, wait: float | None = None) -> str:
        """A command answered by command/reply; raises on `-ERR`; returns Reply-Text."""
        msg = await self.request(data, wait=wait)
        return _raise_if_error(data.split(b"\n", 1)[0].decode(), msg.reply_text)

    async def api(self, command: str, *, wait: float | None = None) -> str:
        msg = await self.request(encode_api(command), wait=wait)
        return _raise_if_error(command, msg.text())

    async def bgapi(self, command: str, *, wait: float = 60.0) -> str:
        job_uuid = str(uuid_mod.uuid4())
        fut: asyncio.Future[EslEvent] = asyncio.get_running_loop().create_future()
        self._jobs[job_uuid] = fut
        try:
            reply = await self.command(encode_bgapi(command, job_uuid))
            echoed = reply.partition("Job-UUID:")[2].strip()
            if echoed and echoed != job_uuid:  # a FreeSWITCH that ignores our Job-UUID
                self._jobs[echoed] = self._jobs.pop(job_uuid)
                job_uuid = echoed
            async with asyncio.timeout(wait):
                event = await fut
        except TimeoutError:
            raise EslCommandError(command, f"-ERR bgapi timeout after {wait}s") from None
        finally:
            self._jobs.pop(job_uuid, None)
        return _raise_if_error(command, event.body or "")


# --- inbound client ------------------------------------------------------------------------------


class ConnectionState(StrEnum):
    """What the state handler is told, in order with the events."""

    CONNECTED = "connected"  # first successful connection
    LOST = "lost"  # the stream dropped; events may be missed until RESTORED
    RESTORED = "restored"  # reconnected, re-authenticated, subscriptions re-applied
    AUTH_FAILED = "auth_failed"  # a reconnect was refused: the client gave up
    CLOSED = "closed"  # close() was called


EventHandler = Callable[[EslEvent], Awaitable[None]]
StateHandler = Callable[[ConnectionState], Awaitable[None]]


class EslClient:
    """Inbound ESL client: keeps one authenticated connection to FreeSWITCH up.

    `connect()` then `subscribe()`/`filter()` (remembered and re-applied after every
    reconnect), `api()`, `bgapi()`, `sendmsg()`; events go to `on_event` in order, and
    connection changes to `on_state`, through the same ordered queue.
    """

    def __init__(
        self,
        host: str,
        port: int,
        password: str,
        *,
        on_event: EventHandler | None = None,
        on_state: StateHandler | None = None,
        event_format: str = "plain",
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
        reconnect: bool = True,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        if event_format not in ("plain", "json"):
            raise ValueError("event_format must be plain or json")
        self.host = host
        self.port = port
        self._password = password
        self._on_event = on_event
        self._on_state = on_state
        self._format = event_format
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._reconnect = reconnect
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._events: list[str] = []
        self._custom: list[str] = []
        self._filters: list[tuple[str, str]] = []
        self._conn: EslConnection | None = None
        self._queue: asyncio.Queue[EslEvent | ConnectionState | None] = asyncio.Queue()
        self._dispatcher: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self.reconnects = 0
        self.failed_reconnects = 0  # attempts refused or timed out since the start

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.is_open

    async def connect(self, *, retry: bool = False) -> None:
        """Connect and authenticate, then keep the connection up in the background.

        Raises `EslAuthError` at once on a wrong password. Otherwise, with `retry`, waits
        (backing off) until FreeSWITCH answers; without, raises `EslConnectionError`.
        """
        if self._supervisor is not None:
            raise RuntimeError("already connected")
        self._closing = False
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch(), name="esl-dispatch")
        delay = self._backoff_initial
        while True:
            try:
                self._conn = await self._open()
                break
            except EslAuthError:
                raise
            except EslConnectionError:
                if not retry or self._closing:
                    raise
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self._backoff_max)
        self._queue.put_nowait(ConnectionState.CONNECTED)
        self._supervisor = asyncio.create_task(self._supervise(), name="esl-supervisor")

    async def close(self) -> None:
        """Stop reconnecting, close the socket, deliver CLOSED, stop the dispatcher."""
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        if self._conn is not None:
            with contextlib.suppress(EslError, OSError):
                await self._conn.request(encode_command("exit"), wait=1.0)
            await self._conn.close()
            self._conn = None
        if self._dispatcher is not None and not self._dispatcher.done():
            self._queue.put_nowait(ConnectionState.CLOSED)
            self._queue.put_nowait(None)  # stops the dispatcher after everything queued
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        self._dispatcher = None

    async def _open(self) -> EslConnection:
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise EslConnectionError(f"cannot reach {self.host}:{self.port}: {exc}") from exc
        conn = EslConnection(
            reader, writer, on_event=self._queue.put_nowait, command_timeout=self._command_timeout
        )
        try:
            await self._authenticate(conn)
            conn.start()
            await self._apply_subscriptions(conn)
        except EslProtocolError as exc:
            await conn.close(str(exc))
            raise EslConnectionError(f"protocol error during handshake: {exc}") from exc
        except (EslError, TimeoutError, OSError) as exc:
            await conn.close(str(exc))
            if isinstance(exc, EslAuthError | EslConnectionError):
                raise
            raise EslConnectionError(f"handshake failed: {exc}") from exc
        return conn

    async def _authenticate(self, conn: EslConnection) -> None:
        first = await conn.read_message(self._connect_timeout)
        if first.content_type == ContentType.RUDE_REJECTION:
            raise EslAuthError(f"rejected by FreeSWITCH ACL: {first.text().strip()}")
        if first.content_type != ContentType.AUTH_REQUEST:
            raise EslProtocolError(f"expected auth/request, got {first.content_type!r}")
        await conn.send_raw(encode_auth(self._password))
        reply = await conn.read_message(self._connect_timeout)
        if reply.content_type != ContentType.COMMAND_REPLY:
            raise EslProtocolError(f"expected command/reply to auth, got {reply.content_type!r}")
        if not reply.reply_text.startswith("+OK"):
            raise EslAuthError(f"authentication refused: {reply.reply_text}")

    async def _apply_subscriptions(self, conn: EslConnection) -> None:
        await conn.command(self._event_command())
        for header, value in self._filter_list():
            await conn.command(encode_filter(header, value))

    def _event_command(self) -> bytes:
        names = list(dict.fromkeys([*self._events, "BACKGROUND_JOB"]))
        if self._custom:
            names += ["CUSTOM", *self._custom]
        return encode_event(names, self._format)

    def _filter_list(self) -> list[tuple[str, str]]:
        if not self._filters:
            return []
        # Filters are OR-ed by FreeSWITCH: keep bgapi results flowing once any filter exists.
        return [*self._filters, ("Event-Name", "BACKGROUND_JOB")]

    async def _supervise(self) -> None:
        while not self._closing:
            conn = self._conn
            assert conn is not None
            await conn.closed.wait()
            if self._closing:
                return
            log.warning("esl_connection_lost", host=self.host, port=self.port)
            self._queue.put_nowait(ConnectionState.LOST)
            if not self._reconnect:
                return
            delay = self._backoff_initial
            while not self._closing:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                try:
                    self._conn = await self._open()
                except EslAuthError as exc:
                    log.error("esl_reconnect_auth_failed", error=str(exc))
                    self._queue.put_nowait(ConnectionState.AUTH_FAILED)
                    return
                except EslConnectionError as exc:
                    self.failed_reconnects += 1
                    log.info("esl_reconnect_failed", error=str(exc), retry_in=delay)
                    delay = min(delay * 2, self._backoff_max)
                    continue
                self.reconnects += 1
                log.info("esl_connection_restored", host=self.host, port=self.port)
                self._queue.put_nowait(ConnectionState.RESTORED)
                break

    async def _dispatch(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            try:
                if isinstance(item, ConnectionState):
                    if self._on_state is not None:
                        await self._on_state(item)
                elif self._on_event is not None and self._wants(item):
                    await self._on_event(item)
            except Exception:  # a handler bug must not stop event delivery
                log.exception("esl_handler_failed")

    def _wants(self, event: EslEvent) -> bool:
        if event.name != "BACKGROUND_JOB":
            return True
        return "BACKGROUND_JOB" in self._events or "ALL" in self._events

    # -- commands -----------------------------------------------------------------------------

    def _live(self) -> EslConnection:
        conn = self._conn
        if conn is None or not conn.is_open:
            raise EslConnectionError("not connected to FreeSWITCH")
        return conn

    async def api(self, command: str, *, wait: float | None = None) -> str:
        """Run an API command and return its output; `-ERR`/`-USAGE` raise EslCommandError."""
        return await self._live().api(command, wait=wait)

    async def bgapi(self, command: str, *, wait: float = 60.0) -> str:
        """Run an API command in the background; return the BACKGROUND_JOB body matched by
        Job-UUID. `-ERR` results (e.g. originate's `-ERR USER_BUSY`) raise EslCommandError."""
        return await self._live().bgapi(command, wait=wait)

    async def raw_command(self, data: bytes, *, wait: float | None = None) -> EslMessage:
        """Send pre-serialized bytes (from esl_protocol) and return the reply message."""
        return await self._live().request(data, wait=wait)

    async def subscribe(self, events: Iterable[str]) -> None:
        """Add event names (`CHANNEL_PARK`, `ALL`, `CUSTOM sofia::register`); remembered."""
        for name in events:
            name = name.strip()
            if name.startswith("CUSTOM "):
                self._custom.extend(n for n in name.split()[1:] if n not in self._custom)
            elif name not in self._events:
                self._events.append(name)
        encode_event(self._events or ["BACKGROUND_JOB"])  # validate before remembering more
        if self.connected:
            await self._live().command(self._event_command())

    async def unsubscribe(self, events: Iterable[str]) -> None:
        """Forget event names and tell FreeSWITCH (`nixevent`)."""
        names = [n.strip() for n in events]
        self._events = [e for e in self._events if e not in names]
        if self.connected and names:
            await self._live().command(encode_command("nixevent " + " ".join(names)))

    async def filter(self, header: str, value: str) -> None:
        """Only receive events whose `header` equals `value` (OR-ed across filters);
        remembered and re-applied after reconnect."""
        encode_filter(header, value)  # refuse injection before remembering
        first = not self._filters
        if (header, value) not in self._filters:
            self._filters.append((header, value))
        if self.connected:
            conn = self._live()
            await conn.command(encode_filter(header, value))
            if first:
                await conn.command(encode_filter("Event-Name", "BACKGROUND_JOB"))

    async def filter_delete(self, header: str, value: str) -> None:
        """Remove one filter."""
        self._filters = [f for f in self._filters if f != (header, value)]
        if self.connected:
            await self._live().command(encode_filter(header, value, delete=True))

    async def sendmsg(
        self,
        uuid: str,
        app: str,
        arg: str | None = None,
        *,
        event_lock: bool = False,
        event_uuid: str | None = None,
    ) -> str:
        """Execute a dialplan application on channel `uuid` (returns the Reply-Text)."""
        data = encode_execute(uuid, app, arg, event_lock=event_lock, event_uuid=event_uuid)
        return await self._live().command(data)

    async def hangup(self, uuid: str, cause: str = "NORMAL_CLEARING") -> str:
        """Hang channel `uuid` up through sendmsg."""
        return await self._live().command(encode_hangup(uuid, cause))

    async def sendmsg_raw(self, uuid: str, call_command: str, headers: dict[str, str]) -> str:
        """Any other `call-command` (e.g. `unicast`, `nomedia`), headers as given."""
        return await self._live().command(encode_sendmsg(uuid, call_command, headers))


# --- outbound mode -------------------------------------------------------------------------------


class EslOutboundSession:
    """One call's socket from the dialplan `socket` application (outbound mode).

    `channel` holds the channel data FreeSWITCH sent in the `connect` reply. Events of the
    call arrive on `events()`; the socket is closed after CHANNEL_HANGUP_COMPLETE because a
    plain `linger` would keep it forever.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._queue: asyncio.Queue[EslEvent | None] = asyncio.Queue()
        self.conn = EslConnection(reader, writer, on_event=self._on_event)
        self.channel: EslEvent | None = None
        self.peer = writer.get_extra_info("peername")

    def _on_event(self, event: EslEvent) -> None:
        self._queue.put_nowait(event)
        if event.name == "CHANNEL_HANGUP_COMPLETE" and event.unique_id == self.uuid:
            self._queue.put_nowait(None)

    @property
    def uuid(self) -> str | None:
        return self.channel.unique_id if self.channel else None

    async def handshake(self, *, linger: bool = True, myevents: bool = True) -> EslEvent:
        """`connect`, then `myevents` and `linger` (so hangup events still reach us)."""
        await self.conn.send_raw(encode_command("connect"))
        reply = await self.conn.read_message(10.0)
        if reply.content_type != ContentType.COMMAND_REPLY or "Unique-ID" not in reply.headers:
            raise EslProtocolError(f"unexpected connect reply: {dict(reply.headers)}")
        self.channel = reply.event()
        self.conn.start()
        if myevents:
            await self.conn.command(encode_command("myevents plain"))
        if linger:
            await self.conn.command(encode_command("linger"))
        return self.channel

    async def next_event(self) -> EslEvent | None:
        """The call's next event; `None` marks the end (hangup complete or socket closed)."""
        return await self._queue.get()

    async def execute(self, app: str, arg: str | None = None, *, event_lock: bool = True) -> str:
        return await self.conn.command(encode_execute(None, app, arg, event_lock=event_lock))

    async def hangup(self, cause: str = "NORMAL_CLEARING") -> str:
        return await self.conn.command(encode_hangup(None, cause))

    async def api(self, command: str) -> str:
        return await self.conn.api(command)

    async def close(self) -> None:
        await self.conn.close()
        self._queue.put_nowait(None)


OutboundHandler = Callable[[EslOutboundSession], Awaitable[None]]


class EslOutboundServer:
    """Listens for the dialplan `socket` application; runs `handler` per call socket, after
    the handshake, and closes the socket when the handler returns."""

    def __init__(self, handler: OutboundHandler, host: str = "127.0.0.1", port: int = 0) -> None:
        self._handler = handler
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._host, self._port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        session = EslOutboundSession(reader, writer)
        try:
            await session.handshake()
            await self._handler(session)
        except (EslError, EslProtocolError, OSError, TimeoutError) as exc:
            log.warning("esl_outbound_session_failed", peer=session.peer, error=str(exc))
        finally:
            await session.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
