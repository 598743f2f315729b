"""PowerSGD all-reduce (Vogels et al., 2019): all-reduce P, orthonormalise, all-reduce Q.

With M_r = this member's contribution viewed as m x n (m = first dimension) and Q0 (n x r)
equal on every member:

    P   = sum_r M_r Q0                     all-reduce (sum) of m x r
    P^  = orth(P)                          computed by rank 0, broadcast (m x r)
    Q   = sum_r M_r^T P^                   all-reduce (sum) of n x r
    out = P^ Q^T  (/ W for the mean)       decoded as a fixed-order sum of outer products

P^ is finalised by one member and every member decodes the same bytes of P^ and Q (the
DESIGN's bit-parity rule; a local QR on every member would depend on each one's LAPACK and
thread count). The gloo all-reduces give every member the same reduced bytes.

Warm start: Q0 is the previous step's Q of the same key when the error-feedback object holds
one made in this epoch (equal on every member), else Gaussian from the shared seed of
(epoch, step, tensor). The new Q is staged as the next warm start.

Error feedback: err = M_r - P^ Q_r^T with Q_r = M_r^T P^; summed over members this is exactly
sum_r M_r - P^ Q^T. Tensors with fewer than 2 dims or too small to gain (r (m + n) >= m n)
are all-reduced exactly in fp32 (err = 0).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from lococomm import ops
from lococomm.collectives.call import Call, CallAlgorithm
from lococomm.collectives.finite import check_finite
from lococomm.collectives.stats import Timer
from lococomm.compress.lowrank import PowerSGD, orthonormalize, power_step_p

log = logging.getLogger(__name__)


class PowerSGDAllreduce(CallAlgorithm):
    """One PowerSGD all-reduce call (construct, then `run()`); `warm_out` holds the new Q."""

    def __init__(
        self, call: Call, codec: PowerSGD, shape: tuple[int, ...], warm: torch.Tensor | None = None
    ) -> None:
        super().__init__(call)
        self.codec = codec
        self.shape = shape
        self.warm = warm
        self.warm_out: torch.Tensor | None = None
        self._keep: list[torch.Tensor] = []
        self._deadline = 0.0

    def run(self) -> bool:
        self._deadline = time.monotonic() + self.comm.timeout
        try:
            check_finite(self.codec, self.x)
            low, m, n, r = self.codec._plan(self.shape)
            mat = self._matrix()
            if not low:
                return self._raw(mat)
            return self._lowrank(mat.view(m, n), r)
        except Exception as e:
            log.exception("%s: PowerSGD all-reduce failed", self.description)
            return self._fail(f"{type(e).__name__}: {e}")

    def _matrix(self) -> torch.Tensor:
        """M = x (+ e) as flat fp32; held in err when error feedback is on."""
        if self.err is None:
            return self.x.to(torch.float32)
        if self.state is not None:
            return torch.add(self.x, self.state, out=self.err)
        return self.err.copy_(self.x)

    def _allreduce(self, t: torch.Tensor) -> str | None:
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        work = self.comm.pg.allreduce([t], opts)
        self._works.append(work)
        self._keep.append(t)
        moved = 2 * (self.comm.world_size - 1) * t.numel() * 4 // self.comm.world_size
        self.stats.bytes_sent += moved
        self.stats.bytes_received += moved
        return self.comm.wait([work], self._deadline)

    def _raw(self, mat: torch.Tensor) -> bool:
        buf = mat.clone()
        err = self._allreduce(buf)
        if err is not None:
            return self._fail(err)
        if self.mean:
            buf.div_(self.comm.world_size)
        self.result.copy_(buf)
        if self.err is not None:
            self.err.zero_()
        return True

    def _lowrank(self, mat: torch.Tensor, r: int) -> bool:
        comm = self.comm
        m, n = mat.shape
        q0 = self.warm
        if q0 is None or tuple(q0.shape) != (n, r):
            gen = torch.Generator().manual_seed(self.seed & 0x7FFFFFFFFFFFFFFF)
            q0 = torch.randn(n, r, generator=gen).to(mat.device)
        with Timer(self.stats, "encode_seconds"):
            p = power_step_p(mat, q0).contiguous()
        err = self._allreduce(p)
        if err is not None:
            return self._fail(err)
        if comm.rank == 0:
            with Timer(self.stats, "encode_seconds"):
                p_hat = orthonormalize(p).contiguous()
            self.stats.bytes_sent += p_hat.numel() * 4 * (comm.world_size - 1)
        else:
            p_hat = torch.empty(m, r, dtype=torch.float32, device=mat.device)
            self.stats.bytes_received += p_hat.numel() * 4
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        work = comm.pg.broadcast([p_hat], opts)
        self._works.append(work)
        self._keep.append(p_hat)
        err = comm.wait([work], self._deadline)
        if err is not None:
            return self._fail(err)
        with Timer(self.stats, "encode_seconds"):
            # Q_r = M^T P^, computed as (P^T M)^T: the same product, ~3x faster here than
            # BLAS on the transposed view (every member sums the same all-reduced Q anyway)
            q_own = (p_hat.t() @ mat).t().contiguous()
            q = q_own.clone()
            if self.err is not None:  # M - P^ Q_r^T, in the buffer that holds M
                mat.addmm_(p_hat, q_own.t(), alpha=-1.0)
        err = self._allreduce(q)
        if err is not None:
            return self._fail(err)
        self.warm_out = q.clone()
        with Timer(self.stats, "decode_seconds"):
            if self.mean:
                q.div_(comm.world_size)  # n x r: cheaper than dividing the m x n result
            # P^ Q^T as a fixed-order sum of outer products (element-wise, so the same bits
            # on every member whatever the BLAS or thread count), one pass over the result
            ops.lowrank_product(p_hat, q, self.result.view(m, n))
        return True

    def _fail(self, err: str) -> bool:
        self.comm.graveyard.bury(self._works, self._keep)
        self.comm.fail(f"{self.description}: {err}")
        return False
