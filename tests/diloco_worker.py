"""A DiLoCo worker for process tests: a tiny char-level LM on stdlib text, JSON-lines log.

Each worker starts from its own random init (the bootstrap makes them identical). Logs one
"sync" row per exchange (committed or not) with the replicated-state digest after it, and a
final "done" row with held-out losses, fragment sizes and metrics; --save writes the global
parameters and outer state for bit-equality checks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import charlm

import lococomm as lc
from lococomm import presets
from lococomm.algorithms.diloco import DiLoCo
from lococomm.compress import codecs

CONTEXT = 32


def build(args, model, optimizer, manager) -> DiLoCo:
    common = dict(sync_every=args.sync_every, name="diloco")
    if args.variant == "diloco":
        return DiLoCo(model, optimizer, manager, **common)
    if args.variant == "streaming":
        return DiLoCo(model, optimizer, manager, fragments=args.fragments, overlap_steps=args.overlap,
                      mix=0.5, codec=codecs.Int4(), error_feedback=True, **common)
    if args.variant == "delayed":
        return DiLoCo(model, optimizer, manager, delayed=True, **common)
    if args.variant == "sparseloco":
        return presets.sparseloco(model, optimizer, manager, ratio=1 / 16, chunk=256, **common)
    raise SystemExit(f"unknown variant {args.variant}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--replica", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", default="diloco")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sync-every", type=int, default=10)
    parser.add_argument("--fragments", type=int, default=2)
    parser.add_argument("--overlap", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--kill-at", type=int, default=-1, help="SIGKILL itself at this inner step")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--save", default="")
    parser.add_argument("--until-full", type=int, default=0, help="instead of --steps: run until "
                        "the first committed exchange after --after-clock with this many members, "
                        "all contributing, then --extra-steps more (the same inner step on every "
                        "member, however long a restarted worker takes to come back)")
    parser.add_argument("--after-clock", type=int, default=0)
    parser.add_argument("--extra-steps", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.replica} %(name)s: %(message)s")
    torch.set_num_threads(1)
    train, held_out = charlm.split(charlm.load_corpus(300_000))
    torch.manual_seed(zlib.crc32(args.replica.encode()))  # a different init on every worker
    model = charlm.CharModel(context=CONTEXT, width=32, layers=2, heads=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    manager = lc.Manager(args.coordinator, replica_id=args.replica, timeout=20, parity_every=5)
    out = open(args.out, "a", buffering=1)

    def write(row: dict) -> None:
        out.write(json.dumps(row) + "\n")

    write({"event": "start", "pid": os.getpid(), "time": time.time()})
    diloco = build(args, model, optimizer, manager)
    with diloco.global_model():
        initial = charlm.evaluate(model, held_out, CONTEXT, batches=2, size=32)
    write({"event": "joined", "inner_step": diloco.inner_step, "syncs": diloco.syncs,
           "digest": manager.digest()})
    last = None
    target = 2000 if args.until_full else args.steps
    while diloco.inner_step < target:
        if diloco.inner_step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = charlm.batch(train, CONTEXT, 8, seed=zlib.crc32(f"{args.replica}/{diloco.inner_step}".encode()))
        loss = charlm.loss_of(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        diloco.step()
        record = diloco.metrics.last
        if record and record is not last:
            last = record
            write({"event": "sync", **record, "digest": manager.digest(), "loss": loss.item(),
                   "inner_step": diloco.inner_step})
            full = record["committed"] and record["members"] == record["contributors"] == args.until_full
            if args.until_full and target == 2000 and full and record["clock"] > args.after_clock:
                target = record["clock"] + args.extra_steps
        if args.step_sleep:
            time.sleep(args.step_sleep)
    diloco.finish()
    if diloco.metrics.last is not last:
        write({"event": "sync", **diloco.metrics.last, "digest": manager.digest(),
               "inner_step": diloco.inner_step})
    with diloco.global_model():
        final = charlm.evaluate(model, held_out, CONTEXT, batches=2, size=32)
    write({
        "event": "done", "digest": manager.digest(), "initial": initial, "final": final,
        "fragment_sizes": diloco.fragment_sizes, "metrics": diloco.metrics.as_dict(),
        "manager_step": manager.step, "world_size": manager.world_size,
    })  # fmt: skip
    if args.save:
        torch.save({"global": [g.clone() for g in diloco.global_parameters()],
                    "state": diloco.state_dict()["global"]}, args.save)
    manager.close()


if __name__ == "__main__":
    main()
