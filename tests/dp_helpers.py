"""Helpers for DataParallel tests: members as threads of the test process, models, data.

Each member is a real Manager with its own gloo process group (over loopback); running them
as threads keeps the in-process tests fast. Crash tests use real processes (dp_worker.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import lococomm as lc


def run_members(coordinator: Any, n: int, fn: Callable[[int, Any], Any], timeout: float = 60.0,
                **manager_kwargs: Any) -> list[Any]:
    """Run fn(rank, manager) for n members (threads); returns their results in rank order."""
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def target(r: int) -> None:
        manager = lc.Manager(coordinator.address, replica_id=f"m{r}", timeout=20.0, **manager_kwargs)
        try:
            results[r] = fn(r, manager)
        except BaseException as e:  # re-raised on the test's thread
            errors.append(e)
        finally:
            manager.close()

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if any(t.is_alive() for t in threads):
        raise AssertionError(f"members did not finish within {timeout}s")
    if errors:
        raise errors[0]
    return results


def init_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic parameters without touching the global RNG (threads share it)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.2).to(p.dtype))
    return module


def mlp(seed: int = 0) -> nn.Module:
    return init_(
        nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)),
        seed,
    )


def batch(member: int, step: int, micro: int = 0, rows: int = 16, width: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * member + 10 * step + micro)
    return torch.randn(rows, width, generator=g)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean()


def grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in module.parameters()]


def params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def member_grads(make: Callable[[], nn.Module], state: list[torch.Tensor],
                 inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """One member's gradient (accumulated over `inputs`) at parameters `state`, computed the
    way autograd does it in a training loop (single process, no lococomm)."""
    net = make()
    with torch.no_grad():
        for p, v in zip(net.parameters(), state):
            p.copy_(v)
    for x in inputs:
        loss_of(net(x)).backward()
    return grads(net)


def average(per_member: list[list[torch.Tensor | None]]) -> list[torch.Tensor | None]:
    """Sum in member order, then divide (what a 2-member gloo all-reduce + division does)."""
    out = []
    for gs in zip(*per_member):
        present = [g for g in gs if g is not None]
        if not present:
            out.append(None)
            continue
        total = torch.zeros_like(present[0])
        for g in gs:
            if g is not None:
                total = total + g
        out.append(total / len(gs))
    return out
