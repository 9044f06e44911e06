"""What goes through a call's queue besides PBX events: finished speech, timers, commands
and the resume signal."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SpeechDone:
    token: str
    played: bool
    error: str | None = None


@dataclass(frozen=True)
class TimerFired:
    name: str
    ref: str


@dataclass
class CommandEnvelope:
    command: Any
    reply: asyncio.Future[dict[str, Any]]
    source: str = "api"
    label: str | None = None


@dataclass(frozen=True)
class Resume:
    """Pick the call up again after a reconnect or a daemon restart."""

    live_legs: frozenset[str]
    answered_legs: frozenset[str]
