"""Exact in-place all-reduce of a buffer its owner can throw away and replace.

`exact.allreduce` protects the caller's tensor (one backup copy, pipelined) because the caller
keeps using it after a failure. A DataParallel gradient bucket needs no such protection: if
the step fails its contents are discarded anyway. What it does need is the rule every
collective here follows -- never touch memory an abandoned op may still write (measured: an
op abandoned because a peer hung can complete later and write a stale result). So:

* the owner's buffer goes to gloo/NCCL directly (no copy, no backup);
* `wait()` reports one of three outcomes:
    OK         every chunk arrived; the buffer holds the sum, divided by `scale` if given;
    FAILED     the step failed but no op is pending: the buffer is the owner's again, with
               undefined contents (zero it before reuse);
    ABANDONED  some op is still pending: the buffer and its ops were buried in the graveyard
               and the owner must never touch it again -- allocate a new buffer and re-point
               every view of the old one (DataParallel re-points the parameters' .grad);
* failures mark the step failed through `comm.fail` (never raise), waits are sliced
  (`comm.wait`), no Python callback is ever attached to a gloo future.

Chunks as in exact.py (`plan_chunks`): buffers >= 8 MiB go as 2+ ops so gloo's two worker
threads reduce two chunks at once.

Why gloo here and not lococomm's exact ring (`exact_ring.py`): a bucket needs no protection
(the ring's main gain), and with buckets on the ring's single thread DataParallel was slightly
slower at 1 Gbit/s (B=4096, 8 buckets of 4 MiB, step / max(T_compute, T_comm) 1.064-1.075
against 1.048-1.051 for gloo, same runs): gloo's two worker threads keep two buckets moving.
"""

from __future__ import annotations

import enum
import time

import torch
import torch.distributed as dist

from lococomm.collectives.abort import done
from lococomm.collectives.communicator import Communicator
from lococomm.collectives.exact import plan_chunks


class Outcome(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    ABANDONED = "abandoned"


class BucketAllreduce:
    """One in-flight SUM all-reduce of `buf` (a flat, contiguous tensor owned by the caller).

    start() issues the ops and returns at once; wait() finishes them (see module docstring).
    """

    def __init__(self, comm: Communicator, buf: torch.Tensor, description: str) -> None:
        if buf.dim() != 1 or not buf.is_contiguous():
            raise ValueError("BucketAllreduce needs a flat contiguous buffer")
        self.comm = comm
        self.buf = buf
        self.description = description
        self.works: list = []
        self.chunks = plan_chunks(buf.numel(), buf.element_size())
        self.outcome: Outcome | None = None

    def start(self) -> bool:
        """Issue the chunk ops. False (step failed, outcome decided) if they could not start."""
        comm = self.comm
        if comm.world_size == 1 or comm.pg is None or self.buf.numel() == 0:
            self.outcome = Outcome.OK
            return True
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        try:
            for a, b in self.chunks:
                self.works.append(comm.pg.allreduce([self.buf[a:b]], opts))
        except Exception as e:
            self._fail(f"could not start: {e}")
            return False
        # A ring all-reduce sends 2 (W - 1) / W of the buffer from every member.
        nbytes = self.buf.numel() * self.buf.element_size()
        comm.bytes_sent += 2 * (comm.world_size - 1) * nbytes // comm.world_size
        return True

    def wait(self, scale: float | None = None, deadline: float | None = None) -> Outcome:
        """Finish: OK (buffer reduced, divided by `scale`), FAILED or ABANDONED."""
        if self.outcome is not None:
            return self.outcome  # decided at start (one member, nothing to move) or waited
        if deadline is None:
            deadline = time.monotonic() + self.comm.timeout
        for (a, b), work in zip(self.chunks, self.works):
            err = self.comm.wait([work], deadline)
            if err is not None:
                return self._fail(err)
            if scale is not None:
                self.buf[a:b].div_(scale)  # overlaps the chunks still in flight
        self.works = []
        self.outcome = Outcome.OK
        return self.outcome

    def give_up(self, reason: str) -> Outcome:
        """Stop without waiting (the step already failed elsewhere): FAILED or ABANDONED."""
        if self.outcome is not None:
            return self.outcome
        return self._fail(reason, report=False)

    def _fail(self, err: str, report: bool = True) -> Outcome:
        pending = [w for w in self.works if not done(w)]
        if pending:
            self.comm.graveyard.bury(self.works, [self.buf])
            self.outcome = Outcome.ABANDONED
        else:
            self.outcome = Outcome.FAILED
        self.works = []
        if report:
            self.comm.fail(f"{self.description}: {err}")
        return self.outcome
