"""Low-communication training of a char-level LM: DiLoCo, Streaming DiLoCo, delayed DiLoCo,
SparseLoCo, or per-step data parallel (DDP) as the baseline, on the fault-tolerant manager.

The data is CPython's standard-library source text. Every worker draws its own batches from a
seed (replica id, inner step), so the data order is reproducible; a joiner or restarted worker
is healed with the global parameters and continues at the group's inner step.

    lococomm run --workers 4 examples/train_diloco.py --algo diloco --sync-every 50
    lococomm run --workers 4 --chaos kill:1@8,join@14 examples/train_diloco.py --algo streaming
    lococomm run --workers 4 examples/train_diloco.py --algo sparseloco --log-json run.jsonl

Chaos steps count manager steps, i.e. exchanges (about one every sync_every / fragments steps),
not inner steps. `--log-json` writes one JSON line per evaluation (inner step, held-out loss of
the global model, wire bytes this worker sent) from the evaluating replica.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import charlm

import lococomm as lc
from lococomm import presets
from lococomm.algorithms.diloco import DiLoCo
from lococomm.algorithms.outer import OuterSGD
from lococomm.compress import codecs
from lococomm.compress.fp4 import FP4E3M0

log = logging.getLogger("train_diloco")

CODECS = {
    "none": lambda a: None,
    "int8": lambda a: codecs.Int8(),
    "int4": lambda a: codecs.Int4(),
    "int2": lambda a: codecs.Int2(),
    "bf16": lambda a: codecs.BF16(),
    "fp8": lambda a: codecs.FP8E4M3(),
    "topk": lambda a: codecs.TopK(ratio=a.topk_ratio, chunk=a.chunk),
    "sparseloco": lambda a: codecs.SparseLoCo(ratio=a.topk_ratio, chunk=a.chunk, scale_dtype=a.scale_dtype),
    "fp4": lambda a: FP4E3M0(),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algo", choices=["ddp", "diloco", "streaming", "delayed", "sparseloco"], default="diloco")
    p.add_argument("--steps", type=int, default=500, help="inner steps per worker")
    p.add_argument("--batch", type=int, default=16, help="sequences per worker per step")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3, help="inner (or DDP) AdamW peak lr")
    p.add_argument("--warmup", type=int, default=50, help="inner steps of linear warm-up")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0, help="data order (and init) seed")
    # the DiLoCo family
    p.add_argument("--sync-every", type=int, default=50, help="H: inner steps between syncs of a fragment")
    p.add_argument("--fragments", type=int, default=None, help="P (streaming default 4)")
    p.add_argument("--overlap", type=int, default=None, help="tau (streaming default 2)")
    p.add_argument("--mix", type=float, default=None, help="weight of the global params (streaming 0.5)")
    p.add_argument("--codec", choices=sorted(CODECS), default=None,
                   help="pseudo-gradient codec (streaming: int4, sparseloco: sparseloco)")
    p.add_argument("--error-feedback", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--outer-lr", type=float, default=None, help="default 0.7 (sparseloco 1.0)")
    p.add_argument("--outer-momentum", type=float, default=None, help="default 0.9 (sparseloco 0)")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--momentum-clip", type=float, default=None, help="CO2 outer-momentum clipping")
    p.add_argument("--staleness-penalty", type=float, default=1.0, help="CO2 gap penalty (>= 1)")
    p.add_argument("--decay", type=float, default=0.95, help="SparseLoCo error-feedback decay")
    p.add_argument("--topk-ratio", type=float, default=64 / 4096)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--scale-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="SparseLoCo's per-chunk levels on the wire")
    # evaluation and logs
    p.add_argument("--eval-every", type=int, default=50, help="inner steps between evaluations")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--eval-replica", default="w0", help="replica that evaluates ('all': every one)")
    p.add_argument("--log-json", default=None, help="append evaluation rows here (JSON lines)")
    return p.parse_args(argv)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_diloco(args, model, optimizer, manager) -> DiLoCo:
    streaming = args.algo == "streaming"
    sparse = args.algo == "sparseloco"
    if sparse:
        kwargs: dict[str, Any] = dict(ratio=args.topk_ratio, chunk=args.chunk, decay=args.decay,
                                      lr=1.0 if args.outer_lr is None else args.outer_lr,
                                      momentum=args.outer_momentum or 0.0, nesterov=args.nesterov,
                                      scale_dtype=args.scale_dtype)
        if args.fragments:
            kwargs["fragments"] = args.fragments
        return presets.sparseloco(model, optimizer, manager, sync_every=args.sync_every, **kwargs)
    codec_name = args.codec or ("int4" if streaming else "none")
    codec = CODECS[codec_name](args)
    error_feedback = args.error_feedback if args.error_feedback is not None else (codec is not None)
    outer = OuterSGD(
        lr=0.7 if args.outer_lr is None else args.outer_lr,
        momentum=0.9 if args.outer_momentum is None else args.outer_momentum,
        nesterov=args.nesterov,
        clip=args.momentum_clip,
    )
    return DiLoCo(
        model, optimizer, manager, sync_every=args.sync_every, outer_optimizer=outer,
        codec=codec, error_feedback=error_feedback and codec is not None,
        fragments=args.fragments or (4 if streaming else 1),
        overlap_steps=0 if args.algo == "delayed" else (args.overlap if args.overlap is not None else (2 if streaming else 0)),
        mix=args.mix if args.mix is not None else (0.5 if streaming else 1.0),
        delayed=args.algo == "delayed", staleness_penalty=args.staleness_penalty,
    )  # fmt: skip


class Evaluator:
    """Held-out loss every --eval-every inner steps, printed and optionally logged as JSON."""

    def __init__(self, args, replica: str, held_out: torch.Tensor) -> None:
        self.args = args
        self.active = args.eval_replica in ("all", replica)
        self.held_out = held_out
        self.out = open(args.log_json, "a", buffering=1) if (args.log_json and self.active) else None
        self.started = time.monotonic()
        self.replica = replica

    def due(self, step: int) -> bool:
        return self.active and (step % self.args.eval_every == 0 or step == self.args.steps)

    def __call__(self, step: int, model: torch.nn.Module, sent: int, loss: float, extra: dict) -> float:
        value = charlm.evaluate(model, self.held_out, self.args.context, batches=self.args.eval_batches)
        log.info("step %d  train loss %.3f  eval loss %.4f  sent %.2f MB  %.1f steps/s", step, loss,
                 value, sent / 1e6, step / max(1e-9, time.monotonic() - self.started))
        if self.out is not None:
            row = {"algo": self.args.algo, "seed": self.args.seed, "replica": self.replica,
                   "step": step, "eval_loss": value, "train_loss": loss, "bytes": sent,
                   "time": time.monotonic() - self.started, **extra}
            self.out.write(json.dumps(row) + "\n")
        return value


def train_ddp(args, model, optimizer, manager, train, evaluator, replica) -> None:
    """Baseline: exact all-reduce of the gradients every step (the same data, model and lr)."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.zeros(sum(p.numel() for p in params))
    retries = 0
    loss = torch.tensor(0.0)
    if evaluator.due(0):
        evaluator(0, model, 0, float("nan"), {})
    while manager.step < args.steps:
        manager.start_step()
        step = manager.step
        x, y = charlm.batch(train, args.context, args.batch,
                            seed=zlib.crc32(f"{args.seed}/{replica}/{step}/{retries}".encode()))
        loss = charlm.loss_of(model, x, y)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        offset = 0
        for p in params:
            flat[offset : offset + p.numel()].copy_(p.grad.reshape(-1))
            offset += p.numel()
        manager.allreduce(flat, op="mean", name="grads")
        manager.report(loss=round(loss.item(), 4))
        if not manager.commit():
            retries += 1
            continue
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        optimizer.step()
        if evaluator.due(step + 1):
            evaluator(step + 1, model, manager.metrics.bytes_sent, loss.item(), {})


