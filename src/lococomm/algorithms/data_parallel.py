"""Every-step data parallelism whose gradient exchange overlaps backward.

    model = DataParallel(net, manager)                  # or codec=Int8(), error_feedback=True
    opt = Optimizer(torch.optim.SGD(net.parameters(), lr=0.1), manager)
    for x, y in loader:
        opt.zero_grad()                 # starts the step (re-quorum + heal only when needed)
        loss_fn(model(x), y).backward() # buckets are all-reduced while backward runs
        opt.step()                      # finish() + manager.commit(); applied only if committed

Gradients live in flat buckets owned by DataParallel (grad_buckets.py): every trainable
parameter's `.grad` is a view into one (autograd accumulates straight into it), so an exact
bucket goes to gloo/NCCL with no copy at all. Buckets follow reverse registration order, the first one small
(buckets.py). A post-accumulate-grad hook marks a parameter ready; when every parameter of a
bucket is ready and all earlier buckets were launched, the bucket is launched (in bucket
order on every member, so ops stay aligned even if backward visits layers in another order):

* exact: the all-reduce is issued from the hook itself (gloo/NCCL ops are asynchronous: the
  hook only enqueues, gloo's own threads move the bytes while autograd continues);
* compressed (codec=...): submitted to a communication thread (comm_thread.py), since a
  compressed all-reduce runs encode, ring hops and decode on its calling thread.

`finish()` launches what is left, waits for every bucket in order and divides exact sums by
the number of members of the epoch (compressed ones are means already). It returns False if
the step failed; the manager then votes it down and `commit()` is False.

Failures: a bucket's op failing (peer crash, abort after a hang) marks the step failed through
the manager; later hooks of the same backward see the failed step and launch nothing, so
backward completes without blocking, and `finish()` returns at once. A bucket whose op may
still be pending in gloo (a hung peer can make it complete later and write stale bytes) is
given up for good: buried in the manager's graveyard, replaced by a fresh zeroed buffer, and
every `.grad` view re-pointed at the new one (bucket_allreduce.py, grad_buckets.py). After a failed step all
gradients are zero: nothing of it is applied and the batch may be retried.

Details: frozen parameters (requires_grad=False at construction) are left alone; parameters
that got no gradient in a step contribute zeros (their `.grad` is the members' average, zero
if nobody used them) unless find_unused_parameters=True, which costs one tiny all-reduce per
step and leaves `.grad = None` for parameters no member used (optimizers then skip them, as
with torch DDP); `no_sync()` accumulates micro-batches locally; dtypes get separate buckets
(compressed codecs take float32/float16/bfloat16, other dtypes go exact); the layout is
compared across members once per epoch, after which bucket ops skip the signature header.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lococomm.algorithms.buckets import (
    DEFAULT_FIRST_BUCKET_BYTES,
    BucketSpec,
    ParamInfo,
    layout_hash,
    plan_buckets,
)
from lococomm.algorithms.comm_thread import CommThread, Job
from lococomm.algorithms.grad_buckets import GradBuckets
from lococomm.collectives import signature
from lococomm.collectives.bucket_allreduce import BucketAllreduce, Outcome
from lococomm.compress.base import Codec
from lococomm.compress.error_feedback import EF21, EControl, ErrorFeedback

log = logging.getLogger(__name__)

COMPRESSIBLE = (torch.float32, torch.float16, torch.bfloat16)
# DataParallel instances per manager, found by lococomm's Optimizer at zero_grad()/step().
_ATTACHED: weakref.WeakKeyDictionary[Any, weakref.WeakSet[DataParallel]] = (
    weakref.WeakKeyDictionary()
)


def attached(manager: Any) -> list[DataParallel]:
    """The DataParallel wrappers built on `manager`, in creation order."""
    return sorted(_ATTACHED.get(manager, ()), key=lambda dp: dp._serial)


@dataclass
class _Bucket:
    """One bucket's progress in the current sync window (its memory is in GradBuckets)."""

    spec: BucketSpec
    compressed: bool  # goes through the codec (on the comm thread)
    ready: int = 0  # parameters whose gradient arrived in this sync window
    launched: bool = False
    op: BucketAllreduce | None = None  # exact op in flight
    job: Job | None = None  # compressed (or codec-mode) launch on the comm thread
    scale: int = 1  # members the sum is divided by
    skipped: bool = False  # not sent: the step had already failed

    def reset(self) -> None:
        self.ready = 0
        self.launched = self.skipped = False
        self.op = self.job = None
        self.scale = 1


