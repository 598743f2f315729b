"""A DataParallel training worker for fault tests; logs every step as a JSON line.

Worker `w<i>` trains dp_helpers.mlp() with SGD on batch(i, step). It can SIGKILL or SIGSTOP
itself in the middle of backward: from the post-accumulate-grad hook of the middle layer's
weight, i.e. after the last layer's bucket was launched and before the first layer's was.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import time

import torch

import lococomm as lc
from dp_helpers import batch, loss_of, mlp
from lococomm.algorithms.data_parallel import DataParallel
from lococomm.algorithms.optimizer import Optimizer

LR = 0.1
BUCKETS = dict(bucket_mb=0.01, first_bucket_mb=0.002)


def digest(module: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in module.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--replica", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", default=None, help="torch.save the final parameters here")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--stop-at", type=int, default=-1)
    parser.add_argument("--codec", default="none", choices=["none", "int8"])
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {args.replica} %(name)s: %(message)s", stream=sys.stderr
    )
    torch.set_num_threads(1)
    index = int(args.replica.lstrip("w"))
    out = open(args.out, "a", buffering=1)

    def log(**row) -> None:
        out.write(json.dumps({**row, "time": time.time()}) + "\n")

    net = mlp()
    sgd = torch.optim.SGD(net.parameters(), lr=LR)
    manager = lc.Manager(
        args.coordinator, replica_id=args.replica, timeout=args.timeout,
        state={"model": net, "optimizer": sgd},
    )  # fmt: skip
    codec = lc.codecs.Int8() if args.codec == "int8" else None
    model = DataParallel(net, manager, codec=codec, error_feedback=codec is not None, **BUCKETS)
    opt = Optimizer(sgd, manager)
    middle_weight = net[2].weight
    fired = {"kill": False, "stop": False}

    def saboteur(param: torch.Tensor) -> None:
        launched = model._next  # buckets already handed to the process group
        if manager.step == args.kill_at and not fired["kill"]:
            fired["kill"] = True
            log(event="kill", step=manager.step, launched=launched)
            os.kill(os.getpid(), signal.SIGKILL)
        if manager.step == args.stop_at and not fired["stop"]:
            fired["stop"] = True
            log(event="stop", step=manager.step, launched=launched)
            os.kill(os.getpid(), signal.SIGSTOP)
            log(event="continued", step=manager.step)

    middle_weight.register_post_accumulate_grad_hook(saboteur)
    log(event="registered")
    while manager.step < args.steps:
        opt.zero_grad()
        step = manager.step
        started = time.monotonic()
        loss = loss_of(model(batch(index, step)))
        loss.backward()
        backward = time.monotonic() - started
        committed = opt.step()
        seconds = time.monotonic() - started
        views = model.grads_are_views()
        log(
            event="step", step=step, committed=committed, epoch=manager.epoch,
            members=manager.members, loss=loss.item(), digest=digest(net),
            backward_seconds=backward, step_seconds=seconds,
            abandoned=model.metrics.abandoned_buckets, grads_are_views=views,
            grads_zero=not committed and all(not p.grad.any() for p in net.parameters()),
            failure="" if committed else manager.last_failure,
        )  # fmt: skip
        if args.step_sleep:
            time.sleep(args.step_sleep)
    if args.save:
        torch.save([p.detach().clone() for p in net.parameters()], args.save)
    log(event="done", step=manager.step)
    manager.close()


if __name__ == "__main__":
    main()
