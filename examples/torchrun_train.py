"""Replica groups under torchrun: every-step DataParallel, then DiLoCo, across replica groups.

Launch one torchrun job per replica group (see docs/torchrun.md and launch/):

    launch/coordinator.sh                                      # prints host:port
    LOCOCOMM_COORDINATOR=host:port LOCOCOMM_REPLICA_ID=r0 NPROC_PER_NODE=2 \\
        launch/replica.sh examples/torchrun_train.py --algo both
    REPLICAS=2 NPROC_PER_NODE=2 launch/local_cpu.sh examples/torchrun_train.py   # all on CPU

Local rank r of every replica group forms one cross-replica group (as HSDP does); here each
local rank trains its own small regression model (think: one shard of a sharded model) on
data of its own. On a GPU node each rank uses cuda:<local rank> and the manager picks NCCL
(LOCOCOMM_BACKEND overrides); on CPU everything runs on gloo.

Phases: `--dp-steps` committed steps of lc.DataParallel (gradients averaged every step,
exchanged during backward), then `--diloco-steps` inner steps of DiLoCo (parameters
averaged every `--sync-every` steps). A replica group that crashes is restarted by torchrun
(launch/replica.sh) and healed from the others before its first step, in either phase.
`--out` writes JSON lines per step and rank ("{replica}" and "{rank}" in the path expand).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import zlib

import torch
from torch import nn

import lococomm as lc
from lococomm.algorithms.data_parallel import DataParallel
from lococomm.algorithms.diloco import DiLoCo
from lococomm.algorithms.optimizer import Optimizer

log = logging.getLogger("torchrun_train")
WIDTH = 32


def make_model(seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)  # a different init per replica: the first step makes them equal
    net = nn.Sequential(nn.Linear(WIDTH, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    return net.to(device)


def data(replica: str, local_rank: int, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A regression batch: y = <teacher(local rank), x> + noise; x depends on who and when."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{replica}/{local_rank}/{step}".encode()))
    teacher = torch.Generator().manual_seed(1000 + local_rank)
    w = torch.randn(WIDTH, 1, generator=teacher)
    x = torch.randn(64, WIDTH, generator=g)
    y = x @ w + 0.01 * torch.randn(64, 1, generator=g)
    return x.to(device), y.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", choices=["dp", "diloco", "both"], default="both")
    parser.add_argument("--dp-steps", type=int, default=100)
    parser.add_argument("--diloco-steps", type=int, default=100, help="inner steps")
    parser.add_argument("--sync-every", type=int, default=10)
    parser.add_argument("--codec", choices=["none", "int8"], default="none", help="DataParallel wire format")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds (slows the demo down)")
    parser.add_argument("--out", default="", help="JSON lines per step; {replica}, {rank} expand")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    replica = os.environ.get("LOCOCOMM_REPLICA_ID", "solo")
    seed = zlib.crc32(replica.encode()) + local_rank
    dp_steps = args.dp_steps if args.algo in ("dp", "both") else 0
    diloco_steps = args.diloco_steps if args.algo in ("diloco", "both") else 0

    # Everything replicated is registered before the first step, so a restarted rank is
    # healed with all of it whichever phase the others are in.
    net = make_model(seed, device)
    sgd = torch.optim.SGD(net.parameters(), lr=args.lr)
    manager = lc.Manager.from_env(state={"dp_model": net, "dp_optimizer": sgd})
    codec = lc.codecs.Int8() if args.codec == "int8" else None
    model = DataParallel(net, manager, codec=codec, error_feedback=codec is not None, bucket_mb=0.01)
    opt = Optimizer(sgd, manager)
    inner = make_model(seed + 1, device)
    inner_opt = torch.optim.AdamW(inner.parameters(), lr=3e-3)
    diloco = DiLoCo(inner, inner_opt, manager, sync_every=args.sync_every, join=False)

    path = args.out.replace("{replica}", replica).replace("{rank}", str(local_rank))
    out = open(path, "a", buffering=1) if args.out else None

    def record(**row: object) -> None:
        if out is not None:
            row.update(replica=replica, local_rank=local_rank, pid=os.getpid(), time=time.time(),
                       restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
            out.write(json.dumps(row) + "\n")

    record(event="start")
    # Phase 1: DataParallel. The phase is read from manager.step, which a restarted rank only
    # learns when start_step() heals it; if it turns out the group is past this phase, give
    # the step back (voted down at once, so nobody waits) and join DiLoCo instead.
    while manager.step < dp_steps:
        opt.zero_grad()  # start_step(): re-quorum and heal when needed
        step = manager.step
        if step >= dp_steps:
            manager.fail_step("healed into the DiLoCo phase")
            manager.commit()
            break
        x, y = data(replica, local_rank, step, device)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        committed = opt.step()
        record(event="dp", step=step, committed=committed, loss=loss.item(), epoch=manager.epoch,
               members=manager.members, digest=manager.digest() if committed else "",
               heal_bytes=manager.metrics.heal_bytes)
        if args.step_sleep:
            time.sleep(args.step_sleep)
    model.remove_hooks()

    # Phase 2: DiLoCo on the second model (its global state was registered above).
    if diloco_steps:
        diloco.join()
        last = None
        while diloco.inner_step < diloco_steps:
            x, y = data(replica, local_rank, dp_steps + diloco.inner_step, device)
            loss = nn.functional.mse_loss(inner(x), y)
            loss.backward()
            inner_opt.step()
            inner_opt.zero_grad()
            diloco.step()
            sync = diloco.metrics.last
            if sync and sync is not last:
                last = sync
                record(event="diloco", **sync, loss=loss.item(), digest=manager.digest(),
                       heal_bytes=manager.metrics.heal_bytes)
            if args.step_sleep:
                time.sleep(args.step_sleep)
        diloco.finish()
    record(event="done", step=manager.step, syncs=diloco.syncs, digest=manager.digest(),
           members=manager.members, heal_bytes=manager.metrics.heal_bytes)
    log.info("rank %d of %s done: step %d, digest %s", local_rank, replica, manager.step, manager.digest())
    manager.close()


if __name__ == "__main__":
    main()
