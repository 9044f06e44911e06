"""An OpenAI-compatible chat-completions provider over aiohttp, streaming.

Speaks the protocol that OpenAI, Azure OpenAI, Ollama, vLLM and llama.cpp's server share:
`POST {base_url}/chat/completions` with `stream: true`, answered by server-sent events whose
`choices[0].delta` carries content pieces and tool-call fragments (the `function.arguments`
of one call arrive split across chunks and are joined by their `index`), ending with
`data: [DONE]`. We keep our own small client rather than the `openai` SDK: one dependency less,
and we control the timeouts that a phone call needs.

Timeouts: `first_token_timeout` bounds the wait from sending the request to the first content
or tool-call fragment (what the caller hears as silence), `total_timeout` the whole reply.
Both count wall time from the request, including time the consumer spends between events.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bridge.llm.base import (
    ChatMessage,
    Finished,
    FunctionTool,
    LlmAuthError,
    LlmBadRequest,
    LlmConnectionError,
    LlmError,
    LlmEvent,
    LlmProtocolError,
    LlmRateLimited,
    LlmServerError,
    LlmTimeout,
    TextDelta,
    ToolCall,
    ToolCallEvent,
    collect,
)
from bridge.llm.brief import brief_request, speakable_brief


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


def _error_for_status(status: int, message: str) -> LlmError:
    if status in (401, 403):
        return LlmAuthError(message, status=status)
    if status == 429:
        return LlmRateLimited(message, status=status)
    if status >= 500:
        return LlmServerError(message, status=status)
    return LlmBadRequest(message, status=status)


def _error_message(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    if isinstance(error, str):  # Ollama, llama.cpp
        return error
    return body[:300]


class OpenAICompatLlm:
    """Chat completions against any OpenAI-compatible server.

    `base_url` includes the version path, as in the OpenAI SDK: `https://api.openai.com/v1`,
    `http://localhost:11434/v1` (Ollama), `http://localhost:8000/v1` (vLLM, llama.cpp).
    For Azure, pass the deployment URL (`https://R.openai.azure.com/openai/deployments/D`)
    and `api_version`: the key then goes in an `api-key` header.
    """

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        api_version: str | None = None,
        first_token_timeout: float = 5.0,
        total_timeout: float = 30.0,
        temperature: float | None = None,
        max_tokens: int | None = None,
        extra_body: Mapping[str, Any] | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.api_version = api_version
        self.first_token_timeout = first_token_timeout
        self.total_timeout = total_timeout
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})
        self._session = session
        self._own_session = session is None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            if self.api_version:
                headers["api-key"] = self.api_key
            else:
                headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def request_body(
        self, messages: Sequence[ChatMessage], tools: Sequence[FunctionTool]
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [m.to_openai() for m in messages],
            "stream": True,
        }
        if tools:
            body["tools"] = [t.to_openai() for t in tools]
            body["tool_choice"] = "auto"
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        body.update(self.extra_body)
        return body

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        return self._session

    async def aclose(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def stream(
        self, messages: Sequence[ChatMessage], tools: Sequence[FunctionTool] = ()
    ) -> AsyncIterator[LlmEvent]:
        start = time.monotonic()
        total_deadline = start + self.total_timeout
        first_deadline = min(start + self.first_token_timeout, total_deadline)
        got_first = False

        def remaining() -> tuple[float, str]:
            now = time.monotonic()
            if not got_first and first_deadline <= total_deadline:
                return max(0.0, first_deadline - now), "first_token"
            return max(0.0, total_deadline - now), "total"

        params = {"api-version": self.api_version} if self.api_version else None
        body = self.request_body(messages, tools)
        session = self._get_session()
        left, phase = remaining()
        try:
            async with asyncio.timeout(left):
                resp = await session.post(
                    self.url, json=body, headers=self._headers(), params=params
                )
        except TimeoutError:
            raise self._timeout(phase) from None
        except aiohttp.ClientError as exc:
            raise LlmConnectionError(f"cannot reach {self.url}: {exc}") from exc

        async with resp:
            if resp.status != 200:
                text = await resp.text(errors="replace")
                raise _error_for_status(resp.status, _error_message(text))
            partial: dict[int, _PartialCall] = {}
            finish: str | None = None
            while True:
                left, phase = remaining()
                try:
                    async with asyncio.timeout(left):
                        line = await resp.content.readline()
                except TimeoutError:
                    raise self._timeout(phase) from None
                except aiohttp.ClientError as exc:
                    raise LlmConnectionError(f"stream from {self.url} broke: {exc}") from exc
                if not line:
                    break  # EOF without [DONE]: tolerated (some servers omit it)
                payload = self._sse_data(line)
                if payload is None:
                    continue
                if payload == "[DONE]":
                    break
                chunk = self._parse_chunk(payload)
                texts, saw_token = self._feed(chunk, partial)
                got_first = got_first or saw_token
                for text in texts:
                    yield TextDelta(text)
                choice = (chunk.get("choices") or [{}])[0]
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                    for event in self._flush_calls(partial):
                        yield event
            for event in self._flush_calls(partial):
                yield event
            yield Finished(finish)

    async def summarize(self, history: Sequence[ChatMessage]) -> str | None:
        """The warm transfer's brief: the same streaming request, with our own instruction
        and the conversation's words only (no system prompt, no tools)."""
        messages = brief_request(history)
        if messages is None:
            return None
        text, _, _ = await collect(self.stream(messages))
        return speakable_brief(text)

    def _timeout(self, phase: str) -> LlmTimeout:
        if phase == "first_token":
            return LlmTimeout(
                f"no first token from {self.model} within {self.first_token_timeout} s",
                phase="first_token",
            )
        return LlmTimeout(
            f"{self.model} did not finish within {self.total_timeout} s", phase="total"
        )

    @staticmethod
    def _sse_data(raw: bytes) -> str | None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line.startswith("data:"):
            return None  # blank separators, ": comments", "event:" and "id:" lines
        return line[5:].strip()

    @staticmethod
    def _parse_chunk(payload: str) -> dict[str, Any]:
        try:
            chunk = json.loads(payload)
        except ValueError as exc:
            raise LlmProtocolError(f"bad JSON in stream: {payload[:200]!r}") from exc
        if not isinstance(chunk, dict):
            raise LlmProtocolError(f"unexpected stream chunk: {payload[:200]!r}")
        if "error" in chunk:  # some servers report failures inside the stream
            raise LlmServerError(_error_message(payload))
        return chunk

    @staticmethod
    def _feed(chunk: dict[str, Any], partial: dict[int, _PartialCall]) -> tuple[list[str], bool]:
        """Content pieces of a chunk; tool-call fragments go into `partial`. The flag says
        whether the chunk carried a token (content or fragment), which stops the first-token
        clock."""
        texts: list[str] = []
        saw_token = False
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                texts.append(content)
                saw_token = True
            for frag in delta.get("tool_calls") or []:
                saw_token = True
                index = frag.get("index", len(partial))
                call = partial.setdefault(index, _PartialCall())
                call.id = frag.get("id") or call.id
                function = frag.get("function") or {}
                call.name = function.get("name") or call.name
                args = function.get("arguments")
                if isinstance(args, dict):  # a few servers send an object, not a string
                    args = json.dumps(args)
                if args:
                    call.arguments.append(args)
        return texts, saw_token

    @staticmethod
    def _flush_calls(partial: dict[int, _PartialCall]) -> list[ToolCallEvent]:
        out = []
        for index in sorted(partial):
            call = partial[index]
            if not call.name:
                raise LlmProtocolError(f"tool call {index} has no function name")
            args = "".join(call.arguments)
            out.append(ToolCallEvent(ToolCall(call.id or f"call_{index}", call.name, args)))
        partial.clear()
        return out
