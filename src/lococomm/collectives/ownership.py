"""Who else can see a tensor's memory: decides whether a collective may swap its storage.

A collective that finishes in a buffer of its own can hand that buffer to the caller's tensor
(`tensor.set_`) instead of copying into it -- but only if no other tensor, view, process or
foreign owner (numpy, mmap) can observe the old storage, or they would silently diverge.
"""

from __future__ import annotations

import torch


def exclusively_owned(tensor: torch.Tensor) -> bool:
    """True if no other tensor/view can observe `tensor`'s storage (safe to swap it)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None or not tensor.is_contiguous() or tensor.storage_offset() != 0:
        return False
    if tensor.requires_grad and not tensor.is_leaf:
        return False
    storage = tensor.untyped_storage()
    if storage.nbytes() != tensor.numel() * tensor.element_size():
        return False
    return use_count(storage._cdata) == 2  # the tensor itself + the `storage` wrapper above


def swappable(tensor: torch.Tensor) -> bool:
    """True if `tensor` may be re-pointed at another storage without anyone noticing: its
    storage is a plain torch allocation (resizable: not numpy/mmap/frombuffer memory), not
    shared between processes or pinned, and `tensor` is its only user (exclusively_owned)."""
    if not exclusively_owned(tensor):
        return False
    if not tensor.untyped_storage().resizable() or tensor.is_shared():
        return False
    try:
        return not tensor.is_pinned()
    except RuntimeError:  # no accelerator runtime to ask: nothing can be pinned
        return True
