"""A protocol-faithful fake FreeSWITCH event socket for CI (FreeSWITCH cannot be installed there).

Everything it sends is taken from the byte-exact captures in tests/data/esl/ (recorded against
a real FreeSWITCH 1.10.12): the auth exchange, reply texts, api bodies, and the full header sets
of the CHANNEL_* / PLAYBACK_* / BACKGROUND_JOB events, re-keyed to the scripted channel's uuid.
Events are serialized exactly as `switch_event_serialize` does (URL-encoding rules included).

Scriptable channel model, enough for adapter tests:
- `call_arrives()`: CHANNEL_CREATE ... CHANNEL_PARK (optionally CHANNEL_ANSWER) of a caller;
- `bgapi originate {origination_uuid=...}sofia/x/<number>@host &park()` (also `user/<number>`
  and `loopback/<number>/<context>/XML`) with an outcome chosen per number
  (`set_originate_outcome`): answer / busy (486) / noanswer / decline (603), with the captured
  events, hangup causes, SIP fields and BACKGROUND_JOB results;
- `uuid_answer`, `uuid_bridge`, `uuid_broadcast` (PLAYBACK_START/STOP), `uuid_break`,
  `uuid_displace` start/stop,
  `uuid_kill`, `uuid_transfer`, `uuid_setvar/getvar`, `sendmsg` execute/hangup;
- `hangup()` (the far end hangs up), `drop_connections()` (FreeSWITCH restarts);
- warm transfer (issue 9 §2): `press_dtmf()` (the far end's DTMF event), a
  `playback::local_stream://<class>` broadcast plays until uuid_break (`hearing_moh`), an
  answered leg's `&park()` is a park with media (its unicast is accepted);
- `sendmsg` `call-command: unicast`: a real UDP socket at local-ip:local-port, as FreeSWITCH
  binds it (frames received are kept per channel, `send_media()` sends caller audio), closed
  when the channel leaves park (bridge, transfer) or hangs up;
- sofia gateways read from `gateway_dir` on `sofia profile <p> rescan` (`reloadxml`,
  `killgw`, `sofia status gateway <name>`); originate to an unknown gateway fails like the
  real one (`-ERR INVALID_GATEWAY`, no channel).
- `uuid_broadcast` is queued on the channel and starts `broadcast_start_seconds` later (the
  park loop picks it up); `uuid_break <uuid>` stops only a running one, `uuid_break <uuid>
  all` also flushes the queue (mod_commands `break_function`): the fast-failure ringback race.
- the dialplan hook (`hook_call()`): heartbeat check (`expand global_setvar`), `set
  callbridge=1`, the take guard `sleep <take_guard_ms>` (CHANNEL_EXECUTE `sleep`, as a real
  1.10.12 sends it; ended early by `uuid_break`, checked every 20 ms as switch_ivr_sleep does
  on a channel without media), then `hash insert_ifempty/callbridge_owner/<uuid>/fallback` and
  callbridge-take: park (CHANNEL_EXECUTE park, CHANNEL_PARK) unless the fallback owns it.
- `sched_transfer +<s> <uuid> ...` (the lease) runs `sched_scale * s` later and transfers the
  caller to the fallback; `sched_del <group>` answers `+OK Deleted: <n>` counting tasks not
  yet run or deleted, as switch_scheduler does.
- mod_hash's `hash insert|insert_ifempty|select|delete|delete_ifmatch/realm/key[/value]`
  with its replies (`-ERR key already exists`, `-ERR Not found`, `-ERR Doesn't match`).
- derived outcomes (no capture of their own; the captured sequences with the fields sofia
  sets for them): `unreachable` (404 -> UNALLOCATED_NUMBER), `ring` (180, rings until
  `originate_timeout` or uuid_kill), `early_media` (183 with SDP, never 180: as seen on
  1.10.12, `originate ... &park()` then *succeeds* on the early media, the job answers
  `+OK <uuid>` and the unanswered leg stays parked until someone hangs it up).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import uuid as uuid_mod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import ClassVar

from bridge.pbx.freeswitch.esl_protocol import (
    EslEvent,
    EslMessage,
    EslParser,
    EslProtocolError,
    parse_headers,
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "esl"

# --- captures ------------------------------------------------------------------------------------


def load_capture(name: str) -> bytes:
    """The server->client bytes of a capture file (its leading `#` comment lines removed)."""
    raw = (DATA_DIR / f"{name}.txt").read_bytes()
    pos = 0
    while raw.startswith(b"#", pos):
        pos = raw.index(b"\n", pos) + 1
    return raw[pos:]


@cache
def capture_messages(name: str) -> tuple[EslMessage, ...]:
    return tuple(EslParser().feed(load_capture(name)))


def capture_events(name: str) -> list[EslEvent]:
    return [m.event() for m in capture_messages(name) if m.is_event]


def _first_message(name: str, content_type: str, index: int = 0) -> EslMessage:
    found = [m for m in capture_messages(name) if m.content_type == content_type]
    return found[index]


# --- FreeSWITCH-exact serialization ---------------------------------------------------------------

_UNSAFE = set(b'\r\n #%&+:;<=>?@[\\]^`{|}"')
_HEX = b"0123456789ABCDEF"


def fs_url_encode(value: str) -> str:
    """`switch_url_encode` (no double encoding: a valid upper-case %XX is kept as is)."""
    data = value.encode()
    out = bytearray()
    for i, ch in enumerate(data):
        if ch == 0x25 and len(data) - i > 2 and data[i + 1] in _HEX and data[i + 2] in _HEX:
            out.append(ch)
        elif ch < 0x20 or ch > 0x7E or ch in _UNSAFE:
            out += b"%" + bytes([_HEX[ch >> 4], _HEX[ch & 0x0F]])
        else:
            out.append(ch)
    return out.decode("ascii")


Headers = Mapping[str, str] | Iterable[tuple[str, str]]


def _pairs(headers: Headers) -> list[tuple[str, str]]:
    return list(headers.items()) if isinstance(headers, Mapping) else list(headers)


def serialize_event_plain(headers: Headers, body: str | None = None) -> bytes:
    """The body of a text/event-plain message, as `switch_event_serialize(..., encode=TRUE)`
    (repeated names, given as pairs, are kept)."""
    text = "".join(f"{k}: {fs_url_encode(v) or '_undef_'}\n" for k, v in _pairs(headers))
    if body:
        text += f"Content-Length: {len(body.encode())}\n\n{body}"
    else:
        text += "\n"
    return text.encode()


def serialize_event_json(headers: Headers, body: str | None = None) -> bytes:
    """The body of a text/event-json message, as `switch_event_serialize_json` (cJSON)."""
    obj: dict[str, str] = {}
    for k, v in _pairs(headers):
        obj.setdefault(k, v)
    if body is not None:
        obj["Content-Length"] = str(len(body.encode()))
        obj["_body"] = body
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def event_frame(headers: Headers, body: str | None, fmt: str) -> bytes:
    data = (
        serialize_event_json(headers, body)
        if fmt == "json"
        else serialize_event_plain(headers, body)
    )
    return f"Content-Length: {len(data)}\nContent-Type: text/event-{fmt}\n\n".encode() + data


def command_reply(text: str, extra: str = "") -> bytes:
    return f"Content-Type: command/reply\nReply-Text: {text}\n{extra}\n".encode()


def api_response(body: str) -> bytes:
    data = body.encode()
    return f"Content-Type: api/response\nContent-Length: {len(data)}\n\n".encode() + data


# --- event templates from the captures ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Template:
    items: tuple[tuple[str, str], ...]
    own: str  # the captured channel's uuid
    others: tuple[str, ...]  # other uuids of the captured call (the bridged peer)


def _templates() -> dict[tuple[str, str], _Template]:
    """(direction, event name) -> captured headers; first capture that has it wins."""
    out: dict[tuple[str, str], _Template] = {}
    sources = ("inbound_call_park", "originate_answer", "uuid_bridge", "uuid_transfer")
    for name in sources:
        events = [e for e in capture_events(name) if e.unique_id]
        uuids = tuple(dict.fromkeys(e.unique_id for e in events if e.unique_id))
        for e in events:
            key = (e.get("Call-Direction", ""), e.name)
            if e.name in ("CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE"):
                key = (key[0], f"{e.name}:{e.get('Application')}")
            own = e.unique_id or ""
            others = tuple(u for u in uuids if u != own)
            out.setdefault(key, _Template(e.items, own, others))
    # A park that ends because the call moves on (not because it hung up): from uuid_transfer.
    for e in capture_events("uuid_transfer"):
        if e.name == "CHANNEL_EXECUTE_COMPLETE" and e.get("Application") == "park":
            own = e.unique_id or ""
            out[("inbound", "CHANNEL_EXECUTE_COMPLETE:park")] = _Template(e.items, own, ())
            break
    return out


TEMPLATES = _templates()
_SEQ = itertools.count(100000)


def _originate_script(outcome: str) -> tuple[list[EslEvent], str, str]:
    """Captured events of the originated leg (up to the park, for answer), the captured
    BACKGROUND_JOB result, and the leg's captured uuid."""
    if outcome in _DERIVED or outcome == "early_media":
        return _derived_script(outcome)
    events = capture_events(f"originate_{outcome}")
    job = next(e for e in events if e.name == "BACKGROUND_JOB")
    leg = next(e.unique_id for e in events if e.unique_id)
    script: list[EslEvent] = []
    for e in events:
        script.append(e)
        if e.name == "CHANNEL_PARK" or (e.name == "CHANNEL_DESTROY"):
            break
    return script, job.body or "", leg or ""


