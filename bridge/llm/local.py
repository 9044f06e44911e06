"""`provider: "local"`: a deterministic assistant that works offline. It is NOT an LLM.

No usable chat model can be had offline here, so the local provider does what an assistant
with transfer tools and a knowledge list must do, following the product doc's rules ("avoid
over-transferring"; "transfer only if the customer explicitly asks for a human, after 2
failed attempts, or for a complaint"). On the caller's last words, in order:

1. goodbye / that's all → `end_call` with a goodbye (a goodbye alone without `end_call`);
2. after its own offer ("Would you like me to put you through to X?"): yes → X;
3. nothing said (hmm, yes, hello) → a clarifying question naming the destinations;
4. a complaint or escalation (complaint, manager, supervisor, unacceptable) → the destination
   whose description names a person (human, person, agent, colleague, reception, ...), else a
   question;
5. asking for a human / a person / an agent / an operator → that destination, unless the rest
   names a department ("someone in billing" → billing); with no such destination, a question;
6. the closest knowledge entry (MiniLM cosine >= `min_knowledge`) if it is closer than every
   destination → its answer;
7. a destination named and asked for ("sales please", "put me through to billing") → it;
8. a question *about the business* ("do you...?", "is this...?", "are you open...?") or one
   closer to common general-information topics (opening hours, address, warranty, returns,
   delivery, contact details) than to any destination → never a transfer: the closest
   knowledge entry if one is close enough (`min_knowledge`), else "I don't have that
   information", and from the second unanswered question in a row, an offer to put the
   caller through to the person-like destination;
8b. a question whether the caller can *get or have* something ("can I get a loan car?",
   "could we have a later slot?") asks what the business offers, as "do you have...?" does:
   handled as in 8 unless it names a destination ("can I get billing?") or states a problem,
   a payment or a purchase (the `_PROBLEM`/`_PAYING`/`_BUYING` cues, checked first), since a
   description that is merely close to the thing asked for ("replacement car" / "your car
   has broken down") is no request to be connected (docs/conversation.md, rule 9b);
8c. a question about how or whether something is done ("how do I...?", "do I need...?", "is
   a permit needed...?", "can I pay ... online?") is asked for information: handled as in 8
   unless it also states a need or a problem or asks to be put through (docs/conversation.md,
   rule 9c);
8d. a stated need ("I need to...", "I want to...", "I lost...", "my X wasn't...") that is not
   a question and whose destination is sound (>= `min_score`) outranks a knowledge entry (6)
   and the general topics (8): a fact on the same topic does not answer a request (rule 9d);
8e. a question whose subject is a destination ("does the solar team also do...?", "what does
   billing handle?") asks about it: its knowledge entry, else an offer of it (rule 9e);
8f. a yes/no question about a thing ("does the package include...?") is handled as in 8
   unless it states a problem or a need (rule 9f);
8g. what the caller already did ("I already paid", "I paid last week") or what happened to
   someone else ("my neighbour had a power cut") is no request: a question (rule 9g);
8h. the caller's own situation now ("I smell gas", "my meter display is blank") and asking to
   sign up, order, upgrade... as a question are needs as in 8d (rules 9h, 9i);
8i. "I was wondering about..." / "I'd like to know..." is a question, handled as in 8 (9j);
8j. a wh-question not about the caller's own account, a price, a problem or a need ("how do
   refunds work?") is handled as in 8 (9k);
9. the destination whose description (its head, its "for ..." part, and any line of the
   system prompt that names it, e.g. "- Sales: for questions about pricing") is most similar,
   if cosine >= `min_score` and it beats the runner-up by `min_margin`;
10. otherwise a clarifying question naming the destinations (counted as unanswered if the
    caller asked something).

If the embedding model cannot load, similarity falls back to word overlap. It reads
destinations from the same `FunctionTool` specs a remote model gets (`choices`), knowledge
from the system message that carries it (`ChatMessage.knowledge`), and emits the same events,
so the conversation code cannot tell the providers apart.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from bridge.llm.base import (
    ChatMessage,
    Finished,
    FunctionTool,
    Knowledge,
    LlmEvent,
    TextDelta,
    ToolCall,
    ToolCallEvent,
)
from bridge.llm.minilm import EmbedderError, MiniLmEmbedder, shared_embedder
from bridge.llm.tools import END_CALL, TRANSFER_CALL

log = logging.getLogger(__name__)

_GOODBYE = re.compile(r"\b(good ?bye|bye|that'?s all|hang up|have a (nice|good) day)\b")
# Only a short utterance made of these ends the call: "no thanks, I want sales" does not.
_DONE = re.compile(r"\b(no,? thanks?( you)?|nothing else|that'?s it|i'?m done|all done)\b")
_HUMAN_ASK = re.compile(
    r"\b(an? )?(human( being)?|real person|agent|someone|somebody|person|operator|"
    r"representative|receptionist|staff member|colleagues?|live person)\b"
)
_HUMAN_DEST = re.compile(
    r"\b(human|agent|person|people|colleague|operator|representative|reception\w*|staff|"
    r"front desk)\b"
)
_COMPLAINT = re.compile(
    r"\b(complain\w*|escalat\w*|unacceptable|manager|supervisor|outrageous|disgusted|"
    r"furious|very unhappy|so unhappy|not happy|terrible service|rude|ridiculous|fed up|"
    r"dissatisfied|disappointed|appalling|disgrace\w*|shocking)\b"
)
# Asking to be put through: with a destination's name it is a transfer.
_EXPLICIT = re.compile(
    r"\b(transfer|connect|put (me )?through|speak|talk|get me|reach|forward|redirect|"
    r"switch me|go to)\b"
)
_PLEASE = re.compile(r"\bplease\b")
# Asking to be put through to a team, as opposed to "does customer service speak English?".
_ASK_FOR = re.compile(
    r"\b(transfer|connect|put (me )?through|(speak|talk) (to|with)|get me|reach|forward|"
    r"redirect|switch me|go to|please)\b"
)
# A wh-question that is not about the caller's own account, a price, a problem or a need
# ("how do refunds work?", "what is your cheapest tariff?") asks for information (9k).
_WH = re.compile(r"^(what|what's|when|where|why|which|how)\b")
_OWN_OR_PRICE = re.compile(r"\b(my|our|mine|how much|costs?|pric\w*)\b")
# A stated problem ("it's not working") goes to the one destination for problems.
_PROBLEM = re.compile(
    r"\b(not working|(doesn'?t|does not|won'?t|will not|can'?t|cannot) (work|turn|start|"
    r"connect|load|log)|broken|broke|error|crash\w*|freez\w*|stopped working|keeps? "
    r"(crashing|dropping|disconnecting|freezing)|is down|no (internet|signal|connection)|"
    r"fault\w*|bug|problem with|issue with|fail\w*)\b"
)
# Asking about prices or wanting to buy goes to the one destination for prices or sales.
_BUYING = re.compile(
    r"\b(how much|price\w*|pricing|cost\w*|quote\w*|discount\w*|buy\w*|purchas\w*|"
    r"order\w*|subscri\w*|sign up|upgrad\w*|switch(ing)?\b(?! (me|it|on|off)\b))\b"
)
_SALES_DEST = re.compile(
    r"\b(sales|pric\w*|quotes?|buy\w*|purchas\w*|orders?|shop|subscriptions?)\b"
)
# Money owed or paid goes to the one destination for invoices and payments.
_PAYING = re.compile(
    r"\b(charged|invoices?|bills?|billed|billing|payments?|paid|pay|refund\w*|credit card|"
    r"direct debit|overcharged)\b"
)
_PAYING_DEST = re.compile(r"\b(billing|invoices?|payments?|accounts?|finance)\b")
_QUESTION = re.compile(
    r"\?\s*$|^(what|when|where|who|why|how|which|do|does|did|is|are|can|could|will|would|"
    r"have|has)\b"
)
_TROUBLE_DEST = re.compile(
    r"\b(issues?|problems?|troubleshoot\w*|faults?|repairs?|broken|outages?|technical|"
    r"errors?|not working)\b"
)
# A yes/no question about the business: answered or clarified, never a transfer by itself.
_BUSINESS_QUESTION = re.compile(
    r"^(do|does|did) (you|they|acme|your)\b|^(is|are) (this|that|you|it|there)\b|"
    r"^can (i|we) (bring|park|pay by|come)\b"
)
# "Can I get / could we have ...?": asking whether something is offered (8b).
_AVAILABILITY = re.compile(r"^(can|could|may) (i|we) (get|have|borrow|rent|use)\b")
# A question about how or whether something is done (8c): what is needed or allowed, the way
# to do it, or whether a channel exists ("online", "by phone") is asked for information.
_PROCEDURE = re.compile(
    r"^how (do|does|can|could|should|would) (i|we|you|one|it|this|that)\b|^how to\b|"
    r"\b(do|does|will|would) (i|we|you|one) (need|have to|require|must)\b|"
    r"\b(is|are) (an? |the |my |your )?\w+( \w+)? (needed|required|necessary|mandatory|"
    r"compulsory|allowed|permitted)\b|"
    r"^(is|would) (it|that) (possible|necessary|required|allowed|ok|okay|enough)\b|"
    r"^(am i|are we) (allowed|required|supposed|obliged)\b|"
    r"^(can|could|may|should) (i|we) .*\b(online|by (phone|card|e-?mail|post|mail|cash|"
    r"bank transfer|debit card|credit card)|in person|on (the|your) (website|app)|through "
    r"(the|your) (website|app)|at the (counter|desk|office|front desk))\b"
)
# A need the caller states ("I need to...", "I lost...", "my X wasn't..."): a request (8d).
# Wanting to know or ask something is no need for a destination.
_NEED = re.compile(
    r"(^|[.,;!]\s*|\band\s+|\bso\s+|\bthen\s+)(i|we) (really |just |urgently )?"
    r"(need|want|would like|'d like|have to|must)\b"
    r"(?! to (know|ask|find out|check|understand|hear)\b)"
    r"(?! (some )?(info\w*|details|advice)\b)|"
    r"\band need to\b|"
    r"^(i|we) ('ve |have )?(lost|misplaced)\b|^(i|we) (can'?t|cannot) find\b|"
    r"^(my|our) \w+( \w+)? (wasn'?t|weren'?t|didn'?t|hasn'?t|haven'?t|was not|were not|"
    r"did not|has not|have not|never)\b|"
    # the caller's own situation now (9h): "I smell gas", "my meter display is blank"
    r"^(i|we) (can )?(smell|hear|see|have no|don'?t have|haven'?t got)\b|"
    r"^(my|our) (?!(\w+ )?(name|number|address|e-?mail|postcode|date of birth)\b)"
    r"[a-z]+( [a-z]+){0,2} (is|are|keeps?|isn'?t|aren'?t|stopped|has stopped) "
)
# Asking to do what a destination does, as a question ("can I sign up for ...?", "could we
# order ...?"): a request, as "I want to sign up" is (9i), unless asked how or where (9c).
_ASK_TO_DO = re.compile(
    r"^(can|could|may) (i|we) (please )?(sign up|subscribe|order|buy|purchase|book|switch|"
    r"upgrade|downgrade|cancel|change|get a quote)\b"
)
# A question whose subject is a team ("does the solar team also do...?", "what does billing
# handle?", "is sales open on Saturday?", "can your fault line help with...?") asks about the
# team, not for it (9e). The subject is the first words after the verb.
_SUBJECT = re.compile(
    r"^(?:(?:what|which|when|where|who|why|how(?: much| long| late| early| many)?)(?: \w+)? )?"
    r"(?:do|does|did|is|are|was|were|will|would|can|could|should|has|have)\s+"
    r"(?:the |your |you guys'? )?(?P<first>[a-z]+)"
)
# A yes/no question about a thing, not about the caller or a request ("does the TV package
# include sports?", "are refunds paid into my account?") asks for information (9f).
_THING_QUESTION = re.compile(
    r"^(do|does|did|is|are|was|were|will|would|has|have)\s+(?!(i|we|you|me|it|this|that|"
    r"there|someone|somebody|anyone|anybody)\b)[a-z]"
)
# Statements that are no request (9g): what the caller already did ("I already paid my bill"),
# unless a "but", "still" or "again" follows; what happened to someone else ("my neighbour had
# a power cut yesterday", "my neighbour has solar panels"), unless they need or want something.
_ALREADY = re.compile(
    r"^(i|we)( have|'ve| had|'d)? already\b|"
    r"\b(yesterday|last (night|week|month|year)|(days|weeks|months|years) ago)\b"
)
# Wanting to know ("I was wondering about your tariffs", "I'd like to know ...") asks for
# information, as a question does (9j).
_WONDER = re.compile(
    r"^(i was|i'm|i am|we were|we are) (just )?wondering\b"
    r"(?! (if|whether) (i|we) (could|can|may)\b)|"
    r"^(i|we)( just)?( want| would like|'d like) to (know|ask|find out)\b|"
    r"^((could|can|would) you (please )?)?tell me (about|more|what|how|if|whether)\b"
)
_STILL = re.compile(
    r"\b(but|still|again|yet|now|and|because|charged|overcharged|billed|twice|double|wrong\w*|"
    r"missing|never|not|no|\w+n't|accident|crash\w*|stolen|lost|flood\w*|leak\w*|fire|"
    r"smell\w*|hurt|injur\w*)\b"
)
_OTHERS = re.compile(
    r"^(my|our) (neighbou?rs?|friends?|sister|brother|mother|father|mum|mom|dad|parents|son|"
    r"daughter|colleagues?|landlord|tenants?)\b"
)
_OTHERS_PAST_OR_HAVING = re.compile(
    r"\b(had|was|were|did|got|went|yesterday|last (week|month|night|year)|used to)\b|"
    r"^\w+ \w+ (has|have) (?!no\b|not\b|a (problem|fault|leak)\b)"
)
_OTHERS_NEED = re.compile(
    r"\b(needs?|wants?|would like|asked me|has to|have to|for (him|her|them))\b"
)
_YES = re.compile(
    r"^(yes|yeah|yep|sure|ok(ay)?|please|yes please|please do|go ahead|"
    r"that would be (great|good|nice)|i would|i'?d like that)\b"
)
_NO = re.compile(r"^(no|nope|no thanks?|not now)\b")
_STOPWORDS = frozenset(
    "a an and the to for of on in with about my me i i'd i'm would like want need please "
    "can could you your is are it this that be speak talk questions question or".split()
)
# Words that carry no request: "hmm", "yes", "hello" alone must not pick a destination.
_FILLERS = frozenset(
    "hmm hm uh um er erm ah oh yes yeah yep no nope ok okay hello hi hey so well there sorry "
    "what thanks thank".split()
)
# Words of a destination's name that do not name it ("Sales team", "Billing department").
_GENERIC_NAME = frozenset(
    "team department dept desk service services line office our the a of and group unit".split()
)
# Common general-information topics (the product doc: "handle common questions"): an
# utterance closer to one of these than to any destination is a question to answer, not a
# request to be transferred.
GENERAL_TOPICS: dict[str, tuple[str, ...]] = {
    "hours": ("opening hours", "when are you open", "what time do you close"),
    "location": ("our address", "where is your office", "where are you located", "directions"),
    "warranty": ("warranty", "guarantee on a product"),
    "returns": ("return a product", "refund policy", "send an order back"),
    "delivery": ("delivery time", "when will my package arrive", "shipping"),
    "contact": ("phone number", "email address", "website"),
    "identity": ("who are you", "what company is this"),
    "small talk": ("how are you", "the weather"),
    "parking": ("parking", "public transport"),
}
_TOPIC_PHRASES = [p for phrases in GENERAL_TOPICS.values() for p in phrases]
# A knowledge entry and the caller's words both clearly about the same general topic
# ("what is your address?" / "where is your office?"): the entry answers.
BRIDGE_MIN = 0.5
DONT_KNOW = "I'm sorry, I don't have that information."
OFFER = "Would you like me to put you through to {name}?"
GOODBYE = "Thank you for calling. Goodbye."


@dataclass(frozen=True)
class Route:
    """What the router decided, and why (for logs and tests)."""

    action: str  # "transfer", "end", "answer", "clarify", "unknown", "offer", "goodbye"
    destination: str | None = None
    score: float | None = None
    margin: float | None = None
    rule: str = ""
    answer: str | None = None


@dataclass
class Context:
    """What the router knows beyond the last words: knowledge, the system prompt, and what
    it said before in this conversation."""

    knowledge: tuple[Knowledge, ...] = ()
    prompt: str = ""
    unanswered: int = 0  # questions in a row it could not answer
    question: bool = False  # the caller's last words are a question
    offered: str | None = None  # the destination it just offered
    extra: dict[str, list[str]] = field(default_factory=dict)


def _words(text: str) -> set[str]:
    return {w[:6] for w in re.findall(r"[a-z']+", text.lower()) if w not in _STOPWORDS}


def _short_name(description: str) -> str:
    head = re.split(r"\s+[-–—]\s+|[:;,(]|\bfor\b", description, maxsplit=1)[0].strip()
    return head[:1].lower() + head[1:] if head else description


def _name_words(description: str) -> set[str]:
    return {
        w
        for w in re.findall(r"[a-z]+", _short_name(description).lower())
        if w not in _GENERIC_NAME and len(w) > 2
    }


def _names(said_words: list[str], name: set[str]) -> int:
    """How many words of a destination's name the caller said ("tech" names "technical")."""
    hits = 0
    for n in name:
        if any(w.startswith(n[:5]) or (len(w) >= 4 and n.startswith(w)) for w in said_words):
            hits += 1
    return hits


