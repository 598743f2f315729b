"""The maths of the DiLoCo family as pure functions: schedule, fragments, outer step, merges.

Notation (per fragment f; all fp32, flat):

    G      global (outer) parameters, identical on every member
    L      this worker's local (inner) parameters
    Δ      pseudo-gradient sent by a worker: G - L at the moment the exchange is issued
    Δ̄      the members' mean of Δ (over the contributing members)

Schedule: P staggered exchange starts per H inner steps (fragment p at clocks t > 0 with
t mod H == floor((p + 1) H / P) mod H); each exchange completes `overlap` inner steps later
(0 <= overlap <= floor(H / P), so at most one exchange is in flight), or at the next start
(delayed). P = 1, overlap = 0 is plain DiLoCo (every parameter synced every H steps).

Outer step (default, DiLoCo paper): SGD with Nesterov momentum on Δ̄,

    m <- mu m + Δ̄;  (clip: m <- clamp(m, -c, c), CO2's outer-momentum clipping)
    u = Δ̄ + mu m (Nesterov) or m;  G <- G - lr u

Merges after a committed exchange (applied to the synced fragment only):

    mix     L <- (1 - mix) L + mix G          (mix = 1: replace, plain DiLoCo; Streaming
                                               DiLoCo's alpha is 1 - mix, the paper uses 0.5)
    rebase  L <- G + (L - S)                  (S = L when the exchange was issued: the local
                                               progress made while it was in flight is kept on
                                               top of the new global parameters; delayed mode)

Error feedback with decay (SparseLoCo): the accumulator is e <- beta e + Δ, the codec sends
C(e) and keeps e - D(C(e)). Classic error feedback adds its residual e to what it is given,
so a worker hands it x = Δ - (1 - beta) e (see `decayed_contribution`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lococomm import ops

_LAYER_INDEX = re.compile(r"^(.*?\.\d+)(?:\.|$)")


# ---------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """When fragments are exchanged and merged (clock = inner steps done so far).

    Fragment p's exchanges start at the clocks t > 0 with t mod H == offset_p mod H, where
    offset_p = floor((p + 1) H / P): P staggered starts per H steps, as evenly spaced as H
    allows (H = 50, P = 4: 12, 25, 37, 50), so every fragment is exchanged every H steps.
    An exchange completes `overlap` steps after it started, or with delayed=True at the next
    start (the commit of one exchange and the start of the next happen at the same clock).
    """

    sync_every: int  # H: inner steps between two exchanges of the same fragment
    fragments: int = 1  # P
    overlap: int = 0  # tau: inner steps between issuing an exchange and applying it
    delayed: bool = False  # apply each exchange at the next start instead

    def __post_init__(self) -> None:
        if not isinstance(self.sync_every, int) or self.sync_every < 1:
            raise ValueError(f"sync_every must be a positive int, got {self.sync_every!r}")
        if not isinstance(self.fragments, int) or not 1 <= self.fragments <= self.sync_every:
            raise ValueError(
                f"fragments must be an int in [1, sync_every={self.sync_every}], got {self.fragments!r}"
            )
        if not isinstance(self.overlap, int) or not 0 <= self.overlap <= self.period:
            raise ValueError(
                f"overlap_steps must be an int in [0, {self.period}] (the shortest gap between "
                f"two exchanges), got {self.overlap!r}: at most one exchange may be in flight"
            )
        if self.delayed and self.overlap:
            raise ValueError("a delayed schedule overlaps until the next start; overlap must be 0")

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start offsets in (0, H] of fragments 0..P-1 within every H steps."""
        return tuple((p + 1) * self.sync_every // self.fragments for p in range(self.fragments))

    @property
    def period(self) -> int:
        """The shortest gap between two consecutive exchange starts: floor(H / P)."""
        return self.sync_every // self.fragments

    @property
    def overlapped(self) -> bool:
        """Do inner steps run while an exchange is in flight?"""
        return self.delayed or self.overlap > 0

    def _phase(self, clock: int) -> int:
        return clock % self.sync_every or self.sync_every

    def starts_at(self, clock: int) -> bool:
        """Does an exchange start after `clock` inner steps?"""
        return clock > 0 and self._phase(clock) in self.offsets

    def fragment_at(self, clock: int) -> int:
        """The fragment whose exchange starts at `clock` (a start clock)."""
        if not self.starts_at(clock):
            raise ValueError(f"no exchange starts at clock {clock} (offsets {self.offsets} of {self.sync_every})")
        return self.offsets.index(self._phase(clock))

    def next_start(self, clock: int) -> int:
        """The first start clock strictly after `clock`."""
        base = clock - self._phase(clock) if clock > 0 else -self.sync_every
        for cycle in (base, base + self.sync_every):
            for offset in self.offsets:
                if cycle + offset > clock:
                    return cycle + offset
        raise AssertionError("unreachable: every cycle has P starts")

    def finish_at(self, clock: int) -> int:
        """The clock at which the exchange started at `clock` is committed and applied."""
        return self.next_start(clock) if self.delayed else clock + self.overlap


# ---------------------------------------------------------------------------------------------
# fragments
# ---------------------------------------------------------------------------------------------
def layer_key(name: str) -> str | None:
    """'blocks.layers.3.linear1.weight' -> 'blocks.layers.3'; None if the name has no index."""
    m = _LAYER_INDEX.match(name)
    return m.group(1) if m else None


def assign_fragments(names: Sequence[str], numels: Sequence[int], fragments: int) -> list[list[int]]:
    """Split parameters (in model order) into `fragments` groups of parameter indices.

    Numbered layers (a name component that is an integer, e.g. transformer block i) are striped
    over fragments: the j-th layer goes to fragment j mod P (Streaming DiLoCo's strided
    pattern, so each fragment spans the depth of the network). The remaining parameters
    (embeddings, final norm, head...) go, largest first, to the fragment holding the fewest
    elements. Indices inside a fragment keep model order. Pure and deterministic: every
    member derives the same fragments from the same model.
    """
    if len(names) != len(numels):
        raise ValueError("names and numels must have the same length")
    if fragments < 1:
        raise ValueError(f"fragments must be >= 1, got {fragments}")
    if not names:
        raise ValueError("the model has no trainable parameters")
    groups: list[list[int]] = [[] for _ in range(fragments)]
    sizes = [0] * fragments
    layers: dict[str, int] = {}
    loose: list[int] = []
    for i, name in enumerate(names):
        key = layer_key(name)
        if key is None:
            loose.append(i)
            continue
        f = layers.setdefault(key, len(layers) % fragments)
        groups[f].append(i)
        sizes[f] += int(numels[i])
    for i in sorted(loose, key=lambda i: (-int(numels[i]), i)):
        f = min(range(fragments), key=lambda f: (sizes[f], f))
        groups[f].append(i)
        sizes[f] += int(numels[i])
    empty = [f for f in range(fragments) if not groups[f]]
    if empty:
        raise ValueError(
            f"cannot split {len(names)} parameters into {fragments} fragments: fragment(s) "
            f"{empty} would be empty; use fewer fragments"
        )
    return [sorted(g) for g in groups]


# ---------------------------------------------------------------------------------------------
# outer step
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OuterSGD:
    """The default outer optimizer: SGD with (Nesterov) momentum on the averaged
    pseudo-gradient (DiLoCo: lr 0.7, momentum 0.9, Nesterov).

    clip: if set, the momentum buffer is clamped element-wise to [-clip, clip] after each
    update (CO2's outer-momentum clipping), in the units of the pseudo-gradient (parameter
    units).
    """

    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True
    clip: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"outer lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"outer momentum must be in [0, 1), got {self.momentum}")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be None or a finite number > 0, got {self.clip}")

    def config(self) -> dict[str, object]:
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov, "clip": self.clip}


