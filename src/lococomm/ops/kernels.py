"""Fused ops with backend dispatch: C++ for CPU tensors, CUDA for CUDA tensors (quantiser ops),
otherwise the PyTorch reference. All backends return bit-identical results (see reference.py).

Every op takes ``impl=None | "torch" | "cpp" | "cuda"`` to force a backend (tests, benchmarks).
"""

from __future__ import annotations

from typing import Any

import torch

from . import _build
from . import reference as ref

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_IMPLS = ("torch", "cpp", "cuda")


def backend(device: torch.device | str | None = None) -> str:
    """Which backend runs the fused ops for tensors on `device`: "cuda", "cpp" or "torch".

    Without a device: "cuda" if CUDA tensors would use the CUDA kernels, else the CPU backend.
    """
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type == "cuda":
        if torch.cuda.is_available() and _build.get("cuda") is not None:
            return "cuda"
        if dev is not None:
            return "torch"
    if dev is not None and dev.type != "cpu":
        return "torch"
    return "cpp" if _build.get("cpu") is not None else "torch"


def _impl_for(t: torch.Tensor, impl: str | None, cuda_ok: bool = True) -> str:
    if impl is not None:
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
        if impl == "cpp" and (t.device.type != "cpu" or _build.get("cpu") is None):
            raise RuntimeError(
                f"cpp kernels unavailable for {t.device} tensors: {_build.unavailable_reason('cpu')}"
            )
        if impl == "cuda" and (not t.is_cuda or not cuda_ok or _build.get("cuda") is None):
            raise RuntimeError(f"cuda kernels unavailable: {_build.unavailable_reason('cuda')}")
        return impl
    if t.is_cuda:
        return "cuda" if cuda_ok and _build.get("cuda") is not None else "torch"
    if t.device.type == "cpu":
        return "cpp" if _build.get("cpu") is not None else "torch"
    return "torch"


