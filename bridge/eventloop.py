"""Which asyncio event loop runs the daemon (`event_loop` in the settings).

uvloop (libuv) is the default: every call's RTP, the ARI and HTTP traffic and the events all
run on this one loop, and uvloop's lower cost per callback and per socket operation is
measured in docs/BENCHMARKS.md ("Transfer decided → INVITE", "The load table"). "asyncio" is
the standard library's loop, for a platform without uvloop or to compare.

The loop shares the GIL with the daemon's threads (the database's connection, the STT
workers, the router's embedder). sqlite3 and the speech libraries release the GIL for their
I/O and C work and must take it back after each step; while the loop runs Python, each take
waits up to the interpreter's switch interval (5 ms by default). Beside a spinning Python
thread, a 0.6 ms commit took 83 ms at p95 that way, 15 ms at a 1 ms interval; the daemon runs
with `gil_switch_interval_ms` (1 ms) (docs/BENCHMARKS.md, "The GIL hand-off").
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

EventLoopName = Literal["uvloop", "asyncio"]
T = TypeVar("T")


class EventLoopUnavailable(RuntimeError):
    """The configured loop cannot be imported (uvloop missing from this installation)."""


def loop_factory(name: EventLoopName) -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory for `asyncio.Runner`: the configured loop, or a clear error if uvloop is
    not installed (it is a dependency: only a broken installation lacks it)."""
    if name == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError as exc:
        raise EventLoopUnavailable(
            f"event_loop = {name!r} but uvloop cannot be imported ({exc}): reinstall"
            ' callbridge, or set event_loop = "asyncio"'
        ) from None
    return uvloop.new_event_loop


def run(
    main: Coroutine[Any, Any, T], name: EventLoopName, switch_interval_ms: float | None = None
) -> T:
    """`asyncio.run` on the configured loop, with the GIL's switch interval if given."""
    if switch_interval_ms is not None:
        sys.setswitchinterval(switch_interval_ms / 1000)
    try:
        factory = loop_factory(name)
    except EventLoopUnavailable:
        main.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """The running loop's kind, for the start-up log: "uvloop" or "asyncio"."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
