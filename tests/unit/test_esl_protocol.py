"""The sans-I/O ESL parser and serializers, on bytes recorded from a real FreeSWITCH 1.10.12."""

from __future__ import annotations

import pytest

from bridge.pbx.freeswitch.esl_protocol import (
    ContentType,
    EslInjectionError,
    EslParser,
    EslProtocolError,
    ParserState,
    encode_api,
    encode_auth,
    encode_bgapi,
    encode_event,
    encode_execute,
    encode_filter,
    encode_hangup,
    encode_message,
    encode_sendmsg,
    parse_event_plain,
)
from tests.support.esl_server import (
    DATA_DIR,
    capture_messages,
    load_capture,
    serialize_event_json,
    serialize_event_plain,
)

CAPTURES = sorted(p.stem for p in DATA_DIR.glob("*.txt"))


def parse_all(data: bytes) -> list:
    parser = EslParser()
    msgs = parser.feed(data)
    assert parser.state is ParserState.HEADERS
    assert parser.buffered == 0
    return msgs


def test_there_are_captures() -> None:
    assert {"auth_fail", "auth_ok_api_bgapi", "inbound_call_park", "originate_busy"} <= set(
        CAPTURES
    )


@pytest.mark.parametrize("name", CAPTURES)
def test_every_capture_parses_completely(name: str) -> None:
    msgs = parse_all(load_capture(name))
    assert msgs
    for msg in msgs:
        assert msg.content_type in {ct.value for ct in ContentType}
        if msg.is_event:
            assert msg.event().name


@pytest.mark.parametrize("name", CAPTURES)
def test_fake_server_serializer_reproduces_captured_events_byte_for_byte(name: str) -> None:
    for msg in capture_messages(name):
        if msg.content_type == ContentType.EVENT_PLAIN:
            event = msg.event()
            assert serialize_event_plain(event.items, event.body) == msg.body
        elif msg.content_type == ContentType.EVENT_JSON:
            event = msg.event()
            assert serialize_event_json(event.items, event.body) == msg.body


def test_split_at_every_byte_boundary_gives_the_same_messages() -> None:
    data = load_capture("auth_ok_api_bgapi")
    whole = parse_all(data)
    for i in range(len(data) + 1):
        parser = EslParser()
        assert parser.feed(data[:i]) + parser.feed(data[i:]) == whole


@pytest.mark.parametrize("name", ["inbound_call_park", "event_json", "outbound_socket"])
def test_byte_by_byte_feed(name: str) -> None:
    data = load_capture(name)
    parser = EslParser()
    msgs = []
    for i in range(len(data)):
        msgs += parser.feed(data[i : i + 1])
    assert msgs == parse_all(data)


def test_auth_exchange_and_api_replies() -> None:
    msgs = parse_all(load_capture("auth_ok_api_bgapi"))
    assert msgs[0].content_type == ContentType.AUTH_REQUEST
    assert msgs[1].reply_text == "+OK accepted"
    status = msgs[2]
    assert status.content_type == ContentType.API_RESPONSE
    assert "FreeSWITCH (Version 1.10.12" in status.text()
    texts = [m.text() for m in msgs if m.content_type == ContentType.API_RESPONSE]
    assert "-ERR No such channel!\n" in texts
    assert "-USAGE: <uuid> [cause]\n" in texts


def test_auth_failure_then_disconnect_notice() -> None:
    msgs = parse_all(load_capture("auth_fail"))
    assert [m.content_type for m in msgs] == [
        ContentType.AUTH_REQUEST,
        ContentType.COMMAND_REPLY,
        ContentType.DISCONNECT_NOTICE,
    ]
    assert msgs[1].reply_text == "-ERR invalid"
    assert msgs[2].text().startswith("Disconnected, goodbye.")


