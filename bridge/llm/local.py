"""`provider: "local"`: a deterministic router that works offline. It is NOT an LLM.

No usable chat model can be had offline here, so the local provider does the one job an
assistant with transfer tools must do: send the caller to the right destination, or end the
call. Rules, in order, on the caller's last words:

1. goodbye / bye / that's all → `end_call` (with a short goodbye as text);
2. asking for a human, an agent, someone, a person → `transfer_call` to the first destination
   whose description sounds human (person, agent, colleague, reception, ...);
3. the destination whose description is most similar to the words (MiniLM sentence
   embeddings, cosine) if score >= `min_score` and it beats the runner-up by `min_margin`;
4. otherwise a short clarifying question that names the destinations.

If the embedding model cannot load, rule 3 falls back to word overlap. It reads destinations
from the same `FunctionTool` specs a remote model gets (`choices`), and emits the same events,
so the conversation code cannot tell the providers apart.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np

from bridge.llm.base import (
    ChatMessage,
    Finished,
    FunctionTool,
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
    r"\b(an? )?(human|agent|someone|somebody|person|operator|representative|receptionist|"
    r"staff member|colleague)\b"
)
_HUMAN_DEST = re.compile(
    r"\b(human|agent|person|people|colleague|operator|representative|reception\w*|staff)\b"
)
_STOPWORDS = frozenset(
    "a an and the to for of on in with about my me i i'd i'm would like want need please "
    "can could you your is are it this that be speak talk questions question or".split()
)
# Words that carry no request: "hmm", "yes", "hello" alone must not pick a destination.
_FILLERS = frozenset(
    "hmm hm uh um er erm ah oh yes yeah yep no nope ok okay hello hi hey so well".split()
)


@dataclass(frozen=True)
class Route:
    """What the router decided, and why (for logs and tests)."""

    action: str  # "transfer", "end", "clarify"
    destination: str | None = None
    score: float | None = None
    margin: float | None = None
    rule: str = ""


def _words(text: str) -> set[str]:
    return {w[:6] for w in re.findall(r"[a-z']+", text.lower()) if w not in _STOPWORDS}


def _short_name(description: str) -> str:
    head = re.split(r"\s+[-–—]\s+|[:;,(]|\bfor\b", description, maxsplit=1)[0].strip()
    return head[:1].lower() + head[1:] if head else description


class LocalRouter:
    """Offline deterministic routing behind the `LlmProvider` interface."""

    name = "local"

    def __init__(
        self,
        *,
        embedder: MiniLmEmbedder | None = None,
        use_embeddings: bool = True,
        min_score: float = 0.15,
        min_margin: float = 0.05,
    ) -> None:
        self._embedder = embedder
        self._use_embeddings = use_embeddings
        self.min_score = min_score
        self.min_margin = min_margin
        self._cache: dict[str, np.ndarray] = {}
        self._ids = itertools.count(1)

    async def aclose(self) -> None:
        pass

    async def warm_up(self) -> None:
        """Load the embedding model off the event loop (first use would block ~0.2 s)."""
        await asyncio.to_thread(self._get_embedder)

    def _get_embedder(self) -> MiniLmEmbedder | None:
        if self._embedder is None and self._use_embeddings:
            try:
                self._embedder = shared_embedder()
            except (EmbedderError, ImportError, OSError) as exc:
                log.warning("MiniLM unavailable, routing by word overlap: %s", exc)
                self._use_embeddings = False
        return self._embedder

    # --- decision -----------------------------------------------------------------------

    def route(self, text: str, choices: dict[str, str], can_end: bool) -> Route:
        """Decide for one utterance (sync, CPU: call it in a thread)."""
        said = text.lower().strip()
        if can_end and (_GOODBYE.search(said) or (_DONE.search(said) and len(said.split()) <= 5)):
            return Route("end", rule="goodbye")
        if not choices:
            return Route("clarify", rule="no destinations")
        if not _words(said) - _FILLERS:
            return Route("clarify", rule="nothing said")
        if _HUMAN_ASK.search(said):
            # "someone in billing" is a billing request; "a human, please" is not.
            rest = _HUMAN_ASK.sub(" ", said)
            if _words(rest):
                route = self._similar(rest, choices)
                if route.action == "transfer":
                    return route
            for key, description in choices.items():
                if _HUMAN_DEST.search(description.lower()):
                    return Route("transfer", key, rule="human")
        return self._similar(said, choices)

    def _similar(self, said: str, choices: dict[str, str]) -> Route:
        keys = list(choices)
        embedder = self._get_embedder()
        if embedder is not None:
            scores = self._similarities(embedder, said, [choices[k] for k in keys])
            rule = "embedding"
        else:
            scores = self._overlaps(said, [choices[k] for k in keys])
            rule = "overlap"
        order = np.argsort(-scores)
        best = float(scores[order[0]])
        margin = best - float(scores[order[1]]) if len(keys) > 1 else best
        # Overlap scores count shared words: one is enough, if no other destination shares one.
        min_score, min_margin = (
            (self.min_score, self.min_margin) if rule == "embedding" else (1.0, 1.0)
        )
        if best >= min_score and margin >= min_margin:
            return Route("transfer", keys[int(order[0])], best, margin, rule)
        return Route("clarify", None, best, margin, rule)

    def _similarities(self, embedder: MiniLmEmbedder, said: str, texts: list[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self._cache]
        if missing:
            for t, vec in zip(missing, embedder.embed(missing), strict=True):
                self._cache[t] = vec
        query = embedder.embed([said])[0]
        return np.array([float(self._cache[t] @ query) for t in texts])

    @staticmethod
    def _overlaps(said: str, texts: list[str]) -> np.ndarray:
        words = _words(said)
        return np.array([float(len(words & _words(t))) for t in texts])

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
        route = await asyncio.to_thread(self.route, said, choices, can_end)
        log.debug("local route %s for %r", route, said)
        if route.action == "end":
            yield TextDelta("Thank you for calling. Goodbye.")
            yield self._call(END_CALL, {"reason": "caller said goodbye"})
            yield Finished("tool_calls")
        elif route.action == "transfer" and route.destination is not None:
            yield self._call(TRANSFER_CALL, {"destination": route.destination})
            yield Finished("tool_calls")
        else:
            yield TextDelta(self._question(choices))
            yield Finished("stop")

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
