"""Error feedback: stateful wrappers around a codec, one state per tensor key, transactional.

Step protocol per key (every member runs the same calls)::

    payload = ef.compress(key, grad, seed)     # stages this member's new local state
    ...     exchange payloads; mean = average of every member's decode(payload) ...
    update = ef.aggregate(key, mean)           # the gradient estimate to apply; stages global state
    ef.commit(key)                             # the step committed: staged states become current
    ef.rollback(key)                           # ... or it failed: state exactly as before compress

Nothing changes before ``commit``; a failed step followed by ``rollback`` can be retried with
the same batch and produces the same bytes. ``commit()``/``rollback()`` without a key apply to
every staged key. New states are written into per-key spare buffers (double buffering), so a
step allocates nothing after the first and commit is a pointer swap.

Algorithms (g: this member's gradient, C: codec, D: decode, mean over members):

=============  =====================================================  ====================
class          local state update (staged by compress)                aggregate returns
=============  =====================================================  ====================
ErrorFeedback  p = g + e; send C(p); e <- p - D(C(p))                  mean
EF21           send C(g - h); h <- h + D                               H <- H + mean
EControl(eta)  send C(eta e + g - h); h <- h + D; e <- e + g - h_new   H <- H + mean
=============  =====================================================  ====================

ErrorFeedback is classic EF (Seide et al. 2014; Karimireddy et al. 2019). EF21 is Richtarik et
al. 2021: every member tracks h, the receivers track H = mean h. EControl is Gao, Islamov and
Stich 2024 (Algorithm 1): the error e is fed back with strength eta (eta = 0 is EF21); states
start at 0. Block quantisers and top-k run compress as one fused kernel pass (ops.quantize
mode "ef"/"ef21", ops.topk with state).

``state_dict()`` returns ``{"meta": JSON-able, "tensors": {"<slot>/<key>": tensor}}`` with
the committed state only (clones), for checkpoints and for healing a joiner;
``load_state_dict`` checks the algorithm and codec match.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from .base import Codec
from .payload import Payload

STATE_VERSION = 1


class _Transactional:
    """Committed per-key slots, staged replacements and spare buffers."""

    kind: ClassVar[str] = ""
    slots: ClassVar[tuple[str, ...]] = ()

    def __init__(self, codec: Codec) -> None:
        if not isinstance(codec, Codec):
            raise TypeError(f"expected a Codec, got {type(codec).__name__}")
        self.codec = codec
        self._state: dict[str, dict[str, torch.Tensor]] = {}
        self._spare: dict[str, dict[str, torch.Tensor]] = {}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._numel: dict[str, int] = {}

    # -- buffers ------------------------------------------------------------------------------
    def _check_key(self, key: str, n: int) -> None:
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        known = self._numel.setdefault(key, n)
        if known != n:
            raise ValueError(
                f"{type(self).__name__}: key {key!r} holds state for {known} elements, got {n}; "
                "call reset(key) if the tensor really changed"
            )

    def _current(self, key: str, slot: str, n: int, device: torch.device) -> torch.Tensor:
        t = self._state.get(key, {}).get(slot)
        if t is None:
            return torch.zeros(n, dtype=torch.float32, device=device)
        return t

    def _scratch(self, key: str, slot: str, n: int, device: torch.device) -> torch.Tensor:
        spare = self._spare.setdefault(key, {})
        t = spare.get(slot)
        if t is None or t.numel() != n or t.device != device:
            t = spare[slot] = torch.empty(n, dtype=torch.float32, device=device)
        return t

    def _stage(self, key: str, updates: dict[str, torch.Tensor]) -> None:
        staged = self._pending.setdefault(key, {})
        clash = set(staged) & set(updates)
        if clash:
            raise RuntimeError(
                f"{type(self).__name__}: key {key!r} already has a staged {sorted(clash)} update; "
                "commit or rollback the previous step first"
            )
        staged.update(updates)

    # -- transactions -------------------------------------------------------------------------
    def _keys(self, key: str | None) -> Iterable[str]:
        return list(self._pending) if key is None else [key]

    def commit(self, key: str | None = None) -> None:
        """Makes the staged state of `key` (or of every staged key) current."""
        for k in self._keys(key):
            for slot, new in self._pending.pop(k, {}).items():
                slots = self._state.setdefault(k, {})
                old = slots.get(slot)
                slots[slot] = new
                spare = self._spare.setdefault(k, {})
                if old is not None and old.shape == new.shape and slot != "warm":
                    spare[slot] = old  # reused as the next step's output buffer
                else:
                    spare.pop(slot, None)

    def rollback(self, key: str | None = None) -> None:
        """Drops the staged state of `key` (or of every key): state as before compress."""
        for k in self._keys(key):
            self._pending.pop(k, None)

    def pending_keys(self) -> list[str]:
        return sorted(self._pending)

    def reset(self, key: str | None = None) -> None:
        """Forgets the state of `key` (or all state), staged or committed."""
        for d in (self._state, self._spare, self._pending, self._numel):
            if key is None:
                d.clear()
            else:
                d.pop(key, None)

    def state(self, key: str, slot: str) -> torch.Tensor | None:
        """Committed state tensor of a key (read-only view), e.g. state("w", "e")."""
        return self._state.get(key, {}).get(slot)

    # -- checkpointing ------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Committed state: {"meta": JSON-able, "tensors": {"<slot>/<key>": clone}}."""
        meta = {
            "kind": self.kind,
            "version": STATE_VERSION,
            "codec": self.codec.spec(),
            "params": self._params(),
            "numel": dict(sorted(self._numel.items())),
        }
        tensors = {
            f"{slot}/{key}": t.detach().clone()
            for key, slots in sorted(self._state.items())
            for slot, t in sorted(slots.items())
        }
        return {"meta": meta, "tensors": tensors}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replaces all state (staged updates are dropped); checks algorithm and codec."""
        meta, tensors = state_dict["meta"], state_dict["tensors"]
        name = type(self).__name__
        if meta.get("kind") != self.kind or meta.get("version") != STATE_VERSION:
            raise ValueError(f"{name}: state is {meta.get('kind')!r} v{meta.get('version')}")
        if meta.get("codec") != self.codec.spec():
            raise ValueError(f"{name}: state was made with codec {meta.get('codec')}")
        if meta.get("params") != self._params():
            raise ValueError(f"{name}: state params {meta.get('params')} != {self._params()}")
        numel = {str(k): int(v) for k, v in meta.get("numel", {}).items()}
        state: dict[str, dict[str, torch.Tensor]] = {}
        for full, t in tensors.items():
            slot, sep, key = full.partition("/")
            if not sep or slot not in self.slots or key not in numel:
                raise ValueError(f"{name}: unexpected state tensor {full!r}")
            if slot != "warm" and t.numel() != numel[key]:
                raise ValueError(
                    f"{name}: {full!r} has {t.numel()} elements, expected {numel[key]}"
                )
            state.setdefault(key, {})[slot] = t.detach().to(torch.float32).clone().contiguous()
        self.reset()
        self._numel = numel
        self._state = state


class ErrorFeedback(_Transactional):
    """Classic error feedback: the residual e of what compression dropped is added next step."""

    kind = "ef"
    slots = ("e", "warm")

    def compress(self, key: str, tensor: torch.Tensor, seed: int = 0) -> Payload:
        """Encodes tensor + residual; stages the new residual (see module docstring)."""
        n, dev = tensor.numel(), tensor.device
        self._check_key(key, n)
        if "e" in self._pending.get(key, {}):
            raise RuntimeError(f"key {key!r} already has a staged step; commit or rollback first")
        e = self._current(key, "e", n, dev)
        out = self._scratch(key, "e", n, dev)
        warm = self.state(key, "warm")
        payload, e_new = self.codec.encode_feedback(
            tensor, e, seed, mode="ef", state_out=out, warm=warm
        )
        updates = {"e": e_new}
        w = self.codec.warm_state(payload)
        if w is not None:
            updates["warm"] = w
        self._stage(key, updates)
        return payload

    def aggregate(
        self, key: str, mean: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The update to apply: the mean of the decoded payloads itself (no global state)."""
        if out is None:
            return mean
        out.copy_(mean.view_as(out))
        return out


