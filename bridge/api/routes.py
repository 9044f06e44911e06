"""The route table: the single source for the router, authentication and the OpenAPI document.

Each route names its handler and the models of its request body, query and response; the
OpenAPI document is generated from this table and the models' JSON schemas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from bridge.api import chat, http
from bridge.api.ops import ops_routes
from bridge.api.schemas import (
    AssistantOut,
    CallDetail,
    CallOut,
    CallsQuery,
    ControlAccepted,
    ControlRequest,
    DestinationTestRequest,
    DestinationTestResult,
    Health,
    NumberOut,
    TransferStats,
    TransferStatsQuery,
    TrunkOut,
    patch_model,
)
from bridge.api.webhooks import webhook_routes
from bridge.directory.models import AssistantIn, NumberIn, TrunkIn
from bridge.directory.service import DirectoryService as D

PREFIX = "/api/v1"


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # under PREFIX; `{id}` is a path parameter (same syntax for aiohttp and OpenAPI)
    handler: http.Handler
    operation_id: str
    summary: str
    tag: str
    status: int = 200
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    many: bool = False  # the response is `{"data": [response, ...]}`
    query: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()  # statuses beyond those implied by auth, body and path
    public: bool = False  # no API key needed

    @property
    def full_path(self) -> str:
        return PREFIX + self.path


def _collection(
    path: str,
    tag: str,
    singular: str,
    model_in: type[BaseModel],
    model_out: type[BaseModel],
    handlers: dict[str, http.Handler],
    *,
    create_errors: tuple[int, ...] = (),
    patch_errors: tuple[int, ...] = (),
    delete_errors: tuple[int, ...] = (),
) -> list[Route]:
    one = f"/{path}/{{id}}"
    name = singular.lower().replace(" ", "_")
    a = "an" if singular[0] in "aeiou" else "a"
    common: dict[str, Any] = {"tag": tag, "response": model_out}
    return [
        Route("POST", f"/{path}", handlers["create"], f"create_{name}", f"Create {a} {singular}",
              status=201, request=model_in, errors=create_errors, **common),
        Route("GET", f"/{path}", handlers["list"], f"list_{name}s", f"List {singular}s",
              many=True, **common),
        Route("GET", one, handlers["get"], f"get_{name}", f"Get {a} {singular}", **common),
        Route("PATCH", one, handlers["patch"], f"update_{name}",
              f"Update {a} {singular} (JSON merge patch)", request=patch_model(model_in),
              errors=patch_errors, **common),
        Route("DELETE", one, handlers["delete"], f"delete_{name}", f"Delete {a} {singular}",
              tag=tag, status=204, errors=delete_errors),
    ]  # fmt: skip


ROUTES: list[Route] = [
    *_collection(
        "assistants", "assistants", "assistant", AssistantIn, AssistantOut,
        http.collection_handlers(
            AssistantIn, D.create_assistant, D.get_assistant,
            D.list_assistants, D.patch_assistant, D.delete_assistant,
        ),
        delete_errors=(409,),
    ),
    *_collection(
        "sip-trunks", "sip-trunks", "SIP trunk", TrunkIn, TrunkOut,
        http.collection_handlers(
            TrunkIn, D.create_trunk, D.get_trunk,
            D.list_trunks, D.patch_trunk, D.delete_trunk,
        ),
        delete_errors=(409,),
    ),
    *_collection(
        "numbers", "numbers", "number", NumberIn, NumberOut,
        http.collection_handlers(
            NumberIn, D.create_number, D.get_number,
            D.list_numbers, D.patch_number, D.delete_number,
        ),
        create_errors=(409,),
        patch_errors=(409,),
    ),
    Route("GET", "/calls", http.list_calls, "list_calls", "List calls, newest first",
          "calls", response=CallOut, many=True, query=CallsQuery),
    Route("GET", "/calls/{id}", http.get_call, "get_call",
          "Get a call with its events and transfers", "calls", response=CallDetail),
    Route("POST", "/calls/{id}/control", http.control_call, "control_call",
          "Send a command to a call (transfer, say, end_call, return)", "calls", status=202,
          request=ControlRequest, response=ControlAccepted, errors=(403, 409, 503)),
    Route("POST", "/destinations/test", http.test_destination, "test_destination",
          "Place a test call to a destination by the route a transfer would take",
          "calls", request=DestinationTestRequest, response=DestinationTestResult,
          errors=(403, 503)),
    Route("GET", "/transfers/stats", http.transfer_stats, "transfer_stats",
          "Transfer monitoring: rates and outcomes, per destination", "calls",
          response=TransferStats, query=TransferStatsQuery),
    Route("POST", "/assistants/{id}/chat", chat.chat, "chat_with_assistant",
          "Text test console: one caller message, the replies and actions (not executed)",
          "assistants", request=chat.ChatRequest, response=chat.ChatReply, errors=(409,)),
    Route("GET", "/health", http.health, "health", "Liveness and PBX connection state",
          "service", response=Health, public=True),
    Route("GET", "/openapi.json", http.openapi, "openapi", "This API as OpenAPI 3.1",
          "service", public=True),
]  # fmt: skip
ROUTES += ops_routes()  # issue 10: analytics (bridge.api.ops)
ROUTES += webhook_routes()  # issue 10: /webhooks (bridge.api.webhooks)
