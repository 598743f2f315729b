"""Exact ring all-reduce that only reads the caller's tensor: no backup copy at all.

gloo's all-reduce works in place, so `exact.allreduce` backs the caller's tensor up before
handing it over (one memory pass of the whole tensor, which on 2 cores shared by 4 members is
~15 % of a 16M all-reduce). This ring writes every byte it receives into a separate result
buffer R instead, so the caller's tensor x is never written and nothing needs restoring:

    stage 0            send x[seg]                               (x is only read)
    1 <= s <= W - 1    R[seg] (received at s - 1) op= x[seg]; send R[seg]
                       (s = W - 1: R[seg] is the owner's final value; "mean" divides it here)
    s >= W             R[seg] holds final bytes received at s - 1; forward them

with the segments, pipeline chunks and issue order of `ring_plan.py`. Every receive lands
directly in R: a segment received as a partial sum (stage s) and again as a final value
(stage s + W) is safe to receive twice because the final cannot exist before our partial was
received downstream. Every member ends with the owner's bytes of every segment: the result is
bit-identical everywhere.

Transport: the ring's own TCP connection to each neighbour (`ring_sockets.py`, connected once
per epoch), driven by `ops.ring_allreduce`: the C++ executor (`csrc/ring.cpp`, one thread,
poll(2), GIL released) or its Python reference, which can share a ring with it. Why not gloo:
its pair transport is only reachable through its collectives, and the previous version of this
ring -- hops as broadcasts in gloo pair groups, driven from Python -- paid two thread
hand-offs per hop: 111-123 ms against gloo's own 92-105 ms at 4 members, 16M fp32. The C++
executor beats gloo's all-reduce itself here (measured in the same processes, loopback, 16M
fp32: 26 vs 48 ms at 2 members, 81 vs 95 ms at 4).

On success the caller's tensor takes R's storage when it is the sole user of a plain torch
allocation (`swappable`), else R is copied into it. On failure the tensor was never touched;
nothing is pending (the executor returned), so R goes back to the pool, and the sockets, whose
streams are now out of step, are closed -- which also stops the neighbours at once.

Blocking calls run the ring on the calling thread; async calls run it on the communicator's
ring thread (one per epoch, calls in submission order), which holds the GIL only to start
and end a call, and the handle's wait() hands the result over on the caller's thread.
"""

from __future__ import annotations

import atexit
import collections
import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable

import torch

from lococomm import ops
from lococomm.collectives import ring_sockets, signature
from lococomm.collectives.abort import AbortSignal
from lococomm.collectives.communicator import Communicator, Handle
from lococomm.collectives.ownership import swappable
from lococomm.collectives.ring_plan import RingPlan, plan_ring, ring_bytes

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # pipeline chunk (bytes)
# Stream format and schedule version: sent in every header with CHUNK_BYTES, so members whose
# schedules differ (another lococomm version) report a mismatch instead of mixing bytes.
PROTOCOL = 2


# LOCOCOMM_EXACT_RING=0 sends exact CPU all-reduces through gloo instead (with the pipelined
# backup copy): a switch for comparisons and debugging, which must be the same on every member.
enabled = os.environ.get("LOCOCOMM_EXACT_RING", "1").strip() != "0"


def eligible(comm: Communicator, tensor: torch.Tensor) -> bool:
    """Whether an exact all-reduce of `tensor` takes the ring: any CPU tensor on an epoch
    that can connect ring sockets. Nothing about the tensor's size or dtype decides, so members
    whose tensors differ (a bug the signature in the stream reports) still meet in the ring
    rather than wait for each other in different collectives."""
    return (
        enabled
        and comm.world_size >= 2
        and comm.connect_ring is not None
        and comm.device.type == "cpu"
        and tensor.device.type == "cpu"
    )


def _sockets(comm: Communicator) -> tuple[ring_sockets.RingSockets | None, str | None]:
    sockets = ring_sockets.known(comm)
    if sockets is not None:
        return sockets, None
    if ring_sockets.broken(comm):
        return None, "the ring failed earlier in this epoch"
    assert comm.connect_ring is not None
    # On this thread, not a helper: the rendezvous watches the abort itself, and a helper
    # still polling the store when the interpreter exits would outlive the exit hook's join.
    try:
        sockets = comm.connect_ring()
    except Exception as e:  # RendezvousError, or the store went away
        return None, f"ring sockets rendezvous failed: {e}"
    ring_sockets.remember(comm, sockets)
    return sockets, None


