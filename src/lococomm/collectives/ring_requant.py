"""Ring all-reduce of a summable codec: each hop decodes, adds in fp32 and re-encodes.

Schedule and ownership: ring_plan.py. Per message (chunk j, stage s), member r:

    s = 0           encode its own contribution x[seg]                     -> send right
    1 <= s <= W-1   wait for (j, s-1) from the left; acc = x[seg] + D(msg);  encode acc -> send
                    (block quantisers: decode, add and re-encode in one kernel pass)
                    (at s = W-1 the encoding is the owner's final one: kept as the result bytes)
    s >= W          wait for (j, s-1): final bytes of another segment; keep them, forward them

and after the last stage waits for the final bytes of the remaining segments. Only then, when
nothing can fail any more, are all final bytes decoded into `result` -- the same bytes on every
member (the owner decodes the very buffer it sent), so the result is bit-identical everywhere.

Error feedback: every member encodes every segment exactly once (at the stage where the
segment passes through it), and `err` receives that encoding's error; the errors of all
members add up to sum(x) - W * result exactly (see feedback.py).

Memory: receive buffers are posted at most LOOKAHEAD messages ahead and returned to the pool
as soon as they were accumulated; a send buffer goes back once its send completed; the final
bytes of the whole tensor (its compressed size) are kept until the end; one fp32 chunk of
scratch for accumulation. The caller's tensor is never handed to gloo.

Failure: a wait that reports a peer failure, an abort or the deadline ends the call: every
pending operation is buried in the graveyard with its buffers and the two link groups, the
step is marked failed (`comm.fail`), `result` and any error-feedback state are untouched.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from lococomm.collectives.abort import done
from lococomm.collectives.call import Call, CallAlgorithm
from lococomm.collectives.hop_codec import HopCodec
from lococomm.collectives.pair_groups import Links
from lococomm.collectives.ring_plan import RingPlan
from lococomm.collectives.stats import Timer
from lococomm.compress.base import derive_seed

log = logging.getLogger(__name__)

LOOKAHEAD_PER_MEMBER = 4  # receives posted ahead: LOOKAHEAD_PER_MEMBER * W messages


class RingRequant(CallAlgorithm):
    """One ring all-reduce call (construct, then `run()`; see the module docstring)."""

    def __init__(self, call: Call, links: Links, hop: HopCodec, plan: RingPlan) -> None:
        super().__init__(call)  # call.state: classic EF residual, call.err: encoding errors
        self.links = links
        self.hop = hop
        self.plan = plan
        self._opts = dist.BroadcastOptions()
        self._opts.rootRank = 0
        self._live: dict[int, torch.Tensor] = {}  # pooled buffers not yet returned
        self._recvs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self._sends: list[tuple[Any, torch.Tensor, bool]] = []  # (work, buffer, recyclable)
        self._finals: dict[tuple[int, int], torch.Tensor] = {}
        self._posted = 0

    # -- buffers ------------------------------------------------------------------------------
    def _get(self, nbytes: int) -> torch.Tensor:
        buf = self.comm.pool.get(nbytes, torch.uint8, self.result.device)
        self._live[id(buf)] = buf
        return buf

    def _put(self, buf: torch.Tensor) -> None:
        if self._live.pop(id(buf), None) is not None:
            self.comm.pool.put(buf)

    # -- protocol -----------------------------------------------------------------------------
    def run(self) -> bool:
        plan, r, w = self.plan, self.comm.rank, self.comm.world_size
        order = plan.order()
        lookahead = LOOKAHEAD_PER_MEMBER * w
        longest = max((b - a for seg in plan.chunks for a, b in seg), default=0)
        acc_buf = self.comm.pool.get(longest, torch.float32, self.result.device)
        deadline = time.monotonic() + self.comm.timeout
        try:
            for i, (j, s) in enumerate(order):
                self._post_until(order, i + lookahead)
                c = plan.sent_segment(r, s)
                a, b = plan.bounds(c, j)
                if a == b:
                    continue
                received = None
                if s >= 1:
                    work, received = self._recvs.pop((j, s - 1))
                    err = self.comm.wait([work], deadline)
                    if err is not None:
                        return self._fail(err, acc_buf)
                if s == 0:
                    buf = self._get(self.hop.message_bytes(b - a))
                    with Timer(self.stats, "encode_seconds"):
                        self._encode(self.x[a:b], a, c, s, buf)
                elif s <= w - 1:
                    buf = self._get(self.hop.message_bytes(b - a))
                    if self.hop.fuses_hop:  # x + D(received), re-encoded in one kernel pass
                        with Timer(self.stats, "encode_seconds"):
                            self._encode(self.x[a:b], a, c, s, buf, received)
                    else:
                        acc = acc_buf[: b - a]
                        with Timer(self.stats, "decode_seconds"):
                            acc.copy_(self.x[a:b])
                            self.hop.accumulate(acc, received)
                        with Timer(self.stats, "encode_seconds"):
                            self._encode(acc, a, c, s, buf)
                    self._put(received)
                    if s == w - 1:
                        self._finals[(c, j)] = buf
                else:
                    buf = received
                    self._finals[(c, j)] = buf
                work = self.links.right.broadcast([buf], self._opts)
                self._works.append(work)
                self._sends.append((work, buf, s < w - 1))
                self.stats.bytes_sent += buf.numel()
                self._recycle_sends()
            self._post_until(order, len(order))
            for (j, s), (work, received) in sorted(self._recvs.items()):
                err = self.comm.wait([work], deadline)
                if err is not None:
                    return self._fail(err, acc_buf)
                self._finals[(plan.received_segment(r, s), j)] = received
            self._recvs.clear()
            err = self.comm.wait([wk for wk, _, _ in self._sends], deadline)
            if err is not None:
                return self._fail(err, acc_buf)
        except Exception as e:  # an encode error (non-finite input) or a gloo error on issue
            log.exception("%s: compressed ring failed", self.description)
            return self._fail(f"{type(e).__name__}: {e}", acc_buf)
        self.comm.pool.put(acc_buf)
        with Timer(self.stats, "decode_seconds"):
            self._decode_finals()
        for buf in list(self._live.values()):
            self._put(buf)
        return True

    def _encode(
        self,
        chunk: torch.Tensor,
        start: int,
        segment: int,
        stage: int,
        out: torch.Tensor,
        received: torch.Tensor | None = None,
    ) -> None:
        end = start + chunk.numel()
        state = self.state[start:end] if self.state is not None else None
        err = self.err[start:end] if self.err is not None else None
        seed = derive_seed(self.seed, segment, stage)
        self.hop.encode(chunk, start, seed, out, state=state, err=err, received=received)

    def _post_until(self, order: list[tuple[int, int]], limit: int) -> None:
        """Post receives from the left link, in issue order, up to message index `limit`."""
        r = self.comm.rank
        while self._posted < min(limit, len(order)):
            j, s = order[self._posted]
            self._posted += 1
            a, b = self.plan.bounds(self.plan.received_segment(r, s), j)
            if a == b:
                continue
            buf = self._get(self.hop.message_bytes(b - a))
            work = self.links.left.broadcast([buf], self._opts)
            self._works.append(work)
            self._recvs[(j, s)] = (work, buf)
            self.stats.bytes_received += buf.numel()

    def _recycle_sends(self) -> None:
        keep = []
        for work, buf, recyclable in self._sends:
            if recyclable and done(work):
                self._put(buf)
            else:
                keep.append((work, buf, recyclable))
        self._sends = keep

    def _decode_finals(self) -> None:
        w = self.comm.world_size
        for (c, j), buf in self._finals.items():
            a, b = self.plan.bounds(c, j)
            self.hop.decode_into(self.result[a:b], buf, w if self.mean else 1)

    def _fail(self, err: str, acc_buf: torch.Tensor) -> bool:
        self.comm.pool.put(acc_buf)
        self.comm.graveyard.bury(self._works, [*self._live.values(), *self.links.groups()])
        self._live.clear()
        self.comm.fail(f"{self.description}: {err}")
        return False


def ring_bytes_sent(hop: HopCodec, plan: RingPlan, rank: int) -> int:
    """Bytes member `rank` sends in the ring of `plan` (pure): every (chunk, stage) message of
    the segment it sends at that stage, empty chunks skipped, as `RingRequant.run` counts."""
    total = 0
    for j, s in plan.order():
        a, b = plan.bounds(plan.sent_segment(rank, s), j)
        if a != b:
            total += hop.message_bytes(b - a)
    return total
