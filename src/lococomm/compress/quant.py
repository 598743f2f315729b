"""Dense codecs: Identity, casts (FP16, BF16), block-scaled FP8 and block-absmax Int8/Int4/Int2.

All of them "sum well" (``summable = True``): a ring reduce-scatter can split a flat fp32 tensor
into chunks at multiples of ``codec.align`` elements, and at each hop do

    payload = codec.encode_flat(chunk, seed, index_offset=start)   # start % align == 0
    codec.decode_accumulate_(acc, payload)                         # acc += D(payload), fused

Encoding a chunk with ``index_offset=start`` yields exactly the bytes of the corresponding slice
of the whole tensor's encoding (blocks and random numbers are indexed globally), so the result
does not depend on how a tensor is chunked. Same input bytes + same seed -> same output bytes
on every process and backend.

Block quantiser maths (per block of ``block`` elements, qmax = 2^(bits-1) - 1):
scale = absmax / qmax, q = round_half_even(x * qmax / absmax) or floor(x * qmax / absmax + u)
(stochastic, unbiased, u from the counter-based RNG of (seed, index)), decode = q * scale.
Int4/Int2 codes are packed two's complement, element 2i (4i) in the low bits of a byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .. import ops
from .base import INPUT_DTYPES, Codec, numel_of
from .payload import Payload, dtype_from_name

ROUNDINGS = ("nearest", "stochastic")


class _Dense(Codec):
    """Shared flat-chunk API of the summable codecs."""

    summable: ClassVar[bool] = True
    can_propagate: ClassVar[bool] = True

    @property
    def align(self) -> int:
        """Chunk boundaries for encode_flat must be multiples of this many elements."""
        return 1

    def encode_flat(self, flat: torch.Tensor, seed: int = 0, *, index_offset: int = 0) -> Payload:
        """Encodes a 1-D chunk; index_offset = its start in the whole tensor (multiple of align)."""
        if flat.dim() != 1:
            raise ValueError(f"{self.name}.encode_flat: expected a 1-D tensor, got {flat.dim()}-D")
        if index_offset % self.align:
            raise ValueError(
                f"{self.name}.encode_flat: index_offset {index_offset} not a multiple of {self.align}"
            )
        return self._encode(flat, seed, index_offset)

    def encode(self, tensor: torch.Tensor, seed: int = 0) -> Payload:
        return self._encode(tensor, seed, 0)

    def _encode(self, tensor: torch.Tensor, seed: int, index_offset: int) -> Payload:
        raise NotImplementedError


class Identity(_Dense):
    """No compression: the tensor itself (copied). decode returns the input dtype, exactly."""

    name = "identity"

    def _encode(self, tensor: torch.Tensor, seed: int, index_offset: int) -> Payload:
        self._check_input(tensor, (*INPUT_DTYPES, torch.float64))
        self._check_finite(tensor)
        data = tensor.detach().contiguous().clone().reshape(-1)
        return Payload.make(self.name, self._shape_meta(tensor.shape, tensor.dtype), [data])

    def decode(self, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        return payload.tensors[0].clone().view(payload.meta["shape"])

    def decode_accumulate_(self, acc: torch.Tensor, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        acc.view(-1).add_(payload.tensors[0])
        return acc

    def empty_payload(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Payload:
        data = torch.empty(numel_of(shape), dtype=dtype)
        return Payload.make(self.name, self._shape_meta(shape, dtype), [data])


class _Cast(_Dense):
    """Element-wise cast to a 16-bit float; decode to fp32 (exact widening)."""

    wire_dtype: ClassVar[torch.dtype]

    def _encode(self, tensor: torch.Tensor, seed: int, index_offset: int) -> Payload:
        self._check_input(tensor)
        data = tensor.detach().reshape(-1).to(self.wire_dtype, copy=True)
        if self.nonfinite == "raise" and data.numel() and not bool(torch.isfinite(data).all()):
            self._check_finite(tensor)  # raises if the input itself was inf/nan
            big = float(tensor.detach().abs().max())
            raise ValueError(
                f"{self.name}.encode: |x| up to {big:.3g} overflows {self.wire_dtype} "
                f"(max {torch.finfo(self.wire_dtype).max:.3g}); use BF16 or a scaled codec"
            )
        return Payload.make(self.name, self._shape_meta(tensor.shape, tensor.dtype), [data])

    def decode(self, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        return payload.tensors[0].to(torch.float32).view(payload.meta["shape"])

    def decode_accumulate_(self, acc: torch.Tensor, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        acc.view(-1).add_(payload.tensors[0])  # mixed-dtype add: computed in fp32, no temporary
        return acc

    def empty_payload(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Payload:
        data = torch.empty(numel_of(shape), dtype=self.wire_dtype)
        return Payload.make(self.name, self._shape_meta(shape, dtype), [data])


class FP16(_Cast):
    """IEEE half. Overflow (|x| > 65504) raises, or becomes inf with nonfinite='propagate'."""

    name = "fp16"
    wire_dtype = torch.float16


class BF16(_Cast):
    """bfloat16 (fp32 range, 8-bit mantissa): round to nearest even."""

    name = "bf16"
    wire_dtype = torch.bfloat16


class _BlockScaled(_Dense):
    """Per-block scale + codes; blocks are aligned to `block` elements."""

    default_block: ClassVar[int] = 256

    def __init__(
        self, block: int | None = None, rounding: str = "nearest", *, nonfinite: str = "raise"
    ) -> None:
        super().__init__(nonfinite=nonfinite)
        block = self.default_block if block is None else block
        if not isinstance(block, int) or block <= 0:
            raise ValueError(f"{type(self).__name__}: block must be a positive int, got {block!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.block = block
        self.rounding = rounding

    def _finite_blocks(
        self, tensor: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flat fp32 input, zero-padded (blocks, block) view, per-block all-finite mask,
        per-block absmax with 0 for non-finite blocks); raises on inf/nan when
        nonfinite="raise". The torch-side start of the block-scaled float encoders."""
        self._check_input(tensor)
        flat = tensor.detach().reshape(-1).to(torch.float32)
        n, b = flat.numel(), self.block
        nb = ops.num_blocks(n, b)
        padded = torch.zeros(nb * b, dtype=torch.float32, device=flat.device)
        padded[:n] = flat
        blocks = padded.view(nb, b)
        finite = torch.isfinite(blocks).all(1)
        bad = int((~finite).sum())
        if bad and self.nonfinite == "raise":
            self._raise_bad(bad)
        return flat, blocks, finite, blocks.abs().amax(1).masked_fill(~finite, 0.0)

    @property
    def align(self) -> int:
        return self.block

    def config(self) -> dict[str, Any]:
        return {"block": self.block, "rounding": self.rounding, "nonfinite": self.nonfinite}

    def _raise_bad(self, bad: int) -> None:
        raise ValueError(
            f"{self.name}.encode: {bad} block(s) contain inf/nan; fix the input or build the "
            "codec with nonfinite='propagate' (those blocks then decode as NaN)"
        )