def test_background_job_has_its_own_body_and_decoded_headers() -> None:
    msgs = parse_all(load_capture("auth_ok_api_bgapi"))
    jobs = [m.event() for m in msgs if m.is_event and m.event().name == "BACKGROUND_JOB"]
    status, busy = jobs
    assert status.job_uuid == "6a1b6f4e-1111-4c1e-9a7e-000000000001"
    assert status.body is not None and status.body.startswith("UP ")
    assert "Content-Length" not in status.headers
    assert busy.get("Job-Command-Arg") == "error/user_busy &park"
    assert busy.body == "-ERR USER_BUSY\n"
    assert ":" in (busy.get("Event-Date-Local") or "")


def test_bgapi_reply_carries_job_uuid() -> None:
    msgs = parse_all(load_capture("auth_ok_api_bgapi"))
    reply = next(m for m in msgs if m.reply_text.startswith("+OK Job-UUID"))
    assert reply.headers["Job-UUID"] == "6a1b6f4e-1111-4c1e-9a7e-000000000001"


def test_json_events() -> None:
    msgs = parse_all(load_capture("event_json"))
    events = [m.event() for m in msgs if m.is_event]
    job = next(e for e in events if e.name == "BACKGROUND_JOB")
    assert job.raw_format == "json"
    assert job.body and job.body.startswith("UP ")
    assert "Content-Length" not in job.headers
    assert any(e.name == "HEARTBEAT" for e in events)


@pytest.mark.parametrize(
    ("name", "cause", "q850", "sip_status", "disposition", "job"),
    [
        ("originate_busy", "USER_BUSY", "17", "486", "recv_refuse", "-ERR USER_BUSY\n"),
        ("originate_decline", "CALL_REJECTED", "21", "603", "recv_refuse", "-ERR CALL_REJECTED\n"),
        ("originate_noanswer", "NO_ANSWER", "19", None, "send_cancel", "-ERR NO_ANSWER\n"),
    ],
)
def test_originate_failures_as_captured(
    name: str, cause: str, q850: str, sip_status: str | None, disposition: str, job: str
) -> None:
    events = [m.event() for m in capture_messages(name) if m.is_event]
    done = next(e for e in events if e.name == "CHANNEL_HANGUP_COMPLETE")
    assert done["Hangup-Cause"] == cause
    assert done.variable("hangup_cause_q850") == q850
    assert done.variable("sip_term_status") == sip_status
    assert done.variable("sip_hangup_disposition") == disposition
    assert [k for k, _ in done.items].count("Hangup-Cause") == 2  # FreeSWITCH repeats it
    assert next(e for e in events if e.name == "BACKGROUND_JOB").body == job


def test_outbound_connect_reply_is_an_encoded_event() -> None:
    msgs = parse_all(load_capture("outbound_socket"))
    connect = msgs[0]
    assert connect.content_type == ContentType.COMMAND_REPLY
    assert connect.reply_text == "+OK\n"
    channel = connect.event()
    assert channel.name == "CHANNEL_DATA"
    assert channel.get("Caller-Destination-Number") == "2000"
    assert channel.get("Socket-Mode") == "async"
    linger = msgs[-1]
    assert linger.content_type == ContentType.DISCONNECT_NOTICE
    assert linger.headers["Content-Disposition"] == "linger"


def test_encoded_newline_cannot_forge_a_header() -> None:
    body = (
        b"Event-Name: CHANNEL_PARK\n"
        b"Unique-ID: real-uuid\n"
        b"variable_evil: x%0AUnique-ID%3A%20forged%0AEvent-Name%3A%20CHANNEL_HANGUP\n"
        b"\n"
    )
    event = parse_event_plain(body)
    assert event.name == "CHANNEL_PARK"
    assert event.unique_id == "real-uuid"
    assert event.variable("evil") == "x\nUnique-ID: forged\nEvent-Name: CHANNEL_HANGUP"
    assert len(event.items) == 3