class _GlobalEstimate(_Transactional):
    """EF21-style algorithms: receivers keep H, the running mean of every member's h."""

    def aggregate(
        self, key: str, mean: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """H <- H + mean (staged); returns the new H (a copy, or written into `out`)."""
        n, dev = mean.numel(), mean.device
        self._check_key(key, n)
        if "H" in self._pending.get(key, {}):
            raise RuntimeError(f"key {key!r} already has a staged aggregate; commit or rollback")
        h_all = self._current(key, "H", n, dev)
        buf = self._scratch(key, "H", n, dev)
        torch.add(h_all, mean.reshape(-1).to(torch.float32), out=buf)
        self._stage(key, {"H": buf})
        if out is None:
            return buf.clone().view(mean.shape)
        out.copy_(buf.view_as(out))
        return out


class EF21(_GlobalEstimate):
    """EF21: compress the change g - h of each member's gradient estimate h."""

    kind = "ef21"
    slots = ("h", "H", "warm")

    def compress(self, key: str, tensor: torch.Tensor, seed: int = 0) -> Payload:
        """Encodes g - h; stages h + D(payload)."""
        n, dev = tensor.numel(), tensor.device
        self._check_key(key, n)
        if "h" in self._pending.get(key, {}):
            raise RuntimeError(f"key {key!r} already has a staged step; commit or rollback first")
        h = self._current(key, "h", n, dev)
        out = self._scratch(key, "h", n, dev)
        payload, h_new = self.codec.encode_feedback(
            tensor, h, seed, mode="ef21", state_out=out, warm=self.state(key, "warm")
        )
        updates = {"h": h_new}
        w = self.codec.warm_state(payload)
        if w is not None:
            updates["warm"] = w
        self._stage(key, updates)
        return payload


class EControl(_GlobalEstimate):
    """EControl: EF21 plus the error e, fed back with strength eta (eta = 0 gives EF21)."""

    kind = "econtrol"
    slots = ("h", "e", "H", "warm")

    def __init__(self, codec: Codec, eta: float) -> None:
        super().__init__(codec)
        eta = float(eta)
        if not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")
        self.eta = eta

    def _params(self) -> dict[str, Any]:
        return {"eta": self.eta}

    def compress(self, key: str, tensor: torch.Tensor, seed: int = 0) -> Payload:
        """Encodes eta e + g - h; stages h_new = h + D and e_new = e + g - h_new."""
        n, dev = tensor.numel(), tensor.device
        self._check_key(key, n)
        if "h" in self._pending.get(key, {}):
            raise RuntimeError(f"key {key!r} already has a staged step; commit or rollback first")
        g = tensor.detach().reshape(-1).to(torch.float32)
        h = self._current(key, "h", n, dev)
        e = self._current(key, "e", n, dev)
        x = e * self.eta + g
        # eta e + g - h through the codec's (fused) EF21 path: h_new = h + D(C(x - h)).
        h_out = self._scratch(key, "h", n, dev)
        payload, h_new = self.codec.encode_feedback(
            x.view(tensor.shape), h, seed, mode="ef21", state_out=h_out,
            warm=self.state(key, "warm"),
        )  # fmt: skip
        # e + g - h - D = e + g - h_new
        e_new = torch.add(e, g, out=self._scratch(key, "e", n, dev)).sub_(h_new)
        updates = {"h": h_new, "e": e_new}
        w = self.codec.warm_state(payload)
        if w is not None:
            updates["warm"] = w
        self._stage(key, updates)
        return payload
