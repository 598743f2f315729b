"""Learning quality vs bytes: DDP vs DiLoCo vs Streaming DiLoCo vs delayed DiLoCo vs SparseLoCo.

Every run is `lococomm run --workers W examples/train_diloco.py --algo A --seed S ...`: the
same model (char-level transformer), the same per-worker data order and the same number of
tokens (steps x batch x context x W) for every algorithm; only how the workers communicate
differs. DDP is the baseline measured in the same invocation (exact gradient all-reduce every
step, global batch W x batch). Bytes are the wire bytes worker w0 sent through the manager
(payload bytes of its collectives; every member sends about the same).

Prints one JSON line per run and one per variant (means over seeds, loss difference and byte
ratio to DDP, the issue's targets), and writes a PNG with loss vs bytes and loss vs steps.

    .venv/bin/python benchmarks/diloco_quality.py --seeds 0 1 2 --results runs.jsonl --png docs/diloco_quality_6000.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_diloco.py"

# name -> train_diloco.py arguments (H = 50 everywhere; see docs/diloco.md)
# Inner (and DDP) AdamW peak lr 1.2e-2 for every algorithm: the best of {3e-3, 6e-3, 1.2e-2,
# 2.4e-2} for DiLoCo, and better than 3e-3 / 6e-3 for DDP (seed 0, width 64, 4 layers, 1000
# steps; at 2 layers and 3000 steps DiLoCo was the same at 6e-3 and worse with outer lr 1.0).
VARIANTS: dict[str, list[str]] = {
    "ddp": ["--algo", "ddp"],
    "diloco": ["--algo", "diloco", "--sync-every", "50"],
    "streaming": ["--algo", "streaming", "--sync-every", "50", "--fragments", "4", "--overlap", "2",
                  "--codec", "int4"],
    "delayed": ["--algo", "delayed", "--sync-every", "50"],
    # SparseLoCo: 13 of every 256 entries (8-bit offsets), outer lr 1.5 -- tuned on seed 0 at
    # 3000 steps (docs/diloco.md); sparseloco_c4096 is the first setting (1/32 of 4096, lr 1).
    "sparseloco": ["--algo", "sparseloco", "--sync-every", "50", "--topk-ratio", "0.05",
                   "--chunk", "256", "--outer-lr", "1.5"],
    "sparseloco_c4096": ["--algo", "sparseloco", "--sync-every", "50", "--topk-ratio", "0.03125"],
    # 16 of every 256 with the levels in bf16 (1067x), outer lr 2.0
    "sparseloco_bf16": ["--algo", "sparseloco", "--sync-every", "50", "--topk-ratio", "0.0625",
                        "--chunk", "256", "--outer-lr", "2.0", "--scale-dtype", "bfloat16"],
    # Not in the default set: Streaming at H = 100. At H = 50 no 4-bit codec can reach 400x
    # fewer bytes than DDP (ring bytes ratio = H x 32 / bits = 376x at Int4's 4.25 bits).
    "streaming_h100": ["--algo", "streaming", "--sync-every", "100", "--fragments", "4",
                       "--overlap", "2", "--codec", "int4"],
    # H = 60: the smallest round H with room above the 400x line (60 x 32 / 4.25 = 452x).
    "streaming_h60": ["--algo", "streaming", "--sync-every", "60", "--fragments", "4",
                      "--overlap", "2", "--codec", "int4"],
}
# The configurations that meet the targets at 6000 inner steps (docs/diloco.md)
DEFAULT_VARIANTS = ["ddp", "diloco", "streaming_h60", "delayed", "sparseloco_bf16"]
COMMON = ["--lr", "0.012", "--width", "64", "--layers", "2", "--batch", "16", "--context", "64"]
# Targets of the issue: (max relative loss excess over DDP, min byte reduction vs DDP)
TARGETS = {"diloco": (0.02, 50), "streaming": (0.03, 400), "streaming_h100": (0.03, 400),
           "streaming_h60": (0.03, 400),
           "sparseloco": (0.03, 1000), "sparseloco_c4096": (0.03, 1000),
           "sparseloco_bf16": (0.03, 1000)}


def run_one(variant: str, seed: int, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    log_path = out_dir / f"{variant}_s{seed}.jsonl"
    cmd = [
        str(Path(sys.executable).with_name("lococomm")), "run", "--workers", str(args.workers),
        "--quiet", "--summary-json", str(out_dir / f"{variant}_s{seed}.summary.json"),
        str(SCRIPT), *VARIANTS[variant], *COMMON, *args.model_args, "--steps", str(args.steps),
        "--seed", str(seed), "--eval-every", str(args.eval_every),
        "--eval-batches", str(args.eval_batches), "--log-json", str(log_path),
    ]
    for attempt in range(args.attempts):
        if log_path.exists():
            log_path.unlink()
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds = time.monotonic() - started
        if proc.returncode == 0:
            break
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-1000:]}"
        if attempt + 1 == args.attempts:
            raise RuntimeError(f"{variant} seed {seed} failed {args.attempts} times:\n{tail}")
        print(json.dumps({"variant": variant, "seed": seed, "attempt": attempt, "failed": tail[-500:]}),
              file=sys.stderr, flush=True)
        time.sleep(30)
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    final = rows[-1]
    if final["step"] != args.steps:
        raise RuntimeError(f"{variant} seed {seed}: last evaluation at step {final['step']}")
    return {
        "variant": variant, "seed": seed, "workers": args.workers, "steps": args.steps,
        "final_eval_loss": final["eval_loss"], "bytes": final["bytes"],
        "peak_sync_bytes": final.get("peak_sync_bytes"), "syncs": final.get("syncs"),
        "seconds": round(seconds, 1),
        "curve": [(r["step"], r["eval_loss"], r["bytes"]) for r in rows],
    }  # fmt: skip


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ddp = {r["seed"]: r for r in runs if r["variant"] == "ddp"}
    out = []
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        losses = [r["final_eval_loss"] for r in mine]
        row: dict[str, Any] = {
            "variant": variant,
            "seeds": [r["seed"] for r in mine],
            "final_eval_loss": statistics.fmean(losses),
            "final_eval_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "bytes": statistics.fmean(r["bytes"] for r in mine),
            "peak_sync_bytes": max((r["peak_sync_bytes"] or 0) for r in mine),
        }
        paired = [(r, ddp[r["seed"]]) for r in mine if r["seed"] in ddp]
        if paired and variant != "ddp":
            row["loss_vs_ddp"] = statistics.fmean(
                r["final_eval_loss"] / d["final_eval_loss"] - 1 for r, d in paired
            )
            row["byte_reduction_vs_ddp"] = statistics.fmean(d["bytes"] / r["bytes"] for r, d in paired)
            if variant in TARGETS:
                max_loss, min_ratio = TARGETS[variant]
                row["target"] = f"loss <= +{max_loss:.0%}, bytes >= {min_ratio}x fewer"
                row["target_met"] = row["loss_vs_ddp"] <= max_loss and row["byte_reduction_vs_ddp"] >= min_ratio
        out.append(row)
    diloco = next((r for r in out if r["variant"] == "diloco"), None)
    streaming = next((r for r in out if r["variant"] == "streaming"), None)
    if diloco and streaming:  # Streaming's extra target: peak per-exchange bytes <= 1/P of DiLoCo's
        streaming["peak_vs_diloco"] = streaming["peak_sync_bytes"] / diloco["peak_sync_bytes"]
        streaming["peak_target_met"] = streaming["peak_vs_diloco"] <= 1 / 4
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        steps = [s for s, _, _ in mine[0]["curve"]]
        curves = [r["curve"] for r in mine if len(r["curve"]) == len(steps)]
        loss = [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]
        sent = [statistics.fmean(c[i][2] for c in curves) for i in range(len(steps))]
        label = f"{variant} ({len(curves)} seed{'s' if len(curves) > 1 else ''})"
        right.plot(steps, loss, label=label)
        left.plot([max(b, 1) for b in sent[1:]], loss[1:], marker=".", label=label)
    left.set_xscale("log")
    left.set_xlabel("wire bytes sent per worker (log)")
    right.set_xlabel("inner steps (= DDP steps; same tokens)")
    for ax in (left, right):
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend()
    left.set_title("loss vs bytes")
    right.set_title("loss vs steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--model-args", nargs=argparse.REMAINDER, default=[],
                        help="extra train_diloco.py arguments (last; override COMMON), e.g. --width 64")
    parser.add_argument("--out-dir", default="/tmp/lococomm_diloco_quality")
    parser.add_argument("--results", default=None, help="also write every run (JSON lines) here")
    parser.add_argument("--png", default=None, help="write the loss vs bytes / steps figure here")
    parser.add_argument("--reuse", action="store_true", help="load runs already in --results")
    parser.add_argument("--attempts", type=int, default=3, help="tries per run (a run that fails "
                        "to start, e.g. while the package is being edited, is retried)")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    if args.reuse and args.results and Path(args.results).exists():
        runs = [json.loads(x) for x in Path(args.results).read_text().splitlines() if x.strip()]
    done = {(r["variant"], r["seed"]) for r in runs}
    for seed in args.seeds:
        for variant in args.variants:
            if (variant, seed) in done:
                continue
            run = run_one(variant, seed, args, out_dir)
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "curve"}), flush=True)
            if args.results:
                with open(args.results, "a") as f:
                    f.write(json.dumps(run) + "\n")
    for row in summarise(runs):
        print(json.dumps(row), flush=True)
    if args.png:
        plot(runs, Path(args.png))
        print(json.dumps({"png": args.png}))


if __name__ == "__main__":
    main()
