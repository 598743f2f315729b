"""Random-k all-reduce: indices from a seed every member shares, an all-reduce of the values.

Every member draws the same k indices (RandK's stratified sampler on the shared seed
derived from (epoch, step, tensor)), so only the k values travel, summed by one exact fp32
all-reduce on the epoch's group (gloo's ring: every member receives the same reduced bytes).
The result is zero outside the indices.

Error feedback: err = p - D(values) with p = x (+ e): p itself off the indices, and at the
indices p - values (zero unless RandK is unbiased, which scales values by the stratum size).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from lococomm.collectives.call import Call, CallAlgorithm
from lococomm.collectives.finite import check_finite
from lococomm.collectives.stats import Timer
from lococomm.compress.sparse import RandK

log = logging.getLogger(__name__)


class RandKAllreduce(CallAlgorithm):
    """One random-k all-reduce call (construct, then `run()`)."""

    def __init__(self, call: Call, codec: RandK) -> None:
        super().__init__(call)
        self.codec = codec

    def run(self) -> bool:
        comm, n = self.comm, self.x.numel()
        works: list[Any] = []
        values = torch.empty(0)
        try:
            with Timer(self.stats, "encode_seconds"):
                idx, size = self.codec.indices(n, self.seed, self.x.device)
                values = self._values(idx, size)
            opts = dist.AllreduceOptions()
            opts.reduceOp = dist.ReduceOp.SUM
            works.append(comm.pg.allreduce([values], opts))
            moved = 2 * (comm.world_size - 1) * values.numel() * 4 // comm.world_size
            self.stats.bytes_sent += moved
            self.stats.bytes_received += moved
            err = comm.wait(works, time.monotonic() + comm.timeout)
            if err is not None:
                return self._fail(err, works, values)
        except Exception as e:
            log.exception("%s: random-k all-reduce failed", self.description)
            return self._fail(f"{type(e).__name__}: {e}", works, values)
        with Timer(self.stats, "decode_seconds"):
            if self.mean:
                values.div_(comm.world_size)
            self.result.zero_()
            self.result[idx] = values
        return True

    def _values(self, idx: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """The k values to send (a private tensor); writes err when error feedback is on."""
        check_finite(self.codec, self.x)
        err = self.err
        if err is None:
            p = self.x
        elif self.state is not None:
            p = torch.add(self.x, self.state, out=err)
        else:
            p = err.copy_(self.x)
        values = p[idx].to(torch.float32)
        if self.codec.unbiased:
            values = values * size.to(torch.float32)
        if err is not None:
            err[idx] = p[idx] - values
        return values

    def _fail(self, err: str, works: list[Any], values: torch.Tensor) -> bool:
        self.comm.graveyard.bury(works, [values])
        self.comm.fail(f"{self.description}: {err}")
        return False
