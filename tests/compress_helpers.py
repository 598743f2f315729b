"""Worker bodies for the compression tests that need real processes (spawned, gloo, loopback)."""

from __future__ import annotations

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    torch.manual_seed(0)  # identical initial weights on every rank
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )


def _train(rank: int, hook, steps: int) -> torch.Tensor:
    """A few SGD steps of DDP (several small buckets) on rank-specific data; flat params."""
    model = DDP(_model(), bucket_cap_mb=0.005)  # ~1250 floats per bucket -> several buckets
    if hook is not None:
        model.register_comm_hook(None, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(64, 32, generator=g)
    y = torch.randn(64, 4, generator=g) + rank
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _same_on_all_ranks(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return all(torch.equal(g.view(torch.int32), t.view(torch.int32)) for g in gathered)


def ddp_hook_worker(rank: int, world: int, port: int, outdir: str) -> None:
    from lococomm.compress import EF21, codecs, ddp_hook

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        steps = 15
        plain = _train(rank, None, steps)
        identity = _train(rank, ddp_hook(codecs.Identity(), error_feedback=False), steps)
        hook8 = ddp_hook(codecs.Int8(rounding="stochastic"), error_feedback=True, seed=7)
        int8 = _train(rank, hook8, steps)
        topk = _train(rank, ddp_hook(codecs.TopK(0.05), EF21(codecs.TopK(0.05))), steps)
        start = torch.cat([p.detach().reshape(-1) for p in _model().parameters()])
        moved = float((plain - start).norm())
        result = {
            "identity_equals_plain": bool(
                torch.equal(identity.view(torch.int32), plain.view(torch.int32))
            ),
            "int8_rel_dev": float((int8 - plain).norm()) / moved,
            "topk_rel_dev": float((topk - plain).norm()) / moved,
            "moved": moved,
            "same_plain": _same_on_all_ranks(plain),
            "same_int8": _same_on_all_ranks(int8),
            "same_topk": _same_on_all_ranks(topk),
            "ef_keys": hook8.ef.pending_keys(),
            "ef_buckets": sorted(hook8.ef.state_dict()["meta"]["numel"]),
        }
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()  # both ranks done before either tears its gloo pairs down
    finally:
        dist.destroy_process_group()