def _early_media_script() -> tuple[list[EslEvent], str, str]:
    """The captured answered originate without its ANSWER: PROGRESS_MEDIA, the job's `+OK`,
    then the leg parks in early media (Answer-State early)."""
    script, result, leg = _originate_script("answer")
    out = []
    for e in script:
        if e.name == "CHANNEL_ANSWER":
            continue
        over = {"Answer-State": "early"}
        if e.name == "CHANNEL_PROGRESS":
            over["Event-Name"] = "CHANNEL_PROGRESS_MEDIA"
        items = _override(list(e.items), over) if e.name != "BACKGROUND_JOB" else list(e.items)
        first: dict[str, str] = {}
        for k, v in items:
            first.setdefault(k, v)
        out.append(EslEvent(first, e.body, items=tuple(items)))
    return out, result, leg


def _derived_script(outcome: str) -> tuple[list[EslEvent], str, str]:
    if outcome == "early_media":
        return _early_media_script()
    base, cause, sip, q850, early = _DERIVED[outcome]
    script, _, leg = _originate_script(base)
    over = {
        "Hangup-Cause": cause,
        "variable_hangup_cause": cause,
        "variable_hangup_cause_q850": q850,
        "variable_sip_term_cause": q850,
    }
    if sip is not None:
        over["variable_sip_term_status"] = sip
    out = []
    for e in script:
        items = list(e.items)
        if e.name in ("CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY"):
            items = _override(items, over)
        if early and e.name == "CHANNEL_PROGRESS":
            items = _override(items, {"Event-Name": "CHANNEL_PROGRESS_MEDIA"})
        first: dict[str, str] = {}
        for k, v in items:
            first.setdefault(k, v)
        out.append(EslEvent(first, e.body, items=tuple(items)))
    return out, f"-ERR {cause}\n", leg


OUTCOMES = ("answer", "busy", "noanswer", "decline", "unreachable", "early_media", "ring")
# Derived outcomes: (captured base, Hangup-Cause, sip_term_status, q850, 180 -> 183?)
_DERIVED: dict[str, tuple[str, str, str | None, str, bool]] = {
    "unreachable": ("busy", "UNALLOCATED_NUMBER", "404", "1", False),
    "ring": ("noanswer", "NO_ANSWER", None, "19", False),
    # A loopback leg whose dialplan bridges to a PCMU phone offering L16 only (below).
    "incompatible": ("noanswer", "INCOMPATIBLE_DESTINATION", None, "88", False),
}
_ResultHook = Callable[[str], None]


# --- channel model ----------------------------------------------------------------------------