@dataclass
class DataParallelMetrics:
    """Per-step figures of the last finish() (seconds, counts)."""

    buckets: int = 0
    wait_seconds: float = 0.0  # time finish() spent waiting for communication
    launched_in_backward: int = 0  # buckets launched by hooks (overlapped) this step
    abandoned_buckets: int = 0  # cumulative: buffers left to zombie ops and replaced


class DataParallel(nn.Module):
    """Wraps `module` so its gradients are averaged over the manager's members each step.

    Args:
        module: the model; its trainable parameters at construction are the ones synced.
        manager: the lococomm Manager (one per process / local rank).
        codec: a lococomm codec (e.g. codecs.Int8()) to compress the gradient exchange;
            None for exact all-reduce.
        error_feedback: with a codec: True for classic ErrorFeedback, or an ErrorFeedback /
            EF21 / EControl object on the same codec (state keyed "bucket<i>"). Its per-step
            transaction is finished by `end_step(committed)` (Optimizer does it).
        bucket_mb: bucket size cap in MiB. 25 is torch DDP's default; on CPU/gloo and slow
            links ~4 (about one layer) hides more communication (docs/data_parallel.md).
        overlap: launch buckets from backward hooks (True) or all at finish() (False).
        first_bucket_mb: cap of the first bucket of each dtype in MiB (small, so the first
            all-reduce starts early in backward).
        find_unused_parameters: one extra tiny all-reduce per step so parameters no member
            used keep `.grad = None` (otherwise they get a zero gradient).
    """

    _count = 0

    def __init__(
        self,
        module: nn.Module,
        manager: Any,
        codec: Codec | None = None,
        error_feedback: bool | ErrorFeedback | EF21 | EControl = False,
        bucket_mb: float = 25.0,
        overlap: bool = True,
        first_bucket_mb: float = DEFAULT_FIRST_BUCKET_BYTES / (1 << 20),
        find_unused_parameters: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"DataParallel wraps an nn.Module, got {type(module).__name__}")
        if bucket_mb <= 0 or first_bucket_mb <= 0:
            raise ValueError(f"bucket sizes must be > 0 MiB, got {bucket_mb} / {first_bucket_mb}")
        self.module = module
        self.manager = manager
        self.codec, self.error_feedback = _check_codec(codec, error_feedback)
        self.overlap = bool(overlap)
        self.find_unused_parameters = bool(find_unused_parameters)
        self.metrics = DataParallelMetrics()
        DataParallel._count += 1
        self._serial = DataParallel._count

        self._params = [p for p in module.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("DataParallel: the module has no trainable parameters")
        names = {id(p): n for n, p in module.named_parameters()}
        self._names = [names.get(id(p), f"#{i}") for i, p in enumerate(self._params)]
        for name, p in zip(self._names, self._params):
            if not p.is_floating_point() and not p.is_complex():
                raise TypeError(f"parameter {name!r} has dtype {p.dtype}; gradients need floats")
            signature.dtype_code(p.dtype)  # clear error for dtypes the collectives lack
        infos = [
            ParamInfo(tuple(p.shape), str(p.dtype), str(p.device), p.element_size())
            for p in self._params
        ]
        specs = plan_buckets(infos, int(bucket_mb * (1 << 20)), int(first_bucket_mb * (1 << 20)))
        codec_spec = self.codec.spec() if self.codec else None
        ef_kind = type(self.error_feedback).__name__
        config = f"codec={codec_spec}|ef={ef_kind}|unused={self.find_unused_parameters}"
        self.layout = layout_hash(infos, specs, config)
        self._storage = GradBuckets(self._params, specs)
        self._buckets = [
            _Bucket(spec, self.codec is not None and self._storage.dtype(b) in COMPRESSIBLE)
            for b, spec in enumerate(specs)
        ]
        self._managed = {id(p) for p in self._params}
        self._ready = [False] * len(self._params)
        self._used = [False] * len(self._params)
        self._next = 0  # first bucket not launched yet in this sync window
        self._hook_launches = 0
        self._sync = True
        self._verified_epoch: int | None = None
        device = self._params[0].device
        self._comm_thread = CommThread(f"lococomm-dp{self._serial}", device) if self.codec else None
        self._hooks = [
            p.register_post_accumulate_grad_hook(_make_hook(weakref.ref(self), i))
            for i, p in enumerate(self._params)
        ]
        with torch.no_grad():
            self._storage.adopt_all(zero_if_missing=True)
        _ATTACHED.setdefault(manager, weakref.WeakSet()).add(self)
        log.info(
            "DataParallel: %d parameters in %d buckets (%s MiB), %s, overlap=%s",
            len(self._params),
            len(specs),
            ", ".join(f"{s.nbytes / (1 << 20):.2f}" for s in specs),
            f"codec {self.codec.name}" if self.codec else "exact",
            self.overlap,
        )

    # ------------------------------------------------------------------ user API
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module; starts the manager's step first if none is open (training only)."""
        if torch.is_grad_enabled() and not self.manager.in_step:
            self.manager.start_step()
        return self.module(*args, **kwargs)

    @property
    def buckets(self) -> list[BucketSpec]:
        """The bucket plan (launch order); parameter indices refer to `parameter_names`."""
        return [b.spec for b in self._buckets]

    @property
    def parameter_names(self) -> list[str]:
        return list(self._names)

    @property
    def bucket_buffers(self) -> list[torch.Tensor]:
        """The current flat buffers (read-only use: a failed step may replace them)."""
        return list(self._storage.buffers)

    def grads_are_views(self) -> bool:
        """True if every synchronised parameter's `.grad` is a view into its bucket."""
        return self._storage.all_views()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) inside the block, as torch DDP."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every bucket; each `.grad` is (again) a view into its bucket.

        `set_to_none` is accepted for signature compatibility and ignored: the gradients must
        stay views into the buckets for the exchange to need no copies.
        """
        self._check_idle("zero_grad()")
        with torch.no_grad():
            self._storage.zero_()
        self._reset_window()
        self._used = [False] * len(self._params)

    def finish(self) -> bool:
        """Launch the buckets not launched yet, wait for all and average; True on success.

        On False the step failed (the manager knows), every gradient is zero, and nothing
        must be applied.
        """
        if not self._sync:
            raise RuntimeError("finish() inside no_sync(): leave the block first")
        if not self.manager.in_step:
            raise RuntimeError(
                "finish() outside a step: call manager.start_step() (or Optimizer.zero_grad(), "
                "or run the forward pass through DataParallel) before backward"
            )
        self._check_unmanaged()
        started = time.perf_counter()
        with torch.no_grad():
            for bucket in self._buckets[self._next :]:
                self._launch(bucket)
            self._next = len(self._buckets)
            ok = self._wait_all()
            if ok and self.find_unused_parameters:
                ok = self._drop_unused()
            if not ok or self.manager.step_failed:
                ok = False
                self._storage.zero_()
        self.metrics.buckets = len(self._buckets)
        self.metrics.wait_seconds = time.perf_counter() - started
        self.metrics.launched_in_backward = self._hook_launches
        self._reset_window()
        self._used = [False] * len(self._params)
        return ok

    def end_step(self, committed: bool) -> None:
        """After manager.commit(): finish the error-feedback transaction; on False discard
        the gradients (zero) so a retried batch starts clean."""
        ef = self.error_feedback
        if ef is not None:
            ef.commit() if committed else ef.rollback()
        if not committed:
            self._check_idle("end_step()")
            with torch.no_grad():
                self._storage.zero_()

    def remove_hooks(self) -> None:
        """Detach from the parameters and the manager (Optimizer no longer finishes it); the
        `.grad` tensors stay as they are."""
        self._check_idle("remove_hooks()")
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._comm_thread is not None:
            self._comm_thread.close()
        _ATTACHED.get(self.manager, weakref.WeakSet()).discard(self)

    # ------------------------------------------------------------------ hooks
    def _on_grad(self, i: int) -> None:
        """Post-accumulate-grad hook of parameter i (autograd's thread)."""
        self._used[i] = True
        with torch.no_grad():
            self._storage.adopt(i, zero_if_missing=False)
        if not self._sync:
            return
        if self._ready[i]:
            self.manager.fail_step(f"DataParallel: {self._names[i]!r} got two gradients in one step")
            raise RuntimeError(
                f"parameter {self._names[i]!r} received a second gradient in the same step: "
                "use `with model.no_sync():` for every backward but the last of an "
                "accumulation window (or call finish()/step() between backwards)"
            )
        self._ready[i] = True
        bucket = self._buckets[self._storage.slot[i][0]]
        bucket.ready += 1
        if not self.overlap:
            return
        while self._next < len(self._buckets):
            nxt = self._buckets[self._next]
            if nxt.ready < len(nxt.spec.params):
                break
            with torch.no_grad():
                self._launch(nxt)
            self._hook_launches += 1
            self._next += 1

    # ------------------------------------------------------------------ launching
    def _launch(self, bucket: _Bucket) -> None:
        """Send one bucket (hook thread or finish()). Gradients of its parameters that did
        not arrive this window (unused) are kept (no_sync sums) or zeroed."""
        manager = self.manager
        if not manager.in_step:
            raise RuntimeError(
                "DataParallel: backward ran outside a step; call optimizer.zero_grad() (lc."
                "Optimizer) or manager.start_step() before the forward pass"
            )
        for i in bucket.spec.params:
            if not self._ready[i]:
                self._storage.adopt(i, zero_if_missing=True)
        bucket.launched = True
        if self._comm_thread is not None:
            bucket.job = self._comm_thread.submit(lambda: self._issue(bucket))
        else:
            self._issue(bucket)

    def _issue(self, bucket: _Bucket) -> bool:
        """Start the bucket's collective (on the launching thread). False: not sent."""
        manager = self.manager
        if manager.step_failed:
            bucket.skipped = True
            return False
        comm = manager.communicator
        bucket.scale = comm.world_size
        if comm.world_size == 1:
            return True
        if not self._verify_layout(comm):
            bucket.skipped = True
            return False
        spec = bucket.spec
        label = f"DataParallel bucket{spec.index} {spec.dtype[6:]}[{spec.numel}]"
        buf = self._storage.buffers[spec.index]
        if bucket.compressed:
            return bool(
                manager.allreduce(
                    buf,
                    op="mean",
                    codec=self.codec,
                    error_feedback=self.error_feedback,
                    name=f"bucket{spec.index}",
                    verify=False,
                )
            )
        manager.record_signature(f"allreduce(sum) {label}")
        bucket.op = BucketAllreduce(comm, buf, label)
        return bucket.op.start()

    def _verify_layout(self, comm: Any) -> bool:
        """Compare the bucket layout across members once per epoch (one tiny all-reduce)."""
        if self._verified_epoch == comm.epoch:
            return True
        total = sum(b.spec.numel for b in self._buckets)
        values = [signature.KINDS["allreduce"], 0, 0, total, len(self._buckets), self.layout, 0]
        description = (
            f"DataParallel bucket layout ({len(self._buckets)} buckets, {total} elements)"
        )
        err = signature.check(comm, values, description)
        if err is not None:
            comm.fail(
                f"{err} -- every member must wrap the same model (same parameter order, shapes "
                "and dtypes) with the same bucket_mb, codec and find_unused_parameters"
            )
            return False
        self.manager.record_signature(f"{description} {self.layout:x}")
        self._verified_epoch = comm.epoch
        return True

    # ------------------------------------------------------------------ finishing
    def _wait_all(self) -> bool:
        ok = True
        deadline = time.monotonic() + self.manager.timeout
        for bucket in self._buckets:
            sent = bucket.job.result() if bucket.job is not None else not bucket.skipped
            if not ok:
                self._give_up(bucket)
                continue
            if not sent:
                ok = False
                self._give_up(bucket)
                continue
            if bucket.op is not None:
                outcome = bucket.op.wait(scale=bucket.scale, deadline=deadline)
                if outcome is Outcome.ABANDONED:
                    self._replace(bucket)
                ok = outcome is Outcome.OK
        return ok

    def _give_up(self, bucket: _Bucket) -> None:
        if bucket.op is not None and bucket.op.give_up("step failed") is Outcome.ABANDONED:
            self._replace(bucket)

    def _replace(self, bucket: _Bucket) -> None:
        """The old buffer belongs to a zombie op now: new zeroed buffer, re-pointed grads."""
        self._storage.replace(bucket.spec.index)
        self.metrics.abandoned_buckets += 1
        log.info("DataParallel: bucket %d abandoned to a pending op; re-allocated", bucket.spec.index)

    def _drop_unused(self) -> bool:
        """Members agree on which parameters anyone used; the rest keep grad None."""
        used = torch.tensor(self._used, dtype=torch.uint8, device=self._params[0].device)
        if self.manager.world_size > 1:
            ok = self.manager.allreduce(used, op="max", name="DataParallel used", verify=False)
            if not ok:
                return False
        for i, flag in enumerate(used.tolist()):
            if not flag:
                self._params[i].grad = None
        return True

    # ------------------------------------------------------------------ helpers
    def _reset_window(self) -> None:
        for bucket in self._buckets:
            bucket.reset()
        self._ready = [False] * len(self._params)
        self._next = 0
        self._hook_launches = 0

    def _check_idle(self, what: str) -> None:
        if any(b.launched for b in self._buckets):
            raise RuntimeError(
                f"{what} while gradient buckets are in flight: call finish() (or "
                "Optimizer.step()) first"
            )

    def _check_unmanaged(self) -> None:
        for name, p in self.module.named_parameters():
            if p.grad is not None and id(p) not in self._managed:
                raise RuntimeError(
                    f"parameter {name!r} has a gradient but was frozen when DataParallel was "
                    "built, so it is not synchronised; build DataParallel after unfreezing"
                )

    def __repr__(self) -> str:
        mode = f"codec={self.codec.name}" if self.codec else "exact"
        return f"DataParallel({mode}, buckets={len(self._buckets)}, module={self.module!r})"


def _make_hook(ref: weakref.ReferenceType[DataParallel], i: int) -> Any:
    def hook(param: torch.Tensor) -> None:
        dp = ref()
        if dp is not None:
            dp._on_grad(i)

    return hook


def _check_codec(codec: Any, error_feedback: Any) -> tuple[Codec | None, Any]:
    if codec is not None and not isinstance(codec, Codec):
        raise TypeError(f"codec must be a lococomm codec (lc.codecs.*), got {type(codec).__name__}")
    if error_feedback is None or error_feedback is False:
        return codec, None
    if codec is None:
        if isinstance(error_feedback, ErrorFeedback | EF21 | EControl):
            return error_feedback.codec, error_feedback
        raise ValueError("error_feedback=True needs a codec")
    if error_feedback is True:
        return codec, ErrorFeedback(codec)
    if isinstance(error_feedback, ErrorFeedback | EF21 | EControl):
        if error_feedback.codec != codec:
            raise ValueError(f"error_feedback wraps {error_feedback.codec!r}, not {codec!r}")
        return codec, error_feedback
    raise TypeError("error_feedback must be a bool or an ErrorFeedback / EF21 / EControl object")