def _parts(description: str) -> list[str]:
    parts = [description]
    pieces = re.split(r"\s+[-–—]\s+|[:;(]", description, maxsplit=1)
    parts += [p.strip() for p in pieces if p.strip() and p.strip() != description]
    return parts


def _prompt_lines(prompt: str, choices: dict[str, str]) -> dict[str, list[str]]:
    """Lines of the system prompt that describe a destination by its name ("- Sales: for
    questions about pricing, quotes, or new products")."""
    out: dict[str, list[str]] = {}
    for line in prompt.splitlines():
        m = re.match(r"^\s*(?:[-*•]|\d+[.)])?\s*([A-Za-z][\w &/]{0,40}?)\s*[:–—-]\s*(.+)$", line)
        if not m:
            continue
        label = [w for w in re.findall(r"[a-z]+", m.group(1).lower()) if w not in _GENERIC_NAME]
        for key, description in choices.items():
            if label and _names(label, _name_words(description)):
                out.setdefault(key, []).append(f"{m.group(1)}: {m.group(2)}")
    return out


def _human_destination(choices: dict[str, str]) -> str | None:
    for key, description in choices.items():
        if _HUMAN_DEST.search(description.lower()):
            return key
    return None


def _about_team(said: str, choices: dict[str, str]) -> str | None:
    """The one destination a question is about, as its subject (9e): "does the solar team also
    do heat pumps?", "what does billing handle?", "can your fault line help with...?"."""
    m = _SUBJECT.match(said)
    if m is None:
        return None
    hits = [k for k, d in choices.items() if _names([m.group("first")], _name_words(d))]
    return hits[0] if len(hits) == 1 else None


