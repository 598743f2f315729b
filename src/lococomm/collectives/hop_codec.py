"""One summable codec seen as a wire format for ring hops: fixed-size byte messages.

A hop encodes a flat chunk (optionally plus an error-feedback state) straight into a uint8
message buffer and, when asked, writes the encoding error ``p - D(C(p))`` of that chunk; the
next hop decodes and accumulates the message into an fp32 buffer. Block quantisers use the
fused kernels (`ops.quantize` with mode "ef" gives codes, scales and the error in one pass,
`ops.dequantize(accumulate=True)` the accumulation); casts, FP8 and Identity go through the
codec's own encode_flat/decode. Message sizes depend only on the chunk length and the codec
configuration, so receivers allocate them before the data exists.

Every chunk is encoded as fp32 (contributions in other dtypes are widened first for Identity,
whose wire dtype follows its input) so the sender's and the receiver's sizes always agree.
"""

from __future__ import annotations

from typing import Any

import torch

from lococomm import ops
from lococomm.collectives.finite import check_finite
from lococomm.compress.base import Codec
from lococomm.compress.payload import Payload, buffer_bytes
from lococomm.compress.quant import BF16, FP16, BlockQuant, Identity


class HopCodec:
    """Encode/decode flat chunks of a summable codec into/from uint8 message buffers."""

    def __init__(self, codec: Codec) -> None:
        if not getattr(codec, "summable", False):
            raise TypeError(f"{codec.name} does not sum in a ring (summable is False)")
        self.codec = codec
        self.fused = isinstance(codec, BlockQuant)
        # casts and Identity: the message is the chunk in the wire dtype, cast in place
        self.wire_dtype = {Identity: torch.float32, FP16: torch.float16, BF16: torch.bfloat16}.get(
            type(codec)
        )
        self._metas: dict[int, dict[str, Any]] = {}
        self._zeros = torch.zeros(0, dtype=torch.float32)

    @property
    def fuses_hop(self) -> bool:
        """encode(received=...) decodes, adds and re-encodes in one kernel pass."""
        return self.fused

    def meta(self, numel: int) -> dict[str, Any]:
        """Payload metadata of a chunk of `numel` fp32 elements (cached per length)."""
        meta = self._metas.get(numel)
        if meta is None:
            meta = self.codec.empty_payload((numel,), torch.float32).to_parts()[0]
            self._metas[numel] = meta
        return meta

    def message_bytes(self, numel: int) -> int:
        """Size in bytes of the message carrying a chunk of `numel` elements."""
        return buffer_bytes(self.meta(numel))

    def encode(
        self,
        x: torch.Tensor,
        start: int,
        seed: int,
        out: torch.Tensor,
        state: torch.Tensor | None = None,
        err: torch.Tensor | None = None,
        received: torch.Tensor | None = None,
    ) -> None:
        """Encode p = x (+ state) into `out`; if `err` is given write p - D(C(p)) into it.

        x: 1-D chunk (fp32/fp16/bf16); start: its offset in the whole tensor (for block and
        random-number indexing); state/err: fp32 chunks of the same length or None.
        received: a message of the same chunk from the previous hop, added first: p = (x +
        D(received)) (+ state) -- for block quantisers in the same kernel pass (`fuses_hop`).
        """
        n = x.numel()
        if received is not None and not self.fuses_hop:
            acc = x.to(torch.float32, copy=True)
            self.accumulate(acc, received)
            x = acc
            received = None
        if self.fused:
            codec = self.codec
            assert isinstance(codec, BlockQuant)
            if err is not None and state is None:
                state = self._zero_state(n)
            codes, scales, _, bad = ops.quantize(
                x,
                codec.bits,
                codec.block,
                stochastic=codec.rounding == "stochastic",
                seed=seed,
                index_offset=start,
                propagate=codec.nonfinite == "propagate",
                state=state if err is not None else None,
                state_out=err,
                mode="ef" if err is not None else "plain",
                base=None if received is None else tuple(self.payload(received, n).tensors),
            )
            if bad and codec.nonfinite == "raise":
                codec._raise_bad(bad)
            self._write(out, (codes, scales))
            return
        if self.wire_dtype is not None:
            self._encode_cast(x, out, state, err)
            return
        p = x.to(torch.float32)
        if state is not None:
            p = p + state
        payload = self.codec.encode_flat(p, seed, index_offset=start)
        if err is not None:
            torch.sub(p, self.codec.decode(payload).reshape(-1), out=err)
        self._write(out, payload.tensors)

    def _encode_cast(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        state: torch.Tensor | None,
        err: torch.Tensor | None,
    ) -> None:
        """Identity/FP16/BF16: cast p = x (+ state) straight into the message buffer."""
        n = x.numel()
        wire = self._wire(out, n)
        if state is not None:
            p = torch.add(x, state, out=err) if err is not None else x + state
        else:
            p = x
        check_finite(self.codec, p)
        wire.copy_(p)  # round to nearest even, as the codec's .to()
        fp16_raise = self.codec.nonfinite == "raise" and self.wire_dtype == torch.float16
        if fp16_raise and not bool(torch.isfinite(wire.sum(dtype=torch.float32))):
            self.codec.encode_flat(p.to(torch.float32))  # overflow: raises the codec's error
        if err is not None:
            torch.sub(p, wire, out=err)

    def _wire(self, message: torch.Tensor, n: int) -> torch.Tensor:
        assert self.wire_dtype is not None
        size = torch.empty(0, dtype=self.wire_dtype).element_size()
        return message[: n * size].view(self.wire_dtype)

    def accumulate(self, acc: torch.Tensor, message: torch.Tensor) -> None:
        """acc += D(message); acc is a contiguous fp32 chunk."""
        if self.wire_dtype is not None:
            acc.add_(self._wire(message, acc.numel()))
            return
        self.codec.decode_accumulate_(acc, self.payload(message, acc.numel()))

    def decode_into(self, out: torch.Tensor, message: torch.Tensor, divisor: int = 1) -> None:
        """out = D(message) / divisor; out is a contiguous fp32 chunk.

        Block quantisers fold the division into their per-block scales (one pass instead of
        two); the result is then code * (scale / divisor), computed alike on every member.
        """
        if self.wire_dtype is not None:
            out.copy_(self._wire(message, out.numel()))
        elif self.fused:
            codec = self.codec
            assert isinstance(codec, BlockQuant)
            codes, scales = self.payload(message, out.numel()).tensors
            if divisor != 1:
                scales = scales / divisor
                divisor = 1
            ops.dequantize(codes, scales, out.numel(), codec.bits, codec.block, out=out)
        else:
            out.copy_(self.codec.decode(self.payload(message, out.numel())).reshape(-1))
        if divisor != 1:
            out.div_(divisor)

    def payload(self, message: torch.Tensor, numel: int) -> Payload:
        return Payload.from_buffer(self.meta(numel), message)

    def _zero_state(self, n: int) -> torch.Tensor:
        if self._zeros.numel() < n:
            self._zeros = torch.zeros(n, dtype=torch.float32)
        return self._zeros[:n]

    @staticmethod
    def _write(out: torch.Tensor, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> None:
        """Lay tensors out as Payload.to_buffer does (8-byte aligned sections)."""
        off = 0
        for t in tensors:
            b = t.reshape(-1).view(torch.uint8)
            out[off : off + b.numel()].copy_(b)
            off += b.numel() + (-b.numel() % 8)
        if off != out.numel():
            raise ValueError(f"message of {out.numel()} bytes, payload needs {off}")
