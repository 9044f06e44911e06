"""Test-only fault injection: stop the daemon at a named point of a transfer's dial, to prove
what a restarted daemon does with what its predecessor left behind (issue 7, section 3).

Never set in production. Two ways to arm a point:

- `CALLBRIDGE_TEST_FAULT=<point>` in the environment: the process SIGKILLs itself there (a
  daemon run as `callbridge run`);
- `arm(<point>)` from an in-process test: the coroutine that reaches the point stops there for
  good (nothing after it runs, as if the process had died), `reached(<point>)` is set, and
  the test then stops the daemon and starts a new one;
- `hold(<point>)` from an in-process test: the coroutine that reaches the point waits there
  until the test sets the returned `release` event, then goes on (a race made deterministic:
  the PBX acts while the daemon is held, e.g. a 183 before the leg's subscription).

Points (in the order a call and its transfer pass them):
- `before_answer`: the caller is taken (its session started), not yet answered;
- `before_originate`: the transfer is decided (and, with a message, recorded and announced);
  nothing is sent to the PBX yet;
- `before_subscribe`: Asterisk only: the leg is originated (INVITE sent, one request creates
  and dials it), our ARI application not yet subscribed to its events;
- `after_originate`: the leg is dialled (INVITE sent); its record is written meanwhile
  (concurrently: it may or may not be durable yet);
- `before_record`: the transfer's record (its request and dial) is not written; the
  originate goes on (the daemon "dies" with the leg placed and nothing recorded).
"""

from __future__ import annotations

import asyncio
import os
import signal

POINTS = (
    "before_answer",
    "before_originate",
    "before_subscribe",
    "after_originate",
    "before_record",
)
_ENV = "CALLBRIDGE_TEST_FAULT"
_armed: dict[str, asyncio.Event] = {}
_held: dict[str, tuple[asyncio.Event, asyncio.Event]] = {}


def arm(point: str) -> asyncio.Event:
    """In-process tests: the next coroutine reaching `point` stops there. Returns the event
    set when it is reached."""
    assert point in POINTS, point
    event = _armed[point] = asyncio.Event()
    return event


def hold(point: str) -> tuple[asyncio.Event, asyncio.Event]:
    """In-process tests: the next coroutine reaching `point` waits there until `release` is
    set. Returns `(reached, release)`."""
    assert point in POINTS, point
    reached, release = _held[point] = (asyncio.Event(), asyncio.Event())
    return reached, release


def disarm() -> None:
    _armed.clear()
    for _, release in _held.values():
        release.set()
    _held.clear()


async def point(name: str) -> None:
    """A fault point: a no-op unless a test armed it."""
    if not _armed and not _held and not os.environ.get(_ENV):
        return
    if os.environ.get(_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    held = _held.pop(name, None)
    if held is not None:
        held[0].set()
        await held[1].wait()
    event = _armed.pop(name, None)
    if event is not None:
        event.set()
        await asyncio.Event().wait()  # "dead": cancelled when the daemon stops
