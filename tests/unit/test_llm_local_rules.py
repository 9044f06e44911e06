"""The offline assistant's rules beyond routing by meaning: knowledge, complaints, a person,
business questions, the offer after two unanswered questions, prompt lines, no end_call."""

from __future__ import annotations

import pytest

from bridge.llm.base import ChatMessage, Knowledge, collect
from bridge.llm.local import DONT_KNOW, GOODBYE, LocalRouter, _prompt_lines
from bridge.llm.minilm import shared_embedder
from bridge.llm.tools import EndCallIntent, Toolset, TransferIntent

SEED_HUMAN = {
    "type": "transfer_call",
    "destinations": [
        {
            "number": "+31612345678",
            "description": "Human support assistant for complex issues or when customer"
            " explicitly requests a human",
        }
    ],
}
DEPARTMENTS = {
    "type": "transfer_call",
    "destinations": [
        {"number": "+31612345678", "description": "Sales team - for pricing and quotes"},
        {
            "number": "+31687654321",
            "description": "Technical support - for product issues and troubleshooting",
        },
        {
            "number": "+31698765432",
            "description": "Billing department - for invoice and payment questions",
        },
    ],
}
KNOWLEDGE = (
    Knowledge("We are open Monday to Friday from nine to five.", "What are your opening hours?"),
    Knowledge("Our office is at Keizersgracht 100 in Amsterdam.", "Where is your office?"),
)


@pytest.fixture(scope="module")
def router() -> LocalRouter:
    return LocalRouter(embedder=shared_embedder())


async def turn(
    router: LocalRouter, tools: list[dict], history: list[ChatMessage], knowledge=KNOWLEDGE
):  # type: ignore[no-untyped-def]
    toolset = Toolset.from_assistant_tools(tools)
    system = [ChatMessage.system("Be helpful.")]
    if knowledge:
        system.append(ChatMessage("system", "facts", knowledge=tuple(knowledge)))
    text, calls, _ = await collect(router.stream(system + history, toolset.specs))
    return text, [toolset.parse(c) for c in calls]


async def test_knowledge_is_answered_not_transferred(router: LocalRouter) -> None:
    for said, answer in [
        ("What are your opening hours?", KNOWLEDGE[0].answer),
        ("When are you open?", KNOWLEDGE[0].answer),
        ("What is your address?", KNOWLEDGE[1].answer),  # same topic as "where is your office"
    ]:
        text, intents = await turn(router, [DEPARTMENTS], [ChatMessage.user(said)])
        assert (text, intents) == (answer, []), said


async def test_without_knowledge_a_question_is_not_transferred(router: LocalRouter) -> None:
    for said in ["What are your opening hours?", "Where is your office?",
                 "Do you have a warranty?", "Can I return a product?"]:  # fmt: skip
        text, intents = await turn(router, [DEPARTMENTS], [ChatMessage.user(said)], ())
        assert intents == [] and text.startswith(DONT_KNOW), said


async def test_a_complaint_goes_to_the_person_or_gets_a_question(router: LocalRouter) -> None:
    said = [ChatMessage.user("I want to make a complaint")]
    _, intents = await turn(router, [SEED_HUMAN], said)
    assert len(intents) == 1 and isinstance(intents[0], TransferIntent)
    text, intents = await turn(router, [DEPARTMENTS], said)
    assert intents == [] and text.startswith("I can connect you with")


@pytest.mark.parametrize(
    "said", ["I want to speak to a human", "Can I talk to a real person?", "Operator"]
)
async def test_a_person_is_the_person_like_destination_else_a_question(
    router: LocalRouter, said: str
) -> None:
    _, intents = await turn(router, [SEED_HUMAN], [ChatMessage.user(said)])
    assert [i.destination.target for i in intents] == ["+31612345678"]  # type: ignore[union-attr]
    text, intents = await turn(router, [DEPARTMENTS], [ChatMessage.user(said)])
    assert intents == [] and "Which would you like?" in text


async def test_someone_about_a_topic_is_that_topic(router: LocalRouter) -> None:
    for said, key in [
        ("Can someone help me with my invoice?", "billing_department"),
        ("I need to talk to somebody about a quote", "sales_team"),
    ]:
        _, intents = await turn(router, [DEPARTMENTS], [ChatMessage.user(said)], ())
        assert [i.destination_key for i in intents] == [key], said  # type: ignore[union-attr]