def outer_sgd_(
    global_: torch.Tensor,
    momentum: torch.Tensor | None,
    delta: torch.Tensor,
    opt: OuterSGD,
) -> None:
    """One outer SGD step on flat fp32 tensors, in place (see the module docstring).

    `momentum` may be None only when opt.momentum == 0. Without clipping the fused kernel
    (ops.nesterov_outer_) runs; every member runs the same code on the same bytes, so the
    result is bit-identical everywhere.
    """
    if opt.momentum == 0:
        global_.sub_(delta, alpha=opt.lr)
        return
    if momentum is None:
        raise ValueError("outer momentum > 0 needs a momentum buffer")
    if opt.clip is None:
        ops.nesterov_outer_(global_, momentum, delta, lr=opt.lr, mu=opt.momentum, nesterov=opt.nesterov)
        return
    momentum.mul_(opt.momentum).add_(delta).clamp_(-opt.clip, opt.clip)
    update = delta + momentum * opt.momentum if opt.nesterov else momentum
    global_.sub_(update, alpha=opt.lr)


# ---------------------------------------------------------------------------------------------
# merges and error feedback with decay
# ---------------------------------------------------------------------------------------------
def mix_(local: torch.Tensor, global_: torch.Tensor, mix: float) -> torch.Tensor:
    """local <- (1 - mix) local + mix global, in place (mix = 1: copy)."""
    if mix == 1.0:
        return local.copy_(global_)
    return local.mul_(1.0 - mix).add_(global_, alpha=mix)


def rebase_(local: torch.Tensor, global_: torch.Tensor, snapshot: torch.Tensor) -> torch.Tensor:
    """local <- global + (local - snapshot), in place: keep the progress made since snapshot."""
    return local.sub_(snapshot).add_(global_)


def decayed_contribution(delta: torch.Tensor, residual: torch.Tensor | None, decay: float) -> torch.Tensor:
    """What to hand classic error feedback so that it encodes delta + decay * residual.

    ErrorFeedback encodes x + e (e: its committed residual); with x = delta - (1 - decay) e
    that is delta + decay e, SparseLoCo's decayed accumulator. Modifies and returns `delta`
    (unchanged when decay == 1 or there is no residual yet).
    """
    if decay == 1.0 or residual is None:
        return delta
    return delta.sub_(residual, alpha=1.0 - decay)
