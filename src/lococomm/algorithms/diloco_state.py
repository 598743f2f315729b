"""DiLoCo's state, split by who owns it.

Replicated (identical on every member, registered with the Manager, healed into joiners and
compared by digest): `GlobalState` -- the global parameters G (one flat fp32 CPU tensor per
fragment), the outer optimizer's state (per fragment) and two counters. It changes only after
a committed exchange, the same way on every member.

Per worker (never replicated): the local parameters L (the model's own tensors, seen per
fragment through `FragmentParams`), the inner optimizer, error-feedback residuals, the inner
clock and any exchange in flight (see diloco.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lococomm.algorithms.outer import OuterSGD, outer_sgd_

log = logging.getLogger(__name__)

STATE_VERSION = 1

OuterFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


class FragmentParams:
    """The model parameters of one fragment, gathered to / scattered from a flat fp32 vector."""

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.params = list(params)
        self.numels = [p.numel() for p in self.params]
        self.numel = sum(self.numels)

    def gather(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The local parameters as one flat fp32 CPU tensor (a copy)."""
        if out is None:
            out = torch.empty(self.numel, dtype=torch.float32)
        offset = 0
        with torch.no_grad():
            for p, n in zip(self.params, self.numels):
                out[offset : offset + n].copy_(p.detach().reshape(-1))
                offset += n
        return out

    def scatter(self, flat: torch.Tensor) -> None:
        """Write a flat fp32 vector into the model parameters (cast to their dtype/device)."""
        offset = 0
        with torch.no_grad():
            for p, n in zip(self.params, self.numels):
                p.copy_(flat[offset : offset + n].view_as(p))
                offset += n


class GlobalState:
    """Replicated state: global parameters, outer optimizer state and counters.

    outer: an OuterSGD (momentum buffers kept here, one flat tensor per fragment) or a
    factory `params -> torch.optim.Optimizer`, called once per fragment with [G_f] (the
    optimizer then sees each fragment as one flat fp32 tensor; element-wise optimizers such
    as SGD and Adam behave exactly as on the separate parameters).
    """

    def __init__(self, fragments: Sequence[FragmentParams], outer: OuterSGD | OuterFactory) -> None:
        self.fragments = list(fragments)
        self.global_params = [f.gather() for f in self.fragments]
        self.outer = outer
        self.momentum: list[torch.Tensor | None] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        if isinstance(outer, OuterSGD):
            self.momentum = [
                torch.zeros_like(g) if outer.momentum > 0 else None for g in self.global_params
            ]
        elif callable(outer):
            for g in self.global_params:
                opt = outer([g])
                if not isinstance(opt, torch.optim.Optimizer):
                    raise TypeError(
                        f"outer_optimizer factory must return a torch.optim.Optimizer, got "
                        f"{type(opt).__name__}"
                    )
                self.optimizers.append(opt)
        else:
            raise TypeError(
                "outer_optimizer must be None, an OuterSGD or a callable params -> "
                f"torch.optim.Optimizer, got {type(outer).__name__}"
            )
        self.syncs = 0  # committed exchanges (incl. the bootstrap), the same on every member
        self.outer_steps = 0  # outer updates applied (exchanges with at least one contributor)

    # -- the outer update ---------------------------------------------------------------------
    def apply(self, fragment: int, delta: torch.Tensor) -> None:
        """One outer step of `fragment` with the averaged pseudo-gradient `delta` (flat fp32)."""
        g = self.global_params[fragment]
        if isinstance(self.outer, OuterSGD):
            outer_sgd_(g, self.momentum[fragment], delta, self.outer)
        else:
            opt = self.optimizers[fragment]
            g.grad = delta
            opt.step()
            g.grad = None
        self.outer_steps += 1

    # -- replication --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and JSON-able values only (the Manager flattens it; nothing is pickled)."""
        if isinstance(self.outer, OuterSGD):
            outer: Any = {
                "kind": "sgd",
                "config": self.outer.config(),
                "momentum": [m for m in self.momentum if m is not None],
            }
        else:
            outer = {"kind": "torch", "optimizers": [o.state_dict() for o in self.optimizers]}
        return {
            "version": STATE_VERSION,
            "syncs": self.syncs,
            "outer_steps": self.outer_steps,
            "numels": [f.numel for f in self.fragments],
            "global": list(self.global_params),
            "outer": outer,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the state in place (tensors are copied into the existing buffers)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"DiLoCo state version {state.get('version')!r} != {STATE_VERSION}")
        numels = [int(n) for n in state["numels"]]
        if numels != [f.numel for f in self.fragments]:
            raise ValueError(
                f"DiLoCo state has fragments of {numels} elements, this model {[f.numel for f in self.fragments]}"
                " (same model, fragments and parameter order on every worker?)"
            )
        outer = state["outer"]
        mine = "sgd" if isinstance(self.outer, OuterSGD) else "torch"
        if outer.get("kind") != mine:
            raise ValueError(f"DiLoCo state has a {outer.get('kind')!r} outer optimizer, not {mine!r}")
        if mine == "sgd":
            assert isinstance(self.outer, OuterSGD)
            if outer["config"] != self.outer.config():
                raise ValueError(f"outer optimizer config {outer['config']} != {self.outer.config()}")
            buffers = [m for m in self.momentum if m is not None]
            if len(outer["momentum"]) != len(buffers):
                raise ValueError("outer momentum buffers do not match")
            for mine_t, theirs in zip(buffers, outer["momentum"]):
                mine_t.copy_(theirs)
        else:
            for opt, sd in zip(self.optimizers, outer["optimizers"], strict=True):
                opt.load_state_dict(_cloned(sd))  # torch keeps same-dtype tensors by reference
        for g, theirs in zip(self.global_params, state["global"], strict=True):
            g.copy_(theirs)
        self.syncs = int(state["syncs"])
        self.outer_steps = int(state["outer_steps"])


def _cloned(value: Any) -> Any:
    """A copy of a nested state with every tensor cloned."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cloned(v) for v in value)
    return value


class HealObserver:
    """What the Manager registers: GlobalState plus a flag raised when a heal loads it."""

    def __init__(self, state: GlobalState) -> None:
        self.state = state
        self.healed = False

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)
        self.healed = True
        log.info("DiLoCo global state received (syncs %d)", self.state.syncs)

    def take_healed(self) -> bool:
        healed, self.healed = self.healed, False
        return healed
