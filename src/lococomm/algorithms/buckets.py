"""Gradient bucket planning for DataParallel (pure: no tensors, no processes).

Buckets follow *reverse registration order* of the trainable parameters: backward produces
the gradients of the last layers first, so the first bucket fills (and its all-reduce starts)
while the earlier layers are still being differentiated. The first bucket of each dtype is
small (`first_bucket_bytes`, ~1 MB) so communication starts early; later ones grow to
`bucket_bytes`, which amortises per-op latency. A bucket closes as soon as it holds at least
its cap (a parameter is never split, so one larger than the cap gets a bucket of its own).
Parameters of different dtypes or devices never share a bucket.

The plan depends only on the parameters' order, shapes, dtypes and devices and the two caps,
so every member (a joiner too) derives the same buckets in the same order, which keeps the
all-reduces aligned and bucket-keyed codec state (error feedback, PowerSGD) pointing at the
same parameters everywhere. `layout_hash` condenses a plan (plus any configuration that must
match, e.g. the codec) into 62 bits that members compare once per epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_FIRST_BUCKET_BYTES = 1 << 20


@dataclass(frozen=True)
class ParamInfo:
    """What the planner needs to know about one trainable parameter."""

    shape: tuple[int, ...]
    dtype: str  # e.g. "torch.float32"
    device: str  # e.g. "cpu", "cuda:0"
    element_size: int  # bytes

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.element_size


@dataclass(frozen=True)
class BucketSpec:
    """One bucket: parameter indices (into the planner's input) and their flat offsets."""

    index: int
    dtype: str
    device: str
    params: tuple[int, ...]  # in the order they are laid out (reverse registration)
    offsets: tuple[int, ...]  # element offset of each parameter inside the bucket
    numel: int
    element_size: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.element_size


def plan_buckets(
    params: Sequence[ParamInfo],
    bucket_bytes: int,
    first_bucket_bytes: int = DEFAULT_FIRST_BUCKET_BYTES,
) -> list[BucketSpec]:
    """Assign every parameter (given in registration order) to exactly one bucket.

    Returns buckets in launch order: the order in which they close when walking the
    parameters backwards; buckets still open at the end follow, in order of their first
    parameter. Empty parameters (numel 0) are placed like any other (no traffic, no harm).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    if first_bucket_bytes <= 0:
        raise ValueError(f"first_bucket_bytes must be > 0, got {first_bucket_bytes}")
    first_bucket_bytes = min(first_bucket_bytes, bucket_bytes)
    closed: list[tuple[str, str, list[int]]] = []
    open_: dict[tuple[str, str], list[int]] = {}
    filled: dict[tuple[str, str], int] = {}
    caps: dict[tuple[str, str], int] = {}
    for index in reversed(range(len(params))):
        info = params[index]
        key = (info.dtype, info.device)
        members = open_.setdefault(key, [])
        members.append(index)
        filled[key] = filled.get(key, 0) + info.nbytes
        cap = caps.setdefault(key, first_bucket_bytes)
        if filled[key] >= cap:
            closed.append((key[0], key[1], members))
            del open_[key]
            filled[key] = 0
            caps[key] = bucket_bytes
    # Leftovers, ordered by their first (i.e. highest-index) parameter: reverse order again.
    leftovers = sorted(open_.items(), key=lambda item: -item[1][0])
    closed.extend((key[0], key[1], members) for key, members in leftovers)
    buckets = []
    for b, (dtype, device, members) in enumerate(closed):
        offsets, total = [], 0
        for i in members:
            offsets.append(total)
            total += params[i].numel
        buckets.append(
            BucketSpec(
                index=b,
                dtype=dtype,
                device=device,
                params=tuple(members),
                offsets=tuple(offsets),
                numel=total,
                element_size=params[members[0]].element_size,
            )
        )
    return buckets


def layout_hash(
    params: Sequence[ParamInfo], buckets: Sequence[BucketSpec], extra: str = ""
) -> int:
    """62-bit hash of the bucket layout (+ `extra` configuration); equal plans, equal hashes."""
    h = hashlib.blake2b(digest_size=8)
    for bucket in buckets:
        h.update(f"{bucket.dtype}|{bucket.device.split(':')[0]}|{bucket.numel}|".encode())
        for i in bucket.params:
            h.update(f"{i}:{params[i].shape};".encode())
        h.update(b"\n")
    h.update(extra.encode())
    return int.from_bytes(h.digest(), "little") >> 2
