"""DiLoCo, Streaming DiLoCo and one-step-delayed DiLoCo on the fault-tolerant Manager.

    diloco = DiLoCo(model, inner_opt, manager, sync_every=50)    # joins the group (blocks)
    while diloco.inner_step < steps:
        loss = loss_fn(model(x), y); loss.backward()
        inner_opt.step(); inner_opt.zero_grad()
        diloco.step()                     # exchanges a fragment when its turn comes
    diloco.finish()                       # completes an exchange still in flight

Inner steps never talk to the manager. One exchange is one manager step:

    start_step()                          re-forms the group and heals joiners if needed
    allgather([weight, clock])            who contributes, and the group's inner clock
                                          (first exchange of an epoch only)
    allreduce(G_f - L_f, "sum", codec)    async; inner steps go on for `overlap` steps
    ... handle.wait(); commit()           True: outer step on G_f, then merge L_f
                                          False: nothing applied anywhere (see below)

Variants (outer.py has the maths and the schedule):

* plain DiLoCo: fragments=1, overlap_steps=0, mix=1 -- every H steps all parameters.
* Streaming DiLoCo: fragments=P (layers striped over fragments), P staggered exchanges per H
  steps (about one every H/P steps; each fragment every H);
  overlap_steps=tau lets inner training go on tau steps while the exchange is in flight, then
  L_f <- (1 - mix) L_f + mix G_f.  (`mix` is the weight of the global parameters: mix = 1
  replaces, as plain DiLoCo; the Streaming DiLoCo paper's alpha is 1 - mix.)
* delayed=True (one-step-delayed outer update, PCCL async DiLoCo / CO2): the exchange of
  round r runs until the next exchange starts (H/P inner steps) and is applied then, where the
  local progress made meanwhile is kept on top of the new global parameters
  (L_f <- G_f + (L_f - S_f), S_f the local parameters when the exchange was issued).
  staleness_penalty (CO2's gap penalty: the stale outer gradient is divided by it) and
  OuterSGD(clip=c) (CO2's outer-momentum clipping) are the CO2 options.
* SparseLoCo (presets.sparseloco): codec SparseLoCo (chunked top-k, 2-bit values), classic
  error feedback with decay (feedback_decay), outer SGD lr 1 without momentum.

Fault tolerance (the rules every member applies alike):

* A failed exchange (commit() False) is applied nowhere: G and the outer state stay as they
  were, error feedback rolls back, and the local parameters keep their progress, which the
  next exchange of that fragment carries (its pseudo-gradient G_f - L_f includes it).
* A worker healed during start_step (a joiner, a restarted or a lagging worker) received G
  and the outer state from an up-to-date member; it sets its local parameters to G, drops its
  error-feedback residuals and contributes weight 0 to that exchange (the others average
  over the contributing members only). Its inner clock jumps to the group's.
* At the very first exchange (the bootstrap, when the group has never synced) nothing is
  sent: the heal makes every member's G identical and each sets L = G.

State: see diloco_state.py (replicated vs per worker) and `state_dict()` (checkpoints).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lococomm import ops
from lococomm.algorithms.diloco_state import FragmentParams, GlobalState, HealObserver, OuterFactory
from lococomm.algorithms.outer import (
    OuterSGD,
    Schedule,
    assign_fragments,
    decayed_contribution,
    mix_,
    rebase_,
)
from lococomm.collectives.compressed import RING_EF_KINDS
from lococomm.collectives.feedback import kind_of
from lococomm.compress.base import Codec
from lococomm.compress.error_feedback import EF21, EControl, ErrorFeedback

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


@dataclass
class SyncRecord:
    """One exchange as this worker saw it."""

    sync: int  # committed exchanges before this one (GlobalState.syncs)
    clock: int  # the group's inner clock when it was issued
    fragment: int
    epoch: int
    members: int  # members of the epoch
    contributors: int  # members whose pseudo-gradient counted (healed members do not)
    committed: bool
    bytes: int  # wire bytes this worker sent since the previous committed exchange
    seconds: float  # from issue to commit decision (includes the overlapped inner steps)


@dataclass
class DiLoCoMetrics:
    """Cumulative counters (JSON-able via as_dict; also in manager.metrics.extra["diloco"])."""

    syncs: int = 0  # committed exchanges (bootstrap excluded)
    failed: int = 0  # exchanges voted down
    outer_steps: int = 0  # outer updates applied by this worker
    bytes_total: int = 0  # wire bytes this worker sent through the manager, cumulative
    bytes_last_sync: int = 0  # ... for the last committed exchange (incl. failed ones before it)
    peak_sync_bytes: int = 0  # largest bytes_last_sync so far
    last: dict[str, Any] = field(default_factory=dict)  # the last SyncRecord

    def as_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self).items()}


@dataclass
class _Exchange:
    """An exchange in flight (per worker)."""

    fragment: int
    clock: int
    finish_at: int
    delta: torch.Tensor  # this worker's pseudo-gradient; the members' sum once waited
    handle: Any  # Handle or _Background; wait() -> bool
    contributors: int
    members: int
    epoch: int
    snapshot: torch.Tensor | None  # L_f when issued (delayed mode)
    started: float


class _Background:
    """A compressed exchange on a helper thread (compressed collectives run on the calling
    thread; this lets inner steps overlap it). wait() joins and returns the result."""

    def __init__(self, fn: Callable[[], bool]) -> None:
        self._result = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="diloco-exchange", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], bool]) -> None:
        try:
            self._result = bool(fn())
        except BaseException as e:  # re-raised on the caller's thread
            self._error = e

    def wait(self) -> bool:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def _resolve_feedback(codec: Any, error_feedback: Any) -> tuple[Codec | None, Any]:
    if codec is not None and not isinstance(codec, Codec):
        raise TypeError(f"codec must be a lococomm Codec or None, got {type(codec).__name__}")
    if error_feedback is None or error_feedback is False:
        return codec, None
    if error_feedback is True:
        if codec is None:
            raise ValueError("error_feedback=True needs a codec")
        return codec, ErrorFeedback(codec)
    if not isinstance(error_feedback, ErrorFeedback | EF21 | EControl):
        raise TypeError(
            "error_feedback must be None, True or an ErrorFeedback/EF21/EControl, got "
            f"{type(error_feedback).__name__}"
        )
    if codec is None:
        codec = error_feedback.codec
    elif error_feedback.codec != codec:
        raise ValueError(f"error_feedback wraps {error_feedback.codec!r}, not {codec!r}")
    return codec, error_feedback


class DiLoCo:
    """Infrequent synchronisation of `model` through `manager` (see the module docstring).

    Args:
        model: the local model; its trainable parameters are the local parameters L.
        inner_optimizer: the model's optimizer (stepped by the caller; saved in state_dict).
        manager: the lococomm Manager; the global state is registered with it as `name`.
        sync_every: H, inner steps between two exchanges of the same fragment.
        outer_optimizer: None (OuterSGD(): lr 0.7, momentum 0.9, Nesterov), an OuterSGD, or a
            factory `params -> torch.optim.Optimizer` (called per fragment with [G_f]).
        codec: a lococomm codec for the pseudo-gradients (None: exact fp32).
        error_feedback: None, True (classic ErrorFeedback on `codec`) or an EF object.
        fragments: P (Streaming DiLoCo), at most sync_every.
        overlap_steps: tau in [0, floor(sync_every / fragments)].
        mix: weight of the global parameters when merging an overlapped exchange, in (0, 1].
        delayed: one-step-delayed outer updates (overlap until the next start, rebase merge).
        feedback_decay: beta of SparseLoCo's decayed error feedback, in (0, 1] (classic EF only).
        staleness_penalty: divide every outer gradient by this (>= 1; CO2's gap penalty).
        name: key of the replicated state and prefix of the collectives' names.
        join: join the group now (blocks until the group's next exchange; a fresh group
            bootstraps at once). Pass False to load a checkpoint first, then call join().
    """

    def __init__(
        self,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        manager: Any,
        sync_every: int,
        outer_optimizer: OuterSGD | OuterFactory | None = None,
        codec: Codec | None = None,
        error_feedback: Any = None,
        fragments: int = 1,
        overlap_steps: int = 0,
        mix: float = 1.0,
        delayed: bool = False,
        feedback_decay: float = 1.0,
        staleness_penalty: float = 1.0,
        name: str = "diloco",
        join: bool = True,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (isinstance(mix, int | float) and 0.0 < mix <= 1.0):
            raise ValueError(f"mix must be in (0, 1], got {mix!r}")
        if delayed and overlap_steps:
            raise ValueError("delayed=True overlaps until the next exchange; leave overlap_steps at 0")
        if delayed and mix != 1.0:
            raise ValueError("delayed=True keeps local progress by rebasing; mix must stay 1.0")
        if not (math.isfinite(feedback_decay) and 0.0 < feedback_decay <= 1.0):
            raise ValueError(f"feedback_decay must be in (0, 1], got {feedback_decay!r}")
        if not (math.isfinite(staleness_penalty) and staleness_penalty >= 1.0):
            raise ValueError(f"staleness_penalty must be a finite number >= 1, got {staleness_penalty!r}")
        self.codec, self.error_feedback = _resolve_feedback(codec, error_feedback)
        if feedback_decay != 1.0 and not isinstance(self.error_feedback, ErrorFeedback):
            raise ValueError("feedback_decay needs classic error feedback (error_feedback=True)")
        self.schedule = Schedule(sync_every, fragments, overlap_steps, delayed=bool(delayed))
        self.mix = float(mix)
        self.delayed = bool(delayed)
        self.feedback_decay = float(feedback_decay)
        self.staleness_penalty = float(staleness_penalty)
        self.name = name
        self.model = model
        self.inner_optimizer = inner_optimizer
        self._manager = manager

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = assign_fragments([n for n, _ in named], [p.numel() for _, p in named], fragments)
        self.fragment_names = [[named[i][0] for i in g] for g in groups]
        self._fragments = [FragmentParams([named[i][1] for i in g]) for g in groups]
        outer = OuterSGD() if outer_optimizer is None else outer_optimizer
        self._global = GlobalState(self._fragments, outer)
        self._observer = HealObserver(self._global)
        manager.register_state(name, self._observer)

        self.metrics = DiLoCoMetrics()
        self._clock = 0
        self._pending: _Exchange | None = None
        self._joined = False
        self._resumed = False
        self._control_epoch = -1  # epoch whose members are known to agree (see _start_exchange)
        self._bytes_start = int(manager.metrics.bytes_sent)
        self._bytes_mark = self._bytes_start
        # Load (or build) the fused kernels now: a joiner that did it inside its first
        # exchange would keep the whole group waiting.
        ops.backend("cpu")
        if join:
            self.join()

    # ------------------------------------------------------------------ properties
    @property
    def inner_step(self) -> int:
        """Inner steps done (the group's clock: joiners jump to it). Use it for data order and
        learning-rate schedules."""
        return self._clock

    @property
    def syncs(self) -> int:
        """Committed exchanges of the group (replicated; the bootstrap counts as one)."""
        return self._global.syncs

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    @property
    def fragment_sizes(self) -> list[int]:
        """Elements per fragment."""
        return [f.numel for f in self._fragments]

    def global_parameters(self) -> list[torch.Tensor]:
        """The global parameters G, one flat fp32 tensor per fragment (read-only views)."""
        return list(self._global.global_params)

    # ------------------------------------------------------------------ protocol
    def join(self) -> None:
        """Join the group: bootstrap a fresh group, or enter the group's current exchange.

        Blocks until the group's next exchange begins (a joiner) or until every initial
        member is there (a fresh group). Afterwards the model holds the global parameters.
        """
        if self._joined:
            raise RuntimeError("join() was already called")
        self._joined = True
        if self._resumed:
            log.info("%s: resumed at inner step %d; next exchange at %d", self.name, self._clock,
                     self.schedule.next_start(self._clock))
            return
        while True:
            self._manager.start_step()
            healed = self._observer.take_healed()
            if self._global.syncs > 0:
                # A running group: this is one of its exchanges (we arrived during it).
                self._adopt_global("joined a running group")
                failed = self.metrics.failed
                self._start_exchange(contributing=False)
                if self._pending is None and self.metrics.failed > failed:
                    continue  # failed before anything was issued: wait for the next exchange
                return
            epoch = self._manager.epoch
            if self._manager.commit():
                self._control_epoch = epoch  # every member bootstrapped at clock 0 in it
                self._global.syncs = 1
                self._adopt_global("bootstrap" + (" (healed)" if healed else ""))
                return
            log.warning("%s: bootstrap step failed (%s); retrying", self.name, self._manager.last_failure)

    def step(self) -> None:
        """Call after every inner optimizer step: finishes and starts exchanges on schedule."""
        if not self._joined:
            raise RuntimeError("call join() first (or construct DiLoCo with join=True)")
        self._clock += 1
        if self._pending is not None and self._clock >= self._pending.finish_at:
            self._finish()
        if self.schedule.starts_at(self._clock):
            if self._pending is not None:
                self._finish()
            self._begin()

    def finish(self) -> None:
        """Complete the exchange in flight now (at the end of training; every member must
        call it at the same inner step)."""
        if self._pending is not None:
            self._finish()

    @contextlib.contextmanager
    def global_model(self) -> Iterator[torch.nn.Module]:
        """Temporarily load the global parameters into the model (e.g. to evaluate the
        consensus model); the local parameters are restored afterwards."""
        saved = [f.gather() for f in self._fragments]
        try:
            for f, g in zip(self._fragments, self._global.global_params):
                f.scatter(g)
            yield self.model
        finally:
            for f, s in zip(self._fragments, saved):
                f.scatter(s)

    # ------------------------------------------------------------------ internals
    def _begin(self) -> None:
        self._manager.start_step()
        healed = self._observer.take_healed()
        if healed:
            self._adopt_global("healed")
        self._start_exchange(contributing=not healed)

    def _adopt_global(self, why: str) -> None:
        """L <- G for every fragment; per-worker compression state starts afresh."""
        for f, g in zip(self._fragments, self._global.global_params):
            f.scatter(g)
        if self.error_feedback is not None:
            self.error_feedback.reset()
        log.info("%s: local parameters set to the global ones (%s; syncs %d)", self.name, why,
                 self._global.syncs)

    def _start_exchange(self, contributing: bool) -> None:
        m = self._manager
        started = time.monotonic()
        members, epoch = m.world_size, m.epoch
        contributors, clock = members, self._clock
        if epoch != self._control_epoch:
            # First exchange of this epoch: members may have been healed (weight 0) or be at
            # different inner steps. Within an epoch neither can change (any membership
            # change or failed step starts a new one), so later exchanges skip this.
            control = torch.tensor([1 if contributing else 0, self._clock], dtype=torch.int64)
            gathered = m.allgather(control, name=f"{self.name}/control")
            if gathered is None:
                self._record_failure(self._clock, -1, members, 0, epoch, started)
                return
            contributors = int(gathered[:, 0].sum())
            clock = int(gathered[:, 1].max())
            self._control_epoch = epoch
        if clock != self._clock:
            log.info("%s: inner clock %d -> %d (the group's)", self.name, self._clock, clock)
            self._clock = clock
        if not self.schedule.starts_at(clock):
            m.fail_step(f"{self.name}: members disagree on the exchange schedule (clock {clock})")
            self._record_failure(clock, -1, members, contributors, epoch, started)
            return
        fragment = self.schedule.fragment_at(clock)
        key = f"{self.name}/f{fragment}"
        local = self._fragments[fragment].gather()
        delta = ops.pseudo_gradient(self._global.global_params[fragment], local)
        if not contributing:
            delta.zero_()
        ef = self.error_feedback
        if ef is not None and self.feedback_decay != 1.0:
            decayed_contribution(delta, ef.state(key, "e"), self.feedback_decay)

        # Fewest bytes: a summable codec rides the ring at any fragment size (the size-based
        # default sends small tensors by all-gather, W/2 times the bytes, to save latency,
        # which an exchange every H/P inner steps does not need).
        ring = (
            self.codec is not None
            and getattr(self.codec, "summable", False)
            and kind_of(ef) in RING_EF_KINDS
        )

        def exchange(async_op: bool) -> Any:
            return m.allreduce(delta, op="sum", async_op=async_op, name=key, codec=self.codec,
                               error_feedback=ef, algorithm="ring" if ring else "auto")

        if self.codec is not None and self.schedule.overlapped:
            handle: Any = _Background(lambda: exchange(False))
        else:
            handle = exchange(True)
        self._pending = _Exchange(
            fragment=fragment,
            clock=clock,
            finish_at=self.schedule.finish_at(clock),
            delta=delta,
            handle=handle,
            contributors=contributors,
            members=members,
            epoch=epoch,
            snapshot=local if self.delayed else None,
            started=started,
        )
        if not self.schedule.overlapped:
            self._finish()

    def _finish(self) -> None:
        ex, self._pending = self._pending, None
        assert ex is not None
        m = self._manager
        ex.handle.wait()
        committed = m.commit()
        ef = self.error_feedback
        if not committed:
            if ef is not None:
                ef.rollback()
            self._record(ex, committed=False)
            return
        if ef is not None:
            ef.commit()
        if ex.contributors > 0:
            mean = ex.delta.div_(ex.contributors)
            if self.staleness_penalty != 1.0:
                mean.div_(self.staleness_penalty)
            self._global.apply(ex.fragment, mean)
            self.metrics.outer_steps += 1
        self._global.syncs += 1
        self._merge(ex)
        self._record(ex, committed=True)

    def _merge(self, ex: _Exchange) -> None:
        frag = self._fragments[ex.fragment]
        g = self._global.global_params[ex.fragment]
        if ex.snapshot is not None:
            frag.scatter(rebase_(frag.gather(), g, ex.snapshot))
        elif self.mix == 1.0:
            frag.scatter(g)
        else:
            frag.scatter(mix_(frag.gather(), g, self.mix))

    def _record_failure(self, clock: int, fragment: int, members: int, contributors: int,
                        epoch: int, started: float) -> None:
        """The control exchange failed: vote the step down now (nothing was sent)."""
        committed = self._manager.commit()  # False: the step was marked failed
        ex = _Exchange(fragment, clock, clock, torch.zeros(0), None, contributors, members, epoch,
                       None, started)
        self._record(ex, committed=committed)

    def _record(self, ex: _Exchange, committed: bool) -> None:
        m = self._manager
        sent = 0
        if committed:
            now = int(m.metrics.bytes_sent)
            sent = now - self._bytes_mark
            self._bytes_mark = now
            self.metrics.syncs += 1
            self.metrics.bytes_total = now - self._bytes_start
            self.metrics.bytes_last_sync = sent
            self.metrics.peak_sync_bytes = max(self.metrics.peak_sync_bytes, sent)
        else:
            self.metrics.failed += 1
        record = SyncRecord(
            sync=self._global.syncs, clock=ex.clock, fragment=ex.fragment, epoch=ex.epoch,
            members=ex.members, contributors=ex.contributors, committed=committed, bytes=sent,
            seconds=time.monotonic() - ex.started,
        )  # fmt: skip
        self.metrics.last = asdict(record)
        m.metrics.extra[self.name] = self.metrics.as_dict()
        if committed:
            log.info(
                "%s: sync %d committed (clock %d, fragment %d, epoch %d): %d members, %d "
                "contributing, %d bytes sent, %.0f ms",
                self.name, record.sync, ex.clock, ex.fragment, ex.epoch, ex.members,
                ex.contributors, sent, record.seconds * 1e3,
            )  # fmt: skip
        else:
            log.warning(
                "%s: exchange at clock %d (fragment %d, epoch %d, %d members) failed: %s; "
                "nothing applied, local progress kept",
                self.name, ex.clock, ex.fragment, ex.epoch, ex.members, m.last_failure,
            )  # fmt: skip

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: global (replicated) state, local parameters, inner
        optimizer, error feedback, inner clock and the manager's step.

        An exchange in flight is not saved: after a resume it counts as failed (its progress is
        in the local parameters and goes out with that fragment's next exchange).
        """
        return {
            "version": CHECKPOINT_VERSION,
            "global": self._global.state_dict(),
            "local": [f.gather() for f in self._fragments],
            "inner_optimizer": self.inner_optimizer.state_dict(),
            "error_feedback": None if self.error_feedback is None else self.error_feedback.state_dict(),
            "inner_step": self._clock,
            "manager_step": int(self._manager.step),  # committed steps: in-flight not included
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint; call before join() (construct with join=False).

        Declares the restored state to the manager (manager.resume) when it is past the
        bootstrap, so this worker counts as up to date and can heal others.
        """
        if self._joined:
            raise RuntimeError("load_state_dict() must be called before join() (use join=False)")
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"DiLoCo checkpoint version {state.get('version')!r} != {CHECKPOINT_VERSION}")
        self._global.load_state_dict(state["global"])
        local = state["local"]
        if len(local) != len(self._fragments):
            raise ValueError(f"checkpoint has {len(local)} fragments, this DiLoCo {len(self._fragments)}")
        for f, flat in zip(self._fragments, local):
            if flat.numel() != f.numel:
                raise ValueError(f"checkpoint fragment of {flat.numel()} elements, expected {f.numel}")
            f.scatter(flat)
        self.inner_optimizer.load_state_dict(state["inner_optimizer"])
        ef_state = state.get("error_feedback")
        if (ef_state is None) != (self.error_feedback is None):
            raise ValueError("checkpoint and this DiLoCo disagree on error feedback")
        if self.error_feedback is not None:
            self.error_feedback.load_state_dict(ef_state)
        self._clock = int(state["inner_step"])
        if self._global.syncs > 0:
            self._manager.resume(int(state["manager_step"]))
            self._resumed = True
