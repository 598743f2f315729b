"""Compressed all-reduce through the manager vs fp32 gloo all_reduce, on emulated links.

    sudo .venv/bin/python benchmarks/compressed_allreduce.py            # JSON lines on stdout
    .venv/bin/python benchmarks/compressed_allreduce.py --format markdown --plot out.png

Links: "loopback" (127.0.0.1, no limit) and rate-limited ones ("1gbit", "100mbit"): every
worker runs in its own network namespace, attached by a veth pair to a bridge in the root
namespace, with a `tc tbf` rate limit on both ends of its veth (egress and ingress of every
worker limited to the rate, as a host with that NIC behind a switch). netem is not needed.
Namespaces are removed at exit (also on Ctrl-C). Needs root for the emulated links.

For each link and member count: the fp32 baseline is a raw gloo all_reduce (sum) of the same
tensor on the epoch's process group, in the same run; every codec goes through
`manager.allreduce(t, op="mean", codec=...)`. Each timed call is preceded by a tiny exact
all-reduce (a barrier) in the same step; the reported time of a repetition is the slowest
member's, and the case's time is the best repetition (after one warm-up call; the median is
reported too): other processes on a shared machine can only add time. Repetitions go
round-robin over the cases (rep 1 of every case, then rep 2, ...), so load from other processes
is spread over all cases alike; `cpu_seconds_median` is the CPU time of the call summed over the
process's threads (gloo's included), median over repetitions, largest member: a measure of
work that waiting on a busy machine does not inflate; `paired_ratio_median` is the median over
rounds of (this case's time / the fp32 baseline's time in the same round).
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BRIDGE = "lcbr0"
SUBNET = "10.77.0"
TOKEN = "lococomm-bench"

CASES = [
    # (label, codec spec or None for raw fp32 gloo, error feedback)
    ("fp32-gloo", None, False),
    ("identity", {"name": "identity", "config": {}}, False),
    ("bf16", {"name": "bf16", "config": {}}, False),
    ("int8", {"name": "int8", "config": {}}, False),
    ("int8+ef", {"name": "int8", "config": {}}, True),
    ("int4", {"name": "int4", "config": {}}, False),
    ("int2", {"name": "int2", "config": {}}, False),
    ("topk1%", {"name": "topk", "config": {"ratio": 0.01, "chunk": 4096}}, False),
    ("sparseloco", {"name": "sparseloco", "config": {}}, False),
    ("randk1%", {"name": "randk", "config": {"ratio": 0.01}}, False),
    ("powersgd4", {"name": "powersgd", "config": {"rank": 4}}, False),
]
LINKS = {"loopback": None, "10gbit": 10.0, "1gbit": 1.0, "100mbit": 0.1}  # Gbit/s
REPS = {"loopback": 7, "10gbit": 5, "1gbit": 5, "100mbit": 2}


# ----------------------------------------------------------------------------- network
def _run(cmd: str) -> None:
    subprocess.run(cmd.split(), check=True, capture_output=True)


def _quiet(cmd: str) -> None:
    subprocess.run(cmd.split(), check=False, capture_output=True)


def teardown(world: int = 8) -> None:
    for i in range(world):
        _quiet(f"ip netns del lcns{i}")
    _quiet(f"ip link del {BRIDGE}")


def setup(world: int, gbps: float) -> list[str]:
    """Bridge + one namespace per worker, tbf at `gbps` on both veth ends; worker addresses."""
    teardown()
    _run(f"ip link add {BRIDGE} type bridge")
    _run(f"ip addr add {SUBNET}.1/24 dev {BRIDGE}")
    _run(f"ip link set {BRIDGE} up")
    rate = f"{int(gbps * 1000)}mbit"
    burst = f"{max(64, int(gbps * 1e9 / 8 / 100 / 1024))}kb"  # 10 ms of traffic, >= 64 KiB
    addresses = []
    for i in range(world):
        ns = f"lcns{i}"
        _run(f"ip netns add {ns}")
        _run(f"ip link add lcv{i} type veth peer name eth0 netns {ns}")
        _run(f"ip link set lcv{i} master {BRIDGE}")
        _run(f"ip link set lcv{i} up")
        _run(f"ip netns exec {ns} ip addr add {SUBNET}.{10 + i}/24 dev eth0")
        _run(f"ip netns exec {ns} ip link set eth0 up")
        _run(f"ip netns exec {ns} ip link set lo up")
        tbf = f"root tbf rate {rate} burst {burst} latency 200ms"
        _run(f"ip netns exec {ns} tc qdisc add dev eth0 {tbf}")
        _run(f"tc qdisc add dev lcv{i} {tbf}")
        addresses.append(f"{SUBNET}.{10 + i}")
    return addresses


# ----------------------------------------------------------------------------- worker side
def worker(args: argparse.Namespace) -> None:
    import torch

    import lococomm as lc
    from lococomm.compress import ErrorFeedback, from_spec

    torch.set_num_threads(1)
    manager = lc.Manager(
        args.coordinator, replica_id=f"b{args.index}", token=TOKEN, timeout=300.0
    )
    side = math.isqrt(args.numel)
    gen = torch.Generator().manual_seed(args.index)
    base = torch.randn(side, args.numel // side, generator=gen)
    out = open(args.out, "a", buffering=1)
    barrier = torch.zeros(1)
    cases = []
    for label, spec, use_ef in json.loads(args.cases):
        codec = from_spec(spec) if spec else None
        cases.append((label, codec, ErrorFeedback(codec) if use_ef else None))
    # Repetitions go round-robin over the cases, so a burst of load from other processes on
    # the machine hits every case alike instead of one case's whole series.
    for rep in range(1 + args.reps):
        for label, codec, ef in cases:
            t = base.clone()
            manager.start_step()
            manager.allreduce(barrier)
            started = time.perf_counter()
            cpu_started = time.process_time()
            if codec is None:
                manager.communicator.pg.allreduce([t]).wait()
                ok = True
            else:
                ok = manager.allreduce(t, op="mean", codec=codec, error_feedback=ef, name="bench")
            seconds = time.perf_counter() - started
            cpu_seconds = time.process_time() - cpu_started  # every thread of this process
            committed = manager.commit()
            if ef is not None:
                ef.commit() if committed else ef.rollback()
            stats = manager.metrics.compressed.get("last", {}) if codec is not None else {}
            payload_bits = None
            if codec is not None and rep == 0:
                payload = codec.encode(base, 0)
                payload_bits = 8 * codec.wire_bytes(payload) / base.numel()
            row = {
                "case": label, "rep": rep, "warmup": rep == 0, "seconds": seconds,
                "cpu_seconds": cpu_seconds, "ok": bool(ok and committed), "stats": stats,
                "payload_bits": payload_bits,
            }  # fmt: skip
            out.write(json.dumps(row) + "\n")
    manager.close()


# ----------------------------------------------------------------------------- driver side
def run_cases(
    link: str, world: int, numel: int, cases: list, log_dir: Path, reps: int | None = None
) -> list[dict]:
    import lococomm as lc

    gbps = LINKS[link]
    if gbps is None:
        host, addresses = "127.0.0.1", ["127.0.0.1"] * world
    else:
        addresses = setup(world, gbps)
        host = f"{SUBNET}.1"
    coordinator = lc.Coordinator(
        host=host, token=TOKEN, heartbeat_timeout=30.0, initial_workers=world
    ).start()
    load_before = os.getloadavg()[0]
    procs, outs = [], []
    try:
        for i in range(world):
            out = log_dir / f"{link}-{world}-{i}.jsonl"
            out.unlink(missing_ok=True)
            outs.append(out)
            cmd = [
                sys.executable, __file__, "--worker", "--index", str(i), "--coordinator",
                coordinator.address, "--numel", str(numel), "--reps", str(reps or REPS[link]),
                "--cases", json.dumps(cases), "--out", str(out),
            ]  # fmt: skip
            if gbps is not None:
                cmd = ["ip", "netns", "exec", f"lcns{i}", *cmd]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "LOCOCOMM_GLOO_HOST": addresses[i]}
            err = open(log_dir / f"{link}-{world}-{i}.stderr", "w")
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
            teardown(world)
    per_worker = [[json.loads(line) for line in o.read_text().splitlines()] for o in outs]
    rows = summarise(link, world, numel, cases, per_worker)
    for row in rows:  # other processes on the machine distort timings: say how busy it was
        row["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        row["cpus"] = os.cpu_count()
    return rows


def summarise(link, world, numel, cases, per_worker) -> list[dict]:
    rows = []
    for label, spec, use_ef in cases:
        reps = [[r for r in w if r["case"] == label and not r["warmup"]] for w in per_worker]
        slowest = [max(rs[k]["seconds"] for rs in reps) for k in range(len(reps[0]))]
        mine = reps[0]
        first = next(r for r in per_worker[0] if r["case"] == label and r["warmup"])
        seconds = min(slowest)  # best of N: other processes on a shared machine only add time
        stats = [r["stats"] for r in mine if r["stats"]]
        cpu = [statistics.median(r["cpu_seconds"] for r in rs) for rs in reps if "cpu_seconds" in rs[0]]
        row = {
            "link": link, "link_gbps": LINKS[link], "world": world, "numel": numel,
            "case": label, "codec": spec["name"] if spec else "fp32-gloo", "ef": use_ef,
            "seconds": seconds, "median_seconds": statistics.median(slowest), "seconds_reps": slowest,
            "cpu_seconds_median": max(cpu) if cpu else None,
            "ok": all(r["ok"] for rs in reps for r in rs),
            "effective_GBps": 4 * numel / seconds / 1e9,
            "payload_bits_per_param": first["payload_bits"] if spec else 32.0,
        }  # fmt: skip
        if stats:
            for k in ("encode_seconds", "communicate_seconds", "decode_seconds"):
                row[k] = statistics.median(s[k] for s in stats)
            row["bytes_sent_per_member"] = stats[0]["bytes_sent"]
            row["algorithm"] = stats[0]["algorithm"]
        else:
            row["bytes_sent_per_member"] = 2 * (world - 1) * 4 * numel // world
            row["algorithm"] = "gloo allreduce"
        rows.append(row)
    base_row = next(r for r in rows if r["case"] == "fp32-gloo")
    base = base_row["seconds"]
    for r in rows:
        r["baseline_seconds"] = base
        r["speedup_vs_fp32"] = base / r["seconds"]
        # Repetition k of every case ran in the same round (round-robin), right after each
        # other: the median of the per-round ratios is robust to load that comes and goes.
        pairs = [a / b for a, b in zip(r["seconds_reps"], base_row["seconds_reps"])]
        r["paired_ratio_median"] = statistics.median(pairs)
    return rows


# ----------------------------------------------------------------------------- analysis
TARGETS_1G = {"int8": 3.0, "int4": 5.0, "int2": 8.0, "sparseloco": 8.0}


def fit(rows: list[dict], world: int, case: str) -> tuple[float, float] | None:
    """Least-squares T = a + c / B over the rate-limited links (B in Gbit/s): a = seconds of
    compute and latency, c = seconds x Gbit/s of traffic on the critical path."""
    pts = [(1 / r["link_gbps"], r["seconds"]) for r in rows
           if r["world"] == world and r["case"] == case and r["link_gbps"]]  # fmt: skip
    if len(pts) < 2:
        return None
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    c = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return my - c * mx, c


def break_even(rows: list[dict], world: int) -> list[dict]:
    base = fit(rows, world, "fp32-gloo")
    out = []
    for label, _, _ in CASES:
        f = fit(rows, world, label)
        if f is None or base is None or label == "fp32-gloo":
            continue
        a, c = f
        a0, c0 = base
        if c >= c0:
            gbps = 0.0  # never saves time on the wire
        elif a <= a0:
            gbps = math.inf  # faster at every link speed
        else:
            gbps = (c0 - c) / (a - a0)
        out.append({"world": world, "case": label, "compute_seconds": a, "wire_seconds_at_1gbit": c,
                    "fp32_wire_seconds_at_1gbit": c0, "break_even_gbps": gbps})  # fmt: skip
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| link | W | case | algorithm | bits/param | s | x fp32 | x fp32 paired | GB/s eff. | encode / comm / decode s | CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        split = (f"{r['encode_seconds']:.3f} / {r['communicate_seconds']:.3f} / {r['decode_seconds']:.3f}"
                 if "encode_seconds" in r else "")  # fmt: skip
        cpu = f"{r['cpu_seconds_median']:.3f}" if r.get("cpu_seconds_median") is not None else ""
        paired = f"{1 / r['paired_ratio_median']:.2f}" if r.get("paired_ratio_median") else ""
        lines.append(
            f"| {r['link']} | {r['world']} | {r['case']} | {r['algorithm']} | "
            f"{r['payload_bits_per_param']:.3f} | {r['seconds']:.3f} | {r['speedup_vs_fp32']:.2f} | "
            f"{paired} | {r['effective_GBps']:.2f} | {split} | {cpu} |"
        )
    lines += ["", "| W | case | compute s (fit) | wire s at 1 Gbit/s (fit) | fp32 wire s | break-even link |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for world in sorted({r["world"] for r in rows}):
        for b in break_even(rows, world):
            be = b["break_even_gbps"]
            text = "always faster" if be == math.inf else ("never" if be < 0.05 else f"< {be:.1f} Gbit/s")
            lines.append(f"| {world} | {b['case']} | {b['compute_seconds']:.3f} | "
                         f"{b['wire_seconds_at_1gbit']:.3f} | {b['fp32_wire_seconds_at_1gbit']:.3f} | {text} |")  # fmt: skip
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for r in rows:
        if r["link"] == "1gbit" and r["world"] == 2 and r["case"] in TARGETS_1G:
            want = TARGETS_1G[r["case"]]
            paired = 1 / r["paired_ratio_median"] if r.get("paired_ratio_median") else None
            text = f"{r['speedup_vs_fp32']:.2f}x" + (f" (paired median {paired:.2f}x)" if paired else "")
            met = r["speedup_vs_fp32"] >= want and (paired is None or paired >= want)
            lines.append(f"| 1 Gbit/s, W=2, {r['case']} >= {want}x fp32 | {text} | {'yes' if met else 'no'} |")  # fmt: skip
        if r["link"] == "loopback" and r["case"] != "fp32-gloo":
            slow = r["seconds"] / r["baseline_seconds"]
            paired = r.get("paired_ratio_median")
            text = f"{slow:.2f}x" + (f" (paired median {paired:.2f}x)" if paired else "")
            met = slow <= 1.2 and (paired is None or paired <= 1.2)
            lines.append(f"| loopback, W={r['world']}, {r['case']} <= 1.2x fp32 time | {text} | "
                         f"{'yes' if met else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({r["world"] for r in rows})
    fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 4.5), squeeze=False)
    loop_x = 20.0  # where loopback is drawn (Gbit/s axis)
    for ax, world in zip(axes[0], worlds):
        for label, _, _ in CASES:
            pts = sorted(((r["link_gbps"] or loop_x), r["seconds"]) for r in rows
                         if r["world"] == world and r["case"] == label)  # fmt: skip
            if not pts:
                continue
            style = "k-o" if label == "fp32-gloo" else "-o"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, markersize=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link speed (Gbit/s; rightmost point: loopback, no limit)")
        ax.set_ylabel("seconds per all-reduce of 16M fp32")
        ax.set_title(f"{world} members")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="worker: log file; driver: also write JSON lines here")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case "
                        "(default per link: loopback 7, 1gbit 5, 100mbit 2)")
    parser.add_argument("--numel", type=int, default=1 << 24)
    parser.add_argument("--links", default="loopback,1gbit,100mbit")
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--only", default="", help="comma-separated case labels (default: all)")
    parser.add_argument("--format", choices=["json", "markdown"], default="json")
    parser.add_argument("--plot", default="", help="write a PNG of time vs link speed")
    parser.add_argument("--from-json", default="", help="re-analyse earlier JSON lines")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.from_json:
        rows = [json.loads(x) for x in Path(args.from_json).read_text().splitlines() if x.strip()]
        for r in rows:  # lines from before the paired statistic: compute it
            if "paired_ratio_median" not in r:
                base = next(b for b in rows if b["link"] == r["link"] and b["world"] == r["world"]
                            and b["case"] == "fp32-gloo")  # fmt: skip
                pairs = [a / b for a, b in zip(r["seconds_reps"], base["seconds_reps"])]
                r["paired_ratio_median"] = statistics.median(pairs)
    else:
        atexit.register(teardown)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
        cases = [c for c in CASES if not args.only or c[0] in args.only.split(",") or c[0] == "fp32-gloo"]
        links = args.links.split(",")
        if any(LINKS[link] for link in links) and os.geteuid() != 0:
            sys.exit("emulated links need root (network namespaces, tc); use --links loopback")
        rows = []
        log_dir = Path(tempfile.mkdtemp(prefix="lococomm-bench-"))
        sink = open(args.out, "a") if args.out else None
        for link in links:
            for world in (int(w) for w in args.worlds.split(",")):
                for row in run_cases(link, world, args.numel, cases, log_dir, args.reps):
                    rows.append(row)
                    line = json.dumps(row)
                    if args.format == "json":
                        print(line, flush=True)
                    if sink:
                        sink.write(line + "\n")
                        sink.flush()
    if args.format == "markdown":
        print(markdown(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
