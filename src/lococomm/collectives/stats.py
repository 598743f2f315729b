"""What one compressed collective cost: wire bytes and where the time went."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CallStats:
    """Per-call measurements, reported in `manager.metrics.compressed`.

    encode_seconds / decode_seconds: compute on the calling thread (encoding, re-encoding and
    error computation / decoding and accumulation). communicate_seconds: the rest of the call's
    wall time, i.e. waiting for the network that was not hidden behind compute.
    """

    algorithm: str = ""
    codec: str = ""
    numel: int = 0
    bytes_sent: int = 0  # payload bytes this member put on the wire
    bytes_received: int = 0
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0
    total_seconds: float = 0.0
    ok: bool = False
    _started: float = field(default_factory=time.perf_counter, repr=False)

    @property
    def communicate_seconds(self) -> float:
        return max(0.0, self.total_seconds - self.encode_seconds - self.decode_seconds)

    def finish(self, ok: bool) -> CallStats:
        self.total_seconds = time.perf_counter() - self._started
        self.ok = ok
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "codec": self.codec,
            "numel": self.numel,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "encode_seconds": self.encode_seconds,
            "communicate_seconds": self.communicate_seconds,
            "decode_seconds": self.decode_seconds,
            "total_seconds": self.total_seconds,
            "ok": self.ok,
        }


class Timer:
    """Adds the elapsed time of a `with` block to one of a CallStats' seconds fields."""

    __slots__ = ("_attr", "_stats", "_t0")

    def __init__(self, stats: CallStats, attr: str) -> None:
        self._stats = stats
        self._attr = attr
        self._t0 = 0.0

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        setattr(self._stats, self._attr, getattr(self._stats, self._attr) + time.perf_counter() - self._t0)


def accumulate(totals: dict[str, Any], stats: CallStats) -> None:
    """Fold one call into cumulative totals (a JSON-able dict; "last" holds the call itself)."""
    d = stats.as_dict()
    totals["calls"] = totals.get("calls", 0) + 1
    for k in ("bytes_sent", "bytes_received"):
        totals[k] = totals.get(k, 0) + d[k]
    for k in ("encode_seconds", "communicate_seconds", "decode_seconds", "total_seconds"):
        totals[k] = totals.get(k, 0.0) + d[k]
    totals["last"] = d
