"""Waiting for process-group work without ever blocking past an abort.

A hung peer leaves a gloo op pending until the process-group timeout and `pg.abort()` does not
unblock it (measured on this machine). So every wait here is a wait on a condition that is woken
either by the op's completion callback or by `AbortSignal.abort()` (a coordinator push), with a
deadline on top. An abandoned op stays pending in the background and still owns its buffers;
callers must never reuse them (see buffers.py / exact.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

# Upper bound on one condition wait: a safety net in case a completion callback is lost.
_POLL_SECONDS = 0.25


class AbortSignal:
    """Set once when the epoch's current work must be abandoned; wakes every waiter."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._reason: str | None = None

    @property
    def aborted(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        return self._reason

    def abort(self, reason: str) -> None:
        with self._cond:
            if self._reason is None:
                self._reason = reason
            self._cond.notify_all()

    def notify(self, *_: Any) -> None:
        """Completion callback for futures: wake the waiters so they re-check."""
        with self._cond:
            self._cond.notify_all()

    def watch(self, work: Any) -> None:
        """Make `work`'s completion wake waiters of this signal.

        Gloo marks the future done (running callbacks) *before* `work.is_completed()` turns
        True, so waiters test `done(work)`, never `is_completed()`, or they miss the wakeup.
        """
        work.get_future().add_done_callback(self.notify)

    def wait_works(self, works: Sequence[Any], deadline: float) -> str | None:
        """Wait until every work completed. Returns None on success, else why it stopped.

        Completion with an error (a peer closed its connection) is reported as that error.
        """
        with self._cond:
            while True:
                if all(done(w) for w in works):
                    break
                if self._reason is not None:
                    return f"aborted: {self._reason}"
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timed out waiting for peers"
                self._cond.wait(min(remaining, _POLL_SECONDS))
        for work in works:
            try:
                work.wait()
            except Exception as e:  # gloo raises RuntimeError / DistBackendError subclasses
                return f"peer failure: {_short(e)}"
        return None

    def wait_until(self, predicate: Any, deadline: float) -> str | None:
        """Wait for `predicate()` (checked under the lock, woken by `notify`)."""
        with self._cond:
            while not predicate():
                if self._reason is not None:
                    return f"aborted: {self._reason}"
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timed out"
                self._cond.wait(min(remaining, _POLL_SECONDS))
        return None


def done(work: Any) -> bool:
    """True once `work` finished (successfully or not), consistent with `watch` callbacks."""
    return work.get_future().done() or work.is_completed()


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else type(e).__name__
    return first[:300]