def train_diloco(args, model, optimizer, manager, train, evaluator, replica) -> None:
    diloco = build_diloco(args, model, optimizer, manager)
    log.info("%s: H=%d, fragments %s (%s elements), overlap %d, codec %s, joined at step %d",
             args.algo, args.sync_every, len(diloco.fragment_sizes), diloco.fragment_sizes,
             diloco.schedule.overlap, diloco.codec.name if diloco.codec else "fp32", diloco.inner_step)
    if evaluator.due(diloco.inner_step) and diloco.inner_step == 0:
        with diloco.global_model():
            evaluator(0, model, 0, float("nan"), {})
    loss = torch.tensor(0.0)
    while diloco.inner_step < args.steps:
        step = diloco.inner_step
        x, y = charlm.batch(train, args.context, args.batch,
                            seed=zlib.crc32(f"{args.seed}/{replica}/{step}".encode()))
        loss = charlm.loss_of(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        optimizer.step()
        optimizer.zero_grad()
        syncs = diloco.metrics.syncs
        diloco.step()
        if diloco.metrics.syncs != syncs:
            manager.report(loss=round(loss.item(), 4), inner_step=diloco.inner_step)
        if diloco.inner_step == args.steps:
            diloco.finish()
        if evaluator.due(diloco.inner_step):
            m = diloco.metrics
            with diloco.global_model():
                evaluator(diloco.inner_step, model, m.bytes_total, loss.item(),
                          {"syncs": m.syncs, "peak_sync_bytes": m.peak_sync_bytes,
                           "failed": m.failed, "fragments": len(diloco.fragment_sizes)})
    diloco.finish()
    log.info("done: %s", json.dumps(diloco.metrics.as_dict()))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    replica = os.environ.get("LOCOCOMM_REPLICA_ID", "w0")
    train, held_out = charlm.split(charlm.load_corpus())
    torch.manual_seed(args.seed * 1000 + zlib.crc32(replica.encode()) % 1000)  # own init: the
    model = charlm.CharModel(args.context, args.width, args.layers, args.heads)  # first sync unifies
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    evaluator = Evaluator(args, replica, held_out)
    state = {"model": model, "optimizer": optimizer} if args.algo == "ddp" else None
    with lc.Manager.from_env(state=state, timeout=60) as manager:
        if args.algo == "ddp":
            train_ddp(args, model, optimizer, manager, train, evaluator, replica)
        else:
            train_diloco(args, model, optimizer, manager, train, evaluator, replica)


if __name__ == "__main__":
    main()
