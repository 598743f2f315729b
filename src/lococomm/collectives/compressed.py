"""Compressed all-reduce: picks the algorithm for a codec and wraps it in the step's rules.

=====================================  ==============================  ======================
codec                                  algorithm                       module
=====================================  ==============================  ======================
Identity (no EF or classic EF),        cast, gloo all-reduce of the    native.py (an owned
BF16 (no EF)                           wire dtype, cast back           fp32 tensor with
                                                                       Identity: exact.py's
                                                                       in-place path)
summable (FP16, BF16 + EF, FP8,        ring reduce-scatter with        ring_requant.py
Int8/4/2), tensor >= RING_MIN_BYTES,   re-encoding, all-gather of the
no EF or classic EF                    owners' final encodings
RandK                                  shared-seed indices, exact      randk.py
                                       all-reduce of the values
PowerSGD                               all-reduce P, orth, all-reduce  powersgd.py
                                       Q (warm start)
anything else (TopK, SparseLoCo,       all-gather of payloads, summed  sparse_allgather.py
SignSGD), small summable tensors,      in member order
summable codecs with EF21/EControl
=====================================  ==============================  ======================

What every call guarantees (the same rules as the exact collectives):

* bit-identical results on every member (each algorithm decodes the same bytes everywhere);
* the caller's tensor is never handed to gloo and is written only once everything arrived;
  on a peer failure, an abort or a timeout the step is marked failed (`comm.fail`), the call
  returns False and the tensor and the error-feedback state are exactly as before;
* a mismatch of shape, dtype, op or codec across members fails the step with a message
  (a fixed-size header is checked first unless verify=False), instead of killing gloo;
* one member: no traffic, the tensor is left as it is (the exact sum/mean of one member) and
  error feedback is not touched;
* randomness (stochastic rounding, random-k indices, PowerSGD's Q0) comes from
  derive_seed(epoch, step, tensor id, ...) with the tensor id from `name` (or the call's
  position in the step), so every run and every member is reproducible.

Error feedback (feedback.py): pass an ErrorFeedback/EF21/EControl wrapping the same codec;
the state of key `name` is staged by a successful call and must be finished by the caller with
ef.commit() / ef.rollback() after manager.commit().
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from lococomm import ops
from lococomm.collectives import signature
from lococomm.collectives.call import Call
from lococomm.collectives.communicator import Communicator, Handle
from lococomm.collectives.exact import allreduce_owned, check_tensor, exclusively_owned
from lococomm.collectives.feedback import Feedback, kind_of
from lococomm.collectives.hop_codec import HopCodec
from lococomm.collectives.native import NativeAllreduce, native_wire_dtype
from lococomm.collectives.pair_groups import MakeGroup, ring_links
from lococomm.collectives.powersgd import PowerSGDAllreduce
from lococomm.collectives.randk import RandKAllreduce
from lococomm.collectives.ring_plan import plan_ring
from lococomm.collectives.ring_requant import RingRequant
from lococomm.collectives.sparse_allgather import SparseAllgather
from lococomm.collectives.stats import CallStats, Timer
from lococomm.compress.base import Codec, derive_seed
from lococomm.compress.lowrank import PowerSGD
from lococomm.compress.payload import canonical_json
from lococomm.compress.quant import Identity
from lococomm.compress.sparse import RandK

log = logging.getLogger(__name__)

OPS = {"sum": 1, "mean": 2}
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RING_MIN_BYTES = 256 << 10  # smaller summable tensors: one all-gather beats 2 (W - 1) hops
RING_CHUNK_ELEMENTS = 1 << 21  # pipeline chunk of the ring (8 MiB of fp32)


ALGORITHMS = ("auto", "ring", "allgather")
RING_EF_KINDS = ("none", "ef")  # EF kinds whose errors may come from re-encoded partial sums


def algorithm_for(codec: Codec, numel: int, kind: str = "none", requested: str = "auto") -> str:
    """Which algorithm moves `codec` payloads of a tensor of `numel` elements (pure).

    EF21/EControl (`kind`) need every member's error to be a contraction of its own
    contribution; in the ring a member's error is that of re-encoding a partial sum of up to
    W contributions (fine for classic EF, whose errors telescope, but EF21 with Int2 at W = 3
    diverged here), so with them summable codecs use the all-gather.

    `requested`: "auto" picks by size (below RING_MIN_BYTES one all-gather has less latency
    than 2 (W-1) hops); "ring" forces the ring for a summable codec of any size -- W/2 times
    fewer bytes than the all-gather, what rare exchanges over slow links (DiLoCo) want;
    "allgather" forces the all-gather (any codec but RandK/PowerSGD, which have their own).
    """
    if requested not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {requested!r}")
    if isinstance(codec, RandK):
        return "randk"
    if isinstance(codec, PowerSGD):
        return "powersgd"
    summable = getattr(codec, "summable", False)
    if requested == "ring":
        if not summable or kind not in RING_EF_KINDS:
            raise ValueError(
                f"algorithm='ring' needs a summable codec with no or classic error feedback; "
                f"{codec.name} with {kind!r} error feedback cannot re-encode partial sums"
            )
        return "native" if native_wire_dtype(codec, kind) is not None else "ring"
    if requested == "allgather":
        return "allgather"
    if native_wire_dtype(codec, kind) is not None:
        return "native"
    ring_ok = kind in RING_EF_KINDS and numel * 4 >= RING_MIN_BYTES
    if summable and ring_ok:
        return "ring"
    return "allgather"


def tensor_id(name: str, index: int) -> int:
    """Seed component of a tensor: from its name if it has one, else its call position."""
    if name:
        return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return index


def _config_hash(codec: Codec, kind: str, algorithm: str) -> int:
    text = canonical_json({"codec": codec.spec(), "ef": kind, "algorithm": algorithm})
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


def allreduce(
    comm: Communicator,
    tensor: torch.Tensor,
    op: str = "mean",
    codec: Codec | None = None,
    error_feedback: Any = None,
    *,
    name: str = "",
    verify: bool = True,
    step: int = 0,
    index: int = 0,
    make_group: MakeGroup | None = None,
    on_stats: Callable[[CallStats], None] | None = None,
    algorithm: str = "auto",
) -> Handle:
    """Compressed all-reduce of `tensor` in place; the handle's wait() returns success.

    step/index: the manager's committed step and this collective's position in the step
    (seeds, default EF key). make_group builds the ring's link groups (pair_groups.py).
    algorithm: "auto", "ring" or "allgather" (see `algorithm_for`).
    The call runs to completion on the calling thread; the handle is already finished.
    """
    check_tensor(tensor, "allreduce")
    if op not in OPS:
        raise ValueError(f"compressed allreduce supports op 'sum' or 'mean', got {op!r}")
    if codec is None:
        if error_feedback is None:
            raise ValueError("compressed allreduce needs a codec or an error_feedback object")
        codec = error_feedback.codec
    if not isinstance(codec, Codec):
        raise TypeError(f"codec must be a lococomm Codec, got {type(codec).__name__}")
    kind = kind_of(error_feedback)
    if error_feedback is not None and error_feedback.codec != codec:
        raise ValueError(f"error_feedback wraps {error_feedback.codec!r}, not {codec!r}")
    if tensor.dtype not in INPUT_DTYPES:
        raise TypeError(f"compressed allreduce needs float32/float16/bfloat16, got {tensor.dtype}")
    numel = tensor.numel()
    algorithm = algorithm_for(codec, numel, kind, algorithm)
    if comm.world_size == 1 or comm.pg is None:
        return Handle.completed(True)
    description = signature.describe("allreduce", f"{op},{codec.name}", name, tensor)
    if verify:
        values = signature.fields(
            "compressed", OPS[op], tensor, extra=_config_hash(codec, kind, algorithm)
        )
        err = signature.check(comm, values, description)
        if err is not None:
            comm.fail(err)
            return Handle.completed(False)
    if numel == 0:
        return Handle.completed(True)
    stats = CallStats(algorithm=algorithm, codec=codec.name, numel=numel)
    key = name or f"allreduce#{index}"
    feedback = Feedback(error_feedback, key, numel, comm.epoch)
    seed = derive_seed(comm.epoch, step, tensor_id(name, index))
    if _in_place_ok(tensor, codec, feedback, algorithm):
        ok = _identity_in_place(comm, tensor, op, codec, stats, description)
    else:
        ok = _run(comm, tensor, op, codec, feedback, algorithm, seed, stats, description, make_group)
    comm.bytes_sent += stats.bytes_sent
    if on_stats is not None:
        on_stats(stats.finish(ok))
    return Handle.completed(ok)


def _in_place_ok(tensor: torch.Tensor, codec: Codec, feedback: Feedback, algorithm: str) -> bool:
    """Identity without EF on an fp32 tensor nobody else can see: the exact in-place path."""
    return (
        algorithm == "native"
        and type(codec) is Identity
        and feedback.kind == "none"
        and tensor.dtype == torch.float32
        and not tensor.requires_grad
        and exclusively_owned(tensor)
    )


def _identity_in_place(
    comm: Communicator, tensor: torch.Tensor, op: str, codec: Codec, stats: CallStats, description: str
) -> bool:
    """Identity = the exact fp32 all-reduce, run in place on the caller's tensor (exact.py's
    owned path: a pipelined backup restores it on failure). One pass per chunk, just before its
    op, writes the backup, checks for inf/nan (nonfinite="raise") and, for the mean, divides the
    chunk by W in place: the sum of x / W is the mean with no pass after the data arrived
    (equal to sum(x) / W for power-of-two W, barring subnormals; bit-identical on every member
    either way, as gloo delivers the same sum everywhere)."""
    w = comm.world_size
    divisor = w if op == "mean" else 1

    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        with Timer(stats, "encode_seconds"):
            bad = ops.cast_encode(src, dst, scaled=src if divisor != 1 else None, divisor=divisor)
        if bad and codec.nonfinite == "raise":
            src.copy_(dst)  # undo the scaling: the tensor must come back as it was
            raise ValueError(f"{codec.name}.encode: input contains {bad} inf/nan value(s)")

    moved = 2 * (w - 1) * tensor.numel() * 4 // w
    stats.bytes_sent += moved
    stats.bytes_received += moved
    return bool(allreduce_owned(comm, tensor, "sum", description, copy).wait())


def _run(
    comm: Communicator,
    tensor: torch.Tensor,
    op: str,
    codec: Codec,
    feedback: Feedback,
    algorithm: str,
    seed: int,
    stats: CallStats,
    description: str,
    make_group: MakeGroup | None,
) -> bool:
    """Run one algorithm; on success stage EF state and write the result into `tensor`."""
    g = tensor.detach().reshape(-1)
    if not g.is_contiguous():
        g = g.contiguous()
    x, state = feedback.contribution(g)
    err = feedback.error_buffer(comm.pool, g.device)
    # Decode straight into the caller's tensor when nothing reads it afterwards.
    direct = (
        tensor.dtype == torch.float32
        and tensor.is_contiguous()
        and feedback.kind in ("none", "ef")
        and g.data_ptr() == tensor.data_ptr()
    )
    result = g if direct else comm.pool.get(g.numel(), torch.float32, g.device)
    mean = op == "mean"
    call = Call(comm, x, result, mean=mean, seed=seed, stats=stats, description=description,
                state=state, err=err)
    warm_out = None
    if algorithm == "ring":
        links, why = ring_links(comm, make_group)
        if links is None:
            comm.fail(f"{description}: {why}")
            ok = False
        else:
            hop = HopCodec(codec)
            plan = plan_ring(g.numel(), comm.world_size, codec.align, RING_CHUNK_ELEMENTS)
            ok = RingRequant(call, links, hop, plan).run()
    elif algorithm == "native":
        wire_dtype = native_wire_dtype(codec, feedback.kind)
        assert wire_dtype is not None
        ok = NativeAllreduce(call, codec, wire_dtype).run()
    elif algorithm == "randk":
        ok = RandKAllreduce(call, codec).run()
    elif algorithm == "powersgd":
        run = PowerSGDAllreduce(call, codec, tuple(tensor.shape), warm=feedback.warm)
        ok = run.run()
        warm_out = run.warm_out
    else:
        ok = SparseAllgather(call, codec).run()
    if not ok:
        feedback.release(comm.pool)
        if not direct:
            comm.pool.put(result)
        return False
    feedback.stage(g, comm.pool, warm=warm_out)
    value = feedback.aggregate(result)
    if value.data_ptr() != tensor.data_ptr() or not direct:
        with torch.no_grad():
            tensor.copy_(value.view(tensor.shape))
    if not direct:
        comm.pool.put(result)
    return True