def _check_float(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: unsupported dtype {x.dtype} (expected float32/float16/bfloat16)")


def _check_state(s: torch.Tensor, n: int, device: torch.device, what: str) -> None:
    if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
        raise TypeError(f"{what} must be a float32 tensor")
    if s.numel() != n or not s.is_contiguous() or s.device != device:
        raise ValueError(f"{what} must be contiguous with {n} elements on {device}")


def _check_quant(bits: int, block: int) -> None:
    if bits not in (8, 4, 2):
        raise ValueError(f"bits must be 8, 4 or 2, got {bits}")
    per = 8 // bits
    if not isinstance(block, int) or block <= 0 or block % per:
        raise ValueError(f"block must be a positive multiple of {per} for {bits}-bit codes")


_MODES = {"plain": 0, "ef": 1, "ef21": 2}


def quantize(
    x: torch.Tensor,
    bits: int,
    block: int,
    *,
    stochastic: bool = False,
    seed: int = 0,
    index_offset: int = 0,
    propagate: bool = False,
    state: torch.Tensor | None = None,
    state_out: torch.Tensor | None = None,
    mode: str = "plain",
    base: tuple[torch.Tensor, torch.Tensor] | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Block-absmax quantisation of x (any shape, read flat), optionally fused with EF.

    Returns ``(codes, scales, state_out, bad_blocks)``: codes are int8 (8 bits) or packed uint8
    (4/2 bits, ceil(n*bits/8) bytes), one fp32 scale per block of `block` elements. Modes:
    "plain"; "ef" (p = x + state, state_out = p - D(Q(p))); "ef21" (p = x - state,
    state_out = state + D(Q(p))). state_out may be `state` itself (in place) or None
    (allocated). Stochastic rounding draws element i's number from (seed, index_offset + i).
    Blocks holding inf/nan transmit nothing and are counted in bad_blocks (their scale is NaN
    with propagate=True, else 0 and the caller should raise). ``base=(codes, scales)``, an
    encoding of the same size, bits and block: x + D(base) is quantised instead of x (fused
    ring hop: decode, add, re-encode in one pass).
    """
    _check_float(x, "x")
    _check_quant(bits, block)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {tuple(_MODES)}, got {mode!r}")
    m = _MODES[mode]
    flat = x.reshape(-1)
    n = flat.numel()
    if m:
        if state is None:
            raise ValueError(f"mode {mode!r} needs a state tensor")
        _check_state(state, n, x.device, "state")
        if state_out is None:
            state_out = torch.empty_like(state)
        else:
            _check_state(state_out, n, x.device, "state_out")
    keys = ref.rng_keys(seed) if stochastic else (0, 0)
    if base is not None:
        bcodes, bscales = base
        if bcodes.numel() != ref.packed_bytes(n, bits) or bcodes.element_size() != 1:
            raise ValueError(f"base codes must hold {ref.packed_bytes(n, bits)} bytes")
        if bscales.numel() != ref.num_blocks(n, block) or bscales.dtype != torch.float32:
            raise ValueError(f"base scales must be {ref.num_blocks(n, block)} float32 values")
    which = _impl_for(flat, impl)
    if which == "cuda" and base is not None:
        which = "torch"  # the CUDA kernel has no fused base (ring hops run on the CPU)
    if which == "torch":
        codes, scales, s_new, bad = ref.quantize_blocks(
            flat, bits, block, stochastic=stochastic, keys=keys, index_offset=index_offset,
            propagate=propagate, state=state, mode=m, base=base,
        )  # fmt: skip
        if m:
            state_out.view(-1).copy_(s_new)
        return codes, scales, state_out, bad
    flat = flat.contiguous()
    code_dtype = torch.int8 if bits == 8 else torch.uint8
    codes = torch.empty(ref.packed_bytes(n, bits), dtype=code_dtype, device=x.device)
    scales = torch.empty(ref.num_blocks(n, block), dtype=torch.float32, device=x.device)
    if which == "cpp":
        bc, bs = (base[0].contiguous(), base[1].contiguous()) if base is not None else (None, None)
        bad = _build.get("cpu").quantize(
            flat, state, state_out, codes, scales, bits, block, stochastic,
            keys[0], keys[1], index_offset, propagate, m, bc, bs,
        )  # fmt: skip
        return codes, scales, state_out, int(bad)
    bad = _build.get("cuda").quantize(
        flat, state, state_out, codes, scales, bits, block, stochastic,
        keys[0], keys[1], index_offset, propagate, m,
    )  # fmt: skip
    return codes, scales, state_out, int(bad)


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    n: int,
    bits: int,
    block: int,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    impl: str | None = None,
) -> torch.Tensor:
    """fp32 values code * scale (n of them); into `out` if given, added to it if accumulate."""
    _check_quant(bits, block)
    if codes.numel() != ref.packed_bytes(n, bits) or codes.element_size() != 1:
        raise ValueError(f"codes must hold {ref.packed_bytes(n, bits)} bytes for {n} values")
    if scales.numel() != ref.num_blocks(n, block) or scales.dtype != torch.float32:
        raise ValueError(f"scales must be {ref.num_blocks(n, block)} float32 values")
    if out is None:
        if accumulate:
            raise ValueError("accumulate needs an out tensor")
        out = torch.empty(n, dtype=torch.float32, device=codes.device)
    else:
        _check_state(out, n, codes.device, "out")
    which = _impl_for(codes, impl)
    if which == "torch":
        return ref.dequantize_blocks(codes, scales, n, bits, block, out=out, accumulate=accumulate)
    mod = _build.get("cpu" if which == "cpp" else "cuda")
    mod.dequantize(codes.contiguous(), scales.contiguous(), out, bits, block, accumulate)
    return out


def dequantize_accumulate_(
    acc: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    block: int,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """acc += D(codes, scales), fused (acc: contiguous fp32; one rounding per mul and add)."""
    return dequantize(codes, scales, acc.numel(), bits, block, out=acc, accumulate=True, impl=impl)


WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cast_encode(
    x: torch.Tensor,
    wire: torch.Tensor,
    *,
    state: torch.Tensor | None = None,
    err: torch.Tensor | None = None,
    scaled: torch.Tensor | None = None,
    divisor: float = 1,
    impl: str | None = None,
) -> int:
    """p = x (+ state) cast (nearest even) into `wire` (contiguous fp32/bf16/fp16 with x's
    number of elements); err (fp32) = p - float(wire) if given; scaled (fp32, may be x itself)
    = p / divisor if given. One pass; returns the number of non-finite wire values (inf/nan in
    p, or an overflow of the cast)."""
    _check_float(x, "x")
    flat = x.reshape(-1)
    n = flat.numel()
    if wire.dtype not in WIRE_DTYPES or wire.numel() != n or not wire.is_contiguous():
        raise ValueError(f"wire must be a contiguous float32/bfloat16/float16 tensor of {n}")
    if state is not None:
        _check_state(state, n, x.device, "state")
    if err is not None:
        _check_state(err, n, x.device, "err")
    if scaled is not None:
        _check_state(scaled, n, x.device, "scaled")
        if not flat.is_contiguous():
            raise ValueError("scaled needs a contiguous x")
    which = _impl_for(flat, impl, cuda_ok=False)
    if which == "torch":
        return ref.cast_encode(flat, wire, state=state, err=err, scaled=scaled, divisor=divisor)
    mod = _build.get("cpu")
    return int(mod.cast_encode(flat.contiguous(), state, err, wire, scaled, float(divisor)))


def cast_decode(
    wire: torch.Tensor, out: torch.Tensor, divisor: float = 1, *, impl: str | None = None
) -> torch.Tensor:
    """out (contiguous fp32) = float(wire) / divisor in one pass (no division if 1)."""
    n = out.numel()
    _check_state(out, n, out.device, "out")
    if wire.dtype not in WIRE_DTYPES or wire.numel() != n or not wire.is_contiguous():
        raise ValueError(f"wire must be a contiguous float32/bfloat16/float16 tensor of {n}")
    which = _impl_for(out, impl, cuda_ok=False)
    if which == "torch":
        return ref.cast_decode(wire, out, divisor)
    _build.get("cpu").cast_decode(wire, out, float(divisor))
    return out


def _prep_sparse(x, state, state_out):
    _check_float(x, "x")
    flat = x.reshape(-1)
    n = flat.numel()
    if state is not None:
        _check_state(state, n, x.device, "state")
        if state_out is None:
            state_out = torch.empty_like(state)
        else:
            _check_state(state_out, n, x.device, "state_out")
    elif state_out is not None:
        raise ValueError("state_out given without state")
    return flat, n, state_out


def topk(
    x: torch.Tensor,
    k: int,
    *,
    state: torch.Tensor | None = None,
    state_out: torch.Tensor | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Exact top-k of |p|, p = x (+ state), ties to the lower index, indices ascending (int32).

    With a state (classic EF) state_out = p with the selection zeroed. Returns
    ``(values, indices, state_out, nonfinite)``; with non-finite p nothing is selected.
    """
    flat, n, state_out = _prep_sparse(x, state, state_out)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    which = _impl_for(flat, impl, cuda_ok=False)
    if which == "torch":
        v, i, s_new, bad = ref.topk_select(flat, k, state=state)
        if state is not None:
            state_out.view(-1).copy_(s_new)
        return v, i, state_out, bad
    values = torch.empty(k, dtype=torch.float32)
    indices = torch.empty(k, dtype=torch.int32)
    bad = _build.get("cpu").topk_global(flat.contiguous(), state, state_out, k, values, indices)
    if bad:
        return values[:0], indices[:0], state_out, int(bad)
    return values, indices, state_out, 0


def chunked_counts(n: int, chunk: int, k_chunk: int, k_last: int) -> int:
    """Number of entries a chunked top-k keeps out of n."""
    if n == 0:
        return 0
    nch = (n + chunk - 1) // chunk
    return (nch - 1) * k_chunk + min(k_last, n - (nch - 1) * chunk)


def topk_chunked(
    x: torch.Tensor,
    chunk: int,
    k_chunk: int,
    k_last: int,
    *,
    state: torch.Tensor | None = None,
    state_out: torch.Tensor | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Top-k per chunk of `chunk` elements (k_chunk each; min(k_last, len) for the last).

    Indices are chunk-relative and stored as uint16 bit patterns in an int16 tensor.
    """
    flat, n, state_out = _prep_sparse(x, state, state_out)
    if not 1 <= chunk <= 65536:
        raise ValueError(f"chunk must be in [1, 65536] (16-bit offsets), got {chunk}")
    if not 1 <= k_chunk <= chunk or k_last < 1:
        raise ValueError("need 1 <= k_chunk <= chunk and k_last >= 1")
    which = _impl_for(flat, impl, cuda_ok=False)
    if which == "torch":
        v, i, s_new, bad = ref.topk_chunked_select(flat, chunk, k_chunk, k_last, state=state)
        if state is not None:
            state_out.view(-1).copy_(s_new)
        return v, i, state_out, bad
    total = chunked_counts(n, chunk, k_chunk, k_last)
    values = torch.empty(total, dtype=torch.float32)
    indices = torch.empty(total, dtype=torch.int16)
    bad = _build.get("cpu").topk_chunked(
        flat.contiguous(), state, state_out, chunk, k_chunk, k_last, values, indices
    )
    if bad:
        return values[:0], indices[:0], state_out, int(bad)
    return values, indices, state_out, 0


def _check_chunking(chunk: int, k_chunk: int, k_last: int) -> None:
    if not 1 <= chunk <= 65536:
        raise ValueError(f"chunk must be in [1, 65536] (16-bit offsets), got {chunk}")
    if not 1 <= k_chunk <= chunk or k_last < 1:
        raise ValueError("need 1 <= k_chunk <= chunk and k_last >= 1")


def sparseloco_encode(
    x: torch.Tensor,
    chunk: int,
    k_chunk: int,
    k_last: int,
    *,
    stochastic: bool = False,
    seed: int = 0,
    state: torch.Tensor | None = None,
    state_out: torch.Tensor | None = None,
    bf16_scales: bool = False,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """SparseLoCo encoding: chunked top-k of p = x (+ state), kept values in 2 bits.

    Returns ``(codes, offsets, scales, state_out, nonfinite)``: codes packed 4 per byte
    (bit 0 sign, bit 1 level), offsets uint16 bit patterns in int16 (as topk_chunked), scales
    (lo, hi) per chunk; with a state (classic EF) state_out = p - D(C(p)). Stochastic rounding
    draws the number of kept entry i from (seed, i). bf16_scales rounds the levels to
    bfloat16 before they are used (scales stay fp32 tensors holding bf16 values). See
    reference.sparseloco_encode.
    """
    flat, n, state_out = _prep_sparse(x, state, state_out)
    _check_chunking(chunk, k_chunk, k_last)
    keys = ref.rng_keys(seed) if stochastic else (0, 0)
    which = _impl_for(flat, impl, cuda_ok=False)
    if which == "torch":
        codes, idx, scales, s_new, bad = ref.sparseloco_encode(
            flat, chunk, k_chunk, k_last, stochastic=stochastic, keys=keys, state=state,
            bf16_scales=bf16_scales,
        )
        if state is not None:
            state_out.view(-1).copy_(s_new)
        return codes, idx, scales, state_out, bad
    total = chunked_counts(n, chunk, k_chunk, k_last)
    nch = (n + chunk - 1) // chunk
    codes = torch.empty((total + 3) // 4, dtype=torch.uint8)
    indices = torch.empty(total, dtype=torch.int16)
    scales = torch.empty(2 * nch, dtype=torch.float32)
    bad = _build.get("cpu").sparseloco_encode(
        flat.contiguous(), state, state_out, chunk, k_chunk, k_last, stochastic, keys[0],
        keys[1], codes, indices, scales, bf16_scales,
    )  # fmt: skip
    if bad:
        return codes[:0], indices[:0], scales[:0], state_out, int(bad)
    return codes, indices, scales, state_out, 0


def chunked_sparse_sum(
    out: torch.Tensor,
    payloads: list[tuple[torch.Tensor, ...]],
    chunk: int,
    k_chunk: int,
    k_last: int,
    *,
    accumulate: bool = False,
    divisor: float = 1,
    impl: str | None = None,
) -> torch.Tensor:
    """out = (0, or out if accumulate) + the decoded entries of every payload in order, then
    divided by `divisor` (unless 1). A payload is (values, offsets) of a chunked TopK or
    (codes, offsets, scales) of SparseLoCo; all of one kind. out: contiguous fp32."""
    n = out.numel()
    _check_state(out, n, out.device, "out")
    _check_chunking(chunk, k_chunk, k_last)
    if len({len(p) for p in payloads}) > 1 or any(len(p) not in (2, 3) for p in payloads):
        raise ValueError("payloads must all be (values, offsets) or all (codes, offsets, scales)")
    which = _impl_for(out, impl, cuda_ok=False)
    if which == "torch":
        return ref.chunked_sparse_sum(
            out, payloads, chunk, k_chunk, k_last, accumulate=accumulate, divisor=divisor
        )
    sparseloco = bool(payloads) and len(payloads[0]) == 3
    values = [] if sparseloco else [p[0].contiguous() for p in payloads]
    codes = [p[0].contiguous() for p in payloads] if sparseloco else []
    scales = [p[2].contiguous() for p in payloads] if sparseloco else []
    offsets = [p[1].contiguous() for p in payloads]
    _build.get("cpu").chunked_sparse_sum(
        out, values, codes, scales, offsets, chunk, k_chunk, k_last, accumulate, float(divisor)
    )
    return out


def nesterov_outer_(
    snapshot: torch.Tensor,
    momentum: torch.Tensor,
    delta: torch.Tensor | None = None,
    *,
    lr: float,
    mu: float,
    delta_scale: float = 1.0,
    nesterov: bool = True,
    local: torch.Tensor | None = None,
    average: torch.Tensor | None = None,
    impl: str | None = None,
) -> None:
    """DiLoCo outer step (SGD with Nesterov momentum) fused with the pseudo-gradient, in place.

    The pseudo-gradient is d = delta * delta_scale (e.g. delta_scale = 1/world on a summed
    pseudo-gradient) or, given the averaged parameters instead, d = (snapshot - average) *
    delta_scale, computed in the same pass. Then m = mu*m + d; u = d + mu*m (nesterov) or m;
    snapshot -= lr*u; local (fp32/16/bf16, optional) <- snapshot. snapshot, momentum and
    delta/average are contiguous fp32 tensors of equal size; pass exactly one of delta/average.
    """
    if (delta is None) == (average is None):
        raise ValueError("pass exactly one of delta (pseudo-gradient) and average (parameters)")
    from_average = average is not None
    delta = average if from_average else delta
    n = snapshot.numel()
    _check_state(snapshot, n, snapshot.device, "snapshot")
    _check_state(momentum, n, snapshot.device, "momentum")
    _check_state(delta, n, snapshot.device, "average" if from_average else "delta")
    if local is not None:
        _check_float(local, "local")
        if local.numel() != n or not local.is_contiguous():
            raise ValueError(f"local must be contiguous with {n} elements")
    which = _impl_for(snapshot, impl, cuda_ok=False)
    if which == "torch":
        ref.nesterov_outer_(
            snapshot, momentum, delta, lr=lr, mu=mu, delta_scale=delta_scale,
            nesterov=nesterov, local=local, from_average=from_average,
        )  # fmt: skip
        return
    _build.get("cpu").nesterov_outer(
        snapshot, momentum, delta, local, float(lr), float(mu), float(delta_scale), nesterov,
        from_average,
    )  # fmt: skip


def pseudo_gradient(
    snapshot: torch.Tensor,
    local: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """snapshot - local in fp32 (DiLoCo's pseudo-gradient), into `out` if given."""
    n = snapshot.numel()
    _check_state(snapshot, n, snapshot.device, "snapshot")
    _check_float(local, "local")
    if local.numel() != n:
        raise ValueError(f"local must have {n} elements")
    if out is None:
        out = torch.empty_like(snapshot)
    else:
        _check_state(out, n, snapshot.device, "out")
    which = _impl_for(snapshot, impl, cuda_ok=False)
    if which == "torch":
        return ref.pseudo_gradient(snapshot, local, out)
    _build.get("cpu").pseudo_gradient(snapshot, local.contiguous(), out)
    return out


def lowrank_product(
    p: torch.Tensor, q: torch.Tensor, out: torch.Tensor | None = None, *, impl: str | None = None
) -> torch.Tensor:
    """out (m x n) = P Q^T for fp32 P (m x r) and Q (n x r), as the fixed-order sum of r outer
    products (same bits on every backend and thread count; PowerSGD's decode)."""
    if p.dim() != 2 or q.dim() != 2 or p.shape[1] != q.shape[1] or p.shape[1] < 1:
        raise ValueError(f"need p (m x r) and q (n x r), got {tuple(p.shape)} and {tuple(q.shape)}")
    if p.dtype != torch.float32 or q.dtype != torch.float32:
        raise TypeError("lowrank_product needs float32 factors")
    m, n = p.shape[0], q.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32, device=p.device)
    elif out.dtype != torch.float32 or out.numel() != m * n or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of {m} x {n}")
    which = _impl_for(out, impl, cuda_ok=False)
    if which == "torch":
        return ref.lowrank_product(p, q, out.view(m, n)).view(out.shape)
    _build.get("cpu").lowrank_product(p.contiguous(), q.contiguous(), out)
    return out


def rng_u32(seed: int, offset: int, n: int, *, impl: str | None = None) -> torch.Tensor:
    """n words (int64 holding uint32) of the counter-based RNG from element index `offset`."""
    keys = ref.rng_keys(seed)
    if impl is None:
        impl = "cpp" if _build.get("cpu") is not None else "torch"
    if impl == "torch":
        return ref.rng_u32(keys, offset, n)
    if _build.get("cpu") is None:
        raise RuntimeError(f"cpp kernels unavailable: {_build.unavailable_reason('cpu')}")
    return _build.get("cpu").rng(keys[0], keys[1], offset, n)


def _module_without_build(op: str, impl: str | None, usable: bool = True) -> Any:
    """The C++ module for an op that runs inside a step (checksums, the ring), or None for the
    torch reference.

    impl=None never compiles anything (healing runs inside a step, where a first build would
    stall the group): the C++ kernel if the extension is loaded or built and the inputs suit
    it (`usable`), else the torch reference (itself faster than zlib.crc32 here)."""
    if impl is None:
        return _build.load_if_built("cpu") if usable else None
    if impl not in ("torch", "cpp"):
        raise ValueError(f"{op} impl must be 'torch' or 'cpp', got {impl!r}")
    if impl == "torch":
        return None
    mod = _build.get("cpu")
    if mod is None:
        raise RuntimeError(f"cpp kernels unavailable: {_build.unavailable_reason('cpu')}")
    return mod


def checksum(data: torch.Tensor, *, impl: str | None = None) -> int:
    """64-bit multilinear checksum of a byte buffer (healing's per-chunk transfer check),
    in [0, 2^64); the C++ kernel and the torch reference give the same value. impl=None
    never compiles anything (see _module_without_build)."""
    if data.dtype != torch.uint8:
        raise TypeError(f"checksum expects a uint8 tensor, got {data.dtype}")
    if data.device.type != "cpu":
        data = data.cpu()
    mod = _module_without_build("checksum", impl)
    if mod is None:
        return ref.checksum(data)
    return mod.checksum(data.reshape(-1).contiguous()) & ((1 << 64) - 1)


def checksum_copy(dst: torch.Tensor, src: torch.Tensor, *, impl: str | None = None) -> int:
    """`checksum(src)` while copying `src` into `dst` (same number of bytes, no overlap): one
    pass over the bytes instead of a copy and a hash (healing's staged chunks). Like
    `checksum`, impl=None never compiles anything."""
    for what, t in (("dst", dst), ("src", src)):
        if t.dtype != torch.uint8:
            raise TypeError(f"checksum_copy expects uint8 tensors, {what} is {t.dtype}")
    if dst.numel() != src.numel():
        raise ValueError(f"checksum_copy: dst has {dst.numel()} bytes, src {src.numel()}")
    usable = src.device.type == "cpu" and dst.device.type == "cpu" and dst.is_contiguous()
    mod = _module_without_build("checksum_copy", impl, usable)
    if mod is None:
        return ref.checksum_copy(dst, src)
    return mod.checksum_copy(dst, src.reshape(-1).contiguous()) & ((1 << 64) - 1)


RING_OPS = {"sum": ref.RING_SUM, "mean": ref.RING_SUM, "max": ref.RING_MAX, "min": ref.RING_MIN}


def ring_allreduce(
    left_fd: int,
    right_fd: int,
    abort_fd: int,
    x: torch.Tensor,
    result: torch.Tensor,
    recvs: torch.Tensor,
    sends: torch.Tensor,
    op: str,
    world: int,
    timeout: float,
    header: torch.Tensor,
    left_header: torch.Tensor,
    *,
    impl: str | None = None,
) -> str:
    """Run one exact ring all-reduce schedule (`collectives.exact_ring.native_schedule`) over
    two connected non-blocking TCP sockets: receive the left neighbour's stream into `result`,
    combine where the schedule says, stream x / result to the right neighbour. x is only read.
    Each stream opens with the sender's signature (`header`, int64); the left neighbour's is
    received into `left_header` and compared before any data byte is read.
    Returns "" on success, else why it stopped ("signature mismatch", peer closed, aborted --
    `abort_fd` became readable --, timed out after `timeout` seconds); the sockets are then
    out of step.

    impl=None never compiles anything (it runs inside a step): the C++ executor if the
    extension is loaded or built, else the reference."""
    if op not in RING_OPS:
        raise ValueError(f"ring op must be one of {sorted(RING_OPS)}, got {op!r}")
    for what, t in (("x", x), ("result", result)):
        if t.device.type != "cpu" or not t.is_contiguous() or t.dim() != 1:
            raise ValueError(f"ring_allreduce: {what} must be a flat contiguous CPU tensor")
    if x.dtype != result.dtype or x.numel() != result.numel():
        raise ValueError("ring_allreduce: x and result must have one dtype and length")
    if header.dtype != torch.int64 or left_header.dtype != torch.int64:
        raise ValueError("ring_allreduce: headers must be int64")
    if header.dim() != 1 or not header.numel() or left_header.shape != header.shape:
        raise ValueError("ring_allreduce: headers must be non-empty vectors of one length")
    mod = _module_without_build("ring_allreduce", impl)
    if mod is None:
        return ref.ring_allreduce(
            left_fd, right_fd, abort_fd, x, result, recvs, sends, RING_OPS[op], world, timeout,
            header, left_header,
        )
    return mod.ring_allreduce(
        left_fd, right_fd, abort_fd, x, result, recvs, sends, RING_OPS[op], world, timeout,
        header, left_header,
    )


def heal_stream(
    fds: list[int],
    pieces: list[list[torch.Tensor]],
    chunk_ends: list[list[int]],
    headers: list[torch.Tensor],
    sending: bool,
    abort_fd: int,
    timeout: float,
    *,
    impl: str | None = None,
) -> str:
    """Send (`sending`) or receive healing's state streams over connected non-blocking TCP
    sockets, all streams at once. Stream i carries `headers[i]` (a receiver compares it with
    the one it expects before reading data), then its chunks: chunk c is the bytes of
    pieces[i][chunk_ends[i][c - 1] : chunk_ends[i][c]] (contiguous uint8 CPU tensors, written
    in place on a receiver) followed by their 8-byte checksum (`checksum`), checked on arrival.
    Returns "" on success, else why it stopped, prefixed "stream i: " where one stream failed
    ("... arrived corrupted (checksum mismatch)", "peer closed the connection", "stream header
    mismatch ...") or "aborted" (`abort_fd` became readable) / "timed out" after `timeout`
    seconds; the sockets are then out of step.

    impl=None never compiles anything (it runs inside a step): the C++ executor if the
    extension is loaded or built, else the reference."""
    if not len(fds) == len(pieces) == len(chunk_ends) == len(headers):
        raise ValueError("heal_stream: fds, pieces, chunk_ends and headers need one entry per stream")
    for i, stream in enumerate(pieces):
        for t in stream:
            if t.dtype != torch.uint8 or t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"heal_stream: the pieces of stream {i} must be contiguous uint8 CPU tensors")
        ends = chunk_ends[i]
        if any(b < a for a, b in zip([0] + ends, ends)) or (ends[-1] if ends else 0) != len(stream):
            raise ValueError(f"heal_stream: chunk_ends of stream {i} must be non-decreasing and end at {len(stream)}")
    for i, h in enumerate(headers):
        if h.dtype != torch.uint8 or h.device.type != "cpu" or not h.is_contiguous() or not h.numel():
            raise ValueError(f"heal_stream: header {i} must be a non-empty contiguous uint8 CPU tensor")
    mod = _module_without_build("heal_stream", impl)
    if mod is None:
        return ref.heal_stream(fds, pieces, chunk_ends, headers, sending, abort_fd, timeout)
    return mod.heal_stream(fds, pieces, chunk_ends, headers, sending, abort_fd, timeout)
