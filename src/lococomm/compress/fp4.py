"""FP4 E3M0: 4-bit codes on a power-of-two grid, block-scaled (Streaming DiLoCo's outer-gradient
format). Reference (torch) implementation; summable like the other block quantisers.

Per block of ``block`` elements: scale = absmax (fp32). A code is 1 sign bit (bit 3) and a
3-bit exponent k (bits 0-2) with no mantissa: k = 0 is zero, k = 1..7 is the magnitude
2^(k - 7) * scale, i.e. {0, 1/64, 1/32, 1/16, 1/8, 1/4, 1/2, 1} of the block's absmax.
Rounding between the two neighbouring levels of |x| / scale is to the nearest (ties up) or
seeded-stochastic (unbiased), with the counter-based RNG indexed by the element's global index
(``index_offset`` + i), so encoding a block-aligned chunk gives exactly that slice of the whole
tensor's encoding. Codes are packed two per byte, element 2i in the low nibble.
4 + 32 / block bits per value (4.25 at the default block of 128).

Compared with Int4 (uniform grid, 15 levels) the grid is logarithmic: small entries of a block
keep a relative precision of about 1/3 instead of being rounded to zero, large ones are
coarser. nonfinite="propagate": a block holding inf/nan gets scale NaN and decodes as all-NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops
from .base import numel_of
from .payload import Payload
from .quant import _BlockScaled

MIN_EXPONENT = -6  # smallest non-zero level: 2^-6 of the block's absmax
LEVELS = torch.tensor([0.0] + [2.0**e for e in range(MIN_EXPONENT, 1)], dtype=torch.float32)


def encode_magnitudes(v: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """Exponent codes k in [0, 7] (int64) of magnitudes v in [0, 1] (pure).

    u: uniform [0, 1) numbers for stochastic rounding (None: nearest, ties up).
    """
    _, exponent = torch.frexp(v)  # v = m * 2^exponent with m in [0.5, 1)
    lo_k = (exponent + 6).clamp(0, 7)  # level 2^(exponent - 1) has k = exponent + 6
    below = v < LEVELS[1]
    lo = torch.where(below, torch.zeros_like(v), torch.ldexp(torch.ones_like(v), exponent - 1))
    lo_k = torch.where(below, torch.zeros_like(lo_k), lo_k)
    hi = torch.where(below, torch.full_like(v, float(LEVELS[1])), lo * 2)
    frac = torch.where(hi > lo, (v - lo) / (hi - lo), torch.zeros_like(v))
    up = frac >= 0.5 if u is None else u < frac
    return (lo_k + up.to(lo_k.dtype)).clamp(0, 7)


class FP4E3M0(_BlockScaled):
    """Block-scaled FP4 E3M0 (see the module docstring): 4.25 bits/value by default."""

    name = "fp4e3m0"
    default_block = 128

    def _encode(self, tensor: torch.Tensor, seed: int, index_offset: int) -> Payload:
        flat, blocks, finite, absmax = self._finite_blocks(tensor)
        n = flat.numel()
        scales = absmax.masked_fill(~finite, float("nan"))
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        v = (blocks.abs() / safe[:, None]).masked_fill(~finite[:, None], 0.0).reshape(-1)[:n]
        v = v.clamp(0.0, 1.0)  # guards the division's last-ulp rounding
        u = None
        if self.rounding == "stochastic":
            u = (ops.rng_u32(seed, index_offset, n) >> 8).to(flat.device, torch.float32) * 2.0**-24
        k = encode_magnitudes(v, u)
        code = k | ((flat < 0) & (k > 0)).to(torch.int64) << 3
        pad = torch.zeros(n % 2, dtype=torch.int64, device=flat.device)
        pairs = torch.cat([code, pad]).view(-1, 2)
        packed = (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)
        return Payload.make(self.name, self._shape_meta(tensor.shape, tensor.dtype), [packed, scales])

    def _values(self, payload: Payload) -> torch.Tensor:
        packed, scales = payload.tensors
        n = numel_of(payload.meta["shape"])
        p = packed.to(torch.int64)
        code = torch.stack([p & 15, p >> 4], 1).reshape(-1)[:n]
        mag = LEVELS.to(scales.device)[code & 7]
        signed = torch.where((code & 8) > 0, -mag, mag)
        return signed * torch.repeat_interleave(scales, self.block)[:n]

    def decode(self, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        return self._values(payload).view(payload.meta["shape"])

    def decode_accumulate_(self, acc: torch.Tensor, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        acc.view(-1).add_(self._values(payload))
        return acc

    def empty_payload(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Payload:
        n = numel_of(shape)
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
        scales = torch.empty(ops.num_blocks(n, self.block), dtype=torch.float32)
        return Payload.make(self.name, self._shape_meta(shape, dtype), [packed, scales])