async def test_two_unanswered_questions_offer_the_person_and_yes_transfers(
    router: LocalRouter,
) -> None:
    history = [ChatMessage.user("How much does the premium plan cost?")]
    first, intents = await turn(router, [SEED_HUMAN], history)
    assert intents == [] and first.startswith(DONT_KNOW) and "Would you like me" not in first
    history += [ChatMessage.assistant(first), ChatMessage.user("Is there a student discount?")]
    second, intents = await turn(router, [SEED_HUMAN], history)
    assert intents == []
    assert second == f"{DONT_KNOW} Would you like me to put you through to human support assistant?"
    history += [ChatMessage.assistant(second)]
    _, intents = await turn(router, [SEED_HUMAN], [*history, ChatMessage.user("Yes please")])
    assert len(intents) == 1 and isinstance(intents[0], TransferIntent)
    text, intents = await turn(
        router, [SEED_HUMAN], [*history, ChatMessage.user("No, what are your opening hours?")]
    )
    assert (text, intents) == (KNOWLEDGE[0].answer, [])


async def test_greetings_do_not_count_as_unanswered(router: LocalRouter) -> None:
    history: list[ChatMessage] = []
    for said in ["Hello", "Hmm", "Um"]:
        history.append(ChatMessage.user(said))
        text, intents = await turn(router, [SEED_HUMAN], history)
        assert intents == [] and not text.startswith(DONT_KNOW)
        history.append(ChatMessage.assistant(text))
    # The question for one destination is an offer: "yes" takes it.
    assert text == "I can put you through to human support assistant. Would you like that?"
    _, intents = await turn(router, [SEED_HUMAN], [*history, ChatMessage.user("Yes")])
    assert len(intents) == 1 and isinstance(intents[0], TransferIntent)


async def test_business_questions_are_not_transfers(router: LocalRouter) -> None:
    for said in ["Is this the billing department?", "Do you sell thermostats?"]:
        _, intents = await turn(router, [DEPARTMENTS], [ChatMessage.user(said)], ())
        assert intents == [], said


HOTEL = {
    "type": "transfer_call",
    "destinations": [
        {"number": "+31201110001", "description": "Housekeeping - for towels and cleaning"},
        {"number": "+31201110002", "description": "Restaurant - to book a table for dinner"},
        {"number": "+31201110003", "description": "Reception - a colleague for anything else"},
    ],
}


async def test_asking_whether_one_can_get_something_is_not_a_transfer(
    router: LocalRouter,
) -> None:
    """ "Can I get / could we have X?" asks what is offered (rule 8b): a description close to X
    ("breakfast in my room" / "a table for dinner") is no request to be connected."""
    for said in ["Can I get breakfast in my room?", "Could we have a baby cot in the room?"]:
        text, intents = await turn(router, [HOTEL], [ChatMessage.user(said)], ())
        assert intents == [], said
        assert text.startswith(DONT_KNOW), (said, text)
    # Naming a destination, or a problem / payment / purchase, is still a request.
    for tools, said, key in [
        (HOTEL, "Could I have the restaurant please?", "restaurant"),
        (DEPARTMENTS, "Can I get billing?", "billing_department"),
        (DEPARTMENTS, "Can I get a quote for fifty licences?", "sales_team"),
        (DEPARTMENTS, "Can I get a refund for last month's invoice?", "billing_department"),
    ]:
        _, intents = await turn(router, [tools], [ChatMessage.user(said)], ())
        assert [i.destination_key for i in intents] == [key], said  # type: ignore[union-attr]


async def test_a_business_question_takes_a_close_knowledge_entry(router: LocalRouter) -> None:
    """Never transferred, so the entry answers even when a destination is closer."""
    knowledge = (Knowledge("Yes, we have a cot for every room.", "Do you have baby cots?"),)
    text, intents = await turn(
        router, [HOTEL], [ChatMessage.user("Do you have a baby cot for the room?")], knowledge
    )
    assert intents == [] and text == knowledge[0].answer


async def test_named_and_asked_for_is_a_transfer(router: LocalRouter) -> None:
    for said, key in [
        ("Sales please", "sales_team"),
        ("Put me through to billing", "billing_department"),
        ("uh, tech support", "technical_support"),
    ]:
        _, intents = await turn(router, [DEPARTMENTS], [ChatMessage.user(said)], ())
        assert [i.destination_key for i in intents] == [key], said  # type: ignore[union-attr]


def test_prompt_lines_that_name_a_destination_describe_it() -> None:
    choices = {
        "sales_team": "Sales team - for pricing and quotes",
        "billing_department": "Billing department - for invoice and payment questions",
    }
    prompt = (
        "You are a customer service agent. Transfer to:\n"
        "- Sales: for questions about pricing, quotes, or new products\n"
        "- Billing: for specific billing questions\n\nAlways try to help first."
    )
    assert _prompt_lines(prompt, choices) == {
        "sales_team": ["Sales: for questions about pricing, quotes, or new products"],
        "billing_department": ["Billing: for specific billing questions"],
    }