class _RingCall:
    """One all-reduce over the ring: prepared on the caller's thread, executed on the caller's
    thread (blocking) or the communicator's ring thread (async), finished on the caller's."""

    def __init__(
        self, comm: Communicator, tensor: torch.Tensor, op: str, description: str, fields: list[int]
    ) -> None:
        self.comm, self.tensor, self.op = comm, tensor, op
        self.description = description
        # x is only read; a non-contiguous tensor is read through a contiguous copy
        self.x: torch.Tensor | None = (
            tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1).contiguous()
        )
        self.result = comm.pool.get(self.x.numel(), self.x.dtype, self.x.device)
        self.fields = [*fields, PROTOCOL, CHUNK_BYTES]
        self.header = torch.tensor(self.fields, dtype=torch.int64)
        self.left_header = torch.empty_like(self.header)
        self.err = ""
        comm.bytes_sent += ring_bytes(self.x.numel(), self.x.element_size(), comm.world_size)

    def execute(self) -> None:
        """Run the ring (any thread; the executor releases the GIL). Sets `err`."""
        comm, x = self.comm, self.x
        assert x is not None
        try:
            sockets, why = _sockets(comm)
            if sockets is None:
                self.err = why or "ring sockets unavailable"
                return
            recvs, sends = _schedule(x.numel(), x.element_size(), comm.world_size, comm.rank, self.op)
            self.err = ops.ring_allreduce(
                sockets.left.fileno(),
                sockets.right.fileno(),
                comm.abort.fileno(),
                x,
                self.result,
                recvs,
                sends,
                self.op,
                comm.world_size,
                comm.timeout,
                self.header,
                self.left_header,
            )
        except Exception as e:  # a bad argument is a bug, but it must not leave peers waiting
            log.exception("%s: exact ring failed", self.description)
            self.err = f"{type(e).__name__}: {e}"
        except BaseException:  # Ctrl-C during the ring: the streams are out of step
            ring_sockets.drop(comm)
            raise
        if self.err:
            ring_sockets.drop(comm)  # also stops the neighbours: their streams end here

    def finish(self) -> bool:
        """On the caller's thread: hand the result to the tensor, or fail the step with a
        message naming the call (and, on a mismatch, who holds which signature)."""
        comm, tensor, err = self.comm, self.tensor, self.err
        self.x = None  # our view of the tensor must not count as another user below
        if err:
            comm.pool.put(self.result)
            if err == "signature mismatch":
                left = (comm.rank - 1) % comm.world_size
                pairs = sorted([(left, self.left_header.tolist()), (comm.rank, self.fields)])
                rows, ranks = [row for _, row in pairs], [rank for rank, _ in pairs]
                comm.fail(signature.mismatch_message(self.description, rows, ranks) or err)
            else:
                comm.fail(f"{self.description}: {err}")
            return False
        with torch.no_grad():
            if tensor.is_contiguous() and swappable(tensor):
                old = tensor.view(-1)  # nobody else sees this storage: it becomes a next R
                tensor.set_(self.result.untyped_storage(), 0, tensor.shape, tensor.stride())
                comm.pool.put(old)
            else:
                tensor.copy_(self.result.view(tensor.shape))
                comm.pool.put(self.result)
        return True


