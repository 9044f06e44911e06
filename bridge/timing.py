"""Where a control command's time goes (issue 7 §8): the database and ARI add what they
spent to the span of the command being handled in the current task (a context variable), and
the session logs it as `call.command_timing`. Nothing is recorded outside a span."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field


@dataclass
class Span:
    """Milliseconds spent per kind ("db_wait", "db_run", "ari") and how many times."""

    ms: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, ms: float) -> None:
        self.ms[kind] = self.ms.get(kind, 0.0) + ms
        self.count[kind] = self.count.get(kind, 0) + 1

    def fields(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {}
        for kind, ms in self.ms.items():
            out[f"{kind}_ms"] = round(ms, 1)
            out[f"{kind}_n"] = self.count[kind]
        return out


current: contextvars.ContextVar[Span | None] = contextvars.ContextVar("timing_span", default=None)


def add(kind: str, ms: float) -> None:
    span = current.get()
    if span is not None:
        span.add(kind, ms)
