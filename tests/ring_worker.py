"""A worker for the zero-copy exact ring: blocking all-reduces of large, non-uniform tensors.

Every member derives every other member's contribution from seeds (replica id, step, case), so
it checks its own result against the expected one: exactly for integers (and for max/min),
to a tolerance for float sums. It logs, per case, whether the caller's tensor object kept its
identity, whether its storage was swapped (the ring's owned path) and a digest of the result
bytes, which the test compares across members (the ring promises bit-identical results).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys

import numpy as np
import torch

import lococomm as lc
from lococomm.collectives import exact_ring

# (name, dtype, op, layout): layout "owned" (a tensor of its own: storage swapped), "view" (a
# contiguous slice of a larger buffer: copied out), "numpy" (numpy memory: copied out).
CASES = [
    ("f32-sum-owned", torch.float32, "sum", "owned"),
    ("f32-mean-view", torch.float32, "mean", "view"),
    ("f64-max-owned", torch.float64, "max", "owned"),
    ("i64-sum-owned", torch.int64, "sum", "owned"),
    ("bf16-min-owned", torch.bfloat16, "min", "owned"),
    ("f32-sum-numpy", torch.float32, "sum", "numpy"),
]


def contribution(replica: str, step: int, case: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    seed = (int(replica.lstrip("w")) + 1) * 1_000_003 + step * 1009 + case
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.int64:
        return torch.randint(-(1 << 40), 1 << 40, (numel,), generator=gen)
    return torch.randn(numel, generator=gen, dtype=torch.float64).to(dtype)


def expected(members: list[str], step: int, case: int, numel: int, dtype, op: str) -> torch.Tensor:
    parts = [contribution(m, step, case, numel, dtype) for m in members]
    if op in ("max", "min"):
        out = parts[0]
        for p in parts[1:]:
            out = torch.maximum(out, p) if op == "max" else torch.minimum(out, p)
        return out
    wide = torch.int64 if dtype == torch.int64 else torch.float64
    total = torch.stack([p.to(wide) for p in parts]).sum(0)
    return total / len(members) if op == "mean" else total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--replica", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--numel", type=int, default=(4 << 20) + 3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    torch.set_num_threads(1)
    out = open(args.out, "a", buffering=1)
    with lc.Manager(args.coordinator, replica_id=args.replica, timeout=60) as manager:
        while manager.step < args.steps:
            manager.start_step()
            step, rows = manager.step, []
            for index, (name, dtype, op, layout) in enumerate(CASES):
                mine = contribution(args.replica, step, index, args.numel, dtype)
                array = None
                if layout == "owned":
                    tensor = mine.clone()
                elif layout == "view":
                    base = torch.zeros(args.numel + 8, dtype=dtype)
                    tensor = base[4:-4]
                    tensor.copy_(mine)
                else:
                    array = mine.numpy().copy()
                    tensor = torch.from_numpy(array)
                comm = manager.communicator
                took_ring = exact_ring.eligible(comm, tensor)
                identity, pointer = id(tensor), tensor.data_ptr()
                ok = manager.allreduce(tensor, op=op, name=name)
                want = expected(manager.members, step, index, args.numel, dtype, op)
                if dtype == torch.int64 or op in ("max", "min"):
                    error = 0.0 if torch.equal(tensor, want.to(dtype)) else float("inf")
                else:
                    error = float((tensor.to(torch.float64) - want).abs().max())
                rows.append(
                    {
                        "case": name,
                        "ok": bool(ok),
                        "ring": took_ring,
                        "error": error,
                        "same_object": id(tensor) == identity,
                        "swapped": tensor.data_ptr() != pointer,
                        "numpy_agrees": array is None or bool(np.array_equal(array, tensor.numpy())),
                        "digest": hashlib.blake2b(tensor.view(torch.uint8).numpy().tobytes()).hexdigest(),
                    }
                )
            committed = manager.commit()
            out.write(json.dumps({"event": "step", "step": step, "members": manager.members,
                                  "committed": committed, "cases": rows}) + "\n")


if __name__ == "__main__":
    main()