class BlockQuant(_BlockScaled):
    """Block-absmax symmetric integer quantiser (see module docstring). Base of Int8/4/2.

    nonfinite='propagate': a block holding inf/nan gets scale NaN and decodes as all-NaN.
    """

    bits: ClassVar[int] = 8

    def _meta(self, shape: Sequence[int], dtype: torch.dtype) -> dict[str, Any]:
        return self._shape_meta(shape, dtype)

    def _encode(self, tensor: torch.Tensor, seed: int, index_offset: int) -> Payload:
        self._check_input(tensor)
        codes, scales, _, bad = ops.quantize(
            tensor.detach(),
            self.bits,
            self.block,
            stochastic=self.rounding == "stochastic",
            seed=seed,
            index_offset=index_offset,
            propagate=self.nonfinite == "propagate",
        )
        if bad and self.nonfinite == "raise":
            self._raise_bad(bad)
        return Payload.make(self.name, self._meta(tensor.shape, tensor.dtype), [codes, scales])

    def decode(self, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        shape = payload.meta["shape"]
        codes, scales = payload.tensors
        return ops.dequantize(codes, scales, numel_of(shape), self.bits, self.block).view(shape)

    def decode_accumulate_(self, acc: torch.Tensor, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        codes, scales = payload.tensors
        if acc.dtype != torch.float32 or not acc.is_contiguous():
            raise ValueError(f"{self.name}.decode_accumulate_: acc must be contiguous float32")
        ops.dequantize_accumulate_(acc.view(-1), codes, scales, self.bits, self.block)
        return acc

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
        """One fused pass: codes, scales and the new EF state (see Codec.encode_feedback)."""
        self._check_input(tensor)
        codes, scales, s_out, bad = ops.quantize(
            tensor.detach(),
            self.bits,
            self.block,
            stochastic=self.rounding == "stochastic",
            seed=seed,
            propagate=self.nonfinite == "propagate",
            state=state,
            state_out=state_out,
            mode=mode,
        )
        if bad and self.nonfinite == "raise":
            self._raise_bad(bad)
        payload = Payload.make(self.name, self._meta(tensor.shape, tensor.dtype), [codes, scales])
        return payload, s_out

    def empty_payload(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Payload:
        n = numel_of(shape)
        code_dtype = torch.int8 if self.bits == 8 else torch.uint8
        codes = torch.empty(ops.packed_bytes(n, self.bits), dtype=code_dtype)
        scales = torch.empty(ops.num_blocks(n, self.block), dtype=torch.float32)
        return Payload.make(self.name, self._meta(shape, dtype), [codes, scales])


class Int8(BlockQuant):
    """int8 codes in [-127, 127], one fp32 scale per 256 elements: 8.125 bits/value."""

    name = "int8"
    bits = 8
    default_block = 256


class Int4(BlockQuant):
    """int4 codes in [-7, 7] packed two per byte, scale per 128: 4.25 bits/value."""

    name = "int4"
    bits = 4
    default_block = 128


class Int2(BlockQuant):
    """int2 codes in {-1, 0, 1} packed four per byte, scale per 64: 2.5 bits/value."""

    name = "int2"
    bits = 2
    default_block = 64


class _FP8(_BlockScaled):
    """Block-scaled FP8: scale = absmax / fp8_max per block, codes = fp8(x * fp8_max / absmax)
    (round to nearest even by the torch cast), decode = codes * scale. Reference (torch) only.

    nonfinite='propagate': a block holding inf/nan decodes as all-NaN (as BlockQuant).
    """

    default_block = 128
    wire_dtype: ClassVar[str]

    def __init__(
        self, block: int | None = None, rounding: str = "nearest", *, nonfinite: str = "raise"
    ) -> None:
        if rounding != "nearest":
            raise ValueError(f"{type(self).__name__} supports rounding='nearest' only")
        super().__init__(block, rounding, nonfinite=nonfinite)
        self._dtype = dtype_from_name(self.wire_dtype)
        self._max = float(torch.finfo(self._dtype).max)

    def _encode(self, tensor: torch.Tensor, seed: int, index_offset: int) -> Payload:
        flat, blocks, finite, absmax = self._finite_blocks(tensor)
        n = flat.numel()
        top = torch.tensor(self._max, dtype=torch.float32, device=flat.device)
        scales = torch.div(absmax, top).masked_fill(~finite, float("nan"))
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        inv = torch.where(absmax > 0, torch.div(top, safe), torch.zeros_like(absmax))
        v = torch.where(finite[:, None], blocks * inv[:, None], torch.zeros_like(blocks))
        codes = v.reshape(-1)[:n].clamp(-self._max, self._max).to(self._dtype)
        return Payload.make(
            self.name, self._shape_meta(tensor.shape, tensor.dtype), [codes, scales]
        )

    def _values(self, payload: Payload) -> torch.Tensor:
        codes, scales = payload.tensors
        n = codes.numel()
        return codes.to(torch.float32) * torch.repeat_interleave(scales, self.block)[:n]

    def decode(self, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        return self._values(payload).view(payload.meta["shape"])

    def decode_accumulate_(self, acc: torch.Tensor, payload: Payload) -> torch.Tensor:
        self._check_payload(payload)
        acc.view(-1).add_(self._values(payload))
        return acc

    def empty_payload(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Payload:
        n = numel_of(shape)
        codes = torch.empty(n, dtype=self._dtype)
        scales = torch.empty(ops.num_blocks(n, self.block), dtype=torch.float32)
        return Payload.make(self.name, self._shape_meta(shape, dtype), [codes, scales])


class FP8E4M3(_FP8):
    """float8_e4m3fn codes (3 mantissa bits, max 448) + fp32 scale per 128: 8.25 bits/value."""

    name = "fp8e4m3"
    wire_dtype = "float8_e4m3fn"


class FP8E5M2(_FP8):
    """float8_e5m2 codes (2 mantissa bits, max 57344) + fp32 scale per 128: 8.25 bits/value."""

    name = "fp8e5m2"
    wire_dtype = "float8_e5m2"


HAS_FP8 = hasattr(torch, "float8_e4m3fn") and hasattr(torch, "float8_e5m2")
