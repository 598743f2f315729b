"""Payload: what a codec puts on the wire, as plain tensors plus JSON-able metadata (no pickle).

A payload is shipped either as its parts (``meta`` as JSON, ``tensors`` over a process group)
or as one flat uint8 buffer (``to_buffer`` / ``from_buffer``, one collective per payload).
``meta`` describes every tensor (dtype, shape) and depends only on the input's shape/dtype and
the codec's configuration, never on the data: a receiver can allocate buffers from
``codec.empty_payload(shape)`` and ``from_buffer`` needs nothing but the meta and the bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# Wire names of tensor dtypes (torch dtype objects are not JSON).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        DTYPES[_name] = getattr(torch, _name)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be put in a payload") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown payload dtype {name!r}") from None


def canonical_json(obj: Any) -> str:
    """Compact, key-sorted JSON: the form whose length wire_bytes counts."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Payload:
    """An encoded tensor: `codec` name, JSON-able `meta`, and the `tensors` to transmit.

    ``meta["tensors"]`` lists ``[dtype_name, shape]`` of each tensor; other keys are the
    codec's own (original ``shape`` and ``dtype``, seed of RandK, ...).
    """

    codec: str
    meta: Mapping[str, Any]
    tensors: tuple[torch.Tensor, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        specs = self.meta.get("tensors")
        if specs is None or len(specs) != len(self.tensors):
            raise ValueError(f"{self.codec} payload: meta['tensors'] must describe each tensor")
        for i, (t, (dt, shape)) in enumerate(zip(self.tensors, specs)):
            if dtype_name(t.dtype) != dt or list(t.shape) != list(shape):
                raise ValueError(
                    f"{self.codec} payload: tensor {i} is {t.dtype}{list(t.shape)}, "
                    f"meta says {dt}{list(shape)}"
                )

    @staticmethod
    def make(codec: str, meta: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> Payload:
        """Builds a payload, filling meta["tensors"] from the tensors."""
        full = dict(meta)
        full["tensors"] = [[dtype_name(t.dtype), list(t.shape)] for t in tensors]
        return Payload(codec, full, tuple(tensors))

    # -- parts: meta as JSON, tensors over the wire -------------------------------------------
    def to_parts(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """(JSON-able meta including the codec name, list of tensors)."""
        return {"codec": self.codec, **self.meta}, list(self.tensors)

    @classmethod
    def from_parts(cls, meta: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> Payload:
        """Inverse of to_parts; validates the tensors against meta["tensors"]."""
        m = dict(meta)
        codec = m.pop("codec", None)
        if not isinstance(codec, str):
            raise ValueError("payload meta has no codec name")
        return cls(codec, m, tuple(tensors))

    # -- one flat byte buffer -----------------------------------------------------------------
    def to_buffer(self) -> torch.Tensor:
        """All tensors' bytes concatenated into one uint8 tensor (8-byte aligned sections)."""
        parts = []
        for t in self.tensors:
            b = t.detach().contiguous().reshape(-1).view(torch.uint8)
            parts.append(b)
            pad = -b.numel() % 8
            if pad:
                parts.append(torch.zeros(pad, dtype=torch.uint8, device=b.device))
        if not parts:
            return torch.zeros(0, dtype=torch.uint8)
        return torch.cat(parts)

    @classmethod
    def from_buffer(cls, meta: Mapping[str, Any], buf: torch.Tensor) -> Payload:
        """Views a to_buffer() byte buffer as the payload described by meta (no copy)."""
        m = dict(meta)
        codec = m.pop("codec", None)
        if not isinstance(codec, str):
            raise ValueError("payload meta has no codec name")
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise ValueError("payload buffer must be a 1-D uint8 tensor")
        need = buffer_bytes(m)
        if buf.numel() != need:
            raise ValueError(f"{codec} payload buffer has {buf.numel()} bytes, expected {need}")
        tensors, off = [], 0
        for dt, shape in m["tensors"]:
            dtype = dtype_from_name(dt)
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * torch.empty(0, dtype=dtype).element_size()
            tensors.append(buf[off : off + nbytes].view(dtype).view(shape))
            off += nbytes + (-nbytes % 8)
        return cls(codec, m, tuple(tensors))

    # -- sizes --------------------------------------------------------------------------------
    def tensor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def meta_bytes(self) -> int:
        return len(canonical_json(self.to_parts()[0]).encode())

    def nbytes(self) -> int:
        """Exact bytes on the wire: every tensor plus the canonical JSON of the metadata."""
        return self.tensor_bytes() + self.meta_bytes()


def buffer_bytes(meta: Mapping[str, Any]) -> int:
    """Size of the to_buffer() form of a payload with this meta."""
    total = 0
    for dt, shape in meta["tensors"]:
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty(0, dtype=dtype_from_name(dt)).element_size()
        total += nbytes + (-nbytes % 8)
    return total
