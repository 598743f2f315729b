"""The step protocol: quorum -> collectives -> commit, surviving crashes, hangs and joins.

    manager.start_step()         # fast path if membership is unchanged, else re-quorum + heal
    manager.allreduce(grad)      # never raises on a peer failure: marks the step failed
    if manager.commit():         # True only if every member of the epoch completed the step
        optimizer.step()

A failed step (a peer crashed or hung, a collective mismatched, the coordinator went away) is
voted down at once so the other members abandon their collectives too; it ends the epoch, and
the next `start_step()` forms a new one. Nothing of a failed step is applied: the caller may
retry the same batch. Whether the next step needs a new quorum is always known to all members
alike, because it is carried by the commit decision they all receive.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lococomm.collectives import compressed, exact, exact_ring
from lococomm.collectives.abort import AbortSignal
from lococomm.collectives.buffers import BufferPool, Graveyard
from lococomm.collectives.communicator import Communicator, Handle
from lococomm.collectives.stats import accumulate as accumulate_stats
from lococomm.ft.epoch import EpochGroups, EpochInfo, ring_host
from lococomm.ft.heal_landing import Landing
from lococomm.ft.healing import (
    STREAM_CHUNK_BYTES,
    Background,
    Healer,
    HealError,
    HealGroups,
    publish_meta,
    receive_plan,
    send_plan,
    stream_sources,
    streams_enabled,
    wait_landed,
)
from lococomm.ft.session import CoordinatorSession
from lococomm.ft.state import ReplicatedState
from lococomm.ops import _build

log = logging.getLogger(__name__)

_MAX_REPORTED_SIGNATURES = 16
_MAX_TENSOR_DIGESTS = 8192


@dataclass
class StepMetrics:
    """Counters a training script or `lococomm run` can display (JSON-able via `as_dict`)."""

    committed: int = 0
    failed: int = 0
    epochs: int = 0
    quorum_seconds: float = 0.0  # time spent in the last re-quorum (incl. group build + heal)
    heal_seconds: float = 0.0  # last heal as a receiver, from its epoch group being ready
    heal_bytes: int = 0
    # the same heal from the epoch plan's arrival: includes the epoch group's rendezvous,
    # which the heal groups' rendezvous and the metadata overlap; and the receiver's phases (ms)
    heal_from_plan_seconds: float = 0.0
    heal_phases: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0  # collective payload bytes this worker sent, cumulative
    last_failure: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # compressed all-reduces, cumulative: calls, bytes_sent/received (wire bytes), encode/
    # communicate/decode/total_seconds, and "last": the same for the last call (+ algorithm,
    # codec, numel, ok). See lococomm.collectives.stats.CallStats.
    compressed: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


class StepRetriesExhausted(RuntimeError):
    """The same step kept failing (see Manager(max_retries=...)); the last reason is included."""


class StateLost(RuntimeError):
    """This member's state holds a half-finished heal and no member holds a state to heal it
    from (every up-to-date one died during the transfer): training on would spread it."""


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)


@dataclass
class _EpochContext:
    info: EpochInfo
    abort: AbortSignal
    comm: Communicator | None = None
    commits: int = 0
    # a member of a heal that was not healed itself: returns once the receivers have landed
    # (or the abort / the bound in seconds), before the first commit hashes the state
    # (healing.wait_landed); None, or why it stopped waiting
    wait_healed: Callable[[float], str | None] | None = None


@dataclass
class _HealStart:
    """A heal begun before the epoch group exists (Manager._prepare_heal)."""

    groups: HealGroups
    store: Any  # the epoch's heal prefix of the coordinator's store
    published: tuple[Any, dict] | None  # (snapshot, meta) on the primary source
    started: float  # time.monotonic() when the epoch plan arrived
    landing: Landing | None = None  # a receiver's metadata and targets, prepared meanwhile
    prepared_send: Background | None = None  # the primary source's stream plan, built meanwhile


class Manager:
    """A worker's handle on fault-tolerant training (one per process / local rank).

    Args:
        coordinator: "host:port" of the coordinator.
        replica_id: stable name of this replica group (default: hostname:pid). A restarted
            process may reuse it; it is still a new member and gets healed.
        token: shared secret (default $LOCOCOMM_TOKEN).
        backend: "gloo" (CPU tensors) or "nccl" (CUDA tensors).
        heartbeat_interval: seconds between heartbeats; default a quarter of the
            coordinator's heartbeat timeout, which it announces at registration.
        timeout: seconds a collective, a rendezvous or a commit decision may take before the
            step is failed; also the process groups' own timeout.
        group_rank, group_world_size: this process's rank inside its replica group and the
            group's size (torchrun LOCAL_RANK / LOCAL_WORLD_SIZE); one cross-replica group is
            built per local rank.
        quorum_timeout: seconds start_step() waits for a quorum before raising TimeoutError.
        state: the replicated state (an object with state_dict()/load_state_dict(), or a dict
            of them); healed into joiners and compared by digest. See `register_state`.
        parity_every: compare state digests across members every this many steps (and at the
            first commit after every heal); 0 disables the periodic check.
        max_retries: start_step() raises StepRetriesExhausted once the same step has failed
            this many times in a row (a deterministic bug, e.g. mismatched collectives, would
            otherwise be retried forever); None never gives up.
    """

    def __init__(
        self,
        coordinator: str,
        replica_id: str | None = None,
        token: str | None = None,
        backend: str = "gloo",
        heartbeat_interval: float | None = None,
        timeout: float = 60.0,
        group_rank: int = 0,
        group_world_size: int = 1,
        quorum_timeout: float = 600.0,
        connect_timeout: float = 60.0,
        reconnect_timeout: float = 120.0,
        device: torch.device | str | None = None,
        state: Any = None,
        parity_every: int = 100,
        max_retries: int | None = 100,
    ) -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if not 0 <= group_rank < group_world_size:
            raise ValueError(f"group_rank {group_rank} outside [0, {group_world_size})")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.backend = backend
        self.timeout = float(timeout)
        self.quorum_timeout = float(quorum_timeout)
        self.replica_id = replica_id or f"{socket.gethostname()}:{os.getpid()}"
        self.group_rank = group_rank
        self.group_world_size = group_world_size
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
        self.device = torch.device(device)
        self.metrics = StepMetrics()
        self.parity_every = int(parity_every)
        self.max_retries = max_retries
        self._consecutive_failures = 0
        self._state = ReplicatedState()
        if state is not None:
            self._state.register_all(state)
        self._damaged = False  # a heal broke half-way; only a completed heal clears it
        self._synced = False  # becomes True once this worker's state is known to match
        self._ctx: _EpochContext | None = None
        self._need_quorum = True
        self._step = 0
        self._last_epoch = 0
        self._last_members: list[str] = []
        self._in_step = False
        self._failure: str | None = None
        self._early_voted = False
        self._vote_generation: int | None = None
        self._signatures: list[str] = []
        self._signature_hash = hashlib.blake2b(digest_size=16)
        self._pending: list[Handle] = []
        self._finalizers: list[Any] = []
        self._report: dict[str, Any] = {}
        self._digest_paths: list[str] = []
        self._closed = False
        self._bytes_retired = 0
        self.pool = BufferPool()
        self.graveyard = Graveyard()
        if self.device.type == "cpu":
            # Healing checksums chunks with the C++ kernel when it is loaded: load it now if
            # that needs no compiler (never a build, nor a first import, in the middle of a heal).
            _build.load_if_built("cpu")
        self._session = CoordinatorSession(
            coordinator,
            self.replica_id,
            group_rank,
            group_world_size,
            token if token is not None else (os.environ.get("LOCOCOMM_TOKEN") or None),
            registration=self._registration,
            on_abort=self._on_abort,
            connect_timeout=connect_timeout,
            reconnect_timeout=reconnect_timeout,
            heartbeat_interval=heartbeat_interval,
        )
        self._groups = EpochGroups(backend, self.timeout, self.device, self._session.client)
        # A normal interpreter exit leaves gracefully instead of looking like a crash.
        atexit.register(self.close)

    @classmethod
    def from_env(cls, **overrides: Any) -> Manager:
        """Build from LOCOCOMM_COORDINATOR, LOCOCOMM_REPLICA_ID, LOCOCOMM_TOKEN,
        LOCOCOMM_BACKEND, LOCOCOMM_TIMEOUT and torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE."""
        env = os.environ
        coordinator = overrides.pop("coordinator", env.get("LOCOCOMM_COORDINATOR"))
        if not coordinator:
            raise ValueError("LOCOCOMM_COORDINATOR is not set (expected 'host:port')")
        group_world_size = int(env.get("LOCAL_WORLD_SIZE", "1"))
        replica_id = env.get("LOCOCOMM_REPLICA_ID")
        if not replica_id and group_world_size > 1:
            run_id = env.get("TORCHELASTIC_RUN_ID")
            if not run_id:
                raise ValueError(
                    "a replica group of several ranks needs LOCOCOMM_REPLICA_ID (the same on "
                    "all its ranks)"
                )
            replica_id = f"{socket.gethostname()}:{run_id}"
        kwargs: dict[str, Any] = {
            "coordinator": coordinator,
            "replica_id": replica_id or None,
            "token": env.get("LOCOCOMM_TOKEN") or None,
            "backend": env.get("LOCOCOMM_BACKEND")
            or ("nccl" if torch.cuda.is_available() else "gloo"),
            "group_rank": int(env.get("LOCAL_RANK", "0")),
            "group_world_size": group_world_size,
        }
        if env.get("LOCOCOMM_TIMEOUT"):
            kwargs["timeout"] = float(env["LOCOCOMM_TIMEOUT"])
        kwargs.update(overrides)
        if kwargs["backend"] == "nccl" and "device" not in kwargs:
            kwargs["device"] = torch.device("cuda", int(env.get("LOCAL_RANK", "0")))
        manager = cls(**kwargs)
        if env.get("LOCOCOMM_SIGTERM_LEAVE") == "1" and threading.current_thread() is threading.main_thread():
            # Set by `lococomm run`: SIGTERM means "leave gracefully" (SystemExit unwinds the
            # script; the exit hook above sends the leave).
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return manager

    # ------------------------------------------------------------------ properties
    @property
    def step(self) -> int:
        """Number of committed steps (the same on every member after a commit)."""
        return self._step

    @property
    def epoch(self) -> int:
        return self._ctx.info.number if self._ctx else self._last_epoch

    @property
    def rank(self) -> int:
        return self._ctx.info.rank if self._ctx else 0

    @property
    def world_size(self) -> int:
        return self._ctx.info.world_size if self._ctx else 1

    @property
    def members(self) -> list[str]:
        """Replica ids of this epoch's cross-replica group, in rank order."""
        return list(self._ctx.info.group_replicas) if self._ctx else []

    @property
    def in_step(self) -> bool:
        return self._in_step

    @property
    def step_failed(self) -> bool:
        return self._failure is not None or bool(self._ctx and self._ctx.abort.aborted)

    @property
    def last_failure(self) -> str:
        return self.metrics.last_failure

    # ------------------------------------------------------------------ replicated state
    def register_state(self, name: str, obj: Any) -> None:
        """Add an object (state_dict()/load_state_dict(), or a plain dict) to the replicated
        state: joiners receive it, and digests compare it across members."""
        self._state.register(name, obj)

    def resume(self, step: int) -> None:
        """Declare that the replicated state was restored (from a checkpoint) at `step`.

        Call before the first start_step(): this worker then counts as up to date at `step`
        (a source for healing others) instead of a fresh worker that must be healed.
        """
        if self._in_step or self._ctx is not None:
            raise RuntimeError("resume() must be called before the first start_step()")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"resume step must be a non-negative int, got {step!r}")
        self._step = step
        self._synced = True

    def digest(self) -> str:
        """blake2b digest of the replicated state (identical on all members after a commit)."""
        return self._state.digest()[0]

    # ------------------------------------------------------------------ step protocol
    def start_step(self) -> None:
        """Begin a step: re-quorum (and heal) only if membership changed or a step failed."""
        if self._closed:
            raise RuntimeError("manager is closed")
        if self._in_step:
            raise RuntimeError("start_step() called twice without commit() in between")
        self._session.check()
        if self.max_retries is not None and self._consecutive_failures >= self.max_retries:
            raise StepRetriesExhausted(
                f"step {self._step} failed {self._consecutive_failures} times in a row; last "
                f"reason: {self.metrics.last_failure}"
            )
        ctx = self._ctx
        if self._need_quorum or ctx is None or ctx.abort.aborted:
            self._quorum()
        self._in_step = True
        self._failure = None
        self._early_voted = False
        self._vote_generation = None
        self._signatures = []
        self._signature_hash = hashlib.blake2b(digest_size=16)
        self._pending = []
        self._finalizers = []

    def commit(self) -> bool:
        """Vote on the step; True only if every member completed it (then apply the update).

        On False nothing may be applied; the next start_step() re-forms the group and the same
        batch can be retried. Waits first for every async collective of the step (including
        handles passed to `track`), and afterwards finishes the step's error-feedback
        transactions and runs the callbacks registered with `on_step_end`.
        """
        if not self._in_step:
            raise RuntimeError("commit() called without start_step()")
        finalizers, self._finalizers = self._finalizers, []
        committed = False
        try:
            committed = self._vote_and_decide()
        finally:
            for finalize in finalizers:
                finalize(committed)
        return committed

    def track(self, handle: Handle) -> None:
        """Make commit() wait for an asynchronous operation started outside the manager's
        collectives (e.g. by an algorithm on `manager.communicator`)."""
        if not self._in_step:
            raise RuntimeError("track() called outside a step")
        self._pending.append(handle)

    def on_step_end(self, callback: Any) -> None:
        """Run `callback(committed: bool)` once, when this step's commit() is decided."""
        if not self._in_step:
            raise RuntimeError("on_step_end() called outside a step")
        self._finalizers.append(callback)

    def _vote_and_decide(self) -> bool:
        for handle in self._pending:
            handle.wait()
        self._pending = []
        self._in_step = False
        ctx = self._ctx
        assert ctx is not None
        key = (ctx.info.number, self._step)
        generation = self._vote_generation
        if not self._early_voted:
            parity = self._failure is None and self._parity_due(ctx)
            if parity:
                self._wait_for_healed(ctx)
            if self._failure is None and ctx.abort.aborted:
                self._failure = f"aborted: {ctx.abort.reason}"
            vote = {
                "epoch": ctx.info.number,
                "step": self._step,
                "ok": self._failure is None,
                "reason": self._failure or "",
                "signature": self._signature_hash.hexdigest(),
                "signatures": self._signatures[:_MAX_REPORTED_SIGNATURES],
                "info": {**self._report, "bytes": self._bytes_sent_total(), "step": self._step},
            }
            if parity and self._failure is None:
                digest, per_tensor, self._digest_paths = self._state.digest()
                vote["digest"] = digest
                vote["tensor_digests"] = per_tensor[:_MAX_TENSOR_DIGESTS]
            generation = self._session.vote(vote)
            if generation is None:
                return self._step_failed("lost the coordinator before voting")
        decision = self._session.wait_decision(key, self.timeout, generation)
        ctx.commits += 1
        if decision is None:
            return self._step_failed(self._failure or "no commit decision from the coordinator")
        if decision.get("reconfigure"):
            self._need_quorum = True
        resync = decision.get("resync") or {}
        if self.replica_id in resync:
            index = int(resync[self.replica_id])
            paths = self._digest_paths
            name = paths[index] if index < len(paths) else f"#{index}"
            log.error(
                "bit-parity mismatch at step %d: this worker's tensor %r differs from the "
                "majority; healing from an up-to-date member",
                self._step,
                name,
            )
            self._synced = False
        if not decision["ok"]:
            return self._step_failed(self._failure or str(decision.get("reason", "")))
        self._step += 1
        self.metrics.committed += 1
        self._consecutive_failures = 0
        self.metrics.bytes_sent = self._bytes_sent_total()
        return True

    def report(self, **values: float | int | str) -> None:
        """Attach small metrics (e.g. loss=...) to the next commit vote, for progress displays."""
        self._report.update({k: v for k, v in values.items() if isinstance(v, int | float | str)})

    def close(self) -> None:
        """Leave gracefully (others see a leave, not a crash) and release resources. Reports
        this worker's step and state digest so launchers can check final bit-parity."""
        if self._closed:
            return
        self._closed = True
        final: dict[str, Any] = {"step": self._step}
        if len(self._state) and self._synced:
            try:
                final["digest"] = self.digest()
            except Exception as e:  # a state that cannot be read must not block leaving
                log.warning("could not digest the state at close: %s", e)
        self._session.close(final)
        self._retire_epoch("manager closed")

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ collectives
    def allreduce(
        self,
        tensor: torch.Tensor,
        op: str = "sum",
        async_op: bool = False,
        name: str = "",
        verify: bool = True,
        codec: Any = None,
        error_feedback: Any = None,
        algorithm: str = "auto",
    ) -> bool | Handle:
        """All-reduce of `tensor` in place over the epoch ("sum", "mean", "max", "min").

        Returns True on success (False: the step failed and `tensor` is unchanged). With
        async_op=True returns a Handle whose wait() gives that bool. `verify` exchanges a
        signature header first so mismatched shapes/dtypes fail the step with a clear message.
        A CPU tensor (gloo) goes through lococomm's own ring (C++, over the epoch's TCP
        connections to the ring neighbours; async calls run it on the epoch's ring thread, in
        call order) that never writes `tensor` until it succeeded (no backup copy) and always
        checks the signature in its streams; if nothing else can see the tensor's storage (no
        views, not numpy/shared memory) the tensor then takes the result buffer's storage
        instead of a copy, so its data_ptr() changes. Do not modify a tensor before its async
        handle was waited: the ring reads it while it runs.

        codec (e.g. lc.codecs.Int8()) compresses on the wire ("sum"/"mean" only; see
        docs/compressed_collectives.md); error_feedback (ErrorFeedback/EF21/EControl on the same
        codec) keeps state under the key `name`; commit() makes the staged state current if the
        step commits and rolls it back otherwise (calling ef.commit()/ef.rollback() yourself
        afterwards is harmless). Compressed calls run on the calling thread. `algorithm`
        ("auto", "ring", "allgather") overrides the size-based choice of a compressed call
        ("ring": fewest bytes for a summable codec, e.g. rare exchanges over slow links).
        """
        if algorithm not in compressed.ALGORITHMS:
            raise ValueError(f"algorithm must be one of {compressed.ALGORITHMS}, got {algorithm!r}")
        comm = self._comm_for("allreduce")
        if codec is None and error_feedback is None:
            handle = self._guard(
                lambda: exact.allreduce(comm, tensor, op, name, verify, blocking=not async_op), False
            )
            return self._finish(handle, f"allreduce({op}) {name}", tensor, async_op)
        if error_feedback is not None:
            # The EF state the call stages becomes current only if the step commits.
            key = name or f"allreduce#{len(self._signatures)}"
            self._finalizers.append(
                lambda ok, ef=error_feedback, key=key: ef.commit(key) if ok else ef.rollback(key)
            )
        handle = self._guard(
            lambda: compressed.allreduce(
                comm, tensor, op, codec, error_feedback, name=name, verify=verify,
                step=self._step, index=len(self._signatures),
                make_group=comm.make_group,
                on_stats=lambda stats: accumulate_stats(self.metrics.compressed, stats),
                algorithm=algorithm,
            ),
            False,
        )  # fmt: skip
        label = (codec or error_feedback.codec).name
        return self._finish(handle, f"allreduce({op},{label}) {name}", tensor, async_op)

    def broadcast(
        self, tensor: torch.Tensor, src: int, async_op: bool = False, name: str = "", verify: bool = True
    ) -> bool | Handle:
        """Broadcast `tensor` from epoch rank `src` into every member's `tensor` (in place)."""
        comm = self._comm_for("broadcast")
        handle = self._guard(lambda: exact.broadcast(comm, tensor, src, name, verify), False)
        return self._finish(handle, f"broadcast(src={src}) {name}", tensor, async_op)

    def allgather(
        self, tensor: torch.Tensor, async_op: bool = False, name: str = "", verify: bool = True
    ) -> torch.Tensor | Handle | None:
        """Gather `tensor` from every member: a new [world_size, *shape] tensor, None on failure."""
        comm = self._comm_for("allgather")
        handle = self._guard(lambda: exact.allgather(comm, tensor, name, verify), None)
        return self._finish(handle, f"allgather {name}", tensor, async_op)

    @property
    def communicator(self) -> Communicator:
        """The current epoch's communicator, for collective algorithms built on the manager."""
        return self._comm_for("communicator")

    def record_signature(self, description: str) -> None:
        """Add one collective to this step's signature (compared across members at commit)."""
        self._signatures.append(description)
        self._signature_hash.update(description.encode())
        self._signature_hash.update(b"\0")

    def fail_step(self, reason: str) -> None:
        """Mark the current step failed (voted down at once so peers stop waiting for us)."""
        if self._failure is not None:
            return
        self._failure = reason
        self.metrics.last_failure = reason
        log.warning("step %d failed: %s", self._step, reason)
        ctx = self._ctx
        if ctx is not None and self._in_step and not self._early_voted:
            self._vote_generation = self._session.vote(
                {
                    "epoch": ctx.info.number,
                    "step": self._step,
                    "ok": False,
                    "reason": reason,
                    "signature": "",
                    "signatures": [],
                }
            )
            self._early_voted = self._vote_generation is not None

    # ------------------------------------------------------------------ internals
    def _comm_for(self, what: str) -> Communicator:
        if not self._in_step:
            raise RuntimeError(f"{what} called outside a step: call start_step() first")
        assert self._ctx is not None and self._ctx.comm is not None
        return self._ctx.comm

    def _guard(self, start: Any, failed_value: Any) -> Handle:
        if self.step_failed:
            return Handle.completed(failed_value)  # no point moving data for a doomed step
        return start()

    def _finish(self, handle: Handle, label: str, tensor: Any, async_op: bool) -> Any:
        if isinstance(tensor, torch.Tensor):
            self.record_signature(f"{label.strip()} {str(tensor.dtype)[6:]}{list(tensor.shape)}")
        if async_op:
            self._pending.append(handle)
            return handle
        return handle.wait()

    def _step_failed(self, reason: str) -> bool:
        self._consecutive_failures += 1
        self._need_quorum = True
        self.metrics.failed += 1
        self.metrics.last_failure = reason
        return False

    def _bytes_sent_total(self) -> int:
        comm = self._ctx.comm if self._ctx else None
        return self._bytes_retired + (comm.bytes_sent if comm else 0)

    def _wait_for_healed(self, ctx: _EpochContext) -> None:
        """Before the first digest after a heal this member was not healed in: wait for the
        healed members' state to land (healing.wait_landed), so the hash does not take the CPU
        their transfer needs. An abort meanwhile is seen by the caller's abort check."""
        if ctx.wait_healed is None:
            return
        ctx.wait_healed, wait = None, ctx.wait_healed
        waited = time.monotonic()
        why = wait(self.timeout)
        if why is None:
            log.info(
                "waited %.1f ms for the healed members' state to land before hashing",
                (time.monotonic() - waited) * 1e3,
            )
        elif not ctx.abort.aborted:
            log.warning("the healed members did not report their state landed (%s)", why)

    def _parity_due(self, ctx: _EpochContext) -> bool:
        """Digests ride on this vote? Decided from facts every member shares (step, epoch)."""
        if ctx.info.healed and ctx.commits == 0:
            return True
        return self.parity_every > 0 and self._step > 0 and self._step % self.parity_every == 0

    def _registration(self, local_address: str) -> dict[str, Any]:
        """The register message's fields, on a connection leaving from `local_address`."""
        return {
            "step": self._step,
            "last_epoch": self._last_epoch,
            "last_members": self._last_members,
            "host": self._host(local_address),
        }

    def _host(self, local_address: str) -> str:
        """Where this member's heal links listen (told to the coordinator, which spreads a
        heal over sources on distinct hosts); "" if that cannot be worked out right now (this
        runs on the reconnecting thread, which must not die of it)."""
        try:
            return ring_host(local_address)
        except Exception as e:
            log.warning("cannot tell the coordinator this member's host: %s", e)
            return ""

    def _on_abort(self, epoch: int | None, reason: str) -> None:
        """Coordinator push (reader thread): epoch `epoch` failed, or (None) the connection
        changed. In-flight collectives of that epoch give up; the next step re-forms."""
        ctx = self._ctx
        if epoch is None:
            self._need_quorum = True
        if ctx is not None and (epoch is None or ctx.info.number == epoch):
            ctx.abort.abort(reason)

    def _quorum(self) -> None:
        started = time.monotonic()
        deadline = started + self.quorum_timeout
        self._retire_epoch("re-quorum")
        while True:
            synced = self._synced or not len(self._state)
            info = self._session.request_epoch(self._step, synced, deadline, self.quorum_timeout)
            ctx = _EpochContext(info=info, abort=AbortSignal())
            self._ctx = ctx
            reason = self._session.failed_decision(info.number)
            if reason is not None:  # it failed before we even built the group
                ctx.abort.abort(reason)
            try:
                # (not for an epoch already known dead: its rendezvous would only time out)
                heal = self._prepare_heal(ctx) if reason is None else None
            except HealError as e:
                log.warning("epoch %d: %s; forming a new quorum", info.number, e)
                self._retire_epoch(str(e))
                continue
            if not self._build_group(ctx):
                if heal is not None:
                    heal.groups.retire(self.graveyard)
                self._retire_epoch("rendezvous failed")
                continue
            try:
                self._heal(ctx, heal)
            except HealError as e:
                log.warning("epoch %d: healing failed (%s); forming a new quorum", info.number, e)
                self._retire_epoch(f"healing failed: {e}")
                continue
            self._need_quorum = False
            self._last_epoch = info.number
            self._last_members = list(info.replicas)
            self.metrics.epochs += 1
            self.metrics.quorum_seconds = time.monotonic() - started
            log.info(
                "epoch %d: rank %d/%d, members %s, step %d (quorum %.1f ms)",
                info.number,
                info.rank,
                info.world_size,
                list(info.group_replicas),
                self._step,
                self.metrics.quorum_seconds * 1e3,
            )
            return

    def _prepare_heal(self, ctx: _EpochContext) -> _HealStart | None:
        """Start this member's heal-group rendezvous and, on the primary source, publish the
        heal metadata, so both overlap the epoch group's rendezvous. None when the epoch heals
        nobody."""
        info = ctx.info
        if not info.receivers or info.world_size == 1:
            return None
        started = time.monotonic()
        prefix = info.store_prefix
        sources = info.ranks_of(info.sources)
        store = dist.PrefixStore(f"{prefix}/heal", self._groups.store())
        streams = streams_enabled(self._groups.backend)
        published = None
        prepared_send = None
        if info.rank == min(sources):
            snapshot = self._state.snapshot()
            if streams:
                hosts = {rank: info.hosts.get(r, "") for rank, r in zip(sources, info.sources)}
                used = stream_sources(sources, snapshot.nbytes, hosts)
                meta = publish_meta(store, snapshot, used, STREAM_CHUNK_BYTES)
                if info.rank in used:  # its stream's pieces and header, built meanwhile
                    prepared_send = Background(
                        functools.partial(send_plan, snapshot, meta, info.rank), "lococomm-heal-send-plan"
                    )
            else:
                meta = publish_meta(store, snapshot, sources)
            published = (snapshot, meta)  # (publish_meta raises HealError if the store is gone)
        receivers = info.ranks_of(info.receivers)
        make_links = None
        if streams:
            make_links = functools.partial(
                self._groups.heal_links, f"{prefix}/heal", info.rank, sources, receivers, ctx.abort
            )
        groups = HealGroups(
            info.rank,
            sources,
            receivers,
            lambda suffix, rank, size: self._groups.new_group(f"{prefix}/{suffix}", rank, size),
            ctx.abort,
            make_links,
        )
        landing = None
        if info.rank in receivers:
            prepare = receive_plan if streams else None
            landing = Landing(store, self._state, self.device, ctx.abort, self.timeout, prepare)
        return _HealStart(groups, store, published, started, landing, prepared_send)

    def _heal(self, ctx: _EpochContext, heal: _HealStart | None) -> None:
        """Run this epoch's healing plan; afterwards every member is at the epoch's step."""
        info = ctx.info
        comm = ctx.comm
        assert comm is not None
        if self._damaged and self.replica_id not in info.receivers:
            # Named a source (or left alone): nobody up to date is left to heal from.
            raise StateLost(
                f"epoch {info.number}: this member's state holds a half-finished heal and no "
                "member holds the state to heal it from; restart the job from a checkpoint"
            )
        if heal is not None:
            started = time.monotonic()
            healer = Healer(
                comm,
                heal.store,
                self._state,
                info.ranks_of(info.sources),
                info.ranks_of(info.receivers),
                heal.groups,
                published=heal.published,
                landing=heal.landing,
                prepared_send=heal.prepared_send,
            )
            try:
                healer.run()
            except HealError:
                if healer.state_damaged:
                    # Until a heal completes its state is not any step's state: keep the
                    # coordinator from naming it a source (it would spread the damage).
                    self._synced = False
                    self._damaged = True
                    log.warning("this member's state holds a partial transfer; healing again")
                raise
            seconds = time.monotonic() - started
            if self.replica_id not in info.receivers:
                # (holds the store and ranks only, not the healer and its stream plan)
                ctx.wait_healed = functools.partial(
                    wait_landed, heal.store, info.ranks_of(info.receivers), ctx.abort
                )
            else:
                self._damaged = False
                self.metrics.heal_seconds = seconds
                self.metrics.heal_bytes = healer.bytes_moved
                self.metrics.heal_from_plan_seconds = time.monotonic() - heal.started
                self.metrics.heal_phases = {k: round(v, 3) for k, v in healer.phases.items()}
                log.info(
                    "healed %d bytes of state from %s in %.3f s (step %d -> %d)",
                    healer.bytes_moved,
                    list(info.sources),
                    seconds,
                    self._step,
                    info.max_step,
                )
        elif self._step < info.max_step:
            # Only possible for a local rank that exists in no other replica group (groups of
            # different sizes): there is no peer holding this shard.
            log.warning(
                "local rank %d is behind (step %d < %d) and no other replica holds its shard; "
                "replica groups should have equal sizes",
                self.group_rank,
                self._step,
                info.max_step,
            )
        self._step = info.max_step
        self._synced = True

    def _build_group(self, ctx: _EpochContext) -> bool:
        info = ctx.info
        pg, err = self._groups.build(info, ctx.abort)
        if err is not None:
            log.warning("epoch %d: %s", info.number, err)
            return False
        ctx.comm = Communicator(
            pg=pg,
            rank=info.rank,
            world_size=info.world_size,
            abort=ctx.abort,
            pool=self.pool,
            graveyard=self.graveyard,
            timeout=self.timeout,
            fail=self.fail_step,
            epoch=info.number,
            device=self.device,
            make_group=lambda suffix, rank, size: self._groups.new_group(
                f"{info.store_prefix}/{suffix}", rank, size
            ),
            connect_ring=functools.partial(
                self._groups.ring_sockets,
                f"{info.store_prefix}/ring-tcp",
                info.rank,
                info.world_size,
                ctx.abort,  # not ctx: the communicator is ctx.comm (no reference cycle)
            ),
        )
        return True

    def _retire_epoch(self, reason: str) -> None:
        """Abandon the current epoch's group; pending ops stay alive in the graveyard."""
        ctx = self._ctx
        if ctx is None:
            return
        ctx.abort.abort(reason)
        if ctx.comm is not None:
            self._bytes_retired += ctx.comm.bytes_sent
            exact_ring.release(ctx.comm)
            if ctx.comm.pg is not None:
                self.graveyard.retire_group(ctx.comm.pg)
        self._ctx = None
