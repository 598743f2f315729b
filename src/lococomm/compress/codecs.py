"""The public codec classes (``from lococomm.compress import codecs; codecs.Int8()``).

=============  =========================================  ==============================
codec          wire format                                bits/value (defaults, fp32 in)
=============  =========================================  ==============================
Identity       the tensor                                 32
FP16 / BF16    16-bit floats                              16
FP8E4M3/E5M2   fp8 + fp32 scale per 128                   8.25
Int8           int8 + fp32 scale per 256                  8.125
Int4           packed int4 + fp32 scale per 128           4.25
Int2           packed int2 + fp32 scale per 64            2.5
FP4E3M0        packed 4-bit powers of two + fp32 scale    4.25
               per 128 (Streaming DiLoCo's format)
SignSGD        sign bits + fp32 mean-|x| per 256          1.125
TopK(r)        fp32 values + int32 (or uint16 chunk) idx  64 r (48 r chunked)
RandK(r)       fp32 values; indices from the seed         32 r
SparseLoCo     chunked top-k, 2-bit values, uint16 idx    ~0.30 (r = 1/64)
PowerSGD(k)    fp32 factors P (m x k), Q (n x k)          32 k (m + n) / (m n)
=============  =========================================  ==============================

(plus a few dozen bytes of JSON metadata per payload; ``codec.wire_bytes`` counts them).
"""

from __future__ import annotations

from typing import Any

from .base import Codec
from .choose import choose
from .fp4 import FP4E3M0
from .lowrank import PowerSGD
from .quant import BF16, FP8E4M3, FP8E5M2, FP16, HAS_FP8, BlockQuant, Identity, Int2, Int4, Int8
from .sign import SignSGD
from .sparse import RandK, SparseLoCo, TopK

REGISTRY: dict[str, type[Codec]] = {
    cls.name: cls
    for cls in (
        Identity, FP16, BF16, FP8E4M3, FP8E5M2, Int8, Int4, Int2, FP4E3M0,
        SignSGD, TopK, RandK, SparseLoCo, PowerSGD,
    )
}  # fmt: skip


def from_spec(spec: dict[str, Any]) -> Codec:
    """Rebuilds a codec from ``codec.spec()`` (e.g. received as JSON from another process)."""
    try:
        cls = REGISTRY[spec["name"]]
    except KeyError:
        raise ValueError(f"unknown codec spec {spec!r}") from None
    return cls(**spec.get("config", {}))


__all__ = [
    "BF16",
    "FP4E3M0",
    "FP8E4M3",
    "FP8E5M2",
    "FP16",
    "HAS_FP8",
    "REGISTRY",
    "BlockQuant",
    "Codec",
    "Identity",
    "Int2",
    "Int4",
    "Int8",
    "PowerSGD",
    "RandK",
    "SignSGD",
    "SparseLoCo",
    "TopK",
    "choose",
    "from_spec",
]
