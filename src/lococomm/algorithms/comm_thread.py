"""A communication thread: runs submitted jobs one at a time, in submission order.

DataParallel's compressed buckets run here: a compressed all-reduce (encode, ring hops,
decode) runs to completion on the calling thread, so calling it from an autograd hook would
stall backward for the whole exchange. Submitting it instead lets backward go on while bucket
i is encoded and sent. One thread, FIFO: every member issues its collectives in the same
order, which is what keeps the process-group ops aligned.

The jobs never block past an abort (they are lococomm collectives, which wait in slices), so
`Job.result()` is bounded by the manager's timeout.

CUDA: a job captures an event on the submitting thread's current stream (the one that
produced the gradients) and runs on a side stream that waits for it; `result()` makes the
caller's current stream wait for the job's work. Selected by device, not run on this machine.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

_STOP = object()


class Job:
    """One submitted job; `result()` waits for it and returns its value (or re-raises)."""

    def __init__(self, fn: Callable[[], Any], event: Any = None) -> None:
        self.fn = fn
        self.ready_event = event  # CUDA event the job must wait for (None on CPU)
        self.done_event: Any = None  # CUDA event recorded after the job's work
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def run(self, stream: Any) -> None:
        try:
            if stream is None:
                self._value = self.fn()
            else:
                with torch.cuda.stream(stream):
                    if self.ready_event is not None:
                        stream.wait_event(self.ready_event)
                    self._value = self.fn()
                    self.done_event = torch.cuda.Event()
                    self.done_event.record(stream)
        except BaseException as e:  # handed to the waiter, which re-raises on its thread
            self._error = e
        finally:
            self._done.set()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def result(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        if self.done_event is not None:
            torch.cuda.current_stream().wait_event(self.done_event)
        return self._value


class CommThread:
    """A lazily started daemon thread executing jobs in FIFO order."""

    def __init__(self, name: str = "lococomm-comm", device: torch.device | None = None) -> None:
        self.name = name
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._queue: queue.SimpleQueue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._stream: Any = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], Any]) -> Job:
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        job = Job(fn, event)
        self._ensure_started().put(job)
        return job

    def close(self) -> None:
        """Let the thread exit after the jobs already submitted."""
        with self._lock:
            if self._queue is not None:
                self._queue.put(_STOP)
                self._queue = self._thread = None

    def _ensure_started(self) -> queue.SimpleQueue[Any]:
        with self._lock:
            if self._queue is None:
                if self.device.type == "cuda" and self._stream is None:
                    self._stream = torch.cuda.Stream(self.device)
                # A fresh queue per thread: a closing thread never picks up later jobs.
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._loop, args=(self._queue, self._stream), name=self.name, daemon=True
                )
                self._thread.start()
            return self._queue

    @staticmethod
    def _loop(jobs: queue.SimpleQueue[Any], stream: Any) -> None:
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            job.run(stream)
