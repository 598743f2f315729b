"""1-bit codec: SignSGD with a per-block scale (scaled sign, as in EF-SignSGD).

Per block of `block` elements the scale is mean |x| (so decode keeps the block's L1 mass) and
each element sends one bit, x >= 0; decode = +-scale. 1 + 32/block bits per value (1.125 at the
default 256). Biased: use it with error feedback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import ops
from .base import Codec, numel_of
from .payload import Payload

_SHIFTS = torch.arange(8, dtype=torch.int64)


class SignSGD(Codec):
    """Sign bits packed 8 per byte (element 8i in bit 0) + an fp32 mean-|x| scale per block."""

    name = "sign"

    def __init__(self, block: int = 256, *, nonfinite: str = "raise") -> None:
        super().__init__(nonfinite=nonfinite)
        if not isinstance(block, int) or block <= 0:
            raise ValueError(f"block must be a positive int, got {block!r}")
        self.block = block

    def config(self) -> dict[str, Any]:
        return {"block": self.block, "nonfinite": self.nonfinite}

    def encode(self, tensor: torch.Tensor, seed: int = 0) -> Payload:
        self._check_input(tensor)
        self._check_finite(tensor)
        flat = tensor.detach().reshape(-1).to(torch.float32)
        n, b, dev = flat.numel(), self.block, flat.device
        nb = ops.num_blocks(n, b)
        padded = torch.zeros(nb * b, dtype=torch.float32, device=dev)
        padded[:n] = flat
        counts = torch.full((nb,), b, dtype=torch.float32, device=dev)
        if nb:
            counts[-1] = n - (nb - 1) * b
        scales = padded.view(nb, b).abs().sum(1) / counts
        bits = (flat >= 0).to(torch.int64)
        bits = torch.cat([bits, torch.zeros(-n % 8, dtype=torch.int64, device=dev)])
        packed = (bits.view(-1, 8) << _SHIFTS.to(dev)).sum(1).to(torch.uint8)
        meta = self._shape_meta(tensor.shape, tensor.dtype)
        return Payload.make(self.name, meta, [packed, scales])

    def decode(self, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        shape = payload.meta["shape"]
        n = numel_of(shape)
        packed, scales = payload.tensors
        bits = ((packed.to(torch.int64).view(-1, 1) >> _SHIFTS.to(packed.device)) & 1).reshape(-1)[
            :n
        ]
        mag = torch.repeat_interleave(scales, self.block)[:n]
        return torch.where(bits > 0, mag, -mag).view(shape)

    def empty_payload(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Payload:
        n = numel_of(shape)
        tensors = [
            torch.empty((n + 7) // 8, dtype=torch.uint8),
            torch.empty(ops.num_blocks(n, self.block), dtype=torch.float32),
        ]
        return Payload.make(self.name, self._shape_meta(shape, dtype), tensors)
