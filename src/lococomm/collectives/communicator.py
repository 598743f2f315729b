"""What a collective algorithm needs from one epoch: its process group and how to give up."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lococomm.collectives.abort import AbortSignal
from lococomm.collectives.buffers import BufferPool, Graveyard


@dataclass
class Communicator:
    """One epoch's cross-replica process group, seen by collective algorithms.

    `fail(reason)` marks the current step failed (the manager votes it down at once so the
    other members abandon their side too); algorithms call it instead of raising.
    """

    pg: Any  # torch ProcessGroup, None when world_size == 1
    rank: int
    world_size: int
    abort: AbortSignal
    pool: BufferPool
    graveyard: Graveyard
    timeout: float  # seconds one collective may take before the step is failed
    fail: Callable[[str], None]
    epoch: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    bytes_sent: int = 0  # payload bytes this member put on the wire (algorithm estimate)
    # (store suffix, rank, size) -> a process group of the epoch (ring links); None: no rings
    make_group: Callable[[str, int, int], Any] | None = None
    # () -> the native ring's connected sockets (blocking rendezvous); None: no native ring
    connect_ring: Callable[[], Any] | None = None

    def wait(self, works: list[Any], deadline: float | None = None) -> str | None:
        """Wait for works without blocking past an abort or the deadline (default: now +
        timeout). None on success, else the reason. NCCL works are polled (their wait()
        only orders CUDA streams)."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        return self.abort.wait_works(works, deadline, poll=self.device.type == "cuda")


class Handle:
    """Result of an asynchronous collective; `wait()` finishes it and returns its value."""

    def __init__(self, finish: Callable[[], Any] | None = None, value: Any = None) -> None:
        self._finish = finish
        self._value = value

    @classmethod
    def completed(cls, value: Any) -> Handle:
        return cls(None, value)

    def wait(self) -> Any:
        """Block until done (never past an abort). Returns the collective's value."""
        if self._finish is not None:
            finish, self._finish = self._finish, None
            self._value = finish()
        return self._value

    def is_waited(self) -> bool:
        return self._finish is None
