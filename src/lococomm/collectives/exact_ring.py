"""Exact ring all-reduce that only reads the caller's tensor: no backup copy at all.

gloo's all-reduce works in place, so `exact.allreduce` backs the caller's tensor up before
handing it over (one memory pass of the whole tensor, which on 2 cores shared by 4 members is
~15 % of a 16M all-reduce). This ring writes every byte it receives into a separate result
buffer R instead, so the caller's tensor x is never written and nothing needs restoring:

    stage 0            send x[seg]                               (x is only read)
    1 <= s <= W - 1    R[seg] (received at s - 1) op= x[seg]; send R[seg]
                       (s = W - 1: R[seg] is the owner's final value; "mean" divides it here)
    s >= W             R[seg] holds final bytes received at s - 1; forward them

with the segments, pipeline chunks and issue order of `ring_plan.py`. Every receive lands
directly in R: a segment received as a partial sum (stage s) and again as a final value
(stage s + W) is safe to receive twice because the final cannot exist before our partial was
received downstream. Every member ends with the owner's bytes of every segment: the result is
bit-identical everywhere.

Transport: the ring's own TCP connection to each neighbour (`ring_sockets.py`, connected once
per epoch), driven by `ops.ring_allreduce`: the C++ executor (`csrc/ring.cpp`, one thread,
poll(2), GIL released) or its Python reference, which can share a ring with it. Why not gloo:
its pair transport is only reachable through its collectives, and the previous version of this
ring -- hops as broadcasts in gloo pair groups, driven from Python -- paid two thread
hand-offs per hop: 111-123 ms against gloo's own 92-105 ms at 4 members, 16M fp32. The C++
executor beats gloo's all-reduce itself here (measured in the same processes, loopback, 16M
fp32: 26 vs 48 ms at 2 members, 81 vs 95 ms at 4).

On success the caller's tensor takes R's storage when it is the sole user of a plain torch
allocation (`swappable`), else R is copied into it. On failure the tensor was never touched;
nothing is pending (the executor returned), so R goes back to the pool, and the sockets, whose
streams are now out of step, are closed -- which also stops the neighbours at once.

The ring runs on the calling thread, so it is used for blocking calls only; async calls keep
gloo's own all-reduce, whose threads need no caller.
"""

from __future__ import annotations

import logging

import torch

from lococomm import ops
from lococomm.collectives import ring_sockets, signature
from lococomm.collectives.abort import build_with_abort
from lococomm.collectives.communicator import Communicator
from lococomm.collectives.ownership import swappable
from lococomm.collectives.ring_plan import RingPlan, plan_ring, ring_bytes

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # pipeline chunk (bytes)


def eligible(comm: Communicator, tensor: torch.Tensor) -> bool:
    """Whether a blocking all-reduce of `tensor` takes the ring: any CPU tensor on an epoch
    that can connect ring sockets. Nothing about the tensor's size or dtype decides, so members
    whose tensors differ (a bug the signature in the stream reports) still meet in the ring
    rather than wait for each other in different collectives."""
    return (
        comm.world_size >= 2
        and comm.connect_ring is not None
        and comm.device.type == "cpu"
        and tensor.device.type == "cpu"
    )


def _sockets(comm: Communicator) -> tuple[ring_sockets.RingSockets | None, str | None]:
    sockets = ring_sockets.known(comm)
    if sockets is not None:
        return sockets, None
    assert comm.connect_ring is not None
    sockets, err = build_with_abort(comm.connect_ring, comm.abort, comm.timeout, what="ring sockets")
    if sockets is None:
        return None, err
    ring_sockets.remember(comm, sockets)
    return sockets, None


def allreduce(
    comm: Communicator, tensor: torch.Tensor, op: str, description: str, fields: list[int]
) -> bool:
    """All-reduce `tensor` (eligible) over the ring; True on success (tensor holds the
    result), False with the step failed and the tensor untouched. `fields` is the call's
    signature (`signature.fields`), checked against the left neighbour's in the stream."""
    sockets, why = _sockets(comm)
    if sockets is None:
        comm.fail(f"{description}: {why}")
        return False
    swap = tensor.is_contiguous() and swappable(tensor)  # before our views raise its use count
    x = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1).contiguous()
    plan = plan_ring(x.numel(), comm.world_size, 1, max(1, CHUNK_BYTES // x.element_size()))
    recvs, sends = native_schedule(plan, comm.rank, op)
    result = comm.pool.get(x.numel(), x.dtype, x.device)
    comm.bytes_sent += ring_bytes(x.numel(), x.element_size(), comm.world_size)
    header = torch.tensor(fields, dtype=torch.int64)
    left_header = torch.empty_like(header)
    try:
        err = ops.ring_allreduce(
            sockets.left.fileno(),
            sockets.right.fileno(),
            comm.abort.fileno(),
            x,
            result,
            recvs,
            sends,
            op,
            comm.world_size,
            comm.timeout,
            header,
            left_header,
        )
    except Exception as e:  # a bad argument is a bug, but it must not leave peers waiting
        log.exception("%s: exact ring failed", description)
        err = f"{type(e).__name__}: {e}"
    if err:
        ring_sockets.drop(comm)  # also stops the neighbours: their streams end here
        comm.pool.put(result)
        if err == "signature mismatch":
            left = (comm.rank - 1) % comm.world_size
            pairs = sorted([(left, left_header.tolist()), (comm.rank, fields)])
            rows, ranks = [row for _, row in pairs], [rank for rank, _ in pairs]
            err = signature.mismatch_message(description, rows, ranks) or err
            comm.fail(err)
        else:
            comm.fail(f"{description}: {err}")
        return False
    with torch.no_grad():
        if swap:
            tensor.set_(result.untyped_storage(), 0, tensor.shape, tensor.stride())
            comm.pool.put(x)  # the old storage: nobody else sees it, it becomes the next R
        else:
            tensor.copy_(result.view(tensor.shape))
            comm.pool.put(result)
    return True


def native_schedule(plan: RingPlan, rank: int, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ring's receives and sends for `csrc/ring.cpp`, in issue order (pure).

    receives: int64 [n, 3] rows (start, end, action) over R, action 0 forward, 1 combine with
    x, 2 combine then divide by W (mean, at the owner's stage); sends: int64 [n, 4] rows
    (start, end, source 0 = x / 1 = R, index of the receive it needs, -1 for none)."""
    w = plan.world
    recvs: list[tuple[int, int, int]] = []
    sends: list[tuple[int, int, int, int]] = []
    index: dict[tuple[int, int], int] = {}
    order = plan.order()
    for j, s in order:
        a, b = plan.bounds(plan.received_segment(rank, s), j)
        if a == b:
            continue
        action = 0
        if s <= w - 2:
            action = 2 if (s == w - 2 and op == "mean") else 1
        index[(j, s)] = len(recvs)
        recvs.append((a, b, action))
    for j, s in order:
        a, b = plan.bounds(plan.sent_segment(rank, s), j)
        if a == b:
            continue
        sends.append((a, b, 0 if s == 0 else 1, -1 if s == 0 else index[(j, s - 1)]))
    return (
        torch.tensor(recvs, dtype=torch.int64).reshape(-1, 3),
        torch.tensor(sends, dtype=torch.int64).reshape(-1, 4),
    )
