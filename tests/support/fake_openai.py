"""A real HTTP server on loopback speaking OpenAI's chat-completions and transcription APIs.

Streaming replies are byte-faithful to OpenAI's SSE: `data: {chunk}\\n\\n` lines whose
`choices[0].delta` carries `role`, `content` pieces or `tool_calls` fragments
(`{index, id, type, function: {name, arguments}}` first, then `{index, function: {arguments}}`
pieces), a last chunk with `finish_reason`, then `data: [DONE]`.

Tests script the replies (`Reply`: text, tool calls, delays, HTTP error, hang) and read back
the requests the server got (`requests`, `transcriptions`), e.g. to check the tool enum sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class FakeToolCall:
    name: str
    arguments: dict[str, Any] | str
    id: str = "call_fake0001"


@dataclass
class Reply:
    text: str = ""
    tool_calls: list[FakeToolCall] = field(default_factory=list)
    first_token_delay: float = 0.0  # seconds before the first chunk (headers go out at once)
    chunk_delay: float = 0.0  # between chunks
    status: int = 200  # anything else: an OpenAI-style error body with this status
    error_message: str = "fake error"
    hang: bool = False  # send headers, then nothing, until the client gives up
    hang_after_first: bool = False  # one content chunk, then nothing
    text_pieces: int = 4  # content is split into this many deltas
    arg_pieces: int = 3  # each tool call's arguments are split into this many fragments
    finish_reason: str | None = None  # default: "tool_calls" if there are calls, else "stop"


@dataclass
class Transcription:
    text: str = "hello"
    status: int = 200
    delay: float = 0.0


def _split(text: str, pieces: int) -> list[str]:
    if not text:
        return []
    size = max(1, -(-len(text) // max(1, pieces)))
    return [text[i : i + size] for i in range(0, len(text), size)]


def unanswered_tool_calls(messages: list[dict[str, Any]]) -> list[str]:
    """Tool call ids of assistant messages not followed by their tool messages (OpenAI
    refuses such a history with 400)."""
    missing: list[str] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or not message.get("tool_calls"):
            continue
        answered = set()
        for later in messages[i + 1 :]:
            if later.get("role") != "tool":
                break
            answered.add(later.get("tool_call_id"))
        missing += [c["id"] for c in message["tool_calls"] if c.get("id") not in answered]
    return missing


class FakeOpenAI:
    """`async with FakeOpenAI() as fake:` then point a client at `fake.base_url`."""

    def __init__(self, api_key: str | None = "test-key") -> None:
        self.api_key = api_key
        self.replies: deque[Reply] = deque()
        self.default_reply = Reply(text="Hello from the fake model.")
        self.transcription_replies: deque[Transcription] = deque()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.transcriptions: list[dict[str, Any]] = []
        self.disconnects = 0
        self._runner: web.AppRunner | None = None
        self._hangs: list[asyncio.Event] = []
        self.base_url = ""

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def add_routes(self, app: web.Application) -> None:
        """The endpoints served; a subclass adds its own (e.g. `/v1/audio/speech`)."""
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/audio/transcriptions", self._transcribe)

    async def __aenter__(self) -> FakeOpenAI:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        self.add_routes(app)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for event in self._hangs:
            event.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def _authorized(self, request: web.Request) -> bool:
        if self.api_key is None:
            return True
        return request.headers.get("Authorization") == f"Bearer {self.api_key}" or (
            request.headers.get("api-key") == self.api_key
        )

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        kind = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status, "server_error")
        body = {"error": {"message": message, "type": kind, "param": None, "code": kind}}
        return web.json_response(body, status=status)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided.")
        missing = unanswered_tool_calls(body.get("messages", []))
        if missing:
            # What OpenAI answers for a history with an unanswered tool call.
            return self._error(
                400,
                "An assistant message with 'tool_calls' must be followed by tool messages "
                "responding to each 'tool_call_id'. The following tool_call_ids did not have "
                f"response messages: {', '.join(missing)}",
            )
        reply = self.replies.popleft() if self.replies else self.default_reply
        if reply.status != 200:
            return self._error(reply.status, reply.error_message)
        if not body.get("stream"):
            return web.json_response(self._completion(body, reply))
        return await self._stream(request, body, reply)

    def _chunk(self, body: dict[str, Any], delta: dict[str, Any], finish: str | None) -> bytes:
        chunk = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    async def _stream(
        self, request: web.Request, body: dict[str, Any], reply: Reply
    ) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        if reply.hang:
            await self._hang()
            return resp
        await asyncio.sleep(reply.first_token_delay)
        chunks = [self._chunk(body, {"role": "assistant", "content": ""}, None)]
        for piece in _split(reply.text, reply.text_pieces):
            chunks.append(self._chunk(body, {"content": piece}, None))
        for index, call in enumerate(reply.tool_calls):
            args = call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments)
            head = {
                "index": index,
                "id": call.id if index == 0 else f"{call.id}_{index}",
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            chunks.append(self._chunk(body, {"tool_calls": [head]}, None))
            for piece in _split(args, reply.arg_pieces):
                frag = {"index": index, "function": {"arguments": piece}}
                chunks.append(self._chunk(body, {"tool_calls": [frag]}, None))
        finish = reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")
        chunks.append(self._chunk(body, {}, finish))
        chunks.append(b"data: [DONE]\n\n")
        try:
            for i, chunk in enumerate(chunks):
                if i and reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
                await resp.write(chunk)
                if reply.hang_after_first and i == 1:
                    await self._hang()
                    return resp
            await resp.write_eof()
        except ConnectionResetError:
            self.disconnects += 1  # the client went away mid-stream (barge-in)
        return resp

    def _completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.name,
                        "arguments": c.arguments
                        if isinstance(c.arguments, str)
                        else json.dumps(c.arguments),
                    },
                }
                for c in reply.tool_calls
            ]
        finish = "tool_calls" if reply.tool_calls else "stop"
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        }

    async def _hang(self) -> None:
        event = asyncio.Event()
        self._hangs.append(event)
        await event.wait()

    async def _transcribe(self, request: web.Request) -> web.Response:
        fields: dict[str, Any] = {}
        reader = await request.multipart()
        async for part in reader:
            name = part.name or ""
            if part.filename:  # type: ignore[union-attr]
                fields[name] = {
                    "filename": part.filename,  # type: ignore[union-attr]
                    "content_type": part.headers.get("Content-Type"),
                    "data": await part.read(),  # type: ignore[union-attr]
                }
            else:
                fields[name] = await part.text()  # type: ignore[union-attr]
        self.transcriptions.append(fields)
        self.headers.append(dict(request.headers))
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided.")
        reply = (
            self.transcription_replies.popleft() if self.transcription_replies else Transcription()
        )
        await asyncio.sleep(reply.delay)
        if reply.status != 200:
            return self._error(reply.status, "transcription failed")
        return web.json_response({"text": reply.text})
