"""The assistant's tools as function-calling schemas, and the model's calls as typed intents.

`transfer_call` becomes a function whose `destination` parameter is an enum of short keys,
one per configured destination (a slug of its description, e.g. `technical_support`). The
model never sees a phone number or SIP URI, so it cannot invent or be talked into one (toll
fraud); the key maps back to the configured destination here. `end_call` takes an optional
reason.

A call the model gets wrong raises `ToolError`, whose message is written for the model (as in
livekit's agents): send it back as the tool result and the model can correct itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.directory.models import destination_address
from bridge.llm.base import ChatMessage, FunctionTool, ToolCall

TRANSFER_CALL = "transfer_call"
END_CALL = "end_call"
_MAX_KEY = 32
MAX_PREFACE = 500  # characters the model may have spoken before a transfer (the command takes 1000)


class ToolError(Exception):
    """A tool call we refuse; `str(err)` is meant to be read by the model."""


@dataclass(frozen=True)
class Destination:
    """A configured transfer target, normalised from the assistant's config."""

    key: str
    type: str  # "number" or "sip"
    target: str  # E.164 number or SIP URI
    description: str
    message: str | None = None


@dataclass(frozen=True)
class TransferIntent:
    """The model wants the caller transferred. `preface` is what to say first: the
    destination's configured `message`, else the model's own, else nothing."""

    destination_key: str
    destination: Destination
    preface: str | None = None
    call_id: str = ""


@dataclass(frozen=True)
class EndCallIntent:
    reason: str | None = None
    call_id: str = ""


ToolIntent = TransferIntent | EndCallIntent


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def slug(text: str) -> str:
    """A short key from a description: its head (before " - ", ":" or ","), snake_case."""
    head = re.split(r"\s+[-–—]\s+|[:;,(]", text, maxsplit=1)[0]
    words = re.findall(r"[a-z0-9]+", head.lower())
    key = ""
    for word in words:
        candidate = f"{key}_{word}" if key else word
        if len(candidate) > _MAX_KEY:
            break
        key = candidate
    return key or "destination"


def build_destinations(tools: Iterable[Any]) -> list[Destination]:
    """Destinations of every `transfer_call` tool, each with a unique, stable key.

    Accepts the config models (`bridge.directory.models`) or plain dicts.
    """
    out: list[Destination] = []
    used: set[str] = set()
    for tool in tools:
        if _get(tool, "type") != TRANSFER_CALL:
            continue
        for dest in _get(tool, "destinations") or []:
            kind = _get(dest, "type") or "number"
            target = destination_address(dest)  # number, SIP URI or internal address
            description = str(_get(dest, "description") or "")
            base = slug(description)
            key, n = base, 2
            while key in used:
                key, n = f"{base}_{n}", n + 1
            used.add(key)
            out.append(Destination(key, kind, str(target), description, _get(dest, "message")))
    return out


class Toolset:
    """The function tools offered to the model for one assistant, and their parser."""

    def __init__(self, destinations: Sequence[Destination], end_call: bool) -> None:
        self.destinations = {d.key: d for d in destinations}
        self.end_call = end_call
        self.specs: list[FunctionTool] = []
        if self.destinations:
            self.specs.append(self._transfer_spec())
        if end_call:
            self.specs.append(self._end_call_spec())

    @classmethod
    def from_assistant_tools(cls, tools: Iterable[Any]) -> Toolset:
        tools = list(tools)
        end = any(_get(t, "type") == END_CALL for t in tools)
        return cls(build_destinations(tools), end)

    def _transfer_spec(self) -> FunctionTool:
        lines = "\n".join(f"- {k}: {d.description}" for k, d in self.destinations.items())
        return FunctionTool(
            name=TRANSFER_CALL,
            description=(
                "Transfer the caller to a person or department. Use it only when the caller's "
                "request matches one of the destinations listed under `destination`."
            ),
            parameters={
                "type": "object",
                "properties": {
                    "destination": {
                        "type": "string",
                        "enum": list(self.destinations),
                        "description": "Where to transfer the caller:\n" + lines,
                    },
                    "message": {
                        "type": "string",
                        "description": "Optional short sentence to say to the caller before "
                        "the transfer.",
                    },
                },
                "required": ["destination"],
                "additionalProperties": False,
            },
            choices={k: d.description for k, d in self.destinations.items()},
        )

    @staticmethod
    def _end_call_spec() -> FunctionTool:
        return FunctionTool(
            name=END_CALL,
            description="End the call when the caller says goodbye or has nothing more to ask. "
            "Say goodbye in your reply before calling this.",
            parameters={
                "type": "object",
                "properties": {
                    "reason": {"type": "string", "description": "Why the call ends, briefly."}
                },
                "required": [],
                "additionalProperties": False,
            },
        )

    def parse(self, call: ToolCall) -> ToolIntent:
        """Validate a model's call into an intent, or raise `ToolError` for the model."""
        try:
            args = json.loads(call.arguments) if call.arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ToolError(
                f"The arguments of {call.name} were not valid JSON ({exc.msg}). "
                "Call the function again with a JSON object."
            ) from exc
        if not isinstance(args, dict):
            raise ToolError(f"The arguments of {call.name} must be a JSON object.")
        if call.name == TRANSFER_CALL and self.destinations:
            return self._parse_transfer(call, args)
        if call.name == END_CALL and self.end_call:
            reason = args.get("reason")
            return EndCallIntent(str(reason) if reason else None, call.id)
        names = ", ".join(s.name for s in self.specs) or "none"
        raise ToolError(f"There is no function named {call.name!r}. Available: {names}.")

    def _parse_transfer(self, call: ToolCall, args: dict[str, Any]) -> TransferIntent:
        choices = ", ".join(self.destinations)
        key = args.get("destination")
        if not isinstance(key, str) or not key:
            raise ToolError(f"transfer_call needs a destination, one of: {choices}.")
        dest = self.destinations.get(key) or self.destinations.get(key.strip().lower())
        if dest is None:
            raise ToolError(
                f"{key!r} is not a destination you can transfer to. Use exactly one of: "
                f"{choices}. If none fits, ask the caller what they need."
            )
        said = args.get("message")
        said = str(said).strip() if said else None
        if said and not dest.message and len(said) > MAX_PREFACE:
            raise ToolError(
                f"The message of transfer_call is {len(said)} characters long; keep it to one "
                f"short sentence (at most {MAX_PREFACE} characters) and call it again."
            )
        preface = dest.message or said or None
        return TransferIntent(dest.key, dest, preface, call.id)


def tool_result(call: ToolCall, content: str) -> ChatMessage:
    """The tool message answering `call` (a ToolError's text, or an outcome)."""
    return ChatMessage.tool(call.id, content)
