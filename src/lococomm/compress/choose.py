"""Pick the fastest codec for a link and tensor size within an error budget (measured costs).

    codec = lc.codecs.choose(link_gbps=1.0, tensor_bytes=64 << 20, max_error=0.01)
    manager.allreduce(t, op="mean", codec=codec)   # codec None: the exact fp32 all-reduce wins

Model of one all-reduce of `tensor_bytes` of fp32 over `world` members on a link of
`link_gbps` (each member's own bandwidth, as with one NIC per host behind a switch):

    seconds    = compute_seconds_per_gb * tensor_bytes / 1e9 + wire_bytes * 8 / (link_gbps * 1e9)
    wire_bytes = payload * 2 (W - 1) / W    (ring, all-reduce of values/factors)
               = payload * (W - 1)          (all-gather of payloads)
    payload    = tensor_bytes * bits_per_param / 32

compute_seconds_per_gb is the measured encode + decode time of the compressed all-reduce
(`manager.metrics.compressed`) in benchmarks/compressed_allreduce.py (16M fp32, 2 members,
1 Gbit/s, one thread per worker on this 2-vCPU machine; docs/compressed_collectives.md);
rel_error is one encoding's relative L2 error on Gaussian data (docs/compression.md). The
exact fp32 all-reduce is modelled as pure wire time. On other machines compute costs scale
with the CPU: pass your own `costs` (e.g. from a benchmark run there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .base import Codec


@dataclass(frozen=True)
class CodecCost:
    """Measured cost of one codec in the compressed all-reduce (see the module docstring)."""

    label: str
    spec: dict[str, Any] | None  # codec spec; None is the exact fp32 all-reduce
    bits_per_param: float
    rel_error: float
    compute_seconds_per_gb: float  # encode + decode + bookkeeping per GB of fp32 input
    allgather: bool = False  # payloads all-gathered (W - 1 copies) instead of a ring

    def seconds(self, link_gbps: float, tensor_bytes: int, world: int = 2) -> float:
        """Predicted seconds of one all-reduce (pure)."""
        payload = tensor_bytes * self.bits_per_param / 32
        copies = (world - 1) if self.allgather else 2 * (world - 1) / world
        wire = payload * copies * 8 / (link_gbps * 1e9)
        return self.compute_seconds_per_gb * tensor_bytes / 1e9 + wire


# encode + decode seconds per GB measured in the 1 Gbit/s, 2-member run recorded in
# docs/compressed_collectives.md (best of 9, one thread per worker, 2-vCPU VM; after the
# kernel work of that page: native bf16, fused top-k / SparseLoCo / ring hops).
MEASURED: tuple[CodecCost, ...] = (
    CodecCost("fp32", None, 32.0, 0.0, 0.0),
    CodecCost("bf16", {"name": "bf16", "config": {}}, 16.000, 0.0017, 0.385),
    CodecCost("int8", {"name": "int8", "config": {}}, 8.125, 0.007, 0.415),
    CodecCost("int4", {"name": "int4", "config": {}}, 4.250, 0.1173, 0.472),
    CodecCost("int2", {"name": "int2", "config": {}}, 2.500, 0.7175, 0.565),
    CodecCost("topk1%", {"name": "topk", "config": {"ratio": 0.01, "chunk": 4096}}, 0.481, 0.9568, 0.337, allgather=True),
    CodecCost("sparseloco", {"name": "sparseloco", "config": {}}, 0.297, 0.9393, 0.637, allgather=True),
    CodecCost("randk1%", {"name": "randk", "config": {"ratio": 0.01}}, 0.320, 0.995, 0.402),
)  # fmt: skip


def choose(
    link_gbps: float,
    tensor_bytes: int,
    max_error: float = 0.01,
    *,
    world: int = 2,
    costs: tuple[CodecCost, ...] = MEASURED,
) -> Codec | None:
    """The codec predicted fastest with rel. error <= max_error; None if exact fp32 wins.

    link_gbps: each member's link speed in Gbit/s; tensor_bytes: size of the fp32 tensor;
    max_error: budget on one encoding's relative L2 error (with error feedback the errors
    are fed back, so larger budgets are usable; 0.01 admits bf16/int8, 0.15 int4).
    """
    if not (isinstance(link_gbps, int | float) and link_gbps > 0 and math.isfinite(link_gbps)):
        raise ValueError(f"link_gbps must be a positive number, got {link_gbps!r}")
    if not isinstance(tensor_bytes, int) or tensor_bytes < 0:
        raise ValueError(f"tensor_bytes must be a non-negative int, got {tensor_bytes!r}")
    if not max_error >= 0:
        raise ValueError(f"max_error must be >= 0, got {max_error!r}")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if world == 1 or tensor_bytes == 0:
        return None  # nothing travels
    allowed = [c for c in costs if c.rel_error <= max_error]
    best = min(allowed, key=lambda c: c.seconds(link_gbps, tensor_bytes, world))
    if best.spec is None:
        return None
    from .codecs import from_spec

    return from_spec(best.spec)
