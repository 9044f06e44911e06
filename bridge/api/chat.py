"""`POST /api/v1/assistants/{id}/chat`: the text test console (bridge/agent/chat.py).

Registered in `routes.ROUTES` with one line (`*chat.ROUTES`); the console itself is set on
the application by `create_api_app(chat=...)`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from bridge.agent.chat import ChatConsole
from bridge.api.http import json_object, respond
from bridge.directory.service import validate
from bridge.errors import Conflict

CHAT: web.AppKey[ChatConsole | None] = web.AppKey("chat")


class ChatRequest(BaseModel):
    """One message from the caller's side. Omit `conversation_id` to start a conversation."""

    model_config = ConfigDict(extra="forbid", strict=True, str_strip_whitespace=True)

    message: str = Field(min_length=1, max_length=2000, description="What the caller says.")
    conversation_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="From an earlier reply; omit it to start a new conversation.",
    )


class TransferAction(BaseModel):
    type: Literal["transfer"]
    destination: str = Field(description="The number or SIP URI a call would be sent to.")
    description: str
    message: str | None = Field(description="What the caller would hear first.")


class EndCallAction(BaseModel):
    type: Literal["end_call"]


class ChatReply(BaseModel):
    """What the assistant would say and do. Actions are reported, never executed."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    conversation_id: str
    replies: list[str] = Field(
        description="What the caller would hear, in order (a new conversation starts with the"
        " assistant's first_message)."
    )
    actions: list[Annotated[TransferAction | EndCallAction, Field(discriminator="type")]]
    ended: bool = Field(
        description="A transfer or end_call ended the conversation: further messages get 409."
    )
    llm_error: str | None = Field(
        description="The model failed this turn (e.g. the provider is not configured or down):"
        " the replies and actions are the configured fallback, as on a call."
    )


async def chat(request: web.Request) -> web.Response:
    body = validate(ChatRequest, await json_object(request))
    console = request.app[CHAT]
    if console is None:
        raise Conflict("the conversation pipeline is off (agent.enabled = false)")
    turn = await console.send(request.match_info["id"], body.message, body.conversation_id)
    return respond(turn.public_dict())
