"""Waiting for process-group work without ever blocking past an abort.

A hung peer leaves a gloo op pending until the process-group timeout and `pg.abort()` does not
unblock it (measured on this machine). So waits here are sliced: `work.wait(slice)` returns the
moment the op completes and otherwise raises after the slice (leaving the op pending), and the
abort flag and deadline are checked between slices. An abandoned op stays pending in the
background and still owns its buffers; callers must never reuse them (buffers.py, exact.py).

Why not completion callbacks: a Python callback on a gloo future that fires while the
interpreter is finalizing (an abandoned op failing when a peer exits) makes the gloo thread
take the GIL, which terminates the thread with a forced unwind through noexcept C++ frames:
std::terminate, the process dies (seen here with gdb). Sliced waits keep Python out of gloo's
threads entirely.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

log = logging.getLogger(__name__)

# Longest a waiter can miss an abort: one slice of work.wait / one condition wait.
WAIT_SLICE_SECONDS = 0.01
_POLL_SECONDS = 0.25


class AbortSignal:
    """Set once when the epoch's current work must be abandoned; wakes every waiter."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._reason: str | None = None
        self._pipe: tuple[int, int] | None = None

    def fileno(self) -> int:
        """A file descriptor that becomes readable on abort (for waits outside Python, e.g.
        poll(2) in the native ring). Created on first use, closed with this object."""
        with self._cond:
            if self._pipe is None:
                read_end, write_end = os.pipe()
                self._pipe = (read_end, write_end)
                weakref.finalize(self, _close_fds, read_end, write_end)
                if self._reason is not None:
                    os.write(write_end, b"!")
            return self._pipe[0]

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
                if self._pipe is not None:
                    os.write(self._pipe[1], b"!")
            self._cond.notify_all()

    def notify(self, *_: Any) -> None:
        """Wake `wait_until` waiters so they re-check their predicate (Python threads only)."""
        with self._cond:
            self._cond.notify_all()

    def wait_works(self, works: Sequence[Any], deadline: float, poll: bool = False) -> str | None:
        """Wait until every work completed. Returns None on success, else why it stopped.

        Completion with an error (a peer closed its connection) is reported as that error.
        `poll=True` (NCCL: `wait()` only orders streams) polls `is_completed()` instead.
        """
        for work in works:
            err = self._poll_one(work, deadline) if poll else self._wait_one(work, deadline)
            if err is not None:
                return err
        return None

    def _poll_one(self, work: Any, deadline: float) -> str | None:
        delay = 1e-4
        while not work.is_completed():
            if self._reason is not None:
                return f"aborted: {self._reason}"
            if time.monotonic() > deadline:
                return "timed out waiting for peers"
            time.sleep(delay)
            delay = min(delay * 2, WAIT_SLICE_SECONDS)
        try:
            work.wait()
        except Exception as e:
            return f"peer failure: {_short(e)}"
        return None

    def _wait_one(self, work: Any, deadline: float) -> str | None:
        while True:
            if not work.is_completed():
                if self._reason is not None:
                    return f"aborted: {self._reason}"
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timed out waiting for peers"
                span = timedelta(seconds=min(remaining, WAIT_SLICE_SECONDS))
            else:
                span = None
            try:
                if span is None:
                    work.wait()
                else:
                    work.wait(span)
                return None
            except Exception as e:  # gloo raises RuntimeError / DistBackendError subclasses
                if span is None:
                    return f"peer failure: {_short(e)}"
                # Either the slice ran out (the op may have completed just after: the loop
                # then re-waits without a timeout to learn the real outcome) or it failed.
                continue

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


def wait_store_keys(store: Any, keys: list[str], abort: AbortSignal, deadline: float) -> str | None:
    """Poll a TCPStore until every key exists without blocking past an abort; None, or why it
    stopped. A check is one ~0.1 ms round trip: fine-grained at first, since a key is usually
    only a moment away, then backing off to 5 ms. Not `store.wait` with a timeout: a
    timed-out wait may leave the client connection out of step."""
    delay = 0.0002
    while True:
        # The abort first: an epoch given up (or an interpreter exiting, whose store may be
        # going away under this thread) must not touch the store again.
        if abort.aborted:
            return f"aborted: {abort.reason}"
        try:
            if store.check(keys):  # True once every key exists
                return None
        except Exception as e:  # the store (coordinator) went away
            return f"store unavailable while waiting for {keys!r}: {e}"
        if time.monotonic() > deadline:
            return f"timed out waiting for {keys!r}"
        time.sleep(delay)
        delay = min(delay * 1.5, 0.005)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def done(work: Any) -> bool:
    """True once `work` finished, successfully or not (it no longer touches its buffers)."""
    return work.is_completed()


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else type(e).__name__
    return first[:300]


def build_with_abort(
    build: Any, abort: AbortSignal, timeout: float, what: str = "process group"
) -> tuple[Any, str | None]:
    """Run `build()` (a process-group rendezvous) on a helper thread; return (result, None)
    or (None, why it was given up), e.g. "process group rendezvous aborted: ...".

    A given-up build keeps running in the background until its own rendezvous timeout; its
    result is simply dropped.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = build()
        except BaseException as e:
            box["error"] = e
        abort.notify()

    thread = threading.Thread(target=target, name="lococomm-pg-build", daemon=True)
    started = time.monotonic()
    thread.start()
    err = abort.wait_until(lambda: "result" in box or "error" in box, started + timeout)
    if err is not None:
        return None, f"{what} rendezvous {err}"
    if "error" in box:
        return None, f"{what} rendezvous failed: {box['error']}"
    log.debug("%s ready in %.1f ms", what, (time.monotonic() - started) * 1e3)
    return box["result"], None
