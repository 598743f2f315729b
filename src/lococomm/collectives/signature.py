"""Collective signatures: making sure every member runs the same op on the same shape.

Gloo does not check: a dtype mismatch silently sums garbage and a size mismatch kills the
process from a gloo thread (std::terminate, measured here). So before the data moves, members
exchange a fixed-size header (one tiny all-gather of 7 int64 fields per member; every member
compares all rows, so all of them reach the same verdict and the message names who differs).
Callers that guarantee identical layouts (an algorithm that verified its bucket layout for the
epoch) can skip it; the per-step signature hash in the commit vote still catches any
divergence before a step is applied.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lococomm.collectives.communicator import Communicator

KINDS = {"allreduce": 1, "broadcast": 2, "allgather": 3, "compressed": 4, "transfer": 5}
_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]
# the exact ring appends its stream protocol version and chunk size (exact_ring.PROTOCOL)
FIELD_NAMES = ("kind", "op", "dtype", "numel", "ndim", "shape", "extra", "ring protocol", "ring chunk bytes")


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPES.index(dtype) + 1
    except ValueError:
        raise TypeError(f"dtype {dtype} is not supported by lococomm collectives") from None


def shape_hash(shape: tuple[int, ...]) -> int:
    digest = hashlib.blake2b(repr(tuple(shape)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # 62 bits: stays positive after negation


def describe(kind: str, op: str, name: str, tensor: torch.Tensor) -> str:
    """Human-readable signature, also what the commit vote hashes (e.g. "allreduce(sum) 'g' float32[4, 4]")."""
    label = f" {name!r}" if name else ""
    dtype = str(tensor.dtype).replace("torch.", "")
    return f"{kind}({op}){label} {dtype}{list(tensor.shape)}"


def fields(kind: str, op_code: int, tensor: torch.Tensor, extra: int = 0) -> list[int]:
    return [
        KINDS[kind],
        op_code,
        dtype_code(tensor.dtype),
        tensor.numel(),
        tensor.dim(),
        shape_hash(tuple(tensor.shape)),
        extra,
    ]


class PendingCheck:
    """A signature exchange in flight (`start_check`): the caller may do local work that does
    not depend on the verdict -- the exact all-reduce takes its backup copies -- until
    `done()`, then reads `result()`."""

    def __init__(self, comm: Communicator, description: str, k: int = 0) -> None:
        self.comm = comm
        self.description = description
        self.k = k
        self.work: object | None = None
        self.buffers: list[torch.Tensor] = []
        self.error: str | None = None

    def done(self) -> bool:
        return self.work is None or bool(self.work.is_completed())  # type: ignore[attr-defined]

    def result(self) -> str | None:
        """None if every member has the same fields, else a message naming the fields that
        differ and which ranks hold which value (or why the exchange failed)."""
        if self.error is not None or self.work is None:
            return self.error
        err = self.comm.wait([self.work])
        if err is not None:
            self.comm.graveyard.bury([self.work], self.buffers)
            self.error = f"{self.description}: signature check failed: {err}"
            self.work = None
            return self.error
        self.work = None
        rows = self.buffers[1].cpu().view(self.comm.world_size, self.k).tolist()
        self.error = mismatch_message(self.description, rows, list(range(len(rows))))
        return self.error


def start_check(comm: Communicator, values: list[int], description: str) -> PendingCheck:
    """Start exchanging the header (see `check`)."""
    k = len(values)
    pending = PendingCheck(comm, description, k)
    header = torch.tensor(values, dtype=torch.int64)
    gathered = torch.empty(comm.world_size * k, dtype=torch.int64)
    if comm.device.type != "cpu":
        header, gathered = header.to(comm.device), gathered.to(comm.device)
    pending.buffers = [header, gathered]
    try:
        pending.work = comm.pg._allgather_base(gathered, header)
    except Exception as e:
        pending.error = f"{description}: could not start the signature check: {e}"
    return pending


def check(comm: Communicator, values: list[int], description: str) -> str | None:
    """Exchange the header; None if every member has the same fields, else a message naming
    the fields that differ and which ranks hold which value.

    An all-gather of k int64 per member rather than a MAX all-reduce of fields and negations:
    its latency is lower (0.44 vs 0.61 ms at 2 workers, 3.3 vs 4.9 ms at 4 workers sharing
    2 cores, measured here) and it tells who differs."""
    return start_check(comm, values, description).result()


def mismatch_message(description: str, rows: list[list[int]], ranks: list[int]) -> str | None:
    """None if every row of fields is the same, else the step's failure message naming the
    fields that differ and which of `ranks` (one per row) hold which value."""
    k = len(rows[0]) if rows else 0
    diffs = [_describe_difference(i, [row[i] for row in rows], ranks) for i in range(k)]
    diffs = [d for d in diffs if d]
    if not diffs:
        return None
    return (
        f"{description}: members called mismatched collectives ({'; '.join(diffs)}); "
        "check that every replica runs the same code on the same shapes"
    )


def _describe_difference(field: int, per_rank: list[int], ranks: list[int]) -> str:
    """'' if every rank has the same value, else e.g. "numel 16 on ranks [0, 2], 8 on rank [1]"."""
    if len(set(per_rank)) == 1:
        return ""
    name = FIELD_NAMES[field] if field < len(FIELD_NAMES) else f"field {field}"
    groups: dict[int, list[int]] = {}
    for rank, value in zip(ranks, per_rank):
        groups.setdefault(value, []).append(rank)
    if name == "shape":
        return "shape differs between ranks " + " and ".join(str(r) for r in groups.values())
    if name == "dtype":
        shown = {_dtype_name(v): r for v, r in groups.items()}
    else:
        shown = dict(groups.items())
    parts = [f"{value} on rank{'s' if len(r) > 1 else ''} {r}" for value, r in shown.items()]
    return f"{name} " + ", ".join(parts)


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code - 1]).replace("torch.", "") if 0 < code <= len(_DTYPES) else str(code)