def test_decoding_is_like_freeswitch() -> None:
    event = parse_event_plain(b"A: 100%25%20sure\nB: 50%zz+1\nC: caf%C3%A9\n\n")
    assert event["A"] == "100% sure"
    assert event["B"] == "50%zz+1"  # bad escape stays, '+' is not a space
    assert event["C"] == "café"


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n",
        b"Reply-Text: +OK\n\n",  # no Content-Type
        b"Content-Type: api/response\nContent-Length: -5\n\n",
        b"Content-Type: api/response\nContent-Length: 12abc\n\n",
        b"Content-Type: api/response\n no name\n\n",
        b"\n\n",
    ],
)
def test_garbage_fails_loudly_and_stays_failed(garbage: bytes) -> None:
    parser = EslParser()
    with pytest.raises(EslProtocolError):
        parser.feed(garbage)
    assert parser.state is ParserState.FAILED
    with pytest.raises(EslProtocolError):
        parser.feed(b"Content-Type: auth/request\n\n")


def test_header_block_without_end_is_bounded() -> None:
    parser = EslParser(max_header_bytes=1024)
    with pytest.raises(EslProtocolError):
        parser.feed(b"Content-Type: x\n" + b"A: b\n" * 400)


def test_body_waits_for_all_its_bytes() -> None:
    parser = EslParser()
    assert parser.feed(b"Content-Type: api/response\nContent-Length: 5\n\n+O") == []
    assert parser.state is ParserState.BODY
    (msg,) = parser.feed(b"K\n\n")
    assert msg.body == b"+OK\n\n"


# --- serializers ------------------------------------------------------------------------------


def test_serializers_produce_the_wire_format() -> None:
    assert encode_auth("ClueCon") == b"auth ClueCon\n\n"
    assert encode_api("status") == b"api status\n\n"
    assert encode_bgapi("status", "j-1") == b"bgapi status\nJob-UUID: j-1\n\n"
    assert encode_event(["CHANNEL_PARK", "BACKGROUND_JOB"]) == (
        b"event plain CHANNEL_PARK BACKGROUND_JOB\n\n"
    )
    assert encode_filter("Unique-ID", "abc") == b"filter Unique-ID abc\n\n"
    assert encode_execute("u-1", "playback", "tone_stream://%(100,0,440)", event_lock=True) == (
        b"sendmsg u-1\ncall-command: execute\nexecute-app-name: playback\n"
        b"execute-app-arg: tone_stream://%(100,0,440)\nevent-lock: true\n\n"
    )
    assert encode_hangup(None, "USER_BUSY") == (
        b"sendmsg\ncall-command: hangup\nhangup-cause: USER_BUSY\n\n"
    )
    assert encode_message("sendmsg u", {"x": "y"}, b"a\nb") == (
        b"sendmsg u\nx: y\nContent-Length: 3\n\na\nb"
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda: encode_api("status\n\napi uuid_kill all"),
        lambda: encode_api("status\r"),
        lambda: encode_api("status\x00"),
        lambda: encode_bgapi("originate x &park()\nJob-UUID: other"),
        lambda: encode_bgapi("status", "j\n1"),
        lambda: encode_auth("pw\n\napi status"),
        lambda: encode_auth("pw with space"),
        lambda: encode_event(["CHANNEL_PARK\n\nexit"]),
        lambda: encode_event([]),
        lambda: encode_event(["ALL"], "xml\n"),
        lambda: encode_filter("Unique-ID", "x\n\nnoevents"),
        lambda: encode_filter("Bad Name", "x"),
        lambda: encode_execute("u", "playback", "file.wav\ncall-command: hangup"),
        lambda: encode_execute("u\nx", "answer"),
        lambda: encode_execute("u u", "answer"),
        lambda: encode_sendmsg("u", "execute", {"evil\nname": "x"}),
        lambda: encode_sendmsg("u", "execute", {"name:colon": "x"}),
        lambda: encode_hangup("u", "NORMAL_CLEARING\n\napi status"),
        lambda: encode_message("   "),
    ],
)
def test_injection_is_refused(build) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EslInjectionError):
        build()
