"""A worker for replica-group tests, launched by torchrun or directly (Manager.from_env())."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

import lococomm as lc


def contribution(replica: str, local_rank: int, step: int) -> float:
    return float((10 if replica == "big" else 1) * (local_rank + 1) * (step + 1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    manager = lc.Manager.from_env(timeout=30)
    local_rank = manager.group_rank
    path = args.out.replace("{rank}", str(local_rank))
    with open(path, "a", buffering=1) as out:
        while manager.step < args.steps:
            manager.start_step()
            step = manager.step
            tensor = torch.full((4096,), contribution(manager.replica_id, local_rank, step))
            manager.allreduce(tensor)
            committed = manager.commit()
            out.write(json.dumps({
                "event": "step", "step": step, "committed": committed, "value": tensor[0].item(),
                "members": manager.members, "world_size": manager.world_size,
                "local_rank": local_rank, "group_world_size": manager.group_world_size,
                "pid": os.getpid(),
            }) + "\n")
    manager.close()


if __name__ == "__main__":
    main()
