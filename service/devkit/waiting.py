"""The one deadline loop: check a condition until it holds or time runs out."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class GiveUp(Exception):
    """Raised by a predicate to stop :func:`wait_until` at once (e.g. the process it waits
    for exited); never retried, whatever ``retry_on`` says."""


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float,
    what: str,
    *,
    interval_s: float = 0.05,
    retry_on: tuple[type[Exception], ...] = (),
    between: Callable[[], None] | None = None,
) -> T:
    """Call `predicate` until it returns something truthy, and return that.

    After `timeout_s`: ``TimeoutError("timed out: <what> within N s")`` (with the last exception
    the predicate raised, when it raised one of `retry_on`). Exceptions not in `retry_on`,
    and :class:`GiveUp` always, propagate at once. `between` runs after each failed check,
    before the pause (e.g. sampling a process's metrics while waiting).
    """
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
        except GiveUp:
            raise
        except retry_on as exc:
            last_error = exc
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise TimeoutError(f"timed out: {what} within {timeout_s:.1f} s{detail}")
        if between is not None:
            between()
        time.sleep(interval_s)  # wait-ok: the deadline loop itself
