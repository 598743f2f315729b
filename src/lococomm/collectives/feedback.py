"""Error feedback inside a compressed collective: one transaction per (EF object, key).

Every algorithm here moves a member's *contribution* x and reports, per element, the part of
it that did not reach the result: ``err = (x + e) - D_r`` where ``D_r`` is what the member's
encodings added to the sum (for the ring: the error of each hop this member encoded, so the
errors of all members add up exactly to ``sum(x) - W * result``). The error-feedback kinds
turn that into their state updates:

=============  ===============================  ==============================================
kind           contribution x, state e          staged on success
=============  ===============================  ==============================================
none           x = g                            nothing
ErrorFeedback  x = g, e = residual (fused)      e <- err
EF21           x = g - h                        h <- h + x - err
EControl(eta)  x = eta e + g - h                h <- h + x - err;  e <- e + g - h_new
=============  ===============================  ==============================================

and the value returned to the caller is ``ef.aggregate(key, mean)`` (the mean itself, or
EF21's running estimate H + mean).

State across membership changes (the rule every member applies alike, with no traffic):

* per-worker state (ErrorFeedback's residual e): kept by survivors across epochs, a joiner
  starts from zero. The residual of a member that left is lost (at most one step's error).
* replicated state (EF21/EControl's H, which only makes sense together with every member's h;
  PowerSGD's warm-start Q, which must be equal on all members): made in one epoch, used only in
  that epoch. At a key's first use in a new epoch EF21/EControl state is reset to zero on every
  member and PowerSGD starts again from the shared random Q0 (a fresh subspace iteration).

Transactions: nothing is staged unless the collective succeeded; a failed call leaves the EF
object exactly as it was. After a successful call the caller finishes the transaction once
the step's fate is known: ``ef.commit()`` when ``manager.commit()`` is True, ``ef.rollback()``
otherwise (the next call on a key with a staged step raises, naming the key).

This module is the only place that touches the EF objects' staging internals.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from lococomm.compress.error_feedback import EF21, EControl, ErrorFeedback

EFObject = ErrorFeedback | EF21 | EControl

# Epoch in which each (EF object, key) was last used (the replicated-state rule above).
_EPOCHS: weakref.WeakKeyDictionary[Any, dict[str, int]] = weakref.WeakKeyDictionary()


def kind_of(ef: Any) -> str:
    if ef is None:
        return "none"
    if isinstance(ef, EControl):
        return "econtrol"
    if isinstance(ef, EF21):
        return "ef21"
    if isinstance(ef, ErrorFeedback):
        return "ef"
    raise TypeError(
        f"error_feedback must be an ErrorFeedback, EF21 or EControl, got {type(ef).__name__}"
    )


class Feedback:
    """The error-feedback side of one compressed all-reduce of one key (see module doc)."""

    def __init__(self, ef: EFObject | None, key: str, numel: int, epoch: int) -> None:
        self.ef = ef
        self.key = key
        self.kind = kind_of(ef)
        self.numel = numel
        self.warm: torch.Tensor | None = None
        self._err: torch.Tensor | None = None
        self._x: torch.Tensor | None = None
        if ef is None:
            return
        pending = ef.pending_keys()
        if key in pending:
            raise RuntimeError(
                f"error feedback key {key!r} still holds the staged state of an earlier step: "
                "call ef.commit() after manager.commit() returns True, or ef.rollback() after "
                "it returns False"
            )
        ef._check_key(key, numel)
        epochs = _EPOCHS.setdefault(ef, {})
        same_epoch = epochs.get(key) == epoch
        if not same_epoch and self.kind in ("ef21", "econtrol"):
            ef.reset(key)  # replicated H is only meaningful within one epoch
            ef._check_key(key, numel)
        epochs[key] = epoch
        warm = ef.state(key, "warm")
        self.warm = warm if same_epoch else None

    @property
    def active(self) -> bool:
        return self.ef is not None

    def contribution(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x, e): what this member sends, and a state the algorithm adds before encoding
        (classic EF: the residual, fused into the encode pass). g is flat."""
        ef = self.ef
        if ef is None:
            return g, None
        dev = g.device
        if self.kind == "ef":
            return g, ef._current(self.key, "e", self.numel, dev)
        h = ef._current(self.key, "h", self.numel, dev)
        x = ef._scratch(self.key, "h", self.numel, dev)
        if self.kind == "ef21":
            torch.sub(g, h, out=x)
        else:
            e = ef._current(self.key, "e", self.numel, dev)
            assert isinstance(ef, EControl)
            torch.mul(e, ef.eta, out=x).add_(g).sub_(h)
        self._x = x
        return x, None

    def error_buffer(self, pool: Any, device: torch.device) -> torch.Tensor | None:
        """Where the algorithm writes err (None without error feedback)."""
        if self.ef is None:
            return None
        if self.kind == "ef":
            self._err = self.ef._scratch(self.key, "e", self.numel, device)
        else:
            self._err = pool.get(self.numel, torch.float32, device)
        return self._err

    def release(self, pool: Any) -> None:
        """Return pooled scratch after a failure (the EF object itself is untouched)."""
        if self.kind in ("ef21", "econtrol") and self._err is not None:
            pool.put(self._err)
        self._err = None

    def stage(self, g: torch.Tensor, pool: Any, warm: torch.Tensor | None = None) -> None:
        """After success: stage the new state (nothing is current until ef.commit())."""
        ef = self.ef
        if ef is None:
            return
        err = self._err
        assert err is not None
        updates: dict[str, torch.Tensor] = {}
        if self.kind == "ef":
            updates["e"] = err
        else:
            x = self._x
            assert x is not None
            h = ef._current(self.key, "h", self.numel, g.device)
            h_new = x.sub_(err).add_(h)  # h + x - err, in the scratch that held x
            updates["h"] = h_new
            if self.kind == "econtrol":
                e = ef._current(self.key, "e", self.numel, g.device)
                e_new = ef._scratch(self.key, "e", self.numel, g.device)
                torch.add(e, g, out=e_new).sub_(h_new)
                updates["e"] = e_new
            pool.put(err)
        if warm is not None:
            updates["warm"] = warm
        ef._stage(self.key, updates)
        self._err = None

    def aggregate(self, mean: torch.Tensor) -> torch.Tensor:
        """The value the caller receives: mean (ErrorFeedback) or H + mean (EF21/EControl)."""
        if self.ef is None:
            return mean
        return self.ef.aggregate(self.key, mean)
