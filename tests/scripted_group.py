"""A scripted stand-in for a gloo process group: collectives run without processes, and each
issued op succeeds, fails or hangs as the test says."""

from __future__ import annotations

import time

import torch

from lococomm.collectives.abort import AbortSignal
from lococomm.collectives.buffers import BufferPool, Graveyard
from lococomm.collectives.communicator import Communicator


class ScriptedWork:
    """A gloo-like work: 'ok' sums like 2 equal members (doubles the buffer when issued),
    'error' completes with a peer failure, 'hang' never completes."""

    def __init__(self, tensor: torch.Tensor, behaviour: str) -> None:
        self.tensor = tensor
        self.behaviour = behaviour
        if behaviour == "ok":
            tensor.mul_(2)

    def is_completed(self) -> bool:
        return self.behaviour != "hang"

    def wait(self, timeout=None) -> bool:
        if self.behaviour == "ok":
            return True
        if self.behaviour == "error":
            raise RuntimeError("Connection reset by peer")
        time.sleep(timeout.total_seconds() if timeout else 0.01)  # the slice runs out
        raise RuntimeError("Operation timed out")


class ScriptedGather:
    """The signature exchange (`_allgather_base`): the peer's row is `peer_row` (None: the
    same as ours); it completes after `polls` calls of is_completed(), so a test can watch
    what the caller does while it is in flight."""

    def __init__(self, out: torch.Tensor, row: torch.Tensor, peer_row: list[int] | None, polls: int) -> None:
        k = row.numel()
        out[:k] = row
        out[k:] = row if peer_row is None else torch.tensor(peer_row, dtype=row.dtype)
        self.polls = polls

    def is_completed(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def wait(self, timeout=None) -> bool:
        self.polls = -1
        return True


class ScriptedGroup:
    """all-reduce ops behave as `behaviours` lists them, in order ('ok' once it runs out)."""

    def __init__(self, behaviours: list[str], check_polls: int = 0, peer_row: list[int] | None = None) -> None:
        self.behaviours = list(behaviours)
        self.works: list[ScriptedWork] = []
        self.check_polls = check_polls
        self.peer_row = peer_row
        self.log: list[str] = []  # "check" / "allreduce", in the order they were issued

    def _allgather_base(self, out, tensor):
        self.log.append("check")
        return ScriptedGather(out, tensor, self.peer_row, self.check_polls)

    @property
    def issued(self) -> list[torch.Tensor]:
        """The buffers handed to the group, in order."""
        return [w.tensor for w in self.works]

    def allreduce(self, tensors, opts):
        self.log.append("allreduce")
        work = ScriptedWork(tensors[0], self.behaviours.pop(0) if self.behaviours else "ok")
        self.works.append(work)
        return work


def scripted_communicator(
    group: ScriptedGroup, failures: list[str], abort: AbortSignal | None = None, timeout: float = 5.0
) -> Communicator:
    """Rank 0 of 2 on `group`; step failures are appended to `failures`."""
    return Communicator(
        pg=group, rank=0, world_size=2, abort=abort or AbortSignal(), pool=BufferPool(),
        graveyard=Graveyard(), timeout=timeout, fail=failures.append,
    )  # fmt: skip
