"""Rebuild a call's chat history from its stored transcript (after a daemon restart).

The transcript events the agent records (`role` = caller / assistant / tool_call /
tool_result) hold everything the model saw, so a restarted daemon can carry on the
conversation where it was instead of starting from nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from bridge.llm.base import ChatMessage, ToolCall


def history_from_transcript(events: Iterable[Any]) -> list[ChatMessage]:
    """`events`: the call's `CallEvent`s (or anything with `.kind` and `.data`), in order."""
    history: list[ChatMessage] = []
    answered: set[str] = set()
    asked: list[str] = []
    for event in events:
        if event.kind != "transcript":
            continue
        data = event.data
        role, text = data.get("role"), str(data.get("text") or "")
        if role == "caller":
            history.append(ChatMessage.user(text))
        elif role == "assistant":
            history.append(ChatMessage.assistant(text))
        elif role == "tool_call" and data.get("call_id"):
            call = ToolCall(str(data["call_id"]), str(data.get("tool") or ""), text)
            asked.append(call.id)
            last = history[-1] if history else None
            if last is not None and last.role == "assistant":  # the same turn's words
                history[-1] = ChatMessage.assistant(last.content, (*last.tool_calls, call))
            else:
                history.append(ChatMessage.assistant(None, (call,)))
        elif role == "tool_result" and data.get("call_id"):
            answered.add(str(data["call_id"]))
            history.append(ChatMessage.tool(str(data["call_id"]), text))
    # A call whose result was lost with the old process still needs an answer, or the next
    # request is refused by OpenAI-compatible servers.
    for call_id in asked:
        if call_id not in answered:
            unknown = json.dumps({"outcome": "unknown", "cause": "callbridge restarted"})
            history.append(ChatMessage.tool(call_id, unknown))
    return history
