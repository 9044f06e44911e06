"""What goes through a call's queue besides PBX events: finished speech, timers, commands
and the resume signal."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
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
    posted: float = field(default_factory=time.monotonic)  # when it entered the call's queue


@dataclass(frozen=True)
class Resume:
    """Pick the call up again after a reconnect or a daemon restart."""

    live_legs: frozenset[str]
    answered_legs: frozenset[str]
    undialled_legs: frozenset[str] = frozenset()  # created by our predecessor, never dialled


@dataclass(frozen=True)
class LegAbandoned:
    """After a restart: a leg placed for this call by a daemon that stopped before recording
    it was hung up (by the reconciler). The session records the attempt and tells the
    caller, who never heard the transfer start."""

    leg_id: str
    transfer_id: str
    dialled: bool
