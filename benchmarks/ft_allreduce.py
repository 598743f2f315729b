"""Fault-tolerant all-reduce vs raw gloo, protocol overhead, and MTTR after SIGKILL / SIGSTOP.

Prints one JSON line per case; every figure comes with its baseline measured in the same run:

    raw       ProcessGroupGloo.allreduce on a plain group (no lococomm), median ms
    manager   Manager step = start_step + allreduce (into the caller's tensor) + commit, median ms
              (raw and manager steps alternate in the same processes)
    ratio     median of per-iteration raw / manager (1.0 = as fast as raw gloo)
    overhead  a step with no collective in it (start_step + commit, unchanged membership:
              the protocol's own cost), median ms, interleaved with the steps above
    around    start_step + commit around the all-reduce in the manager steps: the overhead
              plus waiting in commit for the slowest member to finish its all-reduce (the
              members' finishing times spread by 1-3 ms at 4 members on 2 cores)
    mttr      seconds from the failure to the survivors' next commit, minus a normal step

    .venv/bin/python benchmarks/ft_allreduce.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import lococomm as lc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def paired_worker(
    index: int, world: int, port: int, address: str, numel: int, iters: int, queue: mp.Queue
) -> None:
    """Raw gloo all-reduce and a Manager step, interleaved in the same processes, so that both
    see the same machine load (this box is shared): ratios, not absolute times, are the result."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, index == 0, timeout=timedelta(seconds=60))
    pg = dist.ProcessGroupGloo(dist.PrefixStore("raw", store), index, world, timedelta(seconds=60))
    manager = lc.Manager(address, replica_id=f"p{index}", timeout=60)
    raw_tensor = torch.full((numel,), float(index))
    tensor = torch.full((numel,), float(index))
    raw, steps, overheads, around = [], [], [], []
    for i in range(iters + 3):
        pg.barrier().wait()
        start = time.perf_counter()
        pg.allreduce([raw_tensor]).wait()
        raw_s = time.perf_counter() - start
        pg.barrier().wait()
        start = time.perf_counter()
        manager.start_step()
        started = time.perf_counter()
        manager.allreduce(tensor)
        before_commit = time.perf_counter()
        manager.commit()
        end = time.perf_counter()
        protocol_start = time.perf_counter()
        manager.start_step()
        manager.commit()
        protocol_s = time.perf_counter() - protocol_start
        if i >= 3:  # warm-up: first epoch, buffer pools
            raw.append(raw_s)
            steps.append(end - start)
            around.append((started - start) + (end - before_commit))
            overheads.append(protocol_s)
    queue.put((index, raw, steps, overheads, around))
    manager.close()