class _RingThread:
    """The communicator's thread for async ring calls. Jobs run one after the other in
    submission order (every member submits the same calls in the same order, so the streams
    match); a blocking call waits until the thread is idle and then runs inline."""

    def __init__(self, abort: AbortSignal) -> None:
        self.abort = abort  # the epoch's (not the communicator: the thread must not keep it alive)
        self._cond = threading.Condition()
        self._jobs: collections.deque[tuple[Callable[[], None], threading.Event] | None] = (
            collections.deque()
        )
        self._busy = False
        self._thread = threading.Thread(target=self._loop, name="lococomm-ring", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> threading.Event:
        done = threading.Event()
        with self._cond:
            self._jobs.append((job, done))
            self._cond.notify_all()
        return done

    def wait_idle(self) -> None:
        """Until every submitted job ran (each ring call is bounded by its deadline)."""
        with self._cond:
            while self._jobs or self._busy:
                self._cond.wait()

    def stop(self) -> None:
        """Exit after the jobs already submitted."""
        with self._cond:
            self._jobs.append(None)
            self._cond.notify_all()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                item = self._jobs.popleft()
                if item is None:
                    return
                self._busy = True
            job, done = item
            del item
            try:
                job()
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                done.set()
                # A finished call holds its communicator, which must stay collectable (its
                # finalizer stops this thread and closes the sockets).
                job = done = None  # type: ignore[assignment]


_THREADS: dict[int, _RingThread] = {}
_THREADS_LOCK = threading.Lock()


def _ring_thread(comm: Communicator) -> _RingThread:
    with _THREADS_LOCK:
        thread = _THREADS.get(id(comm))
        if thread is None:
            thread = _THREADS[id(comm)] = _RingThread(comm.abort)
            weakref.finalize(comm, _stop_thread, id(comm))
        return thread


def _stop_thread(key: int) -> None:
    with _THREADS_LOCK:
        thread = _THREADS.pop(key, None)
    if thread is not None:
        thread.stop()


def release(comm: Communicator, wait: float = 5.0) -> None:
    """The epoch is over (its abort is set): stop its ring thread and close its ring sockets.
    A call still running on the thread returns at once on the abort (a ring whose data still
    flows finishes first); the sockets are closed only after it (closing an fd the executor
    polls could hand its number to a new socket the executor would then read). Joined here,
    up to `wait` seconds, so no ring thread outlives its manager (a daemon thread inside
    native code while the interpreter finalizes can take the process down)."""
    with _THREADS_LOCK:
        thread = _THREADS.pop(id(comm), None)
    if thread is None:
        ring_sockets.drop(comm)
        return
    thread.submit(functools.partial(ring_sockets.drop, comm))
    thread.stop()
    thread.join(wait)  # if a call is still finishing, the thread closes the sockets after it


def _abort_rings_at_exit() -> None:
    # A ring thread must not be inside the executor (GIL released) when the interpreter
    # finalizes: re-taking the GIL then terminates the process. Abort what runs, let it return.
    with _THREADS_LOCK:
        threads = list(_THREADS.values())
        _THREADS.clear()
    for thread in threads:
        thread.abort.abort("interpreter exiting")
        thread.stop()
    for thread in threads:
        thread.join(5.0)


# Runs before non-daemon threads are joined and before atexit handlers (which may close fds).
getattr(threading, "_register_atexit", atexit.register)(_abort_rings_at_exit)


def allreduce(
    comm: Communicator, tensor: torch.Tensor, op: str, description: str, fields: list[int]
) -> bool:
    """All-reduce `tensor` (eligible) over the ring on the calling thread; True on success
    (tensor holds the result), False with the step failed and the tensor untouched. `fields`
    is the call's signature (`signature.fields`), checked against the left neighbour's in the
    stream. Async calls submitted earlier run first."""
    with _THREADS_LOCK:
        thread = _THREADS.get(id(comm))
    if thread is not None:
        thread.wait_idle()
    call = _RingCall(comm, tensor, op, description, fields)
    call.execute()
    return call.finish()


def allreduce_async(
    comm: Communicator, tensor: torch.Tensor, op: str, description: str, fields: list[int]
) -> Handle:
    """Start the same all-reduce on the communicator's ring thread; the handle's wait()
    finishes it on the caller's thread (result into the tensor, or the step failed). The
    tensor must not be modified before wait() (it is read while the ring runs)."""
    call = _RingCall(comm, tensor, op, description, fields)
    done = _ring_thread(comm).submit(call.execute)

    def finish() -> bool:
        # Bounded: a call gives up at its own deadline (rendezvous + executor, each
        # comm.timeout) or at once on an abort. Waited in slices so Ctrl-C gets through.
        while not done.wait(0.1):
            pass
        return call.finish()

    return Handle(finish)


@functools.lru_cache(maxsize=256)
def _schedule(
    numel: int, element_size: int, world: int, rank: int, op: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`native_schedule` of a call's plan, built once per shape (25-150 us in Python; the
    executor only reads the tensors, so calls of one shape share them)."""
    plan = plan_ring(numel, world, 1, max(1, CHUNK_BYTES // element_size))
    return native_schedule(plan, rank, op)


def native_schedule(plan: RingPlan, rank: int, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ring's receives and sends for `csrc/ring.cpp`, in issue order (pure).

    receives: int64 [n, 3] rows (start, end, action) over R, action 0 forward, 1 combine with
    x, 2 combine then divide by W (mean, at the owner's stage); sends: int64 [n, 4] rows
    (start, end, source 0 = x / 1 = R, index of the receive it needs, -1 for none)."""
    w = plan.world
    recvs: list[tuple[int, int, int]] = []
    sends: list[tuple[int, int, int, int]] = []
    index: dict[tuple[int, int], int] = {}
    order = plan.order()
    for j, s in order:
        a, b = plan.bounds(plan.received_segment(rank, s), j)
        if a == b:
            continue
        action = 0
        if s <= w - 2:
            action = 2 if (s == w - 2 and op == "mean") else 1
        index[(j, s)] = len(recvs)
        recvs.append((a, b, action))
    for j, s in order:
        a, b = plan.bounds(plan.sent_segment(rank, s), j)
        if a == b:
            continue
        sends.append((a, b, 0 if s == 0 else 1, -1 if s == 0 else index[(j, s - 1)]))
    return (
        torch.tensor(recvs, dtype=torch.int64).reshape(-1, 3),
        torch.tensor(sends, dtype=torch.int64).reshape(-1, 4),
    )