async def test_goodbye_ends_only_with_the_end_call_tool(router: LocalRouter) -> None:
    text, intents = await turn(
        router, [DEPARTMENTS, {"type": "end_call"}], [ChatMessage.user("bye")]
    )
    assert text == GOODBYE and isinstance(intents[0], EndCallIntent)
    text, intents = await turn(router, [DEPARTMENTS], [ChatMessage.user("bye")])
    assert (text, intents) == (GOODBYE, [])


@pytest.mark.parametrize(
    ("tools", "said"),
    [
        (DEPARTMENTS, "How do I update my payment details?"),
        (DEPARTMENTS, "Can I download my invoice on the website?"),
        (DEPARTMENTS, "Is a contract required for the basic plan?"),
        (HOTEL, "Is a reservation needed for dinner?"),
        (HOTEL, "Can I book a table online?"),
    ],
)
async def test_asking_how_or_whether_something_is_done_is_not_a_transfer(
    router: LocalRouter, tools: dict, said: str
) -> None:
    """Rule 8c: the way to do something, what it needs or whether a channel exists is asked
    for information, however close a description ("invoice and payment questions", "book a
    table for dinner") is: answered or clarified, never transferred."""
    text, intents = await turn(router, [tools], [ChatMessage.user(said)], ())
    assert intents == [], said
    assert text.startswith(DONT_KNOW), (said, text)


@pytest.mark.parametrize(
    ("said", "key"),
    [
        ("My router is not working, how do I fix it?", "technical_support"),
        ("I need to change my payment details, how do I do that?", "billing_department"),
        ("How do I get put through to billing?", "billing_department"),
    ],
)
async def test_a_how_question_that_states_a_need_or_asks_to_be_put_through_transfers(
    router: LocalRouter, said: str, key: str
) -> None:
    _, intents = await turn(router, [DEPARTMENTS], [ChatMessage.user(said)], ())
    assert [i.destination_key for i in intents] == [key]  # type: ignore[union-attr]


HOTEL_FACTS = (
    Knowledge("Dinner is served from six until ten.", "When is dinner served?"),
    Knowledge("Rooms are cleaned every morning before noon.", "When are rooms cleaned?"),
    Knowledge("Fresh towels are brought every day.", "How often are towels changed?"),
)


async def test_a_stated_need_outranks_a_fact_on_the_same_topic(router: LocalRouter) -> None:
    """Rule 8d: "I need...", "my X wasn't..." for a destination's topic is a request; the fact
    nearest to it (the towels' schedule, the cleaning time) is no answer to it."""
    for said, key in [
        ("I need fresh towels in room twelve", "housekeeping"),
        ("We need two extra towels", "housekeeping"),
        ("Our room wasn't cleaned today", "housekeeping"),
        ("I'd like to book a table for dinner tonight", "restaurant"),
    ]:
        _, intents = await turn(router, [HOTEL], [ChatMessage.user(said)], HOTEL_FACTS)
        assert [i.destination_key for i in intents] == [key], said  # type: ignore[union-attr]
    facts = (
        Knowledge("Invoices are sent on the first of the month.", "When do I get my invoice?"),
    )
    _, intents = await turn(
        router, [DEPARTMENTS], [ChatMessage.user("I need a copy of my invoice from March")], facts
    )
    assert [i.destination_key for i in intents] == ["billing_department"]  # type: ignore[union-attr]


async def test_a_question_or_wanting_to_know_still_gets_the_fact(router: LocalRouter) -> None:
    for said, answer in [
        ("When is dinner served?", HOTEL_FACTS[0].answer),
        ("I want to know when dinner is served", HOTEL_FACTS[0].answer),
        ("We need fresh towels, how often are they changed?", HOTEL_FACTS[2].answer),
    ]:
        text, intents = await turn(router, [HOTEL], [ChatMessage.user(said)], HOTEL_FACTS)
        assert (text, intents) == (answer, []), said


async def test_a_question_about_a_team_is_answered_or_offered_never_transferred(
    router: LocalRouter,
) -> None:
    """Rule 9e: a team as the subject of a question ("does housekeeping also...?") is asked
    about, not for: no transfer; the reply offers the team, and "yes" then transfers."""
    for said in [
        "Does housekeeping also do laundry?",
        "What does the restaurant serve?",
        "Is the restaurant open for lunch?",
        "Can housekeeping help with ironing?",
        "Are the reception staff there all night?",
    ]:
        text, intents = await turn(router, [HOTEL], [ChatMessage.user(said)], ())
        assert intents == [], said
        assert "Would you like me to put you through to" in text, (said, text)
    history = [ChatMessage.user("Does housekeeping also do laundry?")]
    text, _ = await turn(router, [HOTEL], history, ())
    history += [ChatMessage.assistant(text), ChatMessage.user("Yes please")]
    _, intents = await turn(router, [HOTEL], history, ())
    assert [i.destination_key for i in intents] == ["housekeeping"]  # type: ignore[union-attr]
    # Asking to be put through to the team, or a stated need, is still a transfer.
    for said, key in [
        ("Can I speak to housekeeping about laundry?", "housekeeping"),
        ("Put me through to the restaurant", "restaurant"),
    ]:
        _, intents = await turn(router, [HOTEL], [ChatMessage.user(said)], ())
        assert [i.destination_key for i in intents] == [key], said  # type: ignore[union-attr]