def bench_paired(world: int, numel: int, iters: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    with lc.Coordinator(heartbeat_timeout=10.0, initial_workers=world) as coordinator:
        procs = [
            ctx.Process(target=paired_worker, args=(i, world, port, coordinator.address, numel, iters, queue))
            for i in range(world)
        ]
        for p in procs:
            p.start()
        results = dict((r[0], r[1:]) for r in (queue.get(timeout=900) for _ in procs))
        for p in procs:
            p.join(30)
    raw, steps, overheads, around = results[0]
    ratios = [r / s for r, s in zip(raw, steps)]
    return {
        "raw_ms": statistics.median(raw) * 1e3,
        "step_ms": statistics.median(steps) * 1e3,
        "ratio": statistics.median(ratios),
        "overhead_ms": statistics.median(overheads) * 1e3,
        "around_ms": statistics.median(around) * 1e3,
    }


def manager_worker(
    index: int,
    address: str,
    numel: int,
    iters: int,
    queue: mp.Queue,
    kill_at: int,
    stop_at: int,
    event_time: mp.Value,
) -> None:
    torch.set_num_threads(1)
    manager = lc.Manager(address, replica_id=f"b{index}", timeout=30)
    tensor = torch.full((numel,), float(index))
    steps, overheads, commits = [], [], []
    for step in range(iters):
        start = time.perf_counter()
        manager.start_step()
        started = time.perf_counter()
        handle = manager.allreduce(tensor, async_op=True)
        # Shared memory, not the queue: a queue's feeder thread may never flush before the signal.
        if step == kill_at:
            event_time.value = time.time()
            os.kill(os.getpid(), signal.SIGKILL)
        if step == stop_at:
            event_time.value = time.time()
            os.kill(os.getpid(), signal.SIGSTOP)
        handle.wait()
        before_commit = time.perf_counter()
        ok = manager.commit()
        end = time.perf_counter()
        steps.append(end - start)
        overheads.append((started - start) + (end - before_commit))
        commits.append((time.time(), ok))
        tensor.fill_(float(index))
    queue.put(("result", index, steps, overheads, commits))
    manager.close()


def bench_manager(
    world: int, numel: int, iters: int, kill_at: int = -1, stop_at: int = -1, heartbeat: float = 5.0
) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    shared_event = ctx.Value("d", 0.0)
    with lc.Coordinator(heartbeat_timeout=heartbeat, initial_workers=world) as coordinator:
        procs = []
        for i in range(world):
            k = kill_at if i == world - 1 else -1
            s = stop_at if i == world - 1 else -1
            procs.append(
                ctx.Process(
                    target=manager_worker,
                    args=(i, coordinator.address, numel, iters, queue, k, s, shared_event),
                )
            )
        for p in procs:
            p.start()
        expected = world - (1 if kill_at >= 0 or stop_at >= 0 else 0)
        results = {}
        while len(results) < expected:
            item = queue.get(timeout=600)
            results[item[1]] = item[2:]
        event_time = shared_event.value or None
        for p in procs:
            if p.is_alive() and (kill_at >= 0 or stop_at >= 0) and p is procs[-1]:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.join(30)
    steps, overheads, commits = results[0]
    out = {"step_ms": statistics.median(steps[2:]) * 1e3, "overhead_ms": statistics.median(overheads[2:]) * 1e3}
    if event_time is not None:
        after = [t for t, ok in commits if ok and t > event_time]
        out["recovered_s"] = after[0] - event_time if after else None
    return out


def emit(case: dict) -> None:
    print(json.dumps(case), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    iters = 10 if args.quick else 30
    try:
        import torchft  # noqa: F401

        have_torchft = True
    except ImportError:
        have_torchft = False
    for world in (2, 4):
        for numel in (1 << 20, 16 << 20):
            paired = bench_paired(world, numel, iters)
            emit(
                {
                    "case": "allreduce",
                    "world": world,
                    "numel": numel,
                    "dtype": "float32",
                    "raw_gloo_ms": round(paired["raw_ms"], 2),
                    "manager_step_ms": round(paired["step_ms"], 2),
                    "ratio_to_raw": round(paired["ratio"], 3),
                    "protocol_overhead_ms": round(paired["overhead_ms"], 3),
                    "start_commit_around_allreduce_ms": round(paired["around_ms"], 3),
                    "target": "ratio >= 0.9 at 16M, overhead <= 1 ms",
                    "loadavg": round(os.getloadavg()[0], 2),
                    "torchft": "not installed" if not have_torchft else "see torchft case",
                }
            )
    # MTTR: a member dies (SIGKILL) or hangs (SIGSTOP) in the middle of a collective.
    numel = 1 << 20
    normal = bench_manager(3, numel, 15)["step_ms"] / 1e3
    killed = bench_manager(3, numel, 25, kill_at=10)
    emit(
        {
            "case": "mttr_sigkill",
            "world": 3,
            "numel": numel,
            "normal_step_s": round(normal, 4),
            "recovered_s": round(killed["recovered_s"], 4),
            "mttr_beyond_step_s": round(killed["recovered_s"] - normal, 4),
            "target_s": 0.1,
        }
    )
    heartbeat = 1.0
    stopped = bench_manager(3, numel, 25, stop_at=10, heartbeat=heartbeat)
    emit(
        {
            "case": "mttr_sigstop",
            "world": 3,
            "numel": numel,
            "heartbeat_timeout_s": heartbeat,
            "recovered_s": round(stopped["recovered_s"], 4),
            "beyond_heartbeat_s": round(stopped["recovered_s"] - heartbeat, 4),
            "target_beyond_heartbeat_s": 0.3,
        }
    )


if __name__ == "__main__":
    main()
