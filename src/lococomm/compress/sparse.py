"""Sparse codecs: TopK (global or chunked), RandK (indices from a shared seed) and SparseLoCo
(chunked top-k with 2-bit values).

Sparse payloads do not "sum well" in a ring (a sum of two top-k sets is not a top-k set): the
collectives all-gather them and every member adds all decoded payloads in rank order
(``decode_accumulate_``), which is bit-identical everywhere. RandK with a shared seed selects
the same indices on every member, so its values can also be all-reduced directly.

Number kept out of n: k = min(n, max(1, floor(ratio * n + 0.5))) (``ops.k_of``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .. import ops
from .base import Codec, numel_of
from .payload import Payload


def _check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return ratio


class TopK(Codec):
    """Largest-magnitude entries: fp32 values + indices (ties go to the lower index).

    ``chunk=None``: global top-k, int32 indices (64 bits per kept entry).
    ``chunk=C`` (<= 65536): top-k of every chunk of C elements, indices stored as offsets from
    the chunk start, uint16 (48 bits per kept entry), or uint8 for C <= 256 (40 bits) -- a
    fixed-size delta coding whose payload size does not depend on the data.
    """

    name = "topk"

    def __init__(self, ratio: float = 0.01, chunk: int | None = None, *, nonfinite: str = "raise"):
        super().__init__(nonfinite=nonfinite)
        self.ratio = _check_ratio(ratio)
        if chunk is not None and not (isinstance(chunk, int) and 1 <= chunk <= 65536):
            raise ValueError(f"chunk must be None or an int in [1, 65536], got {chunk!r}")
        self.chunk = chunk

    def config(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "chunk": self.chunk, "nonfinite": self.nonfinite}

    # k per chunk (full chunks, last chunk) or globally
    def _ks(self, n: int) -> tuple[int, int]:
        if self.chunk is None:
            return ops.k_of(self.ratio, n), 0
        c = self.chunk
        last = n - (max(1, (n + c - 1) // c) - 1) * c
        return ops.k_of(self.ratio, c), ops.k_of(self.ratio, last)

    def kept(self, n: int) -> int:
        """Entries kept out of n."""
        if self.chunk is None:
            return ops.k_of(self.ratio, n)
        kc, kl = self._ks(n)
        return ops.chunked_counts(n, self.chunk, kc, kl)

    def _select(self, tensor, state=None, state_out=None):
        self._check_input(tensor)
        n = tensor.numel()
        if self.chunk is None:
            res = ops.topk(tensor.detach(), self._ks(n)[0], state=state, state_out=state_out)
        elif n == 0:
            empty = torch.zeros(0, dtype=torch.float32)
            res = (empty, torch.zeros(0, dtype=torch.int16), state_out, 0)
        else:
            kc, kl = self._ks(n)
            res = ops.topk_chunked(
                tensor.detach(), self.chunk, kc, kl, state=state, state_out=state_out
            )
        values, indices, s_out, bad = res
        if bad:
            raise ValueError(f"{self.name}.encode: input contains {bad} inf/nan value(s)")
        return values, self._wire_indices(indices), s_out

    @property
    def index_dtype(self) -> torch.dtype:
        """Dtype of the transmitted indices: int32 (global), uint8 for chunks of <= 256
        elements, else int16 holding the uint16 position within the chunk."""
        if self.chunk is None:
            return torch.int32
        return torch.uint8 if self.chunk <= 256 else torch.int16

    def _wire_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The kernels' in-chunk positions (int16) in the wire dtype."""
        return indices.to(torch.uint8) if self.index_dtype == torch.uint8 else indices

    def _kernel_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Wire indices in the int16 the chunked kernels read."""
        return indices.to(torch.int16) if indices.dtype == torch.uint8 else indices

    def encode(self, tensor: torch.Tensor, seed: int = 0) -> Payload:
        values, indices, _ = self._select(tensor)
        return Payload.make(
            self.name, self._shape_meta(tensor.shape, tensor.dtype), [values, indices]
        )

    def encode_feedback(
        self,
        tensor: torch.Tensor,
        state: torch.Tensor,
        seed: int,
        *,
        mode: str,
        state_out: torch.Tensor | None = None,
        warm: torch.Tensor | None = None,
    ) -> tuple[Payload, torch.Tensor]:
        """Classic EF in one fused pass (select on x + e, residual = p minus the selection)."""
        if mode != "ef":
            return super().encode_feedback(tensor, state, seed, mode=mode, state_out=state_out)
        values, indices, s_out = self._select(tensor, state, state_out)
        meta = self._shape_meta(tensor.shape, tensor.dtype)
        return Payload.make(self.name, meta, [values, indices]), s_out

    def global_indices(self, payload: Payload) -> torch.Tensor:
        """int64 flat indices of the payload's values."""
        idx = payload.tensors[1]
        if self.chunk is None:
            return idx.to(torch.int64)
        n = numel_of(payload.meta["shape"])
        if n == 0:
            return torch.zeros(0, dtype=torch.int64, device=idx.device)
        kc, kl = self._ks(n)
        nch = (n + self.chunk - 1) // self.chunk
        counts = torch.full((nch,), kc, dtype=torch.int64)
        counts[-1] = min(kl, n - (nch - 1) * self.chunk)
        base = torch.repeat_interleave(torch.arange(nch, dtype=torch.int64) * self.chunk, counts)
        return base.to(idx.device) + (idx.to(torch.int64) & 0xFFFF)

    def decode(self, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        shape = payload.meta["shape"]
        values = payload.tensors[0]
        out = torch.zeros(numel_of(shape), dtype=torch.float32, device=values.device)
        if self._chunked_kernel(out):
            return self.decode_sum_(out, [payload]).view(shape)
        out[self.global_indices(payload)] = values
        return out.view(shape)

    def decode_accumulate_(self, acc: torch.Tensor, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        if self._chunked_kernel(acc):
            n = acc.numel()
            kc, kl = self._ks(n)
            ops.chunked_sparse_sum(
                acc.view(-1), [self._sparse_parts(payload)], self.chunk, kc, kl, accumulate=True
            )
            return acc
        acc.view(-1).index_add_(0, self.global_indices(payload), payload.tensors[0])
        return acc

    def decode_sum_(
        self, out: torch.Tensor, payloads: Sequence[Payload], divisor: float = 1
    ) -> torch.Tensor:
        """out = (sum of the payloads' decodings, in order) / divisor, fused for chunked
        payloads (one pass over out); out is contiguous fp32."""
        if not self._chunked_kernel(out) or not payloads:
            return super().decode_sum_(out, payloads, divisor)
        for p in payloads:
            self._check_payload(p)
        kc, kl = self._ks(out.numel())
        parts = [self._sparse_parts(p) for p in payloads]
        ops.chunked_sparse_sum(out.view(-1), parts, self.chunk, kc, kl, divisor=divisor)
        return out

    def _chunked_kernel(self, out: torch.Tensor) -> bool:
        """Chunked payloads of a non-empty fp32 contiguous CPU tensor use the fused kernel."""
        return (
            self.chunk is not None
            and out.numel() > 0
            and out.dtype == torch.float32
            and out.is_contiguous()
            and out.device.type == "cpu"
        )

    def _sparse_parts(self, payload: Payload) -> tuple[torch.Tensor, ...]:
        return (payload.tensors[0], self._kernel_indices(payload.tensors[1]))

    def empty_payload(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Payload:
        k = self.kept(numel_of(shape))
        tensors = [torch.empty(k, dtype=torch.float32), torch.empty(k, dtype=self.index_dtype)]
        return Payload.make(self.name, self._shape_meta(shape, dtype), tensors)


class RandK(Codec):
    """k random entries; the indices come from the shared seed and are not transmitted.

    Stratified sampling: entry j of k is drawn uniformly from the j-th of k contiguous, equal
    (+-1) strata, with the counter-based RNG of (seed, j) -- O(k) work, deterministic on every
    member. ``unbiased=True`` scales values by the stratum size (E[decode] = x); the default
    keeps them as they are (a contractive compressor, for use with error feedback).
    The seed travels in the metadata (8 bytes of JSON), never as an index tensor.
    """

    name = "randk"
    shared_seed: ClassVar[bool] = True

    def __init__(self, ratio: float = 0.01, unbiased: bool = False, *, nonfinite: str = "raise"):
        super().__init__(nonfinite=nonfinite)
        self.ratio = _check_ratio(ratio)
        self.unbiased = bool(unbiased)

    def config(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "unbiased": self.unbiased, "nonfinite": self.nonfinite}

    def indices(self, n: int, seed: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 indices, stratum sizes) for a tensor of n elements (computed on the CPU)."""
        k = ops.k_of(self.ratio, n)
        j = torch.arange(k + 1, dtype=torch.int64)
        bounds = (j * n) // max(k, 1)
        start, size = bounds[:-1], bounds[1:] - bounds[:-1]
        r = ops.rng_u32(seed, 0, k)
        return (start + r % size.clamp_min(1)).to(device), size.to(device)

    def encode(self, tensor: torch.Tensor, seed: int = 0) -> Payload:
        self._check_input(tensor)
        self._check_finite(tensor)
        flat = tensor.detach().reshape(-1)
        idx, size = self.indices(flat.numel(), seed, flat.device)
        values = flat[idx].to(torch.float32)
        if self.unbiased:
            values = values * size.to(torch.float32)
        meta = {**self._shape_meta(tensor.shape, tensor.dtype), "seed": int(seed)}
        return Payload.make(self.name, meta, [values])

    def decode(self, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        shape = payload.meta["shape"]
        n = numel_of(shape)
        values = payload.tensors[0]
        out = torch.zeros(n, dtype=torch.float32, device=values.device)
        out[self.indices(n, payload.meta["seed"], values.device)[0]] = values
        return out.view(shape)

    def decode_accumulate_(self, acc: torch.Tensor, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        idx = self.indices(acc.numel(), payload.meta["seed"], acc.device)[0]
        acc.view(-1).index_add_(0, idx, payload.tensors[0])
        return acc

    def empty_payload(
        self, shape: Sequence[int], dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> Payload:
        k = ops.k_of(self.ratio, numel_of(shape))
        meta = {**self._shape_meta(shape, dtype), "seed": int(seed)}
        return Payload.make(self.name, meta, [torch.empty(k, dtype=torch.float32)])


class SparseLoCo(TopK):
    """SparseLoCo-style: chunked top-k, then each kept value in 2 bits.

    Per chunk, magnitudes are quantised to two levels lo = min|v| and hi = max|v| of the kept
    entries (bit 1: level, nearest or seeded-stochastic), bit 0 is the sign; codes are packed
    four per byte. Per kept entry 2 + 16 bits (2 + 8 for chunks of <= 256 elements), plus
    2 scales per chunk (fp32, or bf16 with scale_dtype="bfloat16": the levels are rounded to
    bf16 before they are used, so error feedback stays exact). Bits per parameter: 0.30 with
    the defaults (64 of every 4096), 0.76 for 13 of every 256, 0.75 for 16 of every 256 with
    bf16 scales.
    """

    name = "sparseloco"

    def __init__(
        self,
        ratio: float = 64 / 4096,
        chunk: int = 4096,
        rounding: str = "nearest",
        *,
        scale_dtype: str = "float32",
        nonfinite: str = "raise",
    ):
        if chunk is None:
            raise ValueError("SparseLoCo needs a chunk size")
        super().__init__(ratio, chunk, nonfinite=nonfinite)
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        if scale_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"scale_dtype must be 'float32' or 'bfloat16', got {scale_dtype!r}")
        self.rounding = rounding
        self.scale_dtype = scale_dtype
        self._scale_torch_dtype = getattr(torch, scale_dtype)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "rounding": self.rounding, "scale_dtype": self.scale_dtype}

    def _chunk_ids(self, n: int, device=None) -> torch.Tensor:
        """Chunk number of every kept entry."""
        kc, kl = self._ks(n)
        return ops.reference.chunk_ids(n, self.chunk, kc, kl, device)

    def _encode_parts(self, tensor, seed, state=None, state_out=None):
        self._check_input(tensor)
        n = tensor.numel()
        if n == 0:
            empty = torch.zeros(0, dtype=self._scale_torch_dtype)
            parts = (torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=self.index_dtype), empty)
            return parts, state_out
        kc, kl = self._ks(n)
        codes, indices, scales, s_out, bad = ops.sparseloco_encode(
            tensor.detach(), self.chunk, kc, kl, stochastic=self.rounding == "stochastic",
            seed=seed, state=state, state_out=state_out, bf16_scales=self.scale_dtype == "bfloat16",
        )  # fmt: skip
        if bad:
            raise ValueError(f"{self.name}.encode: input contains {bad} inf/nan value(s)")
        # bf16 scales were rounded before use: the cast is exact
        return (codes, self._wire_indices(indices), scales.to(self._scale_torch_dtype)), s_out

    def _values(self, payload: Payload) -> torch.Tensor:
        codes, _, scales = payload.tensors
        scales = scales.to(torch.float32)
        n = numel_of(payload.meta["shape"])
        kc, kl = self._ks(n)
        return ops.reference.sparseloco_values(codes, scales, n, self.chunk, kc, kl)

    def encode(self, tensor: torch.Tensor, seed: int = 0) -> Payload:
        parts, _ = self._encode_parts(tensor, seed)
        meta = self._shape_meta(tensor.shape, tensor.dtype)
        return Payload.make(self.name, meta, list(parts))

    def encode_feedback(
        self,
        tensor: torch.Tensor,
        state: torch.Tensor,
        seed: int,
        *,
        mode: str,
        state_out: torch.Tensor | None = None,
        warm: torch.Tensor | None = None,
    ) -> tuple[Payload, torch.Tensor]:
        """Classic EF in one fused pass: the residual includes the 2-bit quantisation error."""
        if mode != "ef":
            return Codec.encode_feedback(self, tensor, state, seed, mode=mode, state_out=state_out)
        parts, s_out = self._encode_parts(tensor, seed, state, state_out)
        if s_out is None:  # empty tensor
            s_out = state_out if state_out is not None else state.clone()
        meta = self._shape_meta(tensor.shape, tensor.dtype)
        return Payload.make(self.name, meta, list(parts)), s_out

    def decode(self, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        shape = payload.meta["shape"]
        out = torch.zeros(numel_of(shape), dtype=torch.float32, device=payload.tensors[0].device)
        if self._chunked_kernel(out):
            return self.decode_sum_(out, [payload]).view(shape)
        out[self.global_indices(payload)] = self._values(payload)
        return out.view(shape)

    def decode_accumulate_(self, acc: torch.Tensor, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        if self._chunked_kernel(acc):
            return super().decode_accumulate_(acc, payload)
        acc.view(-1).index_add_(0, self.global_indices(payload), self._values(payload))
        return acc

    def _sparse_parts(self, payload: Payload) -> tuple[torch.Tensor, ...]:
        codes, indices, scales = payload.tensors
        return (codes, self._kernel_indices(indices), scales.to(torch.float32))

    def empty_payload(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Payload:
        n = numel_of(shape)
        k = self.kept(n)
        nch = (n + self.chunk - 1) // self.chunk if n else 0
        tensors = [
            torch.empty((k + 3) // 4, dtype=torch.uint8),
            torch.empty(k, dtype=self.index_dtype),
            torch.empty(2 * nch, dtype=self._scale_torch_dtype),
        ]
        return Payload.make(self.name, self._shape_meta(shape, dtype), tensors)

    def global_indices(self, payload: Payload) -> torch.Tensor:
        idx = payload.tensors[1]
        n = numel_of(payload.meta["shape"])
        return self._chunk_ids(n, idx.device) * self.chunk + (idx.to(torch.int64) & 0xFFFF)