async def test_a_yes_no_question_about_a_thing_is_information(router: LocalRouter) -> None:
    """Rule 9f: "does the invoice include...?" asks what is so, whatever destination it is near;
    one about a problem ("is the product broken...") is not covered by it."""
    for said in ["Does the quote include delivery?", "Are invoices sent by post?"]:
        _, intents = await turn(router, [DEPARTMENTS], [ChatMessage.user(said)], ())
        assert intents == [], said


async def test_what_was_already_done_or_happened_to_others_is_no_request(
    router: LocalRouter,
) -> None:
    """Rule 9g: a statement of what the caller already did, or of someone else's past, gets a
    question; "already ... but" or another's need is a request."""
    for said in [
        "I already paid the invoice",
        "We've already sent the payment",
        "My brother had a billing problem last year",
        "My neighbour has the same thermostat",
        "I paid the invoice last week",
    ]:
        _, intents = await turn(router, [DEPARTMENTS], [ChatMessage.user(said)], ())
        assert intents == [], said
    for said in [
        "I already paid the invoice but I was charged again",
        "My mother needs a copy of her invoice",
        "I was charged twice last week",
    ]:
        _, intents = await turn(router, [DEPARTMENTS], [ChatMessage.user(said)], ())
        assert [i.destination_key for i in intents] == ["billing_department"], said  # type: ignore[union-attr]


async def test_the_callers_own_situation_and_asking_to_sign_up_are_needs(
    router: LocalRouter,
) -> None:
    """Rules 9h/9i: "my X is ...", "I smell ..." and "can I order ...?" state a need: they
    outrank a fact on the same topic; "can I order online?" still asks how (9c)."""
    towels = (Knowledge("Fresh towels are brought every morning.", "When are the towels changed?"),)
    for said in ["My towels are dirty", "Our towels are still wet", "I see no towels in my room"]:
        _, intents = await turn(router, [HOTEL], [ChatMessage.user(said)], towels)
        assert [i.destination_key for i in intents] == ["housekeeping"], said  # type: ignore[union-attr]
    facts = (Knowledge("Orders ship within two days.", "How long does an order take?"),)
    for said in ["Can I order ten thermostats?", "Could we buy a service contract?"]:
        _, intents = await turn(router, [DEPARTMENTS], [ChatMessage.user(said)], facts)
        assert [i.destination_key for i in intents] == ["sales_team"], said  # type: ignore[union-attr]
    _, intents = await turn(router, [DEPARTMENTS], [ChatMessage.user("Can I order online?")], facts)
    assert intents == []


async def test_wondering_asks_for_information_and_rudeness_is_a_complaint(
    router: LocalRouter,
) -> None:
    """Rule 9j: "I was wondering about ..." / "I'd like to know ..." ask, not request; "if I
    could speak to ..." still asks to be put through. Rule 4: "rude", "ridiculous" complain."""
    for said in [
        "I was wondering about your restaurant",
        "I'd like to know what housekeeping does",
    ]:
        _, intents = await turn(router, [HOTEL], [ChatMessage.user(said)], ())
        assert intents == [], said
    for said, key in [
        ("I was wondering if I could speak to the restaurant", "restaurant"),
        ("The cleaner was very rude to me", "reception"),
        ("Your room prices are ridiculous", "reception"),
    ]:
        _, intents = await turn(router, [HOTEL], [ChatMessage.user(said)], ())
        assert [i.destination_key for i in intents] == [key], said  # type: ignore[union-attr]


async def test_a_wh_question_is_information_unless_own_priced_or_a_problem(
    router: LocalRouter,
) -> None:
    """Rule 9k: "how do invoices work?" asks; "why is my invoice wrong?" and a price are
    still requests (rule 9). A team's name with "speak" that is no request stays a question."""
    for said in [
        "How do invoices work?",
        "What counts as troubleshooting?",
        "Does the billing department speak German?",
    ]:
        _, intents = await turn(router, [DEPARTMENTS], [ChatMessage.user(said)], ())
        assert intents == [], said
    for said, key in [
        ("Why is my invoice so high?", "billing_department"),
        ("How much does the premium plan cost?", "sales_team"),
    ]:
        _, intents = await turn(router, [DEPARTMENTS], [ChatMessage.user(said)], ())
        assert [i.destination_key for i in intents] == [key], said  # type: ignore[union-attr]
