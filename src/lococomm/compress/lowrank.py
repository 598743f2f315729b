"""PowerSGD low-rank codec (Vogels et al., 2019) and its building blocks.

A tensor of shape (d0, d1, ...) is viewed as an m x n matrix M (m = d0). One power-iteration
step from Q0 (n x r): P = orth(M Q0), Q = M^T P; the payload is (P, Q) and decode = P Q^T, the
best rank-r approximation along the current subspace. Warm start: pass the previous Q of the
same tensor as Q0 (``ErrorFeedback`` does this per key through ``warm_state``), which makes
successive steps a subspace iteration; without it Q0 is Gaussian from the seed.

Tensors with fewer than 2 dims, or too small to gain (r (m + n) >= m n), are sent raw.

Decoding sums r outer products element-wise in a fixed order instead of calling a GEMM, so the
bytes decoded on every member are bit-identical whatever BLAS or thread count. For the
distributed variant that all-reduces the factors (issue 5), ``power_step_p``/``orthonormalize``/
``power_step_q`` are the pure steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import ops
from .base import Codec, numel_of
from .payload import Payload


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of p (m x r, r <= m), via reduced QR."""
    return torch.linalg.qr(p, mode="reduced").Q


def power_step_p(m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P = M Q (before orthonormalisation; all-reduce this in the distributed variant)."""
    return m @ q


def power_step_q(m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Q = M^T P with P orthonormal."""
    return m.t() @ p


def lowrank_product(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P Q^T as a fixed-order sum of outer products (deterministic on every backend; fused
    kernel `ops.lowrank_product` for fp32 CPU factors)."""
    if p.dtype == torch.float32 and q.dtype == torch.float32 and p.device.type == "cpu":
        return ops.lowrank_product(p, q)
    out = p[:, 0:1] * q[:, 0]
    for j in range(1, p.shape[1]):
        out += p[:, j : j + 1] * q[:, j]
    return out


class PowerSGD(Codec):
    """Rank-`rank` PowerSGD compression (fp32 factors); see the module docstring."""

    name = "powersgd"

    def __init__(self, rank: int = 4, *, nonfinite: str = "raise") -> None:
        super().__init__(nonfinite=nonfinite)
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        self.rank = rank

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "nonfinite": self.nonfinite}

    def _plan(self, shape: Sequence[int]) -> tuple[bool, int, int, int]:
        """(low-rank?, m, n, r) for a tensor shape."""
        numel = numel_of(shape)
        if len(shape) < 2 or numel == 0:
            return False, numel, 1, 0
        m = int(shape[0])
        n = numel // m
        r = min(self.rank, m, n)
        return r * (m + n) < m * n, m, n, r

    def encode(self, tensor: torch.Tensor, seed: int = 0) -> Payload:
        return self._encode_warm(tensor, seed, None)

    def _encode_warm(self, tensor: torch.Tensor, seed: int, warm: torch.Tensor | None) -> Payload:
        self._check_input(tensor)
        self._check_finite(tensor)
        low, m, n, r = self._plan(tensor.shape)
        meta = self._shape_meta(tensor.shape, tensor.dtype)
        if not low:
            data = tensor.detach().reshape(-1).to(torch.float32, copy=True)
            return Payload.make(self.name, {**meta, "mode": "raw"}, [data])
        # contiguous: BLAS rounds a transposed operand differently, and the bytes must not
        # depend on the caller's memory layout
        mat = tensor.detach().reshape(m, n).to(torch.float32).contiguous()
        if warm is not None and tuple(warm.shape) == (n, r):
            q0 = warm
        else:
            gen = torch.Generator().manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
            q0 = torch.randn(n, r, generator=gen).to(mat.device)
        p = orthonormalize(power_step_p(mat, q0))
        q = power_step_q(mat, p)
        return Payload.make(self.name, {**meta, "mode": "lowrank"}, [p.contiguous(), q])

    def decode(self, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        shape = payload.meta["shape"]
        if payload.meta["mode"] == "raw":
            return payload.tensors[0].clone().view(shape)
        p, q = payload.tensors
        return lowrank_product(p, q).view(shape)

    def warm_state(self, payload: Payload) -> torch.Tensor | None:
        return payload.tensors[1].clone() if payload.meta.get("mode") == "lowrank" else None

    def empty_payload(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Payload:
        low, m, n, r = self._plan(shape)
        meta = self._shape_meta(shape, dtype)
        if not low:
            return Payload.make(self.name, {**meta, "mode": "raw"}, [torch.empty(numel_of(shape))])
        tensors = [torch.empty(m, r), torch.empty(n, r)]
        return Payload.make(self.name, {**meta, "mode": "lowrank"}, tensors)
