"""Time to heal a joiner vs state size, against raw gloo broadcast of the same bytes.

For each state kind and size two up-to-date members hold a state (`make_state`: a plain dict
with one big fp32 tensor, or a model with its AdamW state); a third, fresh member joins and is
healed (metadata, chunked transfer, per-chunk checksums, load; both members run on this one
host, so one of them streams: `healing.stream_sources` spreads over hosts). The
baseline is a plain ProcessGroupGloo broadcast of the nominal size from one process to one
other (the joiner's side of the transfer), measured in the same run: before each heal a fresh
pair of processes broadcasts 3 times (interleaved with the heals, so a noisy minute hits both).
`ratio_to_raw` compares the medians' achieved GB/s against the pairs' 2nd and 3rd broadcasts
(warm), `ratio_to_raw_best` the bests' (min over runs): a single 10 MB transfer here varies 2-10
ms from run to run (the model_adam state is within 1 % of the nominal size).
`raw_broadcast_first_s` / `ratio_to_raw_first`: the pairs' first broadcasts (a heal is always
its joiner's first transfer; gloo's first broadcast is not measurably slower than its next).
`raw_broadcast_fresh_s` / `ratio_to_raw_fresh`: the same broadcast into memory the receiver has
never written, what a joiner lacking part of the state
(e.g. AdamW's moments) receives into.

`heal_s` is the joiner's heal from its epoch group being ready to the state loaded (the heal
groups rendezvous and the metadata is published while the epoch group forms, so they are not
in it); `heal_from_plan_s` counts from the epoch plan's arrival, epoch group rendezvous
included; `phases_ms` splits the joiner's heal (metadata wait, heal-group wait, transfer,
checksum verification, load).

    .venv/bin/python benchmarks/heal.py [--sizes-mb 10 100 1000] [--states blob model_adam]
        [--hosts one|distinct] [--repeats 3] [--chaos SPEC|none]
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import socket
import statistics
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

import lococomm as lc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_broadcast(rank: int, world: int, port: int, nbytes: int, iterations: int, queue: mp.Queue) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=120))
    pg = dist.ProcessGroupGloo(dist.PrefixStore("bcast", store), rank, world, timedelta(seconds=120))
    data = torch.ones(nbytes // 4)
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    times = []
    for _ in range(iterations):
        pg.barrier().wait()
        start = time.perf_counter()
        pg.broadcast([data], opts).wait()
        times.append(time.perf_counter() - start)
    # The same into memory the receiver has never written (what a joiner lacking the state,
    # e.g. optimizer moments, receives into): a new buffer each time, allocated untimed.
    fresh_times = []
    for _ in range(iterations):
        # an anonymous mapping of its own: malloc could hand back memory freed a moment ago
        region = None if rank == 0 else mmap.mmap(-1, nbytes // 4 * 4)
        target = data if region is None else torch.frombuffer(region, dtype=torch.float32)
        pg.barrier().wait()
        start = time.perf_counter()
        pg.broadcast([target], opts).wait()
        fresh_times.append(time.perf_counter() - start)
        del target, region
    queue.put((rank, times, fresh_times))


def make_state(kind: str, nbytes: int, index: int) -> dict:
    """The replicated state of member `index` (index 2 is the joiner).

    blob: one big fp32 tensor in a plain dict (received in place, through staging) plus a
    small model. model_adam: a training state, a stack of 1024 x 1024 linear layers holding a
    third of the bytes and AdamW's two moments the other two thirds; the sources have taken a
    step, the joiner has no optimizer state yet (like a fresh worker)."""
    if kind == "blob":
        return {"blob": {"data": torch.full((nbytes // 4,), float(index))}, "model": torch.nn.Linear(64, 64)}
    layers = max(1, round(nbytes / 3 / (1024 * 1025 * 4)))
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if index < 2:
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"model": model, "opt": opt}


def heal_member(index: int, address: str, kind: str, nbytes: int, steps: int, queue: mp.Queue) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lococomm.ft.healing").setLevel(logging.INFO)
    torch.set_num_threads(1)
    if os.environ.get("HEAL_BENCH_HOSTS") == "distinct":  # each member on a loopback address of its own
        os.environ["LOCOCOMM_GLOO_HOST"] = f"127.0.0.{index + 1}"
    state = make_state(kind, nbytes, index)
    manager = lc.Manager(address, replica_id=f"m{index}", timeout=120, state=state, parity_every=0)
    while manager.step < steps:
        manager.start_step()
        manager.commit()
        if index == 2 and manager.metrics.heal_seconds:
            m = manager.metrics
            queue.put(("healed", m.heal_seconds, m.heal_bytes, m.heal_from_plan_seconds, m.heal_phases))
            break
        time.sleep(0.01)
    manager.close()


def heal_once(kind: str, nbytes: int, queue: mp.Queue, ctx: Any) -> tuple:
    """One joiner healed from two members; (heal_s, bytes, heal_from_plan_s, phases)."""
    with lc.Coordinator(heartbeat_timeout=10.0, initial_workers=2) as coordinator:
        members = [
            ctx.Process(target=heal_member, args=(i, coordinator.address, kind, nbytes, 10_000, queue))
            for i in range(2)
        ]
        for p in members:
            p.start()
        while coordinator.snapshot()["committed"] < 3:
            time.sleep(0.05)
        joiner = ctx.Process(target=heal_member, args=(2, coordinator.address, kind, nbytes, 10_000, queue))
        joiner.start()
        _, seconds, moved, from_plan, phases = queue.get(timeout=900)
        for p in members + [joiner]:
            p.terminate()
            p.join(30)
    return seconds, moved, from_plan, phases


def raw_pair(nbytes: int, warm: int, ctx: Any, queue: mp.Queue) -> tuple[float, list[float], list[float]]:
    """One fresh pair of processes: (its first broadcast, `warm` more into the same memory,
    1 + warm into never-written memory), seconds; an iteration ends when both ranks are done."""
    port = _free_port()
    procs = [ctx.Process(target=raw_broadcast, args=(r, 2, port, nbytes, 1 + warm, queue)) for r in range(2)]
    for p in procs:
        p.start()
    per_rank = [queue.get(timeout=600)[1:] for _ in procs]
    for p in procs:
        p.join()
    times = [max(ts) for ts in zip(*(r[0] for r in per_rank))]
    fresh = [max(ts) for ts in zip(*(r[1] for r in per_rank))]
    return times[0], times[1:], fresh


def bench(kind: str, nbytes: int, repeats: int) -> dict:
    """`repeats` heals (each a fresh job), each after a fresh pair of raw-broadcast processes
    (interleaved, so a noisy minute hits both): ratios of medians (typical) and of bests (min
    over runs). The warm baseline is a pair's broadcasts after its first (2 per pair); a heal
    is always its joiner's first transfer, so the pairs' first broadcasts are reported too."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    first_times: list[float] = []
    raw_times: list[float] = []
    fresh_times: list[float] = []
    heals = []
    for _ in range(repeats):
        first, warm, fresh = raw_pair(nbytes, 2, ctx, queue)
        first_times.append(first)
        raw_times += warm
        fresh_times += fresh
        heals.append(heal_once(kind, nbytes, queue, ctx))
    heal_times = [h[0] for h in heals]
    moved = heals[0][1]
    heal_s, raw_s = statistics.median(heal_times), statistics.median(raw_times)
    best_heal, best_raw = min(heal_times), min(raw_times)
    median_run = heals[heal_times.index(sorted(heal_times)[len(heal_times) // 2])]
    return {
        "case": "heal",
        "state": kind,
        "state_mb": round(moved / 1e6, 1),
        "repeats": repeats,
        "heal_s": round(heal_s, 4),
        "heal_gbps": round(moved / heal_s / 1e9, 3),
        "raw_broadcast_mb": round(nbytes / 1e6, 1),
        "raw_broadcast_s": round(raw_s, 4),
        "raw_broadcast_gbps": round(nbytes / raw_s / 1e9, 3),
        # achieved GB/s of the heal over that of the raw broadcast
        "ratio_to_raw": round((moved / heal_s) / (nbytes / raw_s), 3),
        "ratio_to_raw_best": round((moved / best_heal) / (nbytes / best_raw), 3),
        # against the first broadcast of a fresh process pair (a heal is its joiner's first
        # transfer)
        "raw_broadcast_first_s": round(statistics.median(first_times), 4),
        "ratio_to_raw_first": round((moved / heal_s) / (nbytes / statistics.median(first_times)), 3),
        # against a raw broadcast into never-written memory (context for a fresh joiner)
        "raw_broadcast_fresh_s": round(statistics.median(fresh_times), 4),
        "ratio_to_raw_fresh": round((moved / heal_s) / (nbytes / statistics.median(fresh_times)), 3),
        "heal_s_all": [round(t, 4) for t in heal_times],
        "raw_broadcast_s_all": [round(t, 4) for t in raw_times],
        "raw_broadcast_first_s_all": [round(t, 4) for t in first_times],
        "bytes_received": moved,
        "target_ratio": 0.8,
        # from the epoch plan's arrival: + the epoch group's rendezvous, which every epoch
        # change pays and which the heal groups' rendezvous and the metadata overlap
        "heal_from_plan_s": round(median_run[2], 4),
        "phases_ms": median_run[3],
    }


def chaos_mttr(spec: str, steps: int) -> list[dict]:
    """MTTR of each chaos event type under `lococomm run` (examples/train_ft.py, 4 workers)."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        summary_path = Path(tmp) / "summary.json"
        subprocess.run(
            [sys.executable, "-m", "lococomm.cli.main", "run", "--workers", "4", "--quiet",
             "--heartbeat-timeout", "1", "--chaos", spec, "--summary-json", str(summary_path),
             str(root / "examples" / "train_ft.py"), "--steps", str(steps)],
            check=True, capture_output=True, timeout=1200,
        )  # fmt: skip
        summary = json.loads(summary_path.read_text())
    return [
        {
            "case": "chaos_mttr",
            "event": e["event"],
            "kind": e["event"].split("@")[0].split()[0],
            "mttr_s": None if e["mttr"] is None else round(e["mttr"], 3),
            "member_again_s": None if e["rejoined_after"] is None else round(e["rejoined_after"], 3),
            "heartbeat_timeout_s": 1.0,
        }
        for e in summary["events"]
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--states", nargs="+", choices=["blob", "model_adam"], default=["blob", "model_adam"])
    parser.add_argument("--repeats", type=int, default=3, help="heals per size, each after a fresh raw-broadcast pair")
    parser.add_argument("--chaos", default="kill:1@40,stop:2@80-100,join@130,coordinator-restart@170,leave:3@210")
    parser.add_argument("--chaos-steps", type=int, default=250)
    parser.add_argument(
        "--hosts",
        choices=["one", "distinct"],
        default="one",
        help="distinct: each heal member on a loopback address of its own, as on separate hosts "
        "(a large state is then spread over both sources)",
    )
    args = parser.parse_args()
    os.environ["HEAL_BENCH_HOSTS"] = args.hosts
    for kind in args.states:
        for mb in args.sizes_mb:
            line = bench(kind, int(mb * 1e6) // 4 * 4, args.repeats)
            print(json.dumps({**line, "hosts": args.hosts}), flush=True)
    if args.chaos != "none":
        for line in chaos_mttr(args.chaos, args.chaos_steps):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
