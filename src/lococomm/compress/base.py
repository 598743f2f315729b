"""The codec contract and helpers shared by all codecs.

A codec is a stateless, configured object:

* ``encode(tensor, seed=0) -> Payload`` and ``decode(payload) -> Tensor`` (same shape; float32
  unless the codec documents otherwise, e.g. Identity returns the input dtype);
* ``wire_bytes(payload)``: exact bytes on the wire (tensors + canonical JSON metadata);
* ``name`` and a JSON-able ``config()``; ``spec()`` = {"name", "config"} lets two processes check
  they use the same codec, and ``codecs.from_spec`` rebuilds one;
* ``empty_payload(shape, dtype)``: receive buffers of the right sizes (meta never depends on data);
* ``decode_accumulate_(acc, payload)``: ``acc += decode(payload)`` (fused for quantisers);
  ``decode_sum_(out, payloads, divisor)``: ``out = sum(decode(p)) / divisor`` (fused for
  chunked sparse codecs).

Inputs: any shape, float32/float16/bfloat16, contiguous or not, empty allowed. Non-finite
inputs (inf/nan) raise ``ValueError`` unless the codec was built with
``nonfinite="propagate"`` (supported by Identity, the casts and the block quantisers, where a
non-finite value decodes as non-finite, see each class). ``shared_seed`` codecs (RandK) need
every member to pass the same seed; for others the seed only drives stochastic rounding, and
callers may mix the rank into it.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .payload import Payload, dtype_name

INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NONFINITE_MODES = ("raise", "propagate")


class Codec(abc.ABC):
    """Base class of all codecs (see the module docstring for the contract)."""

    name: ClassVar[str] = "codec"
    #: every member must encode with the same seed (indices derived from it)
    shared_seed: ClassVar[bool] = False
    #: supports encode_flat / decode_accumulate_ on chunks aligned to `align` (ring reduce)
    summable: ClassVar[bool] = False
    #: nonfinite="propagate" is meaningful for this codec
    can_propagate: ClassVar[bool] = False

    def __init__(self, *, nonfinite: str = "raise") -> None:
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if nonfinite == "propagate" and not self.can_propagate:
            raise ValueError(f"{type(self).__name__} cannot propagate inf/nan; use 'raise'")
        self.nonfinite = nonfinite

    # -- identity -----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-able configuration: equal configs encode identically."""
        return {"nonfinite": self.nonfinite}

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and self.spec() == other.spec()

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.config().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # -- contract -----------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, tensor: torch.Tensor, seed: int = 0) -> Payload:
        """Encodes `tensor`; `seed` drives any randomness (stochastic rounding, random-k)."""

    @abc.abstractmethod
    def decode(self, payload: Payload) -> torch.Tensor:
        """Decodes to a tensor of the encoded shape (float32 unless documented)."""

    @abc.abstractmethod
    def empty_payload(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Payload:
        """A payload with uninitialised tensors of the sizes encode(shape, dtype) produces."""

    def wire_bytes(self, payload: Payload) -> int:
        """Exact bytes this payload puts on the wire (tensors + canonical JSON metadata)."""
        return payload.nbytes()

    def decode_accumulate_(self, acc: torch.Tensor, payload: Payload) -> torch.Tensor:
        """acc += decode(payload) in fp32; acc must have the payload's number of elements."""
        self._check_payload(payload)
        d = self.decode(payload)
        if acc.numel() != d.numel():
            raise ValueError(f"{self.name}: acc has {acc.numel()} elements, payload {d.numel()}")
        acc.view(-1).add_(d.reshape(-1).to(acc.dtype))
        return acc

    def decode_sum_(
        self, out: torch.Tensor, payloads: Sequence[Payload], divisor: float = 1
    ) -> torch.Tensor:
        """out = (decode(p0) + decode(p1) + ...) / divisor: zero, accumulate every payload in
        order, then divide (skipped when 1). Sparse codecs fuse it into one pass over out."""
        out.zero_()
        for payload in payloads:
            self.decode_accumulate_(out, payload)
        if divisor != 1:
            out.div_(divisor)
        return out

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
        """Encode with an error-feedback state (flat fp32); used by compress.error_feedback.

        mode "ef":   p = x + e;  send C(p);  e' = p - D(C(p))
        mode "ef21": p = x - h;  send C(p);  h' = h + D(C(p))
        Returns (payload, new state) and never modifies `state` unless state_out is state.
        Quantisers and top-k override this with one fused kernel pass.
        """
        flat = tensor.reshape(-1).to(torch.float32)
        p = flat + state if mode == "ef" else flat - state
        payload = self._encode_warm(p.view(tensor.shape), seed, warm)
        d = self.decode(payload).reshape(-1)
        new = p - d if mode == "ef" else state + d
        if state_out is None:
            return payload, new
        state_out.copy_(new)
        return payload, state_out

    def _encode_warm(self, tensor: torch.Tensor, seed: int, warm: torch.Tensor | None) -> Payload:
        return self.encode(tensor, seed)

    def warm_state(self, payload: Payload) -> torch.Tensor | None:
        """State to carry into the next encode of the same tensor (PowerSGD's Q), if any."""
        return None

    # -- helpers ------------------------------------------------------------------------------
    def _check_input(self, tensor: torch.Tensor, dtypes: tuple = INPUT_DTYPES) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{self.name}.encode: expected a torch.Tensor, got {type(tensor)}")
        if tensor.dtype not in dtypes:
            names = "/".join(dtype_name(d) for d in dtypes)
            raise TypeError(f"{self.name}.encode: unsupported dtype {tensor.dtype} (use {names})")

    def _check_finite(self, tensor: torch.Tensor) -> None:
        """Raises on inf/nan when nonfinite='raise' (one extra read of the input)."""
        if self.nonfinite == "raise" and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"{self.name}.encode: input contains {bad} inf/nan value(s); "
                "fix the input or build the codec with nonfinite='propagate' where supported"
            )

    def _check_payload(self, payload: Payload) -> None:
        if not isinstance(payload, Payload):
            raise TypeError(f"{self.name}.decode: expected a Payload, got {type(payload)}")
        if payload.codec != self.name:
            raise ValueError(f"{self.name}.decode: payload was encoded by {payload.codec!r}")

    @staticmethod
    def _shape_meta(tensor_shape: Sequence[int], dtype: torch.dtype) -> dict[str, Any]:
        return {"shape": [int(s) for s in tensor_shape], "dtype": dtype_name(dtype)}


def numel_of(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


_MASK64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integers, e.g. derive_seed(epoch, step, tensor_id, chunk).

    Order-sensitive, deterministic across processes and Python versions (no hash()).
    """
    h = 0x243F6A8885A308D3
    for p in parts:
        if not isinstance(p, int) or isinstance(p, bool):
            raise TypeError(f"seed parts must be ints, got {type(p).__name__}")
        h = _splitmix64(h ^ (p & _MASK64))
    return h
