"""Waiting on a condition, with a bound and a message naming what was waited for (never a fixed sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.05):
    """Poll ``condition`` until it returns something truthy (returned); past ``timeout_s``, fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:g}s for {what}")
        time.sleep(poll_s)
    return result
