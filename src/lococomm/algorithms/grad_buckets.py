"""Gradient storage for DataParallel: flat bucket buffers, every `.grad` a view into one.

Autograd accumulates into an existing `.grad` in place, so when the gradient *is* a view of
the bucket, the bucket is ready to send the moment backward has produced it: no copy in, no
copy out. What can break the view is handled here:

* a gradient replaced behind our back (torch `zero_grad(set_to_none=True)` then a fresh
  gradient, `create_graph=True` accumulation, a user assignment) is copied into its view and
  `.grad` re-pointed (`adopt`);
* a bucket buffer that an abandoned collective may still write (bucket_allreduce.py) is
  replaced by a fresh zeroed one and every `.grad` that viewed the old one is re-pointed
  (`replace`); the old buffer belongs to the zombie op (the graveyard keeps it alive).
"""

from __future__ import annotations

import torch

from lococomm.algorithms.buckets import BucketSpec


class GradBuckets:
    """One flat buffer per bucket of `specs` over `params` (indices as in the specs)."""

    def __init__(self, params: list[torch.Tensor], specs: list[BucketSpec]) -> None:
        self.params = params
        self.specs = specs
        self.slot: list[tuple[int, int]] = [(0, 0)] * len(params)  # (bucket, position)
        for b, spec in enumerate(specs):
            for k, i in enumerate(spec.params):
                self.slot[i] = (b, k)
        self.buffers: list[torch.Tensor] = []
        self.views: list[list[torch.Tensor]] = []
        for spec in specs:
            buf, views = self._allocate(spec)
            self.buffers.append(buf)
            self.views.append(views)
        self.replaced = 0  # buffers given up to pending ops so far

    def dtype(self, b: int) -> torch.dtype:
        return self.buffers[b].dtype

    def adopt(self, i: int, zero_if_missing: bool) -> None:
        """Make parameter i's `.grad` its bucket view, keeping the gradient's value (a
        missing gradient leaves the view as it is, or zeroes it)."""
        p = self.params[i]
        b, k = self.slot[i]
        view = self.views[b][k]
        grad = p.grad
        if grad is None:
            if zero_if_missing:
                view.zero_()
        elif same_view(grad, view):
            return
        else:
            view.copy_(grad)
        p.grad = view

    def adopt_all(self, zero_if_missing: bool) -> None:
        for i in range(len(self.params)):
            self.adopt(i, zero_if_missing)

    def zero_(self) -> None:
        """Every gradient zero, every `.grad` a view again."""
        for buf in self.buffers:
            buf.zero_()
        self.adopt_all(zero_if_missing=False)

    def replace(self, b: int) -> None:
        """Give bucket b's buffer up for good: fresh zeroed buffer, `.grad` views re-pointed."""
        buf, views = self._allocate(self.specs[b])
        for k, i in enumerate(self.specs[b].params):
            p = self.params[i]
            if p.grad is not None and same_view(p.grad, self.views[b][k]):
                p.grad = views[k]
        self.buffers[b], self.views[b] = buf, views
        self.replaced += 1

    def all_views(self) -> bool:
        """True if every parameter's `.grad` is its bucket view (for checks and tests)."""
        for i, p in enumerate(self.params):
            b, k = self.slot[i]
            if p.grad is None or not same_view(p.grad, self.views[b][k]):
                return False
        return True

    def _allocate(self, spec: BucketSpec) -> tuple[torch.Tensor, list[torch.Tensor]]:
        first = self.params[spec.params[0]]
        buf = torch.zeros(spec.numel, dtype=first.dtype, device=first.device)
        views = [
            buf[off : off + self.params[i].numel()].view(self.params[i].shape)
            for i, off in zip(spec.params, spec.offsets)
        ]
        return buf, views


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