_CUES = ((_PROBLEM, _TROUBLE_DEST), (_PAYING, _PAYING_DEST), (_BUYING, _SALES_DEST))


def _cued(said: str, choices: dict[str, str], human: str | None) -> str | None:
    """The one destination for a stated problem, payment or purchase (rule 9): the only one
    whose description says so (person-like destinations are not candidates; of two, none)."""
    for cue, dest in _CUES:
        found = [k for k, d in choices.items() if k != human and dest.search(d.lower())]
        if cue.search(said) and len(found) == 1:
            return found[0]
    return None


def _not_a_request(said: str, question: bool) -> bool:
    """A statement of what the caller already did or what happened to someone else (9g)."""
    if question:
        return False
    if _ALREADY.search(said):
        return not (_STILL.search(said) or _PROBLEM.search(said) or _NEED.search(said))
    return bool(
        _OTHERS.search(said)
        and _OTHERS_PAST_OR_HAVING.search(said)
        and not _OTHERS_NEED.search(said)
    )


class LocalRouter:
    """Offline deterministic assistant behind the `LlmProvider` interface."""

    name = "local"

    def __init__(
        self,
        *,
        embedder: MiniLmEmbedder | None = None,
        use_embeddings: bool = True,
        min_score: float = 0.30,
        min_margin: float = 0.05,
        min_knowledge: float = 0.45,
    ) -> None:
        self._embedder = embedder
        self._use_embeddings = use_embeddings
        self.min_score = min_score
        self.min_margin = min_margin
        self.min_knowledge = min_knowledge
        self._cache: dict[str, np.ndarray] = {}
        self._ids = itertools.count(1)

    async def aclose(self) -> None:
        pass

    async def summarize(self, history: Sequence[ChatMessage]) -> str | None:
        """No model to write a brief with: a warm transfer briefs from the transcript."""
        return None

    async def warm_up(self) -> None:
        """Load the embedding model off the event loop (first use would block ~0.2 s)."""
        await asyncio.to_thread(self._get_embedder)
        if self._embedder is not None:
            await asyncio.to_thread(self._vectors, _TOPIC_PHRASES)

    def _get_embedder(self) -> MiniLmEmbedder | None:
        if self._embedder is None and self._use_embeddings:
            try:
                self._embedder = shared_embedder()
            except (EmbedderError, ImportError, OSError) as exc:
                log.warning("MiniLM unavailable, routing by word overlap: %s", exc)
                self._use_embeddings = False
        return self._embedder

    # --- decision -----------------------------------------------------------------------

    def route(
        self,
        text: str,
        choices: dict[str, str],
        can_end: bool,
        context: Context | None = None,
    ) -> Route:
        """Decide for one utterance (sync, CPU: call it in a thread)."""
        ctx = context or Context()
        said = text.lower().strip()
        ctx.question = bool(_QUESTION.search(said))
        words = re.findall(r"[a-z']+", said)
        if _GOODBYE.search(said) or (_DONE.search(said) and len(words) <= 5):
            return Route("end", rule="goodbye") if can_end else Route("goodbye", rule="goodbye")
        if ctx.offered is not None and ctx.offered in choices:
            if _YES.match(said) and len(words) <= 6:
                return Route("transfer", ctx.offered, rule="offer accepted")
            if _NO.match(said):
                said = _NO.sub("", said, count=1).strip(" ,.")
                words = re.findall(r"[a-z']+", said)
        content = _words(said) - _FILLERS
        if not content:
            return Route("clarify", rule="nothing said")
        human = _human_destination(choices)
        if _COMPLAINT.search(said):
            if human is not None:
                return Route("transfer", human, rule="complaint")
            return Route("clarify", rule="complaint, no person to transfer to")
        if _not_a_request(said, ctx.question):
            return Route("clarify", rule="not a request")
        explicit = bool(_EXPLICIT.search(said))
        if _HUMAN_ASK.search(said) and (explicit or _about_team(said, choices) is None):
            # "someone in billing" is a billing request; "a human, please" is not.
            rest = _HUMAN_ASK.sub(" ", said)
            rest_words = re.findall(r"[a-z']+", rest)
            named = self._named(rest_words, choices, request=True)
            if named is not None:
                return named
            if _words(rest) - _FILLERS and choices:  # "someone to help with my invoice"
                about = self._by_meaning(rest, rest_words, choices, Context(), None)
                if about.action == "transfer":
                    return about
            if human is not None:
                return Route("transfer", human, rule="human")
            if choices:
                return Route("clarify", rule="human asked, none configured")
        if not choices and not ctx.knowledge:
            return Route("clarify", rule="no destinations")
        return self._by_meaning(said, words, choices, ctx, human)

    def _named(self, words: list[str], choices: dict[str, str], *, request: bool) -> Route | None:
        """The one destination whose name the caller said, when asking for it."""
        if not request:
            return None
        hits = {k: _names(words, _name_words(d)) for k, d in choices.items()}
        best = max(hits.values(), default=0)
        winners = [k for k, n in hits.items() if n == best]
        if best and len(winners) == 1:
            return Route("transfer", winners[0], rule="named")
        return None

    def _by_meaning(
        self,
        said: str,
        words: list[str],
        choices: dict[str, str],
        ctx: Context,
        human: str | None,
    ) -> Route:
        embedder = self._get_embedder()
        keys = list(choices)
        extra = _prompt_lines(ctx.prompt, choices)
        if embedder is None:
            return self._by_overlap(said, choices, ctx, human)
        query = embedder.embed([said])[0]
        dest = np.array([self._best(query, [*_parts(choices[k]), *extra.get(k, [])]) for k in keys])
        knowledge = [k.question or k.answer for k in ctx.knowledge]
        kscore = self._scores(query, knowledge)
        topics = self._topics(query)
        general = float(topics.max())
        best_dest = float(dest.max()) if len(keys) else -1.0
        explicit = bool(_EXPLICIT.search(said) or _PLEASE.search(said))
        # A stated need whose destination is sound outranks a fact on the same topic (8d), and
        # so does asking to do what a destination does ("can I sign up for...?", 8f).
        cued = _cued(said, choices, human)
        need = (best_dest >= self.min_score or cued is not None) and (
            (bool(_NEED.search(said)) and not ctx.question)
            or (bool(_ASK_TO_DO.search(said)) and not self._procedural(said))
        )
        # "Can I get billing?" asks for a destination by name, as "billing please" does.
        asking = explicit or bool(_AVAILABILITY.search(said))
        about = None if _ASK_FOR.search(said) else _about_team(said, choices)
        named = self._named(words, choices, request=asking or len(_words(said) - _FILLERS) <= 2)
        if named is not None and about is None and not _BUSINESS_QUESTION.search(said):
            return named
        answer: Route | None = None  # the closest entry, for a question we cannot transfer
        if len(knowledge):
            # An entry answers a question about the same general topic too ("what is your
            # address?" / "where is your office?"): the lower of the two closenesses.
            j = int(np.argmax(topics))
            for i, item in enumerate(ctx.knowledge):
                texts = [item.question or item.answer, item.answer]
                kscore[i] = self._best(query, texts)
                own = self._topics(self._vectors([texts[0]])[0])
                bridge = min(float(topics[j]), float(own[j]))
                if int(np.argmax(own)) == j and bridge >= BRIDGE_MIN:
                    kscore[i] = max(float(kscore[i]), bridge)
            i = int(np.argmax(kscore))
            if kscore[i] >= self.min_knowledge:
                answer = Route(
                    "answer",
                    score=float(kscore[i]),
                    rule="knowledge",
                    answer=ctx.knowledge[i].answer,
                )
                if kscore[i] >= best_dest and not need:
                    return answer
        if about is not None:  # asked about a team: its answer, else offered, never transferred
            return answer or Route("offer", about, rule="question about a team")
        if not keys:
            return self._unanswered(ctx, human, "no destinations")
        order = np.argsort(-dest)
        margin = best_dest - float(dest[order[1]]) if len(keys) > 1 else best_dest
        thing = bool(_THING_QUESTION.search(said) or _WONDER.search(said))
        thing = thing and not _PROBLEM.search(said) and not need
        if (_BUSINESS_QUESTION.search(said) or thing) and not _EXPLICIT.search(said):
            return answer or self._unanswered(ctx, human, "business question", best_dest, margin)
        if ctx.question and self._procedural(said):
            return answer or self._unanswered(ctx, human, "procedural question", best_dest, margin)
        if _WH.search(said) and not (explicit or need or _OWN_OR_PRICE.search(said)):
            if not _PROBLEM.search(said) and not _NEED.search(said):
                return answer or self._unanswered(ctx, human, "wh-question", best_dest, margin)
        if cued is not None:
            return Route("transfer", cued, rule="cue word")
        if _AVAILABILITY.search(said) and not _EXPLICIT.search(said):
            return answer or self._unanswered(
                ctx, human, "availability question", best_dest, margin
            )
        if general > best_dest and not need:
            return self._unanswered(ctx, human, "general question", best_dest, margin)
        if best_dest >= self.min_score and margin >= self.min_margin:
            return Route("transfer", keys[int(order[0])], best_dest, margin, "embedding")
        return self._unanswered(ctx, human, "unclear", best_dest, margin)

    @staticmethod
    def _procedural(said: str) -> bool:
        """How or whether something is done (8c), unless the caller also states a need or a
        problem, or asks to be put through."""
        return bool(
            _PROCEDURE.search(said)
            and not _NEED.search(said)
            and not _PROBLEM.search(said)
            and not _EXPLICIT.search(said)
        )

    def _unanswered(
        self,
        ctx: Context,
        human: str | None,
        rule: str,
        score: float | None = None,
        margin: float | None = None,
    ) -> Route:
        """Not answered: from the second time in a row, offer the person-like destination
        (the seed's "transfer ... after 2 failed attempts")."""
        if not ctx.question:
            return Route("clarify", None, score, margin, rule)
        if ctx.unanswered >= 1 and human is not None:
            return Route("offer", human, score, margin, rule + ", offer after 2 attempts")
        return Route("unknown", None, score, margin, rule)

    def _by_overlap(
        self, said: str, choices: dict[str, str], ctx: Context, human: str | None
    ) -> Route:
        words = _words(said)
        for item in ctx.knowledge:
            if item.question and len(words & _words(item.question)) >= 2:
                return Route("answer", rule="overlap knowledge", answer=item.answer)
        keys = list(choices)
        scores = np.array([float(len(words & _words(choices[k]))) for k in keys])
        order = np.argsort(-scores)
        best = float(scores[order[0]])
        margin = best - float(scores[order[1]]) if len(keys) > 1 else best
        # Overlap scores count shared words: one is enough, if no other destination shares one.
        if best >= 1.0 and margin >= 1.0:
            return Route("transfer", keys[int(order[0])], best, margin, "overlap")
        return self._unanswered(ctx, human, "overlap unclear", best, margin)

    def _topics(self, query: np.ndarray) -> np.ndarray:
        """Closeness to each general topic: to its closest phrase."""
        scores = self._scores(query, _TOPIC_PHRASES)
        out, i = [], 0
        for phrases in GENERAL_TOPICS.values():
            out.append(float(scores[i : i + len(phrases)].max()))
            i += len(phrases)
        return np.array(out)

    def _best(self, query: np.ndarray, texts: list[str]) -> float:
        return float(self._scores(query, texts).max())

    def _scores(self, query: np.ndarray, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        return np.array([float(v @ query) for v in self._vectors(texts)])

    def _vectors(self, texts: list[str]) -> list[np.ndarray]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            embedder = self._get_embedder()
            assert embedder is not None
            for t, vec in zip(missing, embedder.embed(missing), strict=True):
                self._cache[t] = vec
        return [self._cache[t] for t in texts]

    # --- provider interface ---------------------------------------------------------------

    async def stream(
        self, messages: Sequence[ChatMessage], tools: Sequence[FunctionTool] = ()
    ) -> AsyncIterator[LlmEvent]:
        transfer = next((t for t in tools if t.name == TRANSFER_CALL), None)
        choices = dict(transfer.choices) if transfer else {}
        can_end = any(t.name == END_CALL for t in tools)
        last = messages[-1] if messages else None
        if last is not None and last.role == "tool":
            # A tool result (e.g. the transfer failed): apologise and ask again.
            yield TextDelta("Sorry, that did not work. " + self._question(choices))
            yield Finished("stop")
            return
        said = (last.content or "") if last is not None and last.role == "user" else ""
        ctx = self.context(messages, choices)
        route = await asyncio.to_thread(self.route, said, choices, can_end, ctx)
        log.debug("local route %s for %r", route, said)
        if route.action == "end":
            yield TextDelta(GOODBYE)
            yield self._call(END_CALL, {"reason": "caller said goodbye"})
            yield Finished("tool_calls")
        elif route.action == "transfer" and route.destination is not None:
            yield self._call(TRANSFER_CALL, {"destination": route.destination})
            yield Finished("tool_calls")
        else:
            yield TextDelta(self._text(route, choices))
            yield Finished("stop")

    @staticmethod
    def context(messages: Sequence[ChatMessage], choices: dict[str, str]) -> Context:
        """Knowledge and prompt from the system messages; from its own earlier replies, how
        many questions in a row went unanswered and what it offered last."""
        ctx = Context()
        prompts: list[str] = []
        for m in messages:
            if m.role == "system":
                if m.knowledge:
                    ctx.knowledge += m.knowledge
                elif m.content:
                    prompts.append(m.content)
        ctx.prompt = "\n".join(prompts)
        replies = [m for m in messages if m.role == "assistant" and m.content]
        for reply in reversed(replies):
            if not reply.content or not reply.content.startswith(DONT_KNOW):
                break
            ctx.unanswered += 1
        if replies and replies[-1].content:
            for key, description in choices.items():
                name = _short_name(description)
                last = replies[-1].content
                if OFFER.format(name=name) in last or (
                    len(choices) == 1 and f"I can put you through to {name}." in last
                ):
                    ctx.offered = key
        return ctx

    def _text(self, route: Route, choices: dict[str, str]) -> str:
        if route.action == "answer" and route.answer:
            return route.answer
        if route.action == "goodbye":
            return GOODBYE
        if route.action == "offer" and route.destination is not None:
            name = _short_name(choices[route.destination])
            return f"{DONT_KNOW} {OFFER.format(name=name)}"
        if route.action == "unknown":
            return f"{DONT_KNOW} {self._question(choices)}" if choices else DONT_KNOW
        return self._question(choices)

    def _call(self, name: str, args: dict[str, str]) -> ToolCallEvent:
        return ToolCallEvent(ToolCall(f"local_{next(self._ids)}", name, json.dumps(args)))

    @staticmethod
    def _question(choices: dict[str, str]) -> str:
        names = [_short_name(d) for d in choices.values()]
        if not names:
            return "How can I help you?"
        if len(names) == 1:
            return f"I can put you through to {names[0]}. Would you like that?"
        listed = ", ".join(names[:-1]) + f" or {names[-1]}"
        return f"I can connect you with {listed}. Which would you like?"