@dataclass
class FakeChannel:
    uuid: str
    direction: str  # "inbound" (a caller) or "outbound" (a leg we originated)
    destination: str
    caller: str
    caller_name: str = ""
    answered: bool = False
    bridged_with: str | None = None
    variables: dict[str, str] = field(default_factory=dict)
    sent_dtmf: list[str] = field(default_factory=list)  # uuid_send_dtmf digit strings
    playback: asyncio.Task[None] | None = None
    up: bool = True
    media: _Unicast | None = None
    park_has_media: bool = False  # did the current park start with media up?
    media_in: list[bytes] = field(default_factory=list)  # frames the daemon sent the caller
    media_at: list[float] = field(default_factory=list)  # when each of them arrived
    queued: list[str] = field(default_factory=list)  # uuid_broadcasts not started yet
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # set on hangup
    hangup_cause: str | None = None
    fallback: bool = False  # the dialplan sent it to callbridge-fallback
    fallback_at: float | None = None  # when (loop time)
    break_flag: bool = False  # CF_BREAK: set by uuid_break when no broadcast runs
    guard_over: asyncio.Event = field(default_factory=asyncio.Event)  # the take guard decided
    guard_broken: bool = False  # its sleep was ended by uuid_break, not by running out

    @property
    def hearing_moh(self) -> str | None:
        """The local_stream (music on hold class) playing to the channel, if any."""
        playing = self.playback is not None and not self.playback.done()
        data = self.variables.get("_playing", "")
        return data.removeprefix("local_stream://") if playing and data else None

    @property
    def hearing_tone(self) -> bool:
        """A `gentones` plays to the caller, or is queued to start."""
        playing = self.playback is not None and not self.playback.done()
        return (playing and self.variables.get("_tone") == "1") or any(
            q.startswith("gentones::") for q in self.queued
        )


class _Unicast(asyncio.DatagramProtocol):
    """FreeSWITCH's side of `unicast` for one channel: raw frames both ways."""

    def __init__(self, chan: FakeChannel, remote: tuple[str, int]) -> None:
        self.chan = chan
        self.remote = remote
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.chan.media_in.append(data)
        self.chan.media_at.append(asyncio.get_running_loop().time())

    def send(self, frame: bytes) -> None:
        if self.transport is not None:
            self.transport.sendto(frame, self.remote)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _rekey(items: Iterable[tuple[str, str]], new: Mapping[str, str]) -> list[tuple[str, str]]:
    """Captured header pairs with the captured uuids replaced."""
    out = []
    for k, v in items:
        for old, repl in new.items():
            if old and old in v:
                v = v.replace(old, repl)
        out.append((k, v))
    return out


def _override(items: list[tuple[str, str]], over: Mapping[str, str]) -> list[tuple[str, str]]:
    """Set every occurrence of each name in `over`; names not present are appended."""
    out = [(k, over.get(k, v)) for k, v in items]
    present = {k for k, _ in items}
    out += [(k, v) for k, v in over.items() if k not in present]
    return out


