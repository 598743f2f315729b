"""Exact ring all-reduce that only reads the caller's tensor: no backup copy at all.

gloo's all-reduce works in place, so `exact.allreduce` backs the caller's tensor up before
handing it over (one memory pass of the whole tensor, which on 2 cores shared by 4 members is
~15 % of a 16M all-reduce). This ring writes every byte it receives into a separate result
buffer R instead, so the caller's tensor x is never written and nothing needs restoring:

    stage 0            send x[seg]                               (x is only read)
    1 <= s <= W - 1    R[seg] (received at s - 1) op= x[seg]; send R[seg]
                       (s = W - 1: R[seg] is the owner's final value; "mean" divides it here)
    s >= W             R[seg] holds final bytes received at s - 1; forward them

with the segments, pipeline chunks and issue order of `ring_plan.py` and the link groups of
`pair_groups.py` (a hop is a broadcast from rank 0 in a two-member group, so waits can be
abandoned on an abort). Every receive lands directly in R: a segment received as a partial
sum (stage s) and again as a final value (stage s + W) is safe to receive twice because the
final cannot exist before our partial was received downstream. Every member ends with the
owner's bytes of every segment: the result is bit-identical everywhere.

On success the caller's tensor takes R's storage when it is the sole user of a plain torch
allocation (`swappable`), else R is copied into it. On failure the tensor was never touched;
R, pending ops and the link groups go to the graveyard.

The ring runs on the calling thread (Python drives the hops), so it is used for blocking
calls only; async calls keep gloo's own all-reduce, whose threads need no Python.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from lococomm.collectives.communicator import Communicator
from lococomm.collectives.ownership import swappable
from lococomm.collectives.pair_groups import Links, ring_links
from lococomm.collectives.ring_plan import RingPlan, plan_ring

log = logging.getLogger(__name__)

MIN_BYTES = 8 << 20  # smaller tensors: gloo's all-reduce (latency matters more than a copy)
CHUNK_BYTES = 4 << 20  # pipeline chunk: 4-16 MiB within noise of each other at 16M fp32 here
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64)


def eligible(comm: Communicator, tensor: torch.Tensor) -> bool:
    """Whether `tensor` may take the ring: a large contiguous CPU tensor on a gloo epoch that
    can build ring links (the same answer on every member once signatures agree)."""
    return (
        comm.world_size >= 2
        and comm.make_group is not None
        and comm.device.type == "cpu"
        and tensor.device.type == "cpu"
        and tensor.dtype in DTYPES
        and tensor.is_contiguous()
        and tensor.numel() * tensor.element_size() >= MIN_BYTES
    )


def allreduce(comm: Communicator, tensor: torch.Tensor, op: str, description: str) -> bool:
    """All-reduce `tensor` (eligible, signatures already agreed) over the ring; True on
    success (tensor holds the result), False with the step failed and the tensor untouched."""
    links, why = ring_links(comm, comm.make_group)
    if links is None:
        comm.fail(f"{description}: {why}")
        return False
    swap = swappable(tensor)  # decided before our own views of it raise its use count
    x = tensor.view(-1)
    plan = plan_ring(x.numel(), comm.world_size, 1, max(1, CHUNK_BYTES // x.element_size()))
    result = comm.pool.get(x.numel(), x.dtype, x.device)
    comm.bytes_sent += 2 * (comm.world_size - 1) * x.numel() * x.element_size() // comm.world_size
    ring = _Ring(comm, links, plan, x, result, op, description)
    if not ring.run():
        return False
    with torch.no_grad():
        if swap:
            tensor.set_(result.untyped_storage(), 0, tensor.shape, tensor.stride())
            comm.pool.put(x)  # the old storage: nobody else sees it, it becomes the next R
        else:
            x.copy_(result)
            comm.pool.put(result)
    return True


class _Ring:
    """One call's hops (see the module docstring)."""

    def __init__(
        self,
        comm: Communicator,
        links: Links,
        plan: RingPlan,
        x: torch.Tensor,
        result: torch.Tensor,
        op: str,
        description: str,
    ) -> None:
        self.comm = comm
        self.links = links
        self.plan = plan
        self.x = x
        self.result = result
        self.op = op
        self.description = description
        self.opts = dist.BroadcastOptions()
        self.opts.rootRank = 0
        self.works: list = []

    def _combine(self, acc: torch.Tensor, mine: torch.Tensor) -> None:
        if self.op in ("sum", "mean"):
            acc.add_(mine)
        elif self.op == "max":
            torch.maximum(acc, mine, out=acc)
        else:
            torch.minimum(acc, mine, out=acc)

    def run(self) -> bool:
        comm, plan, links = self.comm, self.plan, self.links
        r, w = comm.rank, comm.world_size
        order = plan.order()
        deadline = time.monotonic() + comm.timeout
        try:
            # Every receive lands in R, so all of them can be posted up front (no buffers to
            # bound); the left link matches them in this order.
            recvs: dict[tuple[int, int], object] = {}
            for j, s in order:
                a, b = plan.bounds(plan.received_segment(r, s), j)
                if a != b:
                    work = links.left.broadcast([self.result[a:b]], self.opts)
                    self.works.append(work)
                    recvs[(j, s)] = work
            sends = []
            for j, s in order:
                a, b = plan.bounds(plan.sent_segment(r, s), j)
                if a == b:
                    continue
                if s == 0:
                    buf = self.x[a:b]
                else:
                    err = comm.wait([recvs.pop((j, s - 1))], deadline)
                    if err is not None:
                        return self._fail(err)
                    buf = self.result[a:b]
                    if s <= w - 1:
                        self._combine(buf, self.x[a:b])
                        if s == w - 1 and self.op == "mean":
                            buf.div_(w)
                work = links.right.broadcast([buf], self.opts)
                self.works.append(work)
                sends.append(work)
            err = comm.wait([*recvs.values(), *sends], deadline)
            if err is not None:
                return self._fail(err)
        except Exception as e:  # a gloo error on issue
            log.exception("%s: exact ring failed", self.description)
            return self._fail(f"{type(e).__name__}: {e}")
        return True

    def _fail(self, err: str) -> bool:
        # x is only ever read (a late send reading it is harmless); R may still be written.
        self.comm.graveyard.bury(self.works, [self.result, self.x, *self.links.groups()])
        self.comm.fail(f"{self.description}: {err}")
        return False
