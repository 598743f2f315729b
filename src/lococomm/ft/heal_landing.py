"""Where a heal receiver's bytes land, made ready while the epoch's group still forms.

A receiver learns the state's layout from `heal/meta` as soon as the primary source has the
epoch plan, well before the epoch's process group exists. `Landing` uses that time on a helper
thread: it reads the metadata, picks each tensor's target (`choose_targets`) and pages in the
memory of tensors this worker lacks. Fresh memory faulted in by the transfer itself costs ~1.1 s
per GB here (each page fault lands in the receive loop: a 1 GB broadcast into new memory takes
1.4 s instead of 0.28 s), while populating it up front takes ~0.35 s per GB, off the heal's
critical path as far as the group rendezvous allows.
"""

from __future__ import annotations

import ctypes
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from lococomm.collectives.abort import AbortSignal, wait_store_keys
from lococomm.collectives.exact import exclusively_owned
from lococomm.ft.state import ReplicatedState, TensorSpec

log = logging.getLogger(__name__)

# How a receiver lands each tensor
FRESH, OWNED, SHARED = "fresh", "owned", "shared"
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault a range in, writable, in one call
_PAGE = 4096
_POPULATE_SLICE = 16 << 20  # bytes paged in per call (an abort is seen between calls)


def choose_targets(
    state: ReplicatedState, specs: list[TensorSpec], device: torch.device
) -> tuple[list[torch.Tensor], list[str]]:
    """Where each tensor is received, and how (FRESH, OWNED or SHARED).

    This worker's own tensors are written in place where they match (no extra copy of a
    model, and memory that is already paged in). OWNED: the state holds the tensor object
    itself and nothing else sees its storage (optimizer state, plain-dict values); SHARED:
    module parameters (state_dict() gives aliases). Tensors this worker lacks (e.g. optimizer
    state a joiner has not created yet) are received into FRESH memory, which nobody sees before
    the state is loaded; non-CPU specs land on `device`."""
    own = state.snapshot()
    live = {s.path: t for s, t in zip(own.specs, own.tensors)}
    del own
    targets: list[torch.Tensor] = []
    kinds: list[str] = []
    for spec in specs:
        dtype = getattr(torch, spec.dtype)
        current = live.get(spec.path)
        if (
            current is not None
            and current.dtype == dtype
            and tuple(current.shape) == spec.shape
            and current.is_contiguous()
        ):
            targets.append(current)
            kinds.append(OWNED if exclusively_owned(current) else SHARED)
        else:
            where = device if spec.device_type != "cpu" else torch.device("cpu")
            targets.append(torch.empty(spec.shape, dtype=dtype, device=where))
            kinds.append(FRESH)
    return targets, kinds


_madvise: Any = None


def populate(tensor: torch.Tensor, stop: Callable[[], bool] = lambda: False) -> None:
    """Page in a fresh CPU tensor's memory with madvise(MADV_POPULATE_WRITE), last slice
    first, until `stop()`. Never writes to the tensor: it runs while the transfer fills the
    same memory (starting from the front, so the two meet in the middle). Without that
    madvise (Linux < 5.14, other systems) it does nothing and the transfer takes the faults.
    """
    global _madvise
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.device.type != "cpu" or nbytes < 16 * _PAGE or not sys.platform.startswith("linux"):
        return
    start = tensor.data_ptr()
    first, last = -(-start // _PAGE) * _PAGE, (start + nbytes) // _PAGE * _PAGE
    if _madvise is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise = libc.madvise
    end = last
    while end > first and not stop():
        begin = max(first, end - _POPULATE_SLICE)
        if _madvise(begin, end - begin, _MADV_POPULATE_WRITE) != 0:
            return  # not supported here (EINVAL): a write fallback could race the transfer
        end = begin


class Landing:
    """A receiver's heal metadata and targets, prepared on a helper thread from the moment the
    epoch plan is known (see the module docstring), with whatever `prepare` builds from them
    (`prepared`). `wait` hands them over."""

    def __init__(
        self,
        store: Any,
        state: ReplicatedState,
        device: torch.device,
        abort: AbortSignal,
        timeout: float,
        prepare: Callable[[dict, list[TensorSpec], list[torch.Tensor]], Any] | None = None,
    ) -> None:
        self._store = store
        self._state = state
        self._device = device
        self._abort = abort
        self._deadline = time.monotonic() + timeout
        self._done = threading.Event()
        self._result: tuple[dict, list[TensorSpec], list[torch.Tensor], list[str]] | None = None
        self._error: str | None = None
        self.seconds = 0.0  # the preparation's own duration (metadata, targets)
        self.populate_seconds = 0.0  # until fresh memory was paged in (0: not yet)
        self.finished = False  # set by the heal when its transfer is over: stop paging in
        # prepare(meta, specs, targets), run here too (e.g. the receive streams' plan)
        self._prepare = prepare
        self.prepared: Any = None
        threading.Thread(target=self._run, daemon=True, name="lococomm-heal-landing").start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            err = wait_store_keys(self._store, ["heal/meta"], self._abort, self._deadline)
            if err is not None:
                self._error = f"heal metadata: {err}"
                return
            meta = json.loads(self._store.get("heal/meta"))
            specs = [TensorSpec.from_json(item) for item in meta["specs"]]
            targets, kinds = choose_targets(self._state, specs, self._device)
            if self._prepare is not None:
                self.prepared = self._prepare(meta, specs, targets)
            self._result = (meta, specs, targets, kinds)
        except Exception as e:  # reported to the heal, which fails the epoch
            self._error = f"preparing the heal: {type(e).__name__}: {e}"
        finally:
            self.seconds = time.monotonic() - started
            self._done.set()
            self._abort.notify()
        if self._result is None:
            return
        # The transfer may begin now; fresh memory is paged in alongside it (on the other
        # core), from the far end of the state, the last tensor first.
        fresh = [t for t, kind in zip(targets, kinds) if kind == FRESH]
        del targets
        for tensor in reversed(fresh):
            populate(tensor, stop=lambda: self._abort.aborted or self.finished)
        self.populate_seconds = time.monotonic() - started

    def wait(self, deadline: float) -> tuple[dict, list[TensorSpec], list[torch.Tensor], list[str]]:
        """(meta, specs, targets, kinds), or RuntimeError with the reason (abort, timeout,
        no metadata)."""
        err = self._abort.wait_until(self._done.is_set, deadline)
        if err is not None:
            raise RuntimeError(f"heal metadata {err}")
        if self._error is not None or self._result is None:
            raise RuntimeError(self._error or "heal preparation failed")
        return self._result