class FakeEslServer:
    """Loopback ESL server on a free port that speaks the captured wire format."""

    def __init__(self, password: str = "ClueCon", *, host: str = "127.0.0.1") -> None:
        self.password = password
        self.host = host
        self.port = 0
        self.commands: list[str] = []  # first lines received, in order
        self.channels: dict[str, FakeChannel] = {}
        self.playback_seconds = 0.05
        self.noanswer_seconds: float | None = 0.05  # None: the originate_timeout
        self.step_seconds = 0.0
        self.bgapi_delay = 0.0  # delay of every BACKGROUND_JOB (interleaving tests)
        # A queued uuid_broadcast starts this much later (the park loop's next pass).
        self.broadcast_start_seconds = 0.15
        # The hook's take guard: `sleep` milliseconds (freeswitch_conf: cb_take_guard_ms).
        self.take_guard_ms = 1000
        # The hook parks only while the heartbeat global is at most this old (None: no check).
        self.heartbeat_max: float | None = None
        self.sched_scale = 1.0  # tests shrink FreeSWITCH's whole-second schedule by this
        self.heartbeat_at: float | None = None
        # sched group (a caller's uuid) -> its pending transfers to the fallback
        self.scheduled: dict[str, list[asyncio.TimerHandle]] = {}
        self.hash: dict[str, str] = {}  # mod_hash: "<realm>_<key>" -> value
        self.hangups: dict[str, str] = {}  # uuid -> Hangup-Cause of every channel that ended
        self.ended: dict[str, FakeChannel] = {}  # channels hung up, by uuid
        self._outcomes: dict[str, str] = {}
        self.gateway_dir: Path | None = None  # where `rescan` finds gateway XML files
        self.gateways: set[str] = set()
        self.crashes: list[str] = []  # channels whose unicast would have aborted FreeSWITCH
        self.unicast_ignored: list[str] = []  # unicast sent where one already ran
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Directory users' registrations (issue 9 §3, the extension check): user -> contact.
        self.registrations: dict[str, str] = {}

    # lifecycle
    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.drop_connections()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def pause(self) -> None:
        """Stop listening (FreeSWITCH down) but keep the port number for `resume()`."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self.drop_connections()

    async def resume(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)

    async def drop_connections(self) -> None:
        """Close every client socket without a goodbye, as a crash or restart would."""
        for conn in list(self._conns):
            conn.writer.close()
            with contextlib.suppress(OSError):
                await conn.writer.wait_closed()
        self._conns.clear()

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    def subscriptions(self) -> list[set[str]]:
        return [set(c.events) for c in self._conns if c.authed]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(self, reader, writer)
        self._conns.add(conn)
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)
            writer.close()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # scripting
    def set_originate_outcome(self, number: str, outcome: str) -> None:
        """Outcome of `originate` to `number` (`*` for any): answer/busy/noanswer/decline."""
        if outcome not in OUTCOMES:
            raise ValueError(outcome)
        self._outcomes[number] = outcome

    def emit(self, headers: Headers, body: str | None = None) -> None:
        """Send an event to every connection subscribed to it."""
        pairs = _pairs(headers)
        for conn in list(self._conns):
            conn.send_event(pairs, body)

    def emit_channel_event(
        self, chan: FakeChannel, name: str, overrides: Mapping[str, str] | None = None
    ) -> None:
        template = TEMPLATES.get((chan.direction, name)) or TEMPLATES[("inbound", name)]
        over = self._channel_overrides(chan)
        over["Event-Sequence"] = str(next(_SEQ))
        over.update(overrides or {})
        self.emit(_override(self._rekeyed(chan, template), over))

    def _rekeyed(self, chan: FakeChannel, template: _Template) -> list[tuple[str, str]]:
        mapping = {template.own: chan.uuid}
        for other in template.others:
            mapping[other] = chan.bridged_with or str(uuid_mod.UUID(int=0))
        return _rekey(template.items, mapping)

    @staticmethod
    def _channel_overrides(chan: FakeChannel) -> dict[str, str]:
        over = {
            "Caller-Destination-Number": chan.destination,
            "Caller-Caller-ID-Number": chan.caller,
            "Caller-ANI": chan.caller,
        }
        if chan.caller_name:
            over["Caller-Caller-ID-Name"] = chan.caller_name
        over.update({f"variable_{k}": v for k, v in chan.variables.items()})
        return over

    async def call_arrives(
        self,
        destination: str = "1000",
        caller: str = "sipp",
        *,
        caller_name: str = "",
        answered: bool = False,
        variables: Mapping[str, str] | None = None,
        channel_uuid: str | None = None,
    ) -> str:
        """A SIP caller reaches a `park` extension: CREATE, EXECUTE park, PARK (+ ANSWER)."""
        chan = FakeChannel(
            channel_uuid or str(uuid_mod.uuid4()),
            "inbound",
            destination,
            caller,
            caller_name,
            variables=dict(variables or {}),
        )
        self.channels[chan.uuid] = chan
        chan.variables.setdefault("callbridge", "1")  # what the dialplan hook sets
        for name in ("CHANNEL_CREATE", "CHANNEL_EXECUTE:park", "CHANNEL_PARK"):
            self.emit_channel_event(chan, name)
            await asyncio.sleep(self.step_seconds)
        chan.park_has_media = False
        if answered:
            self._answer(chan)
        return chan.uuid

    async def hook_call(
        self, destination: str = "1000", caller: str = "sipp", *, caller_name: str = ""
    ) -> str:
        """A caller through freeswitch_conf's hook: if the daemon's heartbeat is stale, to the
        fallback at once; else marked and held in the take guard (`sleep`), which goes on in
        the background: returns once its CHANNEL_EXECUTE `sleep` was sent."""
        loop = asyncio.get_running_loop()
        stale = self.heartbeat_max is not None and (
            self.heartbeat_at is None or loop.time() - self.heartbeat_at > self.heartbeat_max
        )
        chan = FakeChannel(str(uuid_mod.uuid4()), "inbound", destination, caller, caller_name)
        self.channels[chan.uuid] = chan
        self.emit_channel_event(chan, "CHANNEL_CREATE")
        if stale:
            self._to_fallback(chan)
            return chan.uuid
        chan.variables["callbridge"] = "1"
        sleep = {"Application": "sleep", "Application-Data": str(self.take_guard_ms)}
        chan.variables.update(
            current_application="sleep", current_application_data=sleep["Application-Data"]
        )
        self.emit_channel_event(chan, "CHANNEL_EXECUTE:park", sleep)
        self._spawn(self._take_guard(chan, sleep))
        return chan.uuid

    async def _take_guard(self, chan: FakeChannel, sleep: Mapping[str, str]) -> None:
        """switch_ivr_sleep without media: 20 ms steps, CF_BREAK (uuid_break) ends it early;
        then the hook's `hash insert_ifempty ... fallback` and the callbridge-take context."""
        for _ in range(self.take_guard_ms // 20):
            if not chan.up:
                return
            if chan.break_flag:
                chan.break_flag, chan.guard_broken = False, True
                break
            await asyncio.sleep(0.02)
        if not chan.up:
            return
        self.emit_channel_event(chan, "CHANNEL_EXECUTE_COMPLETE:park", sleep)
        for name in ("current_application", "current_application_data"):
            chan.variables.pop(name, None)
        self._hash(f"insert_ifempty/callbridge_owner/{chan.uuid}/fallback")
        if self.hash.get(f"callbridge_owner_{chan.uuid}") == "fallback":
            self._to_fallback(chan)
        else:
            for name in ("CHANNEL_EXECUTE:park", "CHANNEL_PARK"):
                self.emit_channel_event(chan, name)
            chan.park_has_media = False
        chan.guard_over.set()

    def _schedule(self, uuid: str, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        handle = loop.call_later(seconds, self._guard_fires, uuid)
        self.scheduled.setdefault(uuid, []).append(handle)

    def _guard_fires(self, uuid: str) -> None:
        """A scheduled transfer to the fallback runs (the switch_scheduler task)."""
        left = [h for h in self.scheduled.pop(uuid, []) if not h.cancelled()]
        left = [h for h in left if h.when() > asyncio.get_running_loop().time()]
        if left:
            self.scheduled[uuid] = left
        chan = self.channels.get(uuid)
        if chan is not None and chan.up and not chan.bridged_with:
            self.emit_channel_event(chan, "CHANNEL_EXECUTE_COMPLETE:park", {"Application": "park"})
            self._to_fallback(chan)

    def _to_fallback(self, chan: FakeChannel) -> None:
        """`transfer <dest> XML callbridge-fallback`; the fallback unsets the marker."""
        self._stop_media(chan)
        if chan.playback is not None:
            chan.playback.cancel()
        chan.queued.clear()
        chan.variables.pop("callbridge", None)
        chan.variables["transfer_destination"] = f"{chan.destination} XML callbridge-fallback"
        chan.fallback = True
        chan.fallback_at = asyncio.get_running_loop().time()

    async def hangup(self, channel_uuid: str, cause: str = "NORMAL_CLEARING") -> None:
        """The far end hangs up (a BYE): hangup events, and the bridged peer goes too."""
        self._hangup(self.channels[channel_uuid], cause)

    # --- hand back (issue 9 §5) ---
    def _park_after_bridge(self, chan: FakeChannel) -> None:
        """The bridge partner hung up and `park_after_bridge=true`: the survivor is parked
        (switch_ivr_bridge's exchange-media end), with media up, instead of hung up."""
        chan.bridged_with = None
        for name in ("bridge_to", "signal_bond"):
            chan.variables.pop(name, None)
        state = {"Answer-State": "answered" if chan.answered else "ringing"}
        self.emit_channel_event(chan, "CHANNEL_EXECUTE:park", state)
        self.emit_channel_event(chan, "CHANNEL_PARK", state)
        chan.park_has_media = chan.answered

    def _unbridge(self, chan: FakeChannel) -> None:
        """`uuid_transfer` of one side of a `uuid_bridge`: the bridge ends; the other side,
        a leg originated with hangup_after_bridge=true, hangs up."""
        peer = self.channels.get(chan.bridged_with or "")
        chan.bridged_with = None
        for name in ("bridge_to", "signal_bond"):
            chan.variables.pop(name, None)
        if peer is None:
            return
        peer.bridged_with = None
        for name in ("bridge_to", "signal_bond"):
            peer.variables.pop(name, None)
        if peer.variables.get("hangup_after_bridge") == "true":
            self._spawn(self._later(self._hangup, peer, "NORMAL_CLEARING"))

    def _answer(self, chan: FakeChannel) -> None:
        if not chan.answered:
            chan.answered = True
            self.emit_channel_event(chan, "CHANNEL_ANSWER")

    _Q850: ClassVar[dict[str, str]] = {
        "NORMAL_CLEARING": "16",
        "USER_BUSY": "17",
        "NO_ANSWER": "19",
        "CALL_REJECTED": "21",
        "ORIGINATOR_CANCEL": "487",
        "MANAGER_REQUEST": "503",
    }

    def _hangup(self, chan: FakeChannel, cause: str) -> None:
        if not chan.up:
            return
        chan.up = False
        chan.hangup_cause = cause
        self.hangups[chan.uuid] = cause
        chan.gone.set()
        chan.queued.clear()
        for guard in self.scheduled.pop(chan.uuid, []):
            guard.cancel()
        if chan.playback is not None:
            chan.playback.cancel()
        self._stop_media(chan)
        over = {
            "Hangup-Cause": cause,
            "variable_hangup_cause": cause,
            "variable_hangup_cause_q850": self._Q850.get(cause, "16"),
        }
        self.emit_channel_event(chan, "CHANNEL_HANGUP", over)
        peer = self.channels.get(chan.bridged_with or "")
        if peer is not None and peer.up and peer.variables.get("park_after_bridge") == "true":
            self._park_after_bridge(peer)  # hand back (issue 9 §5)
        elif peer is not None and peer.up:
            self._hangup(peer, cause)
        self.emit_channel_event(chan, "CHANNEL_HANGUP_COMPLETE", over)
        self.emit_channel_event(chan, "CHANNEL_DESTROY", over)
        self.channels.pop(chan.uuid, None)
        self.ended[chan.uuid] = chan  # what it heard stays readable (tests)

    async def _originate(self, args: str, on_result: _ResultHook | None) -> str:
        m = re.match(r"^(?:\{(?P<vars>[^}]*)\})?(?P<dial>\S+)(?:\s+(?P<app>.*))?$", args.strip())
        if not m:
            return "-USAGE: <call url> <exten>|&<application_name>(<app_args>) ...\n"
        variables = dict(kv.split("=", 1) for kv in (m["vars"] or "").split(",") if "=" in kv)
        leg = variables.pop("origination_uuid", None) or str(uuid_mod.uuid4())
        number = re.sub(r"^.*/", "", m["dial"]).split("@", 1)[0]
        loopback = re.match(r"^loopback/([^/]+)/", m["dial"])  # loopback/<exten>/<context>/XML
        if loopback:
            number = loopback[1]
        gateway = re.match(r"^sofia/gateway/([^/]+)/", m["dial"])
        if gateway and self.gateway_dir is not None and gateway[1] not in self.gateways:
            if on_result is not None:
                on_result("-ERR INVALID_GATEWAY\n")
            return "-ERR INVALID_GATEWAY\n"
        outcome = self._outcomes.get(number, self._outcomes.get("*", "answer"))
        # Measured on FreeSWITCH 1.10.12 (leftovers, issue 9 §1): a loopback leg originated
        # from ESL is L16; the `bridge` in its dialplan offers a SIP phone L16 only, and the
        # phone's PCMU answer fails the leg (cause 88), unless sofia may mix in its codecs.
        mixed = "media_mix_inbound_outbound_codecs" in variables.get("export_vars", "")
        if loopback and outcome == "answer" and not mixed:
            outcome = "incompatible"
        script, result, old_uuid = _originate_script(outcome)
        caller = variables.get("origination_caller_id_number", "0000000000")
        chan = FakeChannel(leg, "outbound", number, caller, variables=variables)
        if m["dial"].startswith("user/"):  # the directory's dial-string sets it
            chan.variables.setdefault("presence_id", f"{number}@{self.DOMAIN}")
        self.channels[leg] = chan
        if outcome in ("answer", "early_media"):
            result = result.replace(old_uuid, leg)
        reported = False
        for e in script:
            if e.name == "BACKGROUND_JOB":  # where FreeSWITCH reported the job: report it
                if on_result is not None:
                    on_result(result)
                reported = True
                continue
            if e.name == "CHANNEL_HANGUP" and outcome in ("noanswer", "ring"):
                ring = float(variables.get("originate_timeout", "60"))
                if outcome != "ring" and self.noanswer_seconds is not None:
                    ring = self.noanswer_seconds
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(chan.gone.wait(), ring)
            if not chan.up:  # uuid_kill meanwhile: its own hangup events were sent
                result = f"-ERR {chan.hangup_cause or 'NORMAL_CLEARING'}\n"
                if not reported and on_result is not None:
                    on_result(result)
                return result
            over = {"Caller-Destination-Number": number, "Event-Sequence": str(next(_SEQ))}
            over.update({f"variable_{k}": v for k, v in chan.variables.items()})
            if e.name == "CHANNEL_ANSWER":
                chan.answered = True
            if e.name == "CHANNEL_PARK":  # `&park()` after the answer: a park with media
                chan.park_has_media = chan.answered
            self.emit(_override(_rekey(e.items, {old_uuid: leg}), over))
            await asyncio.sleep(self.step_seconds)
        if outcome not in ("answer", "early_media"):
            chan.up = False
            chan.gone.set()
            self.hangups.setdefault(leg, result.removeprefix("-ERR ").strip())
            self.channels.pop(leg, None)
        return result

    async def _playback(self, chan: FakeChannel, path: str) -> None:
        """`playback` of a file, or `app::arg` (speak, gentones) as uuid_broadcast runs it.
        Like FreeSWITCH, a finished file playback resets the session, which ends unicast;
        `gentones` with loops -1 runs until uuid_break."""
        app, sep, data = path.partition("::")
        if not sep:
            app, data = "playback", path
        over = {"Application": app, "Application-Data": data}
        key = app if app in ("speak", "playback") else "speak"  # captured templates
        self.emit_channel_event(chan, f"CHANNEL_EXECUTE:{key}", over)
        play = {"Playback-File-Path": data}
        chan.variables["_tone"] = "1" if app == "gentones" else "0"
        if data.startswith("local_stream://"):
            chan.variables["_playing"] = data
        try:
            if app == "playback":
                self.emit_channel_event(chan, "PLAYBACK_START", play)
            if app == "gentones" and data.endswith("|-1"):
                await asyncio.Event().wait()  # until cancelled (uuid_break, hangup)
            if data.startswith("local_stream://"):  # music on hold never ends by itself
                await asyncio.Event().wait()
            await asyncio.sleep(self.playback_seconds)
        finally:
            if chan.up:
                if app == "playback":
                    self.emit_channel_event(chan, "PLAYBACK_STOP", play)
                    self._stop_media(chan)  # switch_ivr_play_file ends with a session reset
                self.emit_channel_event(chan, f"CHANNEL_EXECUTE_COMPLETE:{key}", over)
            chan.playback = None
            chan.variables.pop("_tone", None)
            chan.variables.pop("_playing", None)

    async def _run_queued(self, chan: FakeChannel) -> None:
        await asyncio.sleep(self.broadcast_start_seconds)
        if chan.up and chan.queued:
            self._start_playback(chan, chan.queued.pop(0))

    def _start_playback(self, chan: FakeChannel, path: str) -> None:
        if chan.playback is not None:
            chan.playback.cancel()
        chan.playback = asyncio.ensure_future(self._playback(chan, path.strip("'\"")))
        self._tasks.add(chan.playback)
        chan.playback.add_done_callback(self._tasks.discard)

    # api commands (the bodies are the captured ones)
    async def api(self, line: str, on_result: _ResultHook | None = None) -> str:
        """Run an API command; `on_result` (bgapi) is called when FreeSWITCH would report."""
        cmd, _, arg = line.strip().partition(" ")
        words = arg.split()
        if cmd == "status":
            return _first_message("auth_ok_api_bgapi", "api/response").text()
        if cmd == "show" and arg.startswith("channels"):
            return self._show_channels()
        if cmd == "originate":
            return await self._originate(arg, on_result)
        if cmd == "expand" and arg.startswith("global_setvar "):
            self.heartbeat_at = asyncio.get_running_loop().time()
            return "+OK\n"
        if cmd == "sched_del":
            tasks = self.scheduled.pop(arg.strip(), [])
            for task in tasks:
                task.cancel()
            return f"+OK Deleted: {len(tasks)}\n"
        if cmd == "sched_transfer":  # [+]<time> <uuid> <extension> [<dialplan>] [<context>]
            if len(words) < 3 or not words[0].startswith("+"):
                return "-USAGE: [+]<time> <uuid> <extension> [<dialplan>] [<context>]\n"
            if words[1] not in self.channels:
                return "-ERR No such channel!\n"
            self._schedule(words[1], float(words[0][1:]) * self.sched_scale)
            return "+OK\n"
        if cmd == "hash":
            return self._hash(arg.strip())
        if cmd == "hash_dump":  # (trust) mod_hash's hash_dump_function, "db [<realm>]" only
            if words[:1] != ["db"]:
                return "Usage: all|limit|db [<realm>]\n"
            realm = f"{words[1]}_" if len(words) > 1 else ""
            return "".join(f"D/{k}/{v}\n" for k, v in self.hash.items() if realm in k)
        if cmd == "reloadxml":
            return "+OK [Success]\n\n"
        if cmd == "sofia":
            return self._sofia(words)
        if cmd == "sofia_contact":
            return self._sofia_contact(arg.strip())
        if cmd.startswith("uuid_"):
            if not words:
                return "-USAGE: <uuid> [args]\n"
            chan = self.channels.get(words[0])
            if chan is None:
                return "false" if cmd == "uuid_exists" else "-ERR No such channel!\n"
            return await self._uuid_command(cmd, chan, words, arg)
        return f"-ERR {cmd} Command not found!\n"

    def _show_channels(self) -> str:
        """`show channels as json` shaped like the captured one (compact JSON, string values)."""
        if not self.channels:
            return _first_message("show_channels", "api/response").text()  # {"row_count": 0}
        texts = [m.text() for m in capture_messages("show_channels")]
        captured = next(t for t in texts if t.startswith('{"row_count":1'))
        template = json.loads(captured)["rows"][0]
        rows = []
        for c in self.channels.values():
            row = dict(template)
            row.update(
                uuid=c.uuid,
                call_uuid=c.bridged_with or "",
                direction=c.direction,
                dest=c.destination,
                cid_num=c.caller,
                cid_name=c.caller_name or c.caller,
                callstate="ACTIVE" if c.answered else "RINGING",
                presence_id=c.variables.get("presence_id", ""),
            )
            rows.append(row)
        return json.dumps({"row_count": len(rows), "rows": rows}, separators=(",", ":"))

    async def _uuid_command(self, cmd: str, chan: FakeChannel, words: list[str], arg: str) -> str:
        if cmd == "uuid_answer":
            self._answer(chan)
            return "+OK\n"
        if cmd == "uuid_kill":
            self._spawn(
                self._later(self._hangup, chan, words[1] if len(words) > 1 else "NORMAL_CLEARING")
            )
            return "+OK\n"
        if cmd == "uuid_bridge":
            peer = self.channels.get(words[1]) if len(words) > 1 else None
            if peer is None:
                return "-ERR Invalid uuid\n"
            chan.bridged_with, peer.bridged_with = peer.uuid, chan.uuid
            chan.variables["bridge_to"], peer.variables["bridge_to"] = peer.uuid, chan.uuid
            chan.variables["signal_bond"], peer.variables["signal_bond"] = peer.uuid, chan.uuid
            for c in (chan, peer):
                if c.playback is not None:
                    c.playback.cancel()
                self._stop_media(c)  # leaving park ends unicast
            self.emit_channel_event(chan, "CHANNEL_BRIDGE")
            return "+OK\n"
        if cmd == "uuid_broadcast":
            path = arg[len(words[0]) :].strip()
            path = re.sub(r"\s+(aleg|bleg|both)$", "", path).strip("'\"")
            chan.queued.append(path)  # a private event: the park loop runs it a bit later
            self._spawn(self._run_queued(chan))
            return "+OK Message sent\n"
        if cmd == "uuid_displace" and len(words) >= 3:  # a media bug: no channel events
            if words[1] == "start":
                chan.variables[f"displace:{words[2]}"] = "1"
                return "+OK Success\n"
            if chan.variables.pop(f"displace:{words[2]}", None) is None:
                return "-ERR Cannot stop displace session!\n"
            return "+OK Success\n"
        if cmd == "uuid_break":
            if "all" in " ".join(words[1:]):  # switch_core_session_flush_private_events
                chan.queued.clear()
            if chan.playback is not None:  # CF_BROADCAST: stop it
                chan.playback.cancel()
            else:  # otherwise mod_commands sets CF_BREAK (a `sleep` checks it)
                chan.break_flag = True
            return "+OK\n"
        if cmd == "uuid_transfer" and chan.bridged_with:  # hand back (issue 9 §5)
            self._unbridge(chan)
        if cmd == "uuid_transfer":
            over = {"Application": "park"}
            self.emit_channel_event(chan, "CHANNEL_EXECUTE_COMPLETE:park", over)
            self._stop_media(chan)
            if words[1:3] == ["park", "inline"]:  # park again, now with media if answered
                state = {"Answer-State": "answered" if chan.answered else "ringing"}
                self.emit_channel_event(chan, "CHANNEL_EXECUTE:park", state)
                self.emit_channel_event(chan, "CHANNEL_PARK", state)
                chan.park_has_media = chan.answered
                return "+OK\n"
            chan.variables["transfer_destination"] = " ".join(words[1:])
            return "+OK\n"
        if cmd == "uuid_setvar" and len(words) == 2:  # no value: unset
            chan.variables.pop(words[1], None)
            return "+OK\n"
        if cmd == "uuid_setvar" and len(words) > 2:
            chan.variables[words[1]] = arg.split(" ", 2)[2]
            return "+OK\n"
        if cmd == "uuid_exists":
            return "true"
        if cmd == "uuid_send_dtmf" and len(words) >= 2:  # mod_commands' reply
            chan.sent_dtmf.append(words[1])
            return "+OK Success\n"
        if cmd == "uuid_getvar" and len(words) >= 2:
            return chan.variables.get(words[1], "_undef_")
        return f"-ERR {cmd} Command not found!\n"

    def _hash(self, arg: str) -> str:
        """mod_hash's `hash` API (hash_api_function), replies as in its source."""
        parts = arg.split("/", 3)
        ops = "insert|insert_ifempty|select|delete|delete_ifmatch"
        usage = f"-ERR Usage: hash {ops}/realm/key[/value]\n"
        if len(parts) < 3:
            return usage
        op, key = parts[0].lower(), f"{parts[1]}_{parts[2]}"
        value = parts[3] if len(parts) > 3 else None
        if op == "insert" and value is not None:
            self.hash[key] = value
            return "+OK\n"
        if op == "insert_ifempty" and value is not None:
            if key in self.hash:
                return "-ERR key already exists\n"
            self.hash[key] = value
            return "+OK\n"
        if op == "delete":
            return "+OK\n" if self.hash.pop(key, None) is not None else "-ERR Not found\n"
        if op == "delete_ifmatch" and value is not None:
            if key not in self.hash:
                return "-ERR Not found\n"
            if self.hash[key] != value:
                return "-ERR Doesn't match\n"
            del self.hash[key]
            return "+OK\n"
        if op == "select":
            return self.hash.get(key, "")
        return usage

    # --- directory users (issue 9 §3, the extension check) ----------------------------------

    DOMAIN = "127.0.0.1"  # the default domain `user/<user>` and `sofia_contact` use

    def register_user(self, user: str, port: int = 5070) -> None:
        """The user's phone registered (as `sofia_contact` then reports it)."""
        self.registrations[user] = f"sofia/internal/sip:{user}@127.0.0.1:{port}"

    def _sofia_contact(self, arg: str) -> str:
        """mod_sofia's `sofia_contact [profile/]<user>[@domain]`: the registered contact's
        dial string, or `error/user_not_registered` (no newline, as FreeSWITCH answers)."""
        user = arg.rpartition("/")[2].split("@", 1)[0]
        return self.registrations.get(user, "error/user_not_registered")

    def _sofia(self, words: list[str]) -> str:
        """The few `sofia` commands gateway provisioning uses, with FreeSWITCH's replies."""
        if words[:1] == ["profile"] and len(words) >= 3:
            if words[2] == "rescan":
                if self.gateway_dir is not None:
                    found = {p.stem for p in self.gateway_dir.glob("*.xml")}
                    self.gateways |= found
                return "+OK scan complete\n"
            if words[2] == "killgw" and len(words) >= 4:
                if words[3] not in self.gateways:
                    return "-ERR no such gateway.\n"
                self.gateways.discard(words[3])
                return "+OK gateway marked for deletion.\n"
        if words[:2] == ["status", "gateway"] and len(words) >= 3:
            if words[2] in self.gateways:
                return f"Name    \t{words[2]}\nStatus  \tUP\n"
            return "Invalid Gateway!\n"
        return "-ERR Usage: sofia profile <name> rescan|killgw <gw>\n"

    async def start_media(self, chan: FakeChannel, headers: Mapping[str, str]) -> None:
        if not chan.park_has_media:
            # FreeSWITCH 1.10.12 aborts here (switch_ivr_park: Assertion `read_frame'
            # failed) when unicast starts in a park that began without media: seen live.
            self.crashes.append(chan.uuid)
            self._spawn(self.pause())
            return
        if chan.media is not None:
            # A second unicast in the same park: the park loop keeps the first connection
            # (the new socket cannot bind the same port; another port would never be read).
            self.unicast_ignored.append(chan.uuid)
            return
        loop = asyncio.get_running_loop()
        remote = (headers.get("remote-ip", "127.0.0.1"), int(headers.get("remote-port", "8026")))
        local = (headers.get("local-ip", "127.0.0.1"), int(headers.get("local-port", "8025")))
        _, proto = await loop.create_datagram_endpoint(
            lambda: _Unicast(chan, remote), local_addr=local
        )
        chan.media = proto

    def press_dtmf(self, channel_uuid: str, digit: str) -> None:
        """The far end of a channel sends a DTMF digit (RFC 2833): the `DTMF` event with the
        channel's headers and the fields switch_channel_dequeue_dtmf adds (DTMF-Digit,
        DTMF-Duration in samples, DTMF-Source). Derived: no capture of its own; the fields
        and values as a real 1.10.12 sent them for an RFC 4733 key on an answered leg
        (docs/freeswitch.md, warm transfer)."""
        chan = self.channels[channel_uuid]
        name = "CHANNEL_PARK"  # the parked channel's headers, renamed
        template = TEMPLATES.get((chan.direction, name)) or TEMPLATES[("inbound", name)]
        over = self._channel_overrides(chan)
        over.update(
            {
                "Event-Name": "DTMF",
                "Event-Sequence": str(next(_SEQ)),
                "DTMF-Digit": digit,
                "DTMF-Duration": "1280",  # samples: a 160 ms key, as seen
                "DTMF-Source": "RTP",
            }
        )
        self.emit(_override(self._rekeyed(chan, template), over))

    def send_media(self, channel_uuid: str, frame: bytes) -> None:
        """The caller speaks: one raw L16 frame to the daemon (as unicast sends it)."""
        chan = self.channels[channel_uuid]
        if chan.media is not None:
            chan.media.send(frame)

    def _stop_media(self, chan: FakeChannel) -> None:
        if chan.media is not None:
            chan.media.close()
            chan.media = None

    async def _later(self, fn: object, *args: object) -> None:
        await asyncio.sleep(0)
        fn(*args)  # type: ignore[operator]


class _Conn:
    """One client connection: the inbound-socket command loop of mod_event_socket."""

    def __init__(
        self, server: FakeEslServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.authed = False
        self.fmt = "plain"
        self.events: set[str] = set()
        self.filters: list[tuple[str, str]] = []

    def write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def send_event(self, pairs: list[tuple[str, str]], body: str | None = None) -> None:
        headers: dict[str, str] = {}
        for k, v in pairs:
            headers.setdefault(k, v)
        if not self.authed or not self._wants(headers):
            return
        self.write(event_frame(pairs, body, self.fmt))

    def _wants(self, headers: Mapping[str, str]) -> bool:
        name = headers.get("Event-Name", "")
        if "ALL" not in self.events and name not in self.events:
            return False
        if self.filters:
            return any(headers.get(h, "").lower() == v.lower() for h, v in self.filters)
        return True

    async def run(self) -> None:
        self.write(_reframe(capture_messages("auth_fail")[0]))  # auth/request
        buf = b""
        while True:
            data = await self.reader.read(65536)
            if not data:
                return
            buf += data
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                block = block.lstrip(b"\r\n")
                if not block:
                    continue
                first, _, rest = block.partition(b"\n")
                try:
                    headers = parse_headers(rest, decode=False) if rest else {}
                except EslProtocolError:
                    headers = {}
                length = int(headers.get("Content-Length", "0") or 0)
                if length:
                    while len(buf) < length:
                        more = await self.reader.read(65536)
                        if not more:
                            return
                        buf += more
                    buf = buf[length:]
                line = first.decode("utf-8", "replace").strip()
                self.server.commands.append(line)
                if not await self.handle(line, headers):
                    return

    async def handle(self, line: str, headers: Mapping[str, str]) -> bool:
        verb, _, arg = line.partition(" ")
        if not self.authed:
            if verb == "auth" and arg == self.server.password:
                self.authed = True
                ok = _first_message("auth_ok_api_bgapi", "command/reply")
                self.write(command_reply(ok.reply_text))
                return True
            for msg in capture_messages("auth_fail")[1:]:  # -ERR invalid, goodbye notice
                self.write(_reframe(msg))
            await self.writer.drain()
            return False
        if verb == "api":
            # mod_event_socket answers an empty output (e.g. `hash_dump` of an empty realm)
            # with "-ERR no reply" (api_exec, 1.10.12), bgapi jobs keep it empty.
            self.write(api_response(await self.server.api(arg) or "-ERR no reply\n"))
        elif verb == "bgapi":
            job = headers.get("Job-UUID") or str(uuid_mod.uuid4())
            self.write(command_reply(f"+OK Job-UUID: {job}", f"Job-UUID: {job}\n"))
            self.server._spawn(self._bgapi(job, arg))
        elif verb == "event":
            fmt, _, names = arg.partition(" ")
            self.fmt = fmt
            self.events.update(n for n in names.split() if n != "CUSTOM")
            self.write(command_reply(f"+OK event listener enabled {fmt}"))
        elif verb == "nixevent":
            self.events.difference_update(arg.split())
            self.write(command_reply("+OK events nixed"))
        elif verb == "noevents":
            self.events.clear()
            self.write(command_reply("+OK no longer listening for events"))
        elif verb == "filter":
            self._filter(arg)
        elif verb == "sendmsg":
            await self._sendmsg(arg.strip(), headers)
        elif verb == "exit":
            self.write(command_reply("+OK bye"))
            self.write(_reframe(capture_messages("auth_fail")[2]))
            await self.writer.drain()
            return False
        else:
            self.write(command_reply("-ERR command not found"))
        return True

    def _filter(self, arg: str) -> None:
        words = arg.split(" ", 2)
        if words[0] == "delete" and len(words) == 3:
            self.filters = [f for f in self.filters if f != (words[1], words[2])]
            self.write(command_reply(f"+OK filter deleted. [{words[1]}][{words[2]}]"))
        elif len(words) >= 2:
            value = arg.split(" ", 1)[1]
            self.filters.append((words[0], value))
            self.write(command_reply(f"+OK filter added. [{words[0]}]=[{value}]"))
        else:
            self.write(command_reply("-ERR invalid syntax"))

    async def _bgapi(self, job: str, command: str) -> None:
        reported: list[str] = []

        def report(result: str) -> None:
            reported.append(result)
            self._job_event(job, command, result)

        result = await self.server.api(command, report if not self.server.bgapi_delay else None)
        if not reported:
            await asyncio.sleep(self.server.bgapi_delay)
            self._job_event(job, command, result)

    def _job_event(self, job: str, command: str, result: str) -> None:
        template = next(e for e in capture_events("auth_ok_api_bgapi") if e.job_uuid)
        cmd, _, arg = command.partition(" ")
        over = {"Job-UUID": job, "Job-Command": cmd, "Event-Sequence": str(next(_SEQ))}
        if arg:
            over["Job-Command-Arg"] = arg
        self.send_event(_override(list(template.items), over), result)

    async def _sendmsg(self, target: str, headers: Mapping[str, str]) -> None:
        chan = self.server.channels.get(target)
        if chan is None:
            self.write(command_reply(f"-ERR invalid session id [{target}]"))
            return
        self.write(command_reply("+OK"))
        command = headers.get("call-command", "")
        if command == "unicast":
            await self.server.start_media(chan, headers)
        elif command == "hangup":
            self.server._hangup(chan, headers.get("hangup-cause", "NORMAL_CLEARING"))
        elif command == "execute":
            app = headers.get("execute-app-name", "")
            app_arg = headers.get("execute-app-arg", "")
            if app == "answer":
                self.server._answer(chan)
            elif app == "hangup":
                self.server._hangup(chan, app_arg or "NORMAL_CLEARING")
            elif app in ("playback", "speak"):
                self.server._start_playback(
                    chan, app_arg if app == "playback" else f"speak::{app_arg}"
                )


def _reframe(msg: EslMessage) -> bytes:
    """Re-serialize a captured message byte-exactly (header order kept)."""
    head = "".join(f"{k}: {v}\n" for k, v in msg.headers.items())
    return f"{head}\n".encode() + msg.body
