"""Bridge to stock DistributedDataParallel: ``model.register_comm_hook(None, ddp_hook(codec))``.

Per gradient bucket the hook encodes the bucket (through error feedback by default), all-gathers
the payloads as one flat byte buffer each (works on gloo, for every codec), decodes and adds all
members' payloads in rank order (bit-identical on every member) and divides by the world size.
With error feedback each bucket is a key; the step's EF state is committed as soon as the
averaged gradient is known -- or rolled back if it is not finite, so a step skipped by an AMP
GradScaler leaves EF untouched. When DDP rebuilds a bucket (it does after the first iteration)
that bucket's EF state is reset, since a residual belongs to a fixed parameter layout.

Seeds: ``derive_seed(seed, bucket, call)`` for the bucket's n-th call, mixed with the rank for
codecs that do not need a shared seed (independent stochastic rounding on every member).
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations at runtime
# (they must be the objects dist.GradBucket and torch.futures.Future[torch.Tensor]).
import logging
from typing import Any

import torch
import torch.distributed as dist

from .base import Codec, derive_seed
from .error_feedback import EF21, EControl, ErrorFeedback
from .payload import Payload

log = logging.getLogger(__name__)


class DDPCompressionHook:
    """A DDP communication hook (callable as ``hook(state, bucket)``); see module docstring."""

    def __init__(
        self,
        codec: Codec,
        error_feedback: bool | ErrorFeedback | EF21 | EControl = True,
        *,
        seed: int = 0,
        process_group: Any = None,
    ) -> None:
        if not isinstance(codec, Codec):
            raise TypeError(f"expected a Codec, got {type(codec).__name__}")
        if error_feedback is True:
            self.ef = ErrorFeedback(codec)
        elif error_feedback is False or error_feedback is None:
            self.ef = None
        elif isinstance(error_feedback, ErrorFeedback | EF21 | EControl):
            if error_feedback.codec != codec:
                raise ValueError("error_feedback wraps a different codec")
            self.ef = error_feedback
        else:
            raise TypeError("error_feedback must be a bool or an ErrorFeedback/EF21/EControl")
        self.codec = codec
        self.seed = int(seed)
        self.process_group = process_group
        self._calls: dict[int, int] = {}
        self._layouts: dict[int, tuple] = {}
        # DDP reads hook.__name__ and hook.__qualname__ (functions have them, objects do not)
        self.__name__ = self.__qualname__ = f"lococomm_{codec.name}_hook"

    def __call__(self, state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        buf = bucket.buffer()
        index = bucket.index()
        call = self._calls.get(index, 0)
        self._calls[index] = call + 1
        seed = derive_seed(self.seed, index, call)
        if not self.codec.shared_seed:
            seed = derive_seed(seed, rank)
        key = f"bucket{index}"
        if self.ef is not None:
            # DDP rebuilds its buckets after the first iteration (and may again): a residual is
            # only meaningful for the same parameters in the same order, so reset on change.
            layout = (buf.numel(), tuple(id(p) for p in bucket.parameters()))
            if self._layouts.get(index, layout) != layout:
                log.info("ddp_hook: bucket %d was rebuilt; its error feedback starts afresh", index)
                self.ef.rollback(key)
                self.ef.reset(key)
            self._layouts[index] = layout
            payload = self.ef.compress(key, buf, seed)
        else:
            payload = self.codec.encode(buf, seed)
        meta = payload.to_parts()[0]
        send = payload.to_buffer()
        recv = [torch.empty_like(send) for _ in range(world)]
        work = dist.all_gather(recv, send, group=group, async_op=True)

        def finish(fut: torch.futures.Future) -> torch.Tensor:
            fut.value()  # re-raises a communication error
            acc = torch.zeros(buf.numel(), dtype=torch.float32, device=buf.device)
            for r in range(world):
                self.codec.decode_accumulate_(acc, Payload.from_buffer(meta, recv[r]))
            acc.div_(world)
            if self.ef is None:
                buf.copy_(acc.view_as(buf))
                return buf
            update = self.ef.aggregate(key, acc)
            if bool(torch.isfinite(update).all()):
                self.ef.commit(key)
            else:
                log.warning("ddp_hook: non-finite gradient in bucket %d; EF state kept", index)
                self.ef.rollback(key)
            buf.copy_(update.view_as(buf))
            return buf

        return work.get_future().then(finish)


def ddp_hook(
    codec: Codec,
    error_feedback: bool | ErrorFeedback | EF21 | EControl = True,
    *,
    seed: int = 0,
    process_group: Any = None,
) -> DDPCompressionHook:
    """A hook for ``DistributedDataParallel.register_comm_hook(None, hook)`` (gloo or nccl).

    error_feedback: True (classic EF on `codec`), False, or an EF21/EControl/ErrorFeedback
    instance wrapping the same codec. The hook holds its own state; pass None as DDP state.
    """
    return DDPCompressionHook(codec, error_feedback, seed=seed, process_group=process_group)
