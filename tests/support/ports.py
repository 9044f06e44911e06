"""Port blocks private to this test process, so two suites on one machine never share one."""

from __future__ import annotations

import os


def unicast_ports(base: int, width: int = 20) -> tuple[int, int]:
    """A block of `width` ports from `base`, chosen by this process's id (50 blocks)."""
    start = base + (os.getpid() % 50) * width
    return start, start + width - 1
