"""The daemon harness lives in `bridge.lab.harness` (the demo uses it too)."""

from bridge.lab.harness import Api, start_daemon, wait_for

__all__ = ["Api", "start_daemon", "wait_for"]
