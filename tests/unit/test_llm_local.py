"""The local router (not an LLM) and the numpy MiniLM it routes with."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bridge.llm.base import ChatMessage, Finished, TextDelta, ToolCall, ToolCallEvent, collect
from bridge.llm.local import LocalRouter
from bridge.llm.minilm import MiniLmEmbedder, shared_embedder
from bridge.llm.tools import EndCallIntent, Toolset, TransferIntent

SEED = [
    {
        "type": "transfer_call",
        "destinations": [
            {
                "type": "number",
                "number": "+31612345678",
                "description": "Sales team - for pricing and quotes",
            },
            {
                "type": "number",
                "number": "+31687654321",
                "description": "Technical support - for product issues and troubleshooting",
            },
            {
                "type": "number",
                "number": "+31698765432",
                "description": "Billing department - for invoice and payment questions",
            },
        ],
    },
    {"type": "end_call"},
]
HUMAN = {
    "type": "number",
    "number": "+31611111111",
    "description": "Human support assistant for complex issues or when the customer asks for one",
}


@pytest.fixture(scope="module")
def embedder() -> MiniLmEmbedder:
    return shared_embedder()


@pytest.fixture(scope="module")
def toolset() -> Toolset:
    return Toolset.from_assistant_tools(SEED)


@pytest.fixture
def router(embedder: MiniLmEmbedder) -> LocalRouter:
    return LocalRouter(embedder=embedder)


def test_numpy_minilm_matches_the_published_similarities(embedder: MiniLmEmbedder) -> None:
    # sentence-transformers' quickstart figures for all-MiniLM-L6-v2.
    v = embedder.embed(
        ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    )
    assert np.linalg.norm(v, axis=1) == pytest.approx([1, 1, 1], abs=1e-5)
    sims = v @ v.T
    assert sims[0, 1] == pytest.approx(0.6660, abs=2e-3)
    assert sims[0, 2] == pytest.approx(0.1046, abs=2e-3)
    assert sims[1, 2] == pytest.approx(0.1411, abs=2e-3)


def test_the_embedder_is_shared(embedder: MiniLmEmbedder) -> None:
    assert shared_embedder() is embedder


async def route(router: LocalRouter, toolset: Toolset, said: str):  # type: ignore[no-untyped-def]
    text, calls, reason = await collect(router.stream([ChatMessage.user(said)], toolset.specs))
    return text, [toolset.parse(c) for c in calls], reason


@pytest.mark.parametrize(
    ("said", "key"),
    [
        # As Whisper heard them on 8 kHz G.711 (note "billing" → "a building").
        ("I would like to talk to a building about my invoice, please.", "billing_department"),
        ("Can you put me through to technical support? My router is broken.", "technical_support"),
        # "go for your new product" is as close to "product issues" as to sales: it now gets
        # a question; buying words are a sales request.
        ("I want to buy your new product.", "sales_team"),
        ("How much does the premium plan cost?", "sales_team"),
        ("My internet keeps dropping", "technical_support"),
        ("I was charged twice on my card", "billing_department"),
        ("Can I talk to someone about my bill?", "billing_department"),
        ("No thanks, I want a quote", "sales_team"),
        ("uh, tech support", "technical_support"),
    ],
)
async def test_routes_by_meaning(
    router: LocalRouter, toolset: Toolset, said: str, key: str
) -> None:
    text, intents, reason = await route(router, toolset, said)
    assert text == "" and reason == "tool_calls"
    assert len(intents) == 1 and isinstance(intents[0], TransferIntent)
    assert intents[0].destination_key == key


@pytest.mark.parametrize("said", ["hmm", "Hello?", "What's the weather like?", "I need help", ""])
async def test_unclear_words_get_a_question_naming_the_destinations(
    router: LocalRouter, toolset: Toolset, said: str
) -> None:
    text, intents, reason = await route(router, toolset, said)
    assert intents == [] and reason == "stop"
    # A question it cannot answer says so first ("I'm sorry, I don't have that information.").
    assert text.endswith(
        "I can connect you with sales team, technical support or billing department. "
        "Which would you like?"
    )


@pytest.mark.parametrize(
    "said", ["Bye!", "Okay, goodbye.", "No thanks, that's all.", "nothing else"]
)
async def test_goodbye_ends_the_call(router: LocalRouter, toolset: Toolset, said: str) -> None:
    text, intents, _ = await route(router, toolset, said)
    assert "Goodbye" in text
    assert len(intents) == 1 and isinstance(intents[0], EndCallIntent)


async def test_goodbye_without_end_call_tool_is_a_question(router: LocalRouter) -> None:
    toolset = Toolset.from_assistant_tools(SEED[:1])
    _, intents, _ = await route(router, toolset, "bye")
    assert intents == []


@pytest.mark.parametrize("said", ["Let me speak to a human.", "an agent please", "a real person"])
async def test_asking_for_a_human_goes_to_the_human_destination(
    router: LocalRouter, said: str
) -> None:
    destinations = [*SEED[0]["destinations"], HUMAN]  # type: ignore[misc]
    toolset = Toolset.from_assistant_tools(
        [{"type": "transfer_call", "destinations": destinations}]
    )
    _, intents, _ = await route(router, toolset, said)
    assert len(intents) == 1 and isinstance(intents[0], TransferIntent)
    assert intents[0].destination.target == "+31611111111"


async def test_asking_for_a_human_with_no_human_destination_asks(
    router: LocalRouter, toolset: Toolset
) -> None:
    text, intents, _ = await route(router, toolset, "Let me speak to a human.")
    assert intents == [] and text.startswith("I can connect you with")


async def test_after_a_tool_result_it_apologises_and_asks(
    router: LocalRouter, toolset: Toolset
) -> None:
    call = ToolCall("local_1", "transfer_call", json.dumps({"destination": "sales_team"}))
    history = [
        ChatMessage.user("sales"),
        ChatMessage.assistant(None, [call]),
        ChatMessage.tool("local_1", "The transfer failed: busy."),
    ]
    events = [e async for e in router.stream(history, toolset.specs)]
    assert isinstance(events[0], TextDelta) and events[0].text.startswith("Sorry")
    assert events[-1] == Finished("stop")


async def test_word_overlap_fallback_without_the_model(toolset: Toolset) -> None:
    router = LocalRouter(use_embeddings=False)
    for said, key in [
        ("I have a question about my invoice", "billing_department"),
        ("my product is broken", "technical_support"),
        ("pricing please", "sales_team"),
    ]:
        _, intents, _ = await route(router, toolset, said)
        assert [i.destination_key for i in intents] == [key]  # type: ignore[union-attr]
    _, intents, _ = await route(router, toolset, "I need help")
    assert intents == []


async def test_tool_call_ids_are_unique(router: LocalRouter, toolset: Toolset) -> None:
    ids = []
    for said in ["sales", "billing"]:
        async for event in router.stream([ChatMessage.user(said)], toolset.specs):
            if isinstance(event, ToolCallEvent):
                ids.append(event.call.id)
    assert len(set(ids)) == 2
