"""Collective signatures: making sure every member runs the same op on the same shape.

Gloo does not check: a dtype mismatch silently sums garbage and a size mismatch kills the
process from a gloo thread (std::terminate, measured here). So before the data moves, members
exchange a fixed-size header (one tiny int64 MAX all-reduce of the fields and their negations:
equal everywhere iff max == min for every field). Callers that guarantee identical layouts
(an algorithm that verified its bucket layout for the epoch) can skip it; the per-step signature
hash in the commit vote still catches any divergence before a step is applied.
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
FIELD_NAMES = ("kind", "op", "dtype", "numel", "ndim", "shape", "extra")


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


def check(comm: Communicator, values: list[int], description: str) -> str | None:
    """Exchange the header; None if every member has the same fields, else a message."""
    k = len(values)
    header = torch.tensor(values + [-v for v in values], dtype=torch.int64)
    if comm.device.type != "cpu":
        header = header.to(comm.device)
    import torch.distributed as dist

    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    try:
        work = comm.pg.allreduce([header], opts)
    except Exception as e:
        return f"{description}: could not start the signature check: {e}"
    err = comm.wait([work])
    if err is not None:
        comm.graveyard.bury([work], [header])
        return f"{description}: signature check failed: {err}"
    result = header.cpu().tolist()
    highs, lows = result[:k], [-v for v in result[k:]]
    diffs = [
        f"{FIELD_NAMES[i]} {lo}..{hi}" if FIELD_NAMES[i] != "shape" else "shape differs"
        for i, (hi, lo) in enumerate(zip(highs, lows))
        if hi != lo
    ]
    if diffs:
        return (
            f"{description}: members called mismatched collectives ({', '.join(diffs)} across "
            "members); check that every replica runs the same code on the same shapes"
        )
    return None
