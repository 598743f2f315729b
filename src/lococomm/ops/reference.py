"""Pure-PyTorch references of every fused kernel: the oracle the C++ and CUDA kernels are tested
against, and the fallback when no compiler is available.

Each function performs the same fp32 operations as its kernel in ``csrc/`` in the same order,
one IEEE rounding per operation (the kernels are built with ``-ffp-contract=off``), so results
are bit-identical. Two traps this file avoids on purpose: ``c / tensor`` in torch is computed as
``reciprocal(tensor) * c`` (not a true division), and ``add_(x, alpha=a)`` may use an FMA; both
would differ from the kernels in the last bit.

Randomness is a counter-based hash: element ``i`` of a stream keyed by ``seed`` gets
``mix32(mix32(lo32(i) + k0) ^ mix32(hi32(i) ^ k1))`` with ``(k0, k1) = rng_keys(seed)`` and
``mix32`` the "lowbias32" integer hash. It needs no state, so any chunk of a tensor can be
encoded independently and still draw the same numbers as the whole.
"""

from __future__ import annotations

import ctypes
import math
import os
import select
import socket
import time

import torch

MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Counter-based RNG
# ---------------------------------------------------------------------------------------------
def mix32_int(x: int) -> int:
    """lowbias32 hash of a Python int (taken modulo 2^32)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def rng_keys(seed: int) -> tuple[int, int]:
    """Derives the two 32-bit stream keys from an integer seed (taken modulo 2^64)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    s = seed & 0xFFFFFFFFFFFFFFFF
    k0 = mix32_int((s & MASK32) ^ 0x9E3779B9)
    k1 = mix32_int(((s >> 32) & MASK32) ^ k0 ^ 0x85EBCA6B)
    return k0, k1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) without any int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int64 tensor holding 32-bit words."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rng_u32(keys: tuple[int, int], offset: int, n: int, device=None) -> torch.Tensor:
    """Random 32-bit words (as int64) for element indices offset .. offset + n - 1."""
    k0, k1 = keys
    idx = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    lo = idx & MASK32
    kh = mix32((idx >> 32) ^ k1)
    return mix32(mix32((lo + k0) & MASK32) ^ kh)


def rng_unit(keys: tuple[int, int], offset: int, n: int, device=None) -> torch.Tensor:
    """Uniform fp32 numbers in [0, 1) with 24 random bits each (exact, no rounding)."""
    return (rng_u32(keys, offset, n, device) >> 8).to(torch.float32) * (2.0**-24)


