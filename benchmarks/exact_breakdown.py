"""Where the exact all-reduce's time goes: chunking and the backup copy, without the Manager.

Raw gloo all-reduces of one 16M fp32 tensor in the same processes, round-robin per iteration:
one call; 2/4/8 chunks issued back to back; the same with a backup copy of each chunk made
just before its op (the kernels' streaming copy, or torch `copy_`), as the exact path does.
Prints one JSON line per world size with the median ms of every case.

    .venv/bin/python benchmarks/exact_breakdown.py --worlds 2 4
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int, port: int, numel: int, iters: int, queue: mp.Queue) -> None:
    from lococomm.ops import _build, kernels

    torch.set_num_threads(1)
    kernel_ok = _build.get("cpu") is not None
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=60))
    pg = dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=60))
    x = torch.ones(numel)
    backup = torch.empty(numel)

    def chunked(count: int, copy: str | None) -> None:
        step = -(-numel // count)
        works = []
        for a in range(0, numel, step):
            if copy == "kernel":
                kernels.cast_encode(x[a : a + step], backup[a : a + step])
            elif copy == "torch":
                backup[a : a + step].copy_(x[a : a + step])
            works.append(pg.allreduce([x[a : a + step]]))
        for work in works:
            work.wait()

    cases = {
        "one_call": lambda: pg.allreduce([x]).wait(),
        "2_chunks": lambda: chunked(2, None),
        "4_chunks": lambda: chunked(4, None),
        "8_chunks": lambda: chunked(8, None),
        **{f"{n}_chunks_torch_copy": (lambda n=n: chunked(n, "torch")) for n in (2, 4, 8, 16)},
    }
    if kernel_ok:
        cases.update({f"{n}_chunks_kernel_copy": (lambda n=n: chunked(n, "kernel")) for n in (2, 4, 8)})
    times: dict[str, list[float]] = {k: [] for k in cases}
    for it in range(iters + 2):
        for name, run in cases.items():
            pg.barrier().wait()
            start = time.perf_counter()
            run()
            if it >= 2:
                times[name].append(time.perf_counter() - start)
    if rank == 0:
        queue.put({k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--numel", type=int, default=1 << 24)
    parser.add_argument("--iters", type=int, default=13)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    for world in args.worlds:
        queue = ctx.Queue()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [ctx.Process(target=worker, args=(r, world, port, args.numel, args.iters, queue)) for r in range(world)]
        for p in procs:
            p.start()
        result = queue.get(timeout=600)
        for p in procs:
            p.join(60)
        base = result["one_call"]
        print(json.dumps({"world": world, "numel": args.numel, "median_ms": result,
                          "vs_one_call": {k: round(v / base, 3) for k, v in result.items()}}), flush=True)


if __name__ == "__main__":
    main()
