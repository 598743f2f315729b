"""Layer-wise adaptive compression in the style of L-GreCo (Markov et al., MLSys 2024).

Every tensor (layer) may use any of several candidate codecs (e.g. Int2/Int4/Int8, or TopK at
several ratios). Every ``replan_every`` steps the compression error of every candidate is
measured on every tensor, and a dynamic program picks one candidate per tensor that minimises
the total bytes on the wire subject to a total error budget:

    minimise  sum_l bytes[l][c_l]   subject to   sum_l err[l][c_l] <= budget * sum_l ||x_l||^2

with err = ||x - D(C(x))||^2. Errors are discretised in ``resolution`` steps of the budget and
rounded up, so a returned plan always meets the budget on the measured errors.

Members must use the same plan for a tensor at a given step (ring reduction requires the same
codec). ``plan()`` is a JSON-able dict; a collective layer can broadcast one member's plan and
``set_plan`` it everywhere (or all-reduce the measured errors before ``replan``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .base import Codec
from .payload import Payload

log = logging.getLogger(__name__)


def lgreco_plan(
    errors: Sequence[Sequence[float]],
    sizes: Sequence[Sequence[float]],
    budget: float,
    *,
    resolution: int = 1000,
) -> list[int]:
    """Per layer, the option index minimising total size with total error <= budget.

    errors[l][c], sizes[l][c] >= 0 for layer l and option c. If even the most accurate options
    exceed the budget, returns the per-layer minimum-error plan and logs a warning.
    """
    n_layers = len(errors)
    if n_layers == 0:
        return []
    if len(sizes) != n_layers or any(len(e) != len(s) for e, s in zip(errors, sizes)):
        raise ValueError("errors and sizes must have the same layers x options shape")
    if not (budget >= 0 and math.isfinite(budget)):
        raise ValueError(f"budget must be a finite number >= 0, got {budget}")
    if resolution < 1:
        raise ValueError("resolution must be >= 1")
    err = np.asarray([list(e) for e in errors], dtype=np.float64)
    size = np.asarray([list(s) for s in sizes], dtype=np.float64)
    if (err < 0).any() or (size < 0).any() or not np.isfinite(err).all():
        raise ValueError("errors and sizes must be finite and >= 0")
    unit = budget / resolution if budget > 0 else 0.0
    if unit > 0:
        weight = np.ceil(err / unit - 1e-9).astype(np.int64)
    else:  # zero budget: only exact options fit
        weight = np.where(err > 0, resolution + 1, 0).astype(np.int64)

    inf = np.inf
    dp = np.full(resolution + 1, inf)
    dp[0] = 0.0
    choice = np.zeros((n_layers, resolution + 1), dtype=np.int64)
    for layer in range(n_layers):
        new = np.full(resolution + 1, inf)
        arg = np.zeros(resolution + 1, dtype=np.int64)
        for c in range(err.shape[1]):
            w = int(weight[layer, c])
            if w > resolution:
                continue
            cand = np.full(resolution + 1, inf)
            cand[w:] = dp[: resolution + 1 - w] + size[layer, c]
            better = cand < new
            new[better] = cand[better]
            arg[better] = c
        dp, choice[layer] = new, arg
    if not np.isfinite(dp).any():
        log.warning("lgreco_plan: budget %.3g infeasible; using the most accurate options", budget)
        return [int(np.argmin(err[layer])) for layer in range(n_layers)]
    e = int(np.argmin(dp))
    plan = [0] * n_layers
    for layer in range(n_layers - 1, -1, -1):
        c = int(choice[layer, e])
        plan[layer] = c
        e -= int(weight[layer, c])
    return plan


class Adaptive:
    """Per-tensor codec choice among `candidates` under a relative error `budget` (see module).

    Use per step: ``payload = ad.encode(key, tensor, seed)`` for every tensor, decode with
    ``ad.decode(payload)`` (the choice travels in the payload meta), then ``ad.step()``.
    Until the first plan, every tensor uses ``candidates[default]``.
    """

    def __init__(
        self,
        candidates: Sequence[Codec],
        budget: float,
        *,
        replan_every: int = 100,
        default: int = 0,
        resolution: int = 1000,
    ) -> None:
        if not candidates or not all(isinstance(c, Codec) for c in candidates):
            raise ValueError("candidates must be a non-empty sequence of codecs")
        if not (budget >= 0 and math.isfinite(budget)):
            raise ValueError(f"budget must be a finite number >= 0, got {budget}")
        if replan_every < 1:
            raise ValueError("replan_every must be >= 1")
        if not 0 <= default < len(candidates):
            raise ValueError(f"default must index candidates, got {default}")
        self.candidates = list(candidates)
        self.budget = float(budget)
        self.replan_every = int(replan_every)
        self.default = int(default)
        self.resolution = int(resolution)
        self._plan: dict[str, int] = {}
        self._step = 0
        self._measured: dict[str, tuple[list[float], list[int], float]] = {}

    def measuring(self) -> bool:
        """True on steps where encode() also measures every candidate's error."""
        return self._step % self.replan_every == 0

    def codec_for(self, key: str) -> Codec:
        return self.candidates[self._plan.get(key, self.default)]

    def encode(self, key: str, tensor: torch.Tensor, seed: int = 0) -> Payload:
        """Encodes with the planned candidate for `key` (measuring all on measuring steps)."""
        choice = self._plan.get(key, self.default)
        if self.measuring():
            x = tensor.detach().reshape(-1).to(torch.float32)
            errs, sizes = [], []
            for c in self.candidates:
                p = c.encode(tensor, seed)
                d = c.decode(p).reshape(-1).to(torch.float32)
                errs.append(float(torch.sum((x - d).double() ** 2)))
                sizes.append(c.wire_bytes(p))
            self._measured[key] = (errs, sizes, float(torch.sum(x.double() ** 2)))
        payload = self.candidates[choice].encode(tensor, seed)
        return Payload.make(payload.codec, {**payload.meta, "choice": choice}, payload.tensors)

    def decode(self, payload: Payload) -> torch.Tensor:
        choice = payload.meta.get("choice")
        if not isinstance(choice, int) or not 0 <= choice < len(self.candidates):
            raise ValueError(f"Adaptive.decode: payload has no valid 'choice' ({choice!r})")
        return self.candidates[choice].decode(payload)

    def step(self) -> bool:
        """Ends a step; replans (returns True) after a measuring step."""
        replan = self.measuring() and bool(self._measured)
        if replan:
            self.replan()
        self._step += 1
        return replan

    def replan(self) -> dict[str, int]:
        """Runs the dynamic program on the last measurements; returns the new plan."""
        keys = sorted(self._measured)
        if not keys:
            return dict(self._plan)
        errors = [self._measured[k][0] for k in keys]
        sizes = [self._measured[k][1] for k in keys]
        total = sum(self._measured[k][2] for k in keys)
        choice = lgreco_plan(errors, sizes, self.budget * total, resolution=self.resolution)
        self._plan.update(dict(zip(keys, choice)))
        self._measured.clear()
        log.info("Adaptive: new plan %s", self._plan)
        return dict(self._plan)

    def plan(self) -> dict[str, int]:
        """The current plan, key -> candidate index (JSON-able)."""
        return dict(self._plan)

    def set_plan(self, plan: dict[str, int]) -> None:
        for k, c in plan.items():
            if not isinstance(c, int) or not 0 <= c < len(self.candidates):
                raise ValueError(f"plan entry {k!r}: {c!r} is not a candidate index")
        self._plan = dict(plan)

    def state_dict(self) -> dict[str, Any]:
        return {
            "meta": {
                "plan": self.plan(),
                "step": self._step,
                "candidates": [c.spec() for c in self.candidates],
            },
            "tensors": {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = state["meta"]
        if meta["candidates"] != [c.spec() for c in self.candidates]:
            raise ValueError("Adaptive: state was made with different candidates")
        self.set_plan({str(k): int(v) for k, v in meta["plan"].items()})
        self._step = int(meta["step"])
        self._measured.clear()
