"""How much gradient communication DataParallel hides behind backward, vs torch DDP.

    sudo .venv/bin/python benchmarks/overlap.py --batch 1024 --pin   # JSON lines on stdout
    .venv/bin/python benchmarks/overlap.py --links loopback          # no root needed

Results and their reading: docs/data_parallel.md. `--pin` puts worker i (all its threads) on
core i, the setting that works best on a 2-core machine (same doc).

Model: 8 x nn.Linear(1024, 1024) (~32 MiB of fp32 gradients), loss = mean(out^2) on a random
batch; 2 workers, `--threads` compute threads each (default 1). Every case runs in the same
two worker processes, one after the other, so baselines and candidates share the machine's
state (this 2-core box is shared and noisy: compare ratios, not absolute times):

    compute      zero_grad + forward + backward, no communication          -> T_compute
    comm-fp32    one gloo all_reduce of the 32 MiB gradient vector          -> T_comm (fp32)
    comm-int8    manager.allreduce(flat, codec=Int8) incl. start/commit     -> T_comm (int8)
    serial       backward, then one all_reduce of the flattened gradients (+ copy back)
    ddp          torch DistributedDataParallel, gloo, default buckets (25 MB, first 1 MB)
    lc-*         lococomm DataParallel: start_step, zero_grad, forward, backward, finish,
                 commit (no optimizer update in any case); exact or Int8, bucket size, overlap

Reported per case (JSON line): median (and quartiles) over repetitions of the slowest
member's step time, exposed communication (T_step - T_compute) / T_comm (with T_comm of the
case's wire format), step / max(T_compute, T_comm), and speed-up over DDP, each from the
medians and, as `*_paired`, as the median over rounds of the same ratio within one round
(the cases of a round run back to back, so this cancels load drifting between rounds).

Links: "loopback" (127.0.0.1) and "1gbit": each worker in its own network namespace behind a
veth pair on a bridge, `tc tbf rate 1gbit` on both ends (netem is absent here). Namespaces are `lcdp<i>`, the bridge
`lcdpbr0` (10.78.0.0/24); they are removed at exit. Needs root for the emulated link.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BRIDGE = "lcdpbr0"
SUBNET = "10.78.0"
TOKEN = "lococomm-overlap-bench"
WORLD = 2
LINKS = {"loopback": None, "1gbit": 1.0}
# (case, kind, options) in run order; lc-* cases build a DataParallel with `options`.
CASES = [
    ("compute", "compute", {}),
    ("comm-fp32", "comm", {}),
    ("comm-int8", "comm", {"codec": "int8"}),
    ("serial", "serial", {}),
    ("ddp", "ddp", {}),
    ("lc-exact", "lc", {"bucket_mb": 25}),
    ("lc-exact-b4", "lc", {"bucket_mb": 4}),
    ("lc-exact-no-overlap", "lc", {"bucket_mb": 25, "overlap": False}),
    ("lc-int8", "lc", {"bucket_mb": 25, "codec": "int8"}),
    ("lc-int8-b4", "lc", {"bucket_mb": 4, "codec": "int8"}),
    ("lc-int8-ef-b4", "lc", {"bucket_mb": 4, "codec": "int8", "ef": True}),
    ("lc-int8-no-overlap", "lc", {"bucket_mb": 4, "codec": "int8", "overlap": False}),
]


# ----------------------------------------------------------------------------- network
def _run(cmd: str) -> None:
    subprocess.run(cmd.split(), check=True, capture_output=True)


def _quiet(cmd: str) -> None:
    subprocess.run(cmd.split(), check=False, capture_output=True)


def teardown() -> None:
    for i in range(WORLD):
        _quiet(f"ip netns del lcdp{i}")
    _quiet(f"ip link del {BRIDGE}")


def setup(gbps: float) -> list[str]:
    """Bridge + one namespace per worker, tbf at `gbps` on both veth ends; worker addresses."""
    teardown()
    atexit.register(teardown)
    _run(f"ip link add {BRIDGE} type bridge")
    _run(f"ip addr add {SUBNET}.1/24 dev {BRIDGE}")
    _run(f"ip link set {BRIDGE} up")
    rate = f"{int(gbps * 1000)}mbit"
    burst = f"{max(64, int(gbps * 1e9 / 8 / 100 / 1024))}kb"  # 10 ms of traffic, >= 64 KiB
    tbf = f"root tbf rate {rate} burst {burst} latency 200ms"
    addresses = []
    for i in range(WORLD):
        ns = f"lcdp{i}"
        _run(f"ip netns add {ns}")
        _run(f"ip link add lcdpv{i} type veth peer name eth0 netns {ns}")
        _run(f"ip link set lcdpv{i} master {BRIDGE}")
        _run(f"ip link set lcdpv{i} up")
        _run(f"ip netns exec {ns} ip addr add {SUBNET}.{10 + i}/24 dev eth0")
        _run(f"ip netns exec {ns} ip link set eth0 up")
        _run(f"ip netns exec {ns} ip link set lo up")
        _run(f"ip netns exec {ns} tc qdisc add dev eth0 {tbf}")
        _run(f"tc qdisc add dev lcdpv{i} {tbf}")
        addresses.append(f"{SUBNET}.{10 + i}")
    return addresses


# ----------------------------------------------------------------------------- worker side
def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    import lococomm as lc
    from lococomm.algorithms.data_parallel import DataParallel

    torch.set_num_threads(args.threads)
    rank = args.index
    if args.pin:  # worker i (and all its threads: compute, gloo, comm) on core i
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    dist.init_process_group(
        "gloo", init_method=f"tcp://{args.master}:{args.port}", rank=rank, world_size=WORLD
    )
    manager = lc.Manager(args.coordinator, replica_id=f"o{rank}", token=TOKEN, timeout=300.0)
    out = open(args.out, "a", buffering=1)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 1024, generator=gen)

    def make() -> nn.Module:
        g = torch.Generator().manual_seed(0)
        net = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.03)
        return net

    def codec_of(opts: dict) -> object:
        return lc.codecs.Int8() if opts.get("codec") == "int8" else None

    def build(kind: str, opts: dict):
        net = make()
        flat = torch.randn(sum(p.numel() for p in net.parameters()), generator=gen)
        if kind == "compute":

            def step() -> dict:
                net.zero_grad(set_to_none=True)
                net(x).square().mean().backward()
                return {}

        elif kind == "comm":
            codec = codec_of(opts)

            def step() -> dict:
                if codec is None:
                    dist.all_reduce(flat)
                    return {}
                manager.start_step()
                ok = manager.allreduce(flat, op="mean", codec=codec)
                return {"ok": bool(ok and manager.commit())}

        elif kind == "serial":

            def step() -> dict:
                net.zero_grad(set_to_none=True)
                net(x).square().mean().backward()
                grads = [p.grad for p in net.parameters()]
                buf = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(buf)
                buf.div_(WORLD)
                torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(buf.split([g.numel() for g in grads]), grads)])
                return {}

        elif kind == "ddp":
            ddp = nn.parallel.DistributedDataParallel(net)

            def step() -> dict:
                ddp.zero_grad(set_to_none=True)
                ddp(x).square().mean().backward()
                return {}

        else:
            codec = codec_of(opts)
            model = DataParallel(
                net, manager, codec=codec, error_feedback=bool(opts.get("ef")) and codec is not None,
                bucket_mb=opts.get("bucket_mb", 25), overlap=opts.get("overlap", True),
            )  # fmt: skip

            def step() -> dict:
                manager.start_step()
                model.zero_grad()
                model(x).square().mean().backward()
                ok = model.finish()
                committed = manager.commit()
                model.end_step(committed)
                m = model.metrics
                return {"ok": bool(ok and committed), "wait": m.wait_seconds,
                        "hook_launches": m.launched_in_backward, "buckets": m.buckets}  # fmt: skip
        return step

    steps = []  # (label, step function): built first, then run round-robin
    for label, kind, opts in json.loads(args.cases):
        steps.append((label, build(kind, opts)))
    # Round-robin repetitions: every case sees the same (shared, noisy) machine state.
    for rep in range(args.warmup + args.reps):
        for label, step in steps:
            dist.barrier()
            started = time.perf_counter()
            info = step()
            seconds = time.perf_counter() - started
            row = {"case": label, "rep": rep, "warmup": rep < args.warmup, "seconds": seconds, **info}
            out.write(json.dumps(row) + "\n")
    dist.barrier()
    manager.close()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- driver side
def run_link(link: str, cases: list, args: argparse.Namespace, log_dir: Path) -> list[dict]:
    import lococomm as lc

    gbps = LINKS[link]
    if gbps is None:
        host, addresses = "127.0.0.1", ["127.0.0.1"] * WORLD
    else:
        addresses = setup(gbps)
        host = f"{SUBNET}.1"
    coordinator = lc.Coordinator(host=host, token=TOKEN, heartbeat_timeout=60.0, initial_workers=WORLD).start()
    port = random.randint(20000, 40000)
    procs, outs = [], []
    try:
        for i in range(WORLD):
            out = log_dir / f"{link}-{i}.jsonl"
            out.unlink(missing_ok=True)
            outs.append(out)
            cmd = [
                sys.executable, __file__, "--worker", "--index", str(i), "--coordinator",
                coordinator.address, "--master", addresses[0], "--port", str(port),
                "--batch", str(args.batch), "--threads", str(args.threads), "--reps", str(args.reps),
                "--warmup", str(args.warmup), "--cases", json.dumps(cases), "--out", str(out),
                *(["--pin"] if args.pin else []),
            ]  # fmt: skip
            if gbps is not None:
                cmd = ["ip", "netns", "exec", f"lcdp{i}", *cmd]
            env = {
                **os.environ,
                "OMP_NUM_THREADS": str(args.threads),
                "LOCOCOMM_GLOO_HOST": addresses[i],
                "GLOO_SOCKET_IFNAME": "lo" if gbps is None else "eth0",
            }
            err = open(log_dir / f"{link}-{i}.stderr", "w")
            procs.append(subprocess.Popen(cmd, env=env, stdout=err, stderr=err))
        for p in procs:
            if p.wait(3600) != 0:
                raise RuntimeError(f"benchmark worker failed (see {log_dir})")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        coordinator.stop()
        if gbps is not None:
            teardown()
    per_worker = [[json.loads(line) for line in o.read_text().splitlines()] for o in outs]
    return summarise(link, cases, per_worker, args)


def summarise(link: str, cases: list, per_worker: list[list[dict]], args: argparse.Namespace) -> list[dict]:
    medians: dict[str, float] = {}
    per_round: dict[str, list[float]] = {}
    extra: dict[str, dict] = {}
    for label, _, _ in cases:
        reps = [[r for r in w if r["case"] == label and not r["warmup"]] for w in per_worker]
        slowest = [max(rs[k]["seconds"] for rs in reps) for k in range(len(reps[0]))]
        per_round[label] = slowest
        medians[label] = statistics.median(slowest)
        mine = reps[0]
        quartiles = statistics.quantiles(slowest, n=4) if len(slowest) > 1 else [slowest[0]] * 3
        extra[label] = {
            "step_p25": round(quartiles[0], 4),
            "step_p75": round(quartiles[2], 4),
            "seconds_reps": [round(s, 4) for s in slowest],
            "ok": all(r.get("ok", True) for rs in reps for r in rs),
        }
        if "wait" in mine[0]:
            extra[label]["finish_wait_seconds"] = statistics.median(r["wait"] for r in mine)
            extra[label]["buckets"] = mine[0]["buckets"]
            extra[label]["hook_launches"] = mine[0]["hook_launches"]
    t_compute = medians.get("compute")
    rows = []
    for label, kind, opts in cases:
        t = medians[label]
        row = {"link": link, "batch": args.batch, "threads": args.threads, "pin": args.pin, "case": label,
               "kind": kind, **opts, "step_seconds": round(t, 4), **extra[label]}  # fmt: skip
        comm_case = "comm-int8" if opts.get("codec") == "int8" else "comm-fp32"
        t_comm = medians.get(comm_case)
        if kind in ("serial", "ddp", "lc") and t_compute and t_comm:
            row["compute_seconds"] = round(t_compute, 4)
            row["comm_seconds"] = round(t_comm, 4)
            row["exposed_comm"] = round((t - t_compute) / t_comm, 3)
            row["step_over_max"] = round(t / max(t_compute, t_comm), 3)
            # Paired per round (the cases of one round ran back to back): robust to the
            # machine's load drifting between rounds.
            rounds = zip(per_round[label], per_round["compute"], per_round[comm_case])
            paired = [((s - c) / m, s / max(c, m)) for s, c, m in rounds]
            row["exposed_comm_paired"] = round(statistics.median(p[0] for p in paired), 3)
            row["step_over_max_paired"] = round(statistics.median(p[1] for p in paired), 3)
            if "ddp" in medians:
                row["speedup_vs_ddp"] = round(medians["ddp"] / t, 3)
                ratios = [d / s for d, s in zip(per_round["ddp"], per_round[label])]
                row["speedup_vs_ddp_paired"] = round(statistics.median(ratios), 3)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--master", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="worker: log file; driver: also append the JSON lines here")
    parser.add_argument("--batch", type=int, default=512, help="rows per step and worker")
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads per worker")
    parser.add_argument("--pin", action="store_true", help="pin worker i to core i")
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--links", default="loopback,1gbit")
    parser.add_argument("--only", default="", help="comma-separated case labels (default: all)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    only = {c for c in args.only.split(",") if c}
    cases = [c for c in CASES if not only or c[0] in only]
    links = [link for link in args.links.split(",") if link]
    for link in links:
        if link not in LINKS:
            raise SystemExit(f"unknown link {link!r}; choose from {sorted(LINKS)}")
        if LINKS[link] is not None and os.geteuid() != 0:
            raise SystemExit(f"link {link!r} needs root (network namespaces + tc)")
    log_dir = Path(tempfile.mkdtemp(prefix="lococomm-overlap-"))
    for link in links:
        for row in run_link(link, cases, args, log_dir):
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