# ---------------------------------------------------------------------------------------------
# Block-absmax quantiser
# ---------------------------------------------------------------------------------------------
def qmax_of_bits(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def packed_bytes(n: int, bits: int) -> int:
    """Bytes of n packed codes of `bits` bits each."""
    per = 8 // bits
    return (n + per - 1) // per


def num_blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs int codes in [-qmax, qmax] (two's complement, little end first) into bytes."""
    if bits == 8:
        return q.to(torch.int8)
    per = 8 // bits
    n = q.numel()
    padded = torch.zeros(packed_bytes(n, bits) * per, dtype=torch.int64, device=q.device)
    padded[:n] = q.to(torch.int64) & ((1 << bits) - 1)
    shifts = torch.arange(per, dtype=torch.int64, device=q.device) * bits
    return (padded.view(-1, per) << shifts).sum(1).to(torch.uint8)


def unpack_codes(codes: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_codes: n signed codes as int64."""
    if bits == 8:
        return codes.view(torch.int8)[:n].to(torch.int64)
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
    v = (codes.to(torch.int64).view(-1, 1) >> shifts) & ((1 << bits) - 1)
    v = torch.where(v >= (1 << (bits - 1)), v - (1 << bits), v)
    return v.reshape(-1)[:n]


def quantize_blocks(
    x: torch.Tensor,
    bits: int,
    block: int,
    *,
    stochastic: bool = False,
    keys: tuple[int, int] = (0, 0),
    index_offset: int = 0,
    propagate: bool = False,
    state: torch.Tensor | None = None,
    mode: int = 0,
    base: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Block-absmax quantisation of flat x, optionally fused with an EF state update.

    mode 0: p = x.                 mode 1 (EF):   p = x + s, s_out = p - D(Q(p)).
    mode 2 (EF21): p = x - s, s_out = s + D(Q(p)).
    base = (codes, scales) of the same bits and block: x is replaced by x + D(base) first
    (a ring hop adding the message that arrived to its own contribution).
    A block holding inf/nan transmits nothing: codes 0, scale NaN (propagate) or 0, and the
    state keeps the untransmitted value (s_out = p for EF, s for EF21).
    Returns (codes, scales, s_out, number of non-finite blocks).
    """
    n = x.numel()
    qmax = qmax_of_bits(bits)
    nb = num_blocks(n, block)
    p = x.reshape(-1).to(torch.float32)
    if base is not None:
        p = p + dequantize_blocks(base[0], base[1], n, bits, block)
    if mode == 1:
        p = p + state.reshape(-1)
    elif mode == 2:
        p = p - state.reshape(-1)
    padded = torch.zeros(nb * block, dtype=torch.float32, device=x.device)
    padded[:n] = p
    blocks = padded.view(nb, block)
    finite = torch.isfinite(blocks).all(1)
    absmax = blocks.abs().amax(1)
    qmax_t = torch.tensor(float(qmax), dtype=torch.float32, device=x.device)
    bad_scale = float("nan") if propagate else 0.0
    scales = torch.where(finite, torch.div(absmax, qmax_t), torch.full_like(absmax, bad_scale))
    safe = torch.where(finite & (absmax > 0), absmax, torch.ones_like(absmax))
    inv = torch.where(finite & (absmax > 0), torch.div(qmax_t, safe), torch.zeros_like(absmax))
    v = blocks * inv[:, None]
    if stochastic:
        u = rng_unit(keys, index_offset, nb * block, x.device).view(nb, block)
        r = torch.floor(v + u)
    else:
        r = torch.round(v)
    r = r.clamp(-qmax, qmax)
    r = torch.where(finite[:, None], r, torch.zeros_like(r))
    q = r.reshape(-1)[:n].to(torch.int64)
    codes = pack_codes(q, bits)
    s_out = None
    if mode != 0:
        rq = q.to(torch.float32)  # +0.0 for a zero code, as in the kernel
        per_elem = torch.repeat_interleave(scales, block)[:n]
        fin_elem = torch.repeat_interleave(finite, block)[:n]
        s = state.reshape(-1)
        if mode == 1:
            s_out = torch.where(fin_elem, p - rq * per_elem, p)
        else:
            s_out = torch.where(fin_elem, s + rq * per_elem, s)
    return codes, scales, s_out, int((~finite).sum())


def dequantize_blocks(
    codes: torch.Tensor,
    scales: torch.Tensor,
    n: int,
    bits: int,
    block: int,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """D(codes) = code * scale of its block, written to (or, with accumulate, added to) out."""
    q = unpack_codes(codes, bits, n).to(torch.float32)
    d = q * torch.repeat_interleave(scales, block)[:n]
    if out is None:
        return d
    flat = out.view(-1)
    if accumulate:
        flat.add_(d)
    else:
        flat.copy_(d)
    return out


# ---------------------------------------------------------------------------------------------
# Casts (wire formats the transport can sum natively)
# ---------------------------------------------------------------------------------------------
def cast_encode(
    x: torch.Tensor,
    wire: torch.Tensor,
    *,
    state: torch.Tensor | None = None,
    err: torch.Tensor | None = None,
    scaled: torch.Tensor | None = None,
    divisor: float = 1,
) -> int:
    """p = x (+ state) rounded (nearest even) into `wire` (fp32/bf16/fp16; a NaN becomes the
    canonical 0x7fc0 / 0x7e00 in bf16 / fp16, fp32 keeps its bits); err = p - float(wire) if
    given (the canonical NaN 0x7fc00000 where p is inf/nan); scaled (fp32, may be x itself) =
    p / divisor (p if divisor == 1) if given. Returns the number of non-finite wire values (inf/nan
    in p, or a finite p that overflowed the wire type)."""
    p = x.reshape(-1).to(torch.float32)
    if state is not None:
        p = p + state.reshape(-1)
    flat = wire.view(-1)
    flat.copy_(p)
    nan = torch.isnan(p)
    if wire.dtype != torch.float32 and bool(nan.any()):  # canonical NaN, whatever the payload
        flat.view(torch.int16)[nan] = 0x7FC0 if wire.dtype == torch.bfloat16 else 0x7E00
    back = flat.to(torch.float32)
    if err is not None:
        e = err.view(-1)
        e.copy_(p - back)
        e.view(torch.int32)[~torch.isfinite(p)] = 0x7FC00000  # err of inf/nan: canonical NaN
    if scaled is not None:  # last: scaled may be x itself
        scaled.view(-1).copy_(p / divisor if divisor != 1 else p)
    return int((~torch.isfinite(back)).sum())


def cast_decode(wire: torch.Tensor, out: torch.Tensor, divisor: float = 1) -> torch.Tensor:
    """out = float(wire) / divisor (true division; none when divisor == 1); NaN of a 16-bit
    wire -> the canonical 0x7fc00000."""
    flat = out.view(-1)
    flat.copy_(wire.reshape(-1))
    if divisor != 1:
        flat.div_(divisor)
    if wire.dtype != torch.float32:  # a 16-bit NaN decodes as the canonical fp32 NaN
        flat.view(torch.int32)[torch.isnan(flat)] = 0x7FC00000
    return out


# ---------------------------------------------------------------------------------------------
# Top-k by magnitude
# ---------------------------------------------------------------------------------------------
def _select_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest entries of a (1-D, >= 0); ties broken towards the lower index."""
    n = a.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=a.device)
    thresh = torch.topk(a, k, sorted=False).values.min()
    gt = a > thresh
    eq = a == thresh
    need = k - int(gt.sum())
    return gt | (eq & (torch.cumsum(eq.to(torch.int64), 0) <= need))


def topk_select(
    x: torch.Tensor, k: int, *, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Exact top-k of |p| (p = x (+ state)), indices ascending, int32.

    Returns (values, indices, s_out, nonfinite) with s_out = p with the selection zeroed when
    a state is given; with non-finite p nothing is selected (empty values).
    """
    p = x.reshape(-1).to(torch.float32)
    if state is not None:
        p = p + state.reshape(-1)
    bad = int((~torch.isfinite(p)).sum())
    s_out = p.clone() if state is not None else None
    if bad:
        return p[:0], torch.zeros(0, dtype=torch.int32), s_out, bad
    k = min(k, p.numel())
    mask = _select_mask(p.abs(), k) if k > 0 else torch.zeros_like(p, dtype=torch.bool)
    idx = mask.nonzero().reshape(-1)
    if s_out is not None:
        s_out[idx] = 0.0
    return p[idx], idx.to(torch.int32), s_out, 0


def topk_chunked_select(
    x: torch.Tensor,
    chunk: int,
    k_chunk: int,
    k_last: int,
    *,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Per-chunk exact top-k: k_chunk per full chunk, min(k_last, len) for the last one.

    Indices are chunk-relative offsets stored as the bit pattern of uint16 in an int16 tensor.
    """
    p = x.reshape(-1).to(torch.float32)
    if state is not None:
        p = p + state.reshape(-1)
    n = p.numel()
    bad = int((~torch.isfinite(p)).sum())
    s_out = p.clone() if state is not None else None
    if bad or n == 0:
        return p[:0], torch.zeros(0, dtype=torch.int16), s_out, bad
    nch = (n + chunk - 1) // chunk
    masks = []
    full = nch - 1
    if full:
        a = p[: full * chunk].abs().view(full, chunk)
        k = min(k_chunk, chunk)
        if k >= chunk:
            masks.append(torch.ones(full * chunk, dtype=torch.bool))
        else:
            thresh = torch.topk(a, k, dim=1, sorted=False).values.min(1, keepdim=True).values
            gt = a > thresh
            eq = a == thresh
            need = k - gt.sum(1, keepdim=True)
            masks.append((gt | (eq & (torch.cumsum(eq.to(torch.int64), 1) <= need))).reshape(-1))
    last = p[full * chunk :]
    masks.append(_select_mask(last.abs(), min(k_last, last.numel())))
    mask = torch.cat(masks)
    idx = mask.nonzero().reshape(-1)
    if s_out is not None:
        s_out[idx] = 0.0
    local = (idx % chunk).to(torch.int32)
    local16 = torch.where(local >= 32768, local - 65536, local).to(torch.int16)
    return p[idx], local16, s_out, 0


def chunk_ids(n: int, chunk: int, k_chunk: int, k_last: int, device=None) -> torch.Tensor:
    """Chunk number of every entry a chunked top-k keeps (int64)."""
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    nch = (n + chunk - 1) // chunk
    counts = torch.full((nch,), k_chunk, dtype=torch.int64)
    counts[-1] = min(k_last, n - (nch - 1) * chunk)
    return torch.repeat_interleave(torch.arange(nch, dtype=torch.int64), counts).to(device)


def sparseloco_encode(
    x: torch.Tensor,
    chunk: int,
    k_chunk: int,
    k_last: int,
    *,
    stochastic: bool = False,
    keys: tuple[int, int] = (0, 0),
    state: torch.Tensor | None = None,
    bf16_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Chunked top-k of p = x (+ state), each kept value in 2 bits.

    Per chunk lo = min |v| and hi = max |v| of the kept entries; per entry bit 0 = (v < 0),
    bit 1 = level hi: t = (|v| - lo) / (hi - lo) (0 if hi == lo), nearest t >= 0.5 or
    stochastic u < t with u from the stream of `keys` at the entry's position in the payload.
    Codes packed 4 per byte, little end first. Returns (codes uint8, offsets int16, scales
    fp32 [lo0, hi0, lo1, ...], s_out = p - D(C(p)) with a state, nonfinite).
    """
    values, idx16, s_out, bad = topk_chunked_select(x, chunk, k_chunk, k_last, state=state)
    n = x.numel()
    nch = (n + chunk - 1) // chunk if n else 0
    if bad or n == 0:
        empty = torch.zeros(0, dtype=torch.uint8)
        return empty, idx16, torch.zeros(2 * nch if not bad else 0), s_out, bad
    ids = chunk_ids(n, chunk, k_chunk, k_last)
    mag = values.abs()
    lo = torch.zeros(nch).scatter_reduce(0, ids, mag, "amin", include_self=False)
    hi = torch.zeros(nch).scatter_reduce(0, ids, mag, "amax", include_self=False)
    if bf16_scales:  # the levels the wire carries; the residual is exact against them
        lo = lo.to(torch.bfloat16).to(torch.float32)
        hi = hi.to(torch.bfloat16).to(torch.float32)
    span = (hi - lo)[ids]
    t = torch.where(span > 0, (mag - lo[ids]) / torch.where(span > 0, span, 1.0), 0.0)
    if stochastic:
        u = (rng_u32(keys, 0, values.numel()) >> 8).to(torch.float32) * 2.0**-24
        level = u < t
    else:
        level = t >= 0.5
    neg = values < 0
    code = neg.to(torch.int64) | (level.to(torch.int64) << 1)
    pad = torch.zeros(-code.numel() % 4, dtype=torch.int64)
    quads = torch.cat([code, pad]).view(-1, 4) << torch.tensor([0, 2, 4, 6])
    codes = quads.sum(1).to(torch.uint8)
    if s_out is not None:
        dec = torch.where(level, hi[ids], lo[ids])
        dec = torch.where(neg, -dec, dec)
        gidx = ids * chunk + (idx16.to(torch.int64) & 0xFFFF)
        s_out[gidx] = values - dec
    return codes, idx16, torch.stack([lo, hi], 1).reshape(-1), s_out, 0


def sparseloco_values(
    codes: torch.Tensor, scales: torch.Tensor, n: int, chunk: int, k_chunk: int, k_last: int
) -> torch.Tensor:
    """The fp32 values a SparseLoCo payload decodes to, in payload order."""
    ids = chunk_ids(n, chunk, k_chunk, k_last, codes.device)
    k = ids.numel()
    shifts = torch.tensor([0, 2, 4, 6], device=codes.device)
    c = (codes.to(torch.int64).view(-1, 1) >> shifts).reshape(-1)[:k] & 3
    lo, hi = scales.view(-1, 2)[:, 0][ids], scales.view(-1, 2)[:, 1][ids]
    mag = torch.where((c & 2) > 0, hi, lo)
    return torch.where((c & 1) > 0, -mag, mag)


def chunked_sparse_sum(
    out: torch.Tensor,
    payloads: list[tuple[torch.Tensor, ...]],
    chunk: int,
    k_chunk: int,
    k_last: int,
    *,
    accumulate: bool = False,
    divisor: float = 1,
) -> torch.Tensor:
    """out = (0 or out) + every payload's decoded entries in order, then / divisor (if != 1).

    A payload is (values, offsets) for TopK or (codes, offsets, scales) for SparseLoCo.
    """
    flat = out.view(-1)
    n = flat.numel()
    if not accumulate:
        flat.zero_()
    ids = chunk_ids(n, chunk, k_chunk, k_last, flat.device)
    for pl in payloads:
        if len(pl) == 2:
            values, offsets = pl
        else:
            codes, offsets, scales = pl
            values = sparseloco_values(codes, scales, n, chunk, k_chunk, k_last)
        flat.index_add_(0, ids * chunk + (offsets.to(torch.int64) & 0xFFFF), values)
    if divisor != 1:
        flat.div_(divisor)
    return out


# ---------------------------------------------------------------------------------------------
# DiLoCo outer step
# ---------------------------------------------------------------------------------------------
def nesterov_outer_(
    snapshot: torch.Tensor,
    momentum: torch.Tensor,
    delta: torch.Tensor,
    *,
    lr: float,
    mu: float,
    delta_scale: float = 1.0,
    nesterov: bool = True,
    local: torch.Tensor | None = None,
    from_average: bool = False,
) -> None:
    """d = delta * delta_scale (or (snapshot - delta) * delta_scale with from_average, delta
    holding averaged parameters); m = mu * m + d; u = d + mu * m (Nesterov) or m;
    snapshot -= lr * u; local <- snapshot. All fp32, in place."""
    d = (snapshot - delta) * delta_scale if from_average else delta * delta_scale
    momentum.mul_(mu).add_(d)
    u = d + momentum * mu if nesterov else momentum
    snapshot.sub_(u * lr)
    if local is not None:
        local.view(-1).copy_(snapshot.view(-1))


def pseudo_gradient(
    snapshot: torch.Tensor, local: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """snapshot - local in fp32 (DiLoCo's outer gradient)."""
    res = snapshot.view(-1) - local.reshape(-1).to(torch.float32)
    if out is None:
        return res
    out.view(-1).copy_(res)
    return out


def lowrank_product(p: torch.Tensor, q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """P Q^T (m x r, n x r -> m x n) as a fixed-order sum of outer products: out = p0 q0^T,
    then out = out + pk qk^T for k = 1 .. r-1 (a rounded product, then a rounded add)."""
    if out is None:
        out = torch.empty(p.shape[0], q.shape[0], dtype=torch.float32, device=p.device)
    torch.mul(p[:, 0:1], q[:, 0], out=out)
    for k in range(1, p.shape[1]):
        out += p[:, k : k + 1] * q[:, k]
    return out


def k_of(ratio: float, n: int) -> int:
    """Entries kept by a ratio-r sparsifier out of n: round half up, at least 1 (n > 0)."""
    if n <= 0:
        return 0
    return min(n, max(1, math.floor(ratio * n + 0.5)))


_CHECKSUM_MUL = 0x9E3779B97F4A7C15
_CHECKSUM_XOR = 0xD6E8FEB86659FD93
_CHECKSUM_LENGTH = 0xC2B2AE3D27D4EB4F
_MASK64 = (1 << 64) - 1
_checksum_keys = torch.empty(0, dtype=torch.int64)


def _signed64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def _keys(count: int) -> torch.Tensor:
    """key_i = ((i + 1) * MUL ^ XOR) | 1 mod 2^64 for i < count (int64 bit patterns, cached:
    every chunk of a heal uses a prefix of the same keys)."""
    global _checksum_keys
    if _checksum_keys.numel() < count:
        index = torch.arange(1, count + 1, dtype=torch.int64)
        # int64 multiplication wraps mod 2^64 (two's complement), like the C++ uint64 one
        keys = index * _signed64(_CHECKSUM_MUL)
        keys ^= _signed64(_CHECKSUM_XOR)
        keys |= 1
        _checksum_keys = keys
    return _checksum_keys[:count]


def checksum(data: torch.Tensor) -> int:
    """Multilinear 64-bit checksum of a contiguous uint8 buffer (see csrc/kernels.h):
    h = sum_i w_i * key_i + nbytes * LENGTH mod 2^64 over little-endian 64-bit words w_i, the
    last one zero-padded. Returns an int in [0, 2^64)."""
    flat = data.reshape(-1)
    n = flat.numel()
    words = n // 8
    h = 0
    if words:
        body = flat[: 8 * words]
        if body.storage_offset() % 8:
            body = body.clone()  # int64 views need 8-byte aligned storage offsets
        w = body.view(torch.int64)
        h = int((w * _keys(words)).sum())  # int64 products and sum wrap mod 2^64
    tail = n - 8 * words
    if tail:
        last = int.from_bytes(bytes(flat[8 * words :].tolist()), "little")
        h += last * (int(_keys(words + 1)[words]) & _MASK64)
    return (h + n * _CHECKSUM_LENGTH) & _MASK64


def checksum_copy(dst: torch.Tensor, src: torch.Tensor) -> int:
    """Reference of the fused kernel: copy src into dst, return checksum(src) (hashed on the
    CPU, so staging buffers on a GPU work too)."""
    dst.copy_(src)
    return checksum(src if src.device.type == "cpu" else src.cpu())


# ---------------------------------------------------------------------------------------------
# Exact ring all-reduce schedule over two TCP sockets (csrc/ring.cpp)
# ---------------------------------------------------------------------------------------------
RING_SUM, RING_MAX, RING_MIN = 0, 1, 2
RING_FORWARD, RING_COMBINE, RING_COMBINE_DIVIDE = 0, 1, 2
RING_FROM_X = 0


def ring_combine(acc: torch.Tensor, mine: torch.Tensor, op: int) -> None:
    """acc op= mine (sum / max / min), in acc's dtype: the ring's reduction at every hop."""
    if op == RING_SUM:
        acc.add_(mine)
    elif op == RING_MAX:
        torch.maximum(acc, mine, out=acc)
    else:
        torch.minimum(acc, mine, out=acc)


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory, valid while `t` lives. Not
    `t.numpy()`: exporting to numpy marks the storage non-resizable for good, which would
    change the caller's tensor (and stop the ring from handing it a new storage)."""
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


class _RingStop(Exception):
    """Ends a reference ring call with `reason` (the executor's return value)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _wait_sockets(abort_fd: int, readers: list[int], writers: list[int], seconds: float) -> bool:
    """One wait of the reference executors (as csrc/poll_wait.h): poll(2) up to `seconds` (at
    most 0.1) until a socket may be ready; True if the abort pipe became readable."""
    poller = select.poll()
    poller.register(abort_fd, select.POLLIN)
    for fd in readers:
        poller.register(fd, select.POLLIN)
    for fd in writers:
        poller.register(fd, select.POLLOUT)
    return any(fd == abort_fd for fd, _ in poller.poll(min(seconds, 0.1) * 1e3))


def _recv_some(fd: int, view: memoryview, peer: str = "left neighbour") -> int:
    """Bytes read into `view` (0: nothing there yet); _RingStop on EOF or an error (texts as
    the kernels': the ring names its left neighbour, a heal stream no one)."""
    try:
        got = os.readv(fd, [view])
    except BlockingIOError:
        return 0
    except OSError as e:
        raise _RingStop(f"receive{f' from {peer}' if peer else ''} failed: {e.strerror}") from e
    if got == 0:
        raise _RingStop(f"peer closed the connection{f' ({peer})' if peer else ''}")
    return got


def _send_failed(
    left_fd: int, mine: memoryview, theirs: memoryview, header_in: int, checked: bool, e: OSError
) -> str:
    """As csrc/ring.cpp's send_failed: a left neighbour's differing signature already here
    is the news, rather than the broken connection the mismatch caused downstream."""
    while not checked and header_in < len(theirs):
        try:
            got = os.readv(left_fd, [theirs[header_in:]])
        except OSError:
            break
        if got == 0:
            break
        header_in += got
    if not checked and header_in == len(theirs) and bytes(mine) != bytes(theirs):
        return "signature mismatch"
    return f"send to right neighbour failed: {e.strerror}"


def ring_allreduce(
    left_fd: int,
    right_fd: int,
    abort_fd: int,
    x: torch.Tensor,
    result: torch.Tensor,
    recvs: torch.Tensor,
    sends: torch.Tensor,
    op: int,
    world: int,
    timeout: float,
    header: torch.Tensor,
    left_header: torch.Tensor,
) -> str:
    """Reference of the ring executor: the same schedule, streams and combines as
    csrc/ring.cpp with os.readv / send(MSG_NOSIGNAL) on the non-blocking sockets and poll(2)
    between them. Each stream opens with the sender's signature `header`; the left
    neighbour's lands in `left_header` and must equal ours ("signature mismatch" otherwise)
    before any data is read. Returns "" on success, else why it stopped. Members running the
    kernel and members running this reference can share one ring (the bytes on the wire are
    the same)."""
    size = x.element_size()
    x_bytes, r_bytes = _raw_bytes(x), _raw_bytes(result)
    mine, theirs = _raw_bytes(header), _raw_bytes(left_header)
    header_in = header_out = 0
    checked = False
    rows_in, rows_out = recvs.tolist(), sends.tolist()
    recv_i = recv_off = send_i = send_off = 0
    deadline = time.monotonic() + timeout
    # Sends go through a socket object for MSG_NOSIGNAL: a closed neighbour must be an error,
    # not SIGPIPE (whatever disposition the application gave that signal).
    right = socket.socket(fileno=os.dup(right_fd))

    def send_ready() -> bool:
        return send_i < len(rows_out) and rows_out[send_i][3] < recv_i

    def send_some(view: memoryview) -> int:
        """Bytes sent from `view` (0: the socket is full); _RingStop on an error."""
        try:
            return right.send(view, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return 0
        except OSError as e:
            raise _RingStop(_send_failed(left_fd, mine, theirs, header_in, checked, e)) from e

    try:
        while recv_i < len(rows_in) or send_i < len(rows_out) or not checked or header_out < len(mine):
            progressed = False
            # our signature first (also before giving up on a mismatch: the right neighbour
            # names it)
            while header_out < len(mine) and (put := send_some(mine[header_out:])):
                header_out += put
                progressed = True
            while header_in < len(theirs) and (got := _recv_some(left_fd, theirs[header_in:])):
                header_in += got
                progressed = True
            if header_in == len(theirs) and not checked:
                if bytes(mine) != bytes(theirs):
                    if header_out == len(mine):
                        return "signature mismatch"
                else:
                    checked = True
            while checked and recv_i < len(rows_in):
                a, b, action = rows_in[recv_i]
                got = _recv_some(left_fd, r_bytes[a * size + recv_off : b * size])
                if not got:
                    break
                recv_off += got
                progressed = True
                if recv_off == (b - a) * size:
                    if action != RING_FORWARD:
                        acc = result[a:b]
                        ring_combine(acc, x[a:b], op)
                        if action == RING_COMBINE_DIVIDE:
                            acc.div_(world)
                    recv_i, recv_off = recv_i + 1, 0
                    if send_ready():
                        break
            while header_out == len(mine) and send_ready():
                a, b, source, _ = rows_out[send_i]
                data = x_bytes if source == RING_FROM_X else r_bytes
                put = send_some(data[a * size + send_off : b * size])
                if not put:
                    break
                send_off += put
                progressed = True
                if send_off == (b - a) * size:
                    send_i, send_off = send_i + 1, 0
            if progressed:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timed out waiting for peers"
            reading = header_in < len(theirs) or (checked and recv_i < len(rows_in))
            writing = header_out < len(mine) or send_ready()
            if _wait_sockets(abort_fd, [left_fd] if reading else [], [right.fileno()] if writing else [], remaining):
                return "aborted"
        return ""
    except _RingStop as stop:
        return stop.reason
    finally:
        right.close()


# ---------------------------------------------------------------------------------------------
# Healing's state transfer over TCP streams (csrc/heal_stream.cpp)
# ---------------------------------------------------------------------------------------------
_MAX_IOV = 512  # pieces per sendmsg


class _HealStream:
    """One stream's position: header, then per chunk its pieces' bytes and an 8-byte
    little-endian checksum of them."""

    def __init__(self, fd: int, pieces: list[torch.Tensor], ends: list[int], header: torch.Tensor) -> None:
        self.fd = fd
        self.pieces = pieces
        self.views = [_raw_bytes(p) for p in pieces]
        self.ends = ends
        self.header = _raw_bytes(header)
        self.header_in = bytearray(len(self.header))
        self.header_done = 0
        self.chunk = self.piece = self.offset = 0
        self.trailer = bytearray(8)
        self.trailer_done = 0
        self.in_trailer = False

    def done(self) -> bool:
        return self.header_done == len(self.header) and self.chunk == len(self.ends)

    def chunk_checksum(self) -> int:
        first = self.ends[self.chunk - 1] if self.chunk else 0
        pieces = self.pieces[first : self.ends[self.chunk]]
        return checksum(torch.cat(pieces)) if pieces else checksum(torch.empty(0, dtype=torch.uint8))

    def data_views(self) -> list[memoryview]:
        """The current chunk's remaining bytes, piece by piece."""
        views = []
        for p in range(self.piece, self.ends[self.chunk]):
            view = self.views[p][self.offset if p == self.piece else 0 :]
            if len(view):
                views.append(view)
        return views

    def advance(self, moved: int) -> None:
        while moved:
            take = min(moved, len(self.views[self.piece]) - self.offset)
            self.offset += take
            moved -= take
            if self.offset == len(self.views[self.piece]):
                self.piece, self.offset = self.piece + 1, 0
        while self.piece < self.ends[self.chunk] and not len(self.views[self.piece]):
            self.piece += 1

    def next_chunk(self) -> None:
        self.chunk += 1
        self.trailer_done = 0
        self.in_trailer = False
        while self.chunk < len(self.ends) and self.piece < self.ends[self.chunk] and not len(self.views[self.piece]):
            self.piece += 1


def _pump_send(s: _HealStream, sock: socket.socket) -> bool:
    """Sends what the socket takes; True if anything moved. _RingStop on an error."""
    moved = False
    while not s.done():
        if s.header_done < len(s.header):
            views = [s.header[s.header_done :]]
        elif s.in_trailer:
            views = [memoryview(s.trailer)[s.trailer_done :]]
        else:
            views = s.data_views()
            if not views:  # the chunk's data is out: its checksum follows
                s.trailer[:] = s.chunk_checksum().to_bytes(8, "little")
                s.in_trailer = True
                continue
        try:
            put = sock.sendmsg(views[:_MAX_IOV], [], socket.MSG_NOSIGNAL)  # IOV_MAX is 1024
        except BlockingIOError:
            return moved
        except OSError as e:
            raise _RingStop(f"send failed: {e.strerror}") from e
        moved = True
        if s.header_done < len(s.header):
            s.header_done += put
        elif s.in_trailer:
            s.trailer_done += put
            if s.trailer_done == 8:
                s.next_chunk()
        else:
            s.advance(put)
    return moved


def _pump_recv(s: _HealStream) -> bool:
    """Receives what has arrived; True if anything moved. _RingStop on an error, a header
    mismatch or a chunk whose checksum differs."""
    moved = False
    while not s.done():
        if s.header_done < len(s.header):
            got = _recv_some(s.fd, memoryview(s.header_in)[s.header_done :], peer="")
            if not got:
                return moved
            moved = True
            s.header_done += got
            if s.header_done == len(s.header) and bytes(s.header_in) != bytes(s.header):
                raise _RingStop("stream header mismatch (the source's state layout or plan differs)")
            continue
        if not s.in_trailer:
            views = s.data_views()
            if views:
                got = _recv_some(s.fd, views[0], peer="")
                if not got:
                    return moved
                moved = True
                s.advance(got)
                continue
            s.in_trailer = True
        got = _recv_some(s.fd, memoryview(s.trailer)[s.trailer_done :], peer="")
        if not got:
            return moved
        moved = True
        s.trailer_done += got
        if s.trailer_done == 8:
            if int.from_bytes(s.trailer, "little") != s.chunk_checksum():
                raise _RingStop(f"chunk {s.chunk} arrived corrupted (checksum mismatch)")
            s.next_chunk()
    return moved


def heal_stream(
    fds: list[int],
    pieces: list[list[torch.Tensor]],
    chunk_ends: list[list[int]],
    headers: list[torch.Tensor],
    sending: bool,
    abort_fd: int,
    timeout: float,
) -> str:
    """Reference of the heal stream executor (csrc/heal_stream.cpp): the same bytes on the
    wire (header; per chunk its pieces and their 8-byte checksum), each chunk hashed whole once
    it is complete rather than piece by piece as it moves. Returns "" or why it stopped, with
    the same texts as the kernel."""
    streams = [_HealStream(fd, p, e, h) for fd, p, e, h in zip(fds, pieces, chunk_ends, headers)]
    # sends go through socket objects for MSG_NOSIGNAL (a closed peer is an error, not SIGPIPE)
    socks = [socket.socket(fileno=os.dup(fd)) for fd in fds] if sending else []
    deadline = time.monotonic() + timeout
    try:
        while True:
            progressed = False
            for i, s in enumerate(streams):
                if s.done():
                    continue
                try:
                    progressed |= _pump_send(s, socks[i]) if sending else _pump_recv(s)
                except _RingStop as stop:
                    return f"stream {i}: {stop.reason}"
            if all(s.done() for s in streams):
                return ""
            if progressed:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timed out"
            waiting = [s.fd for s in streams if not s.done()]
            if _wait_sockets(abort_fd, [] if sending else waiting, waiting if sending else [], remaining):
                return "aborted"
    finally:
        for sock in socks:
            sock.close()
