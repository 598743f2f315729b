"""Every fused kernel against its pure-PyTorch reference, bit for bit, on random shapes
(odd sizes, sizes not divisible by the block, empty), all modes and input dtypes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lococomm import ops
from lococomm.ops import _build
from lococomm.ops import reference as ref

pytestmark = pytest.mark.timeout(240)  # the first test may compile the extension (~30 s)

HAVE_CPP = ops.backend("cpu") == "cpp"
needs_cpp = pytest.mark.skipif(
    not HAVE_CPP, reason=f"no C++ kernels: {_build.unavailable_reason('cpu')}"
)
SRC = str(Path(__file__).resolve().parents[1] / "src")


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so -0.0 != +0.0 and NaN == NaN in comparisons."""
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    return t


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (
        f"{what}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    )
    diff = (bits_of(a) != bits_of(b)).sum().item()
    assert diff == 0, f"{what}: {diff} of {a.numel()} elements differ"


# Random sizes: 0, tiny, odd, not multiples of any block, a few above the parallel grain.
_gen = torch.Generator().manual_seed(1234)
SIZES = [0, 1, 3, 17, 255, 257, 1000, 4099] + [
    int(v) for v in torch.randint(5000, 300_000, (4,), generator=_gen)
]


def test_rng_reference_matches_python_ints():
    keys = ref.rng_keys(987654321987)
    off = 2**32 - 5  # crosses the 2^32 boundary of the index
    words = ref.rng_u32(keys, off, 10).tolist()
    for j, w in enumerate(words):
        i = off + j
        kh = ref.mix32_int((i >> 32) ^ keys[1])
        expect = ref.mix32_int(ref.mix32_int(((i & ref.MASK32) + keys[0]) & ref.MASK32) ^ kh)
        assert w == expect
    u = ref.rng_unit(keys, 0, 100_000)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005


@needs_cpp
def test_rng_cpp_matches_reference_across_2_to_32_boundary():
    for seed in (0, 1, 2**63 + 12345, -7):
        for off in (0, 12345, 2**32 - 100):
            assert torch.equal(
                ops.rng_u32(seed, off, 300, impl="cpp"), ops.rng_u32(seed, off, 300, impl="torch")
            )


QUANT_CASES = [(8, 256), (4, 128), (2, 64), (8, 20), (4, 6), (2, 4), (8, 1)]


@needs_cpp
@pytest.mark.parametrize("bits,block", QUANT_CASES)
@pytest.mark.parametrize("mode", ["plain", "ef", "ef21"])
@pytest.mark.parametrize("stochastic", [False, True])
def test_quantize_cpp_bit_equals_reference(bits, block, mode, stochastic):
    g = torch.Generator().manual_seed(bits * 1000 + block)
    for n in SIZES:
        x = torch.randn(n, generator=g) * 3
        x[::11] = 0.0  # zero blocks and exact zeros
        state = torch.randn(n, generator=g) * 0.1 if mode != "plain" else None
        kw = dict(stochastic=stochastic, seed=n + 7, index_offset=3 * block, mode=mode, state=state)
        a = ops.quantize(x, bits, block, impl="torch", **kw)
        b = ops.quantize(x, bits, block, impl="cpp", **kw)
        assert_bit_equal(a[0], b[0], f"codes n={n}")
        assert_bit_equal(a[1], b[1], f"scales n={n}")
        if mode != "plain":
            assert_bit_equal(a[2], b[2], f"state n={n}")
        assert a[3] == b[3] == 0


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_half_inputs_bit_equal(dtype):
    x = (torch.randn(70_001) * 5).to(dtype)
    s = torch.randn(70_001) * 0.01
    for mode in ("plain", "ef", "ef21"):
        st = s if mode != "plain" else None
        a = ops.quantize(x, 4, 128, mode=mode, state=st, stochastic=True, seed=3, impl="torch")
        b = ops.quantize(x, 4, 128, mode=mode, state=st, stochastic=True, seed=3, impl="cpp")
        for i in range(2 if mode == "plain" else 3):
            assert_bit_equal(a[i], b[i], f"{dtype} {mode} part {i}")


@needs_cpp
@pytest.mark.parametrize("bits,block", QUANT_CASES)
def test_dequantize_and_accumulate_bit_equal(bits, block):
    for n in [*SIZES, (1 << 20) + 13]:
        x = torch.randn(n)
        codes, scales, _, _ = ops.quantize(x, bits, block)
        d_ref = ops.dequantize(codes, scales, n, bits, block, impl="torch")
        assert_bit_equal(d_ref, ops.dequantize(codes, scales, n, bits, block, impl="cpp"), "dq")
        acc0 = torch.randn(n)
        a, b = acc0.clone(), acc0.clone()
        ops.dequantize_accumulate_(a, codes, scales, bits, block, impl="torch")
        ops.dequantize_accumulate_(b, codes, scales, bits, block, impl="cpp")
        assert_bit_equal(a, b, f"acc n={n}")


@needs_cpp
@pytest.mark.parametrize("bits,block", QUANT_CASES)
@pytest.mark.parametrize("mode", ["plain", "ef"])
def test_quantize_with_base_message_bit_equal(bits, block, mode):
    """The fused ring hop: quantise x + D(base) (+ EF state) in one pass, against the reference
    and against the two-step dequantize-accumulate then quantize."""
    g = torch.Generator().manual_seed(bits * 1000 + block)
    for n in [n for n in SIZES if n] + [(1 << 20) + 64]:
        base_codes, base_scales, _, _ = ops.quantize(torch.randn(n, generator=g), bits, block)
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(n, generator=g).to(dtype)
            state = torch.randn(n, generator=g) * 0.1 if mode == "ef" else None
            kw = dict(mode=mode, state=state, stochastic=True, seed=9, index_offset=3 * block)
            a = ops.quantize(x, bits, block, base=(base_codes, base_scales), impl="torch", **kw)
            b = ops.quantize(x, bits, block, base=(base_codes, base_scales), impl="cpp", **kw)
            acc = x.to(torch.float32, copy=True)
            ops.dequantize_accumulate_(acc, base_codes, base_scales, bits, block)
            c = ops.quantize(acc, bits, block, impl="cpp", **kw)
            for i in range(2 if mode == "plain" else 3):
                assert_bit_equal(a[i], b[i], f"part {i} n={n} {dtype}")
                assert_bit_equal(b[i], c[i], f"two-step part {i} n={n} {dtype}")


@needs_cpp
def test_quantize_results_do_not_depend_on_thread_count():
    x = torch.randn(1_000_003)
    e = torch.randn(1_000_003) * 0.1
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(ops.quantize(x, 8, 256, mode="ef", state=e, stochastic=True, seed=5))
            outs.append(ops.topk(x, 10_000, state=e))
    finally:
        torch.set_num_threads(old)
    for i in range(3):
        assert_bit_equal(outs[0][i], outs[2][i], f"quantize part {i}")
        assert_bit_equal(outs[1][i], outs[3][i], f"topk part {i}")


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_chunk_encoding_equals_slice_of_whole(impl):
    if impl == "cpp" and not HAVE_CPP:
        pytest.skip("no C++ kernels")
    n, block = 10_000, 256
    x = torch.randn(n)
    whole = ops.quantize(x, 8, block, stochastic=True, seed=42, impl=impl)
    start, stop = 4 * block, 31 * block
    part = ops.quantize(
        x[start:stop], 8, block, stochastic=True, seed=42, index_offset=start, impl=impl
    )
    assert torch.equal(part[0], whole[0][start:stop])
    assert torch.equal(part[1], whole[1][start // block : stop // block])


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_nonfinite_blocks_counted_and_propagated(impl):
    if impl == "cpp" and not HAVE_CPP:
        pytest.skip("no C++ kernels")
    x = torch.randn(1000)
    x[5] = float("inf")
    x[700] = float("nan")
    e = torch.randn(1000) * 0.1
    codes, scales, s_out, bad = ops.quantize(
        x, 8, 256, mode="ef", state=e, propagate=True, impl=impl
    )
    assert bad == 2
    assert (
        torch.isnan(scales[0]) and torch.isnan(scales[2]) and torch.isfinite(scales[[1, 3]]).all()
    )
    d = ops.dequantize(codes, scales, 1000, 8, 256, impl=impl)
    assert torch.isnan(d[:256]).all() and torch.isnan(d[512:768]).all()
    assert torch.isfinite(d[256:512]).all() and torch.isfinite(d[768:]).all()
    # the untransmitted block stays in the residual (p = x + e), including its inf/nan
    assert_bit_equal(s_out[:256], (x + e)[:256], "bad-block state")
    _, scales0, _, bad0 = ops.quantize(x, 8, 256, impl=impl)
    assert bad0 == 2 and scales0[0] == 0 and scales0[2] == 0


@needs_cpp
def test_topk_global_bit_equal_with_ties_and_ef():
    g = torch.Generator().manual_seed(7)
    for n in [n for n in SIZES if n] + [2]:
        x = torch.randn(n, generator=g)
        x[::7] = 0.5  # many exact ties at the threshold
        x[::13] = -0.5
        for k in sorted({1, max(1, n // 100), (n + 2) // 3, n}):
            for state in (None, torch.randn(n, generator=g) * 0.01):
                a = ops.topk(x, k, state=state, impl="torch")
                b = ops.topk(x, k, state=state, impl="cpp")
                assert_bit_equal(a[0], b[0], f"values n={n} k={k}")
                assert torch.equal(a[1], b[1]), f"indices n={n} k={k}"
                if state is not None:
                    assert_bit_equal(a[2], b[2], f"residual n={n} k={k}")


def test_topk_reference_semantics():
    x = torch.tensor([0.0, -3.0, 1.0, 3.0, -1.0, 2.0])
    v, i, s_out, bad = ops.topk(x, 3, state=torch.zeros(6), impl="torch")
    assert i.tolist() == [1, 3, 5] and v.tolist() == [-3.0, 3.0, 2.0] and bad == 0
    assert s_out.tolist() == [0.0, 0.0, 1.0, 0.0, -1.0, 0.0]
    # ties at the threshold go to the lower index
    v, i, _, _ = ops.topk(torch.tensor([1.0, -1.0, 1.0, 1.0]), 2, impl="torch")
    assert i.tolist() == [0, 1]


@needs_cpp
@pytest.mark.parametrize(
    "chunk,ratio", [(64, 0.05), (4096, 0.01), (1000, 1.0), (65536, 0.01), (7, 0.5)]
)
def test_topk_chunked_bit_equal(chunk, ratio):
    g = torch.Generator().manual_seed(chunk)
    for n in [n for n in SIZES if n]:
        kc = ops.k_of(ratio, chunk)
        kl = ops.k_of(ratio, n - ((n - 1) // chunk) * chunk)
        x = torch.randn(n, generator=g)
        x[::5] = -1.25
        for state in (None, torch.randn(n, generator=g) * 0.1):
            a = ops.topk_chunked(x, chunk, kc, kl, state=state, impl="torch")
            b = ops.topk_chunked(x, chunk, kc, kl, state=state, impl="cpp")
            assert_bit_equal(a[0], b[0], f"values n={n}")
            assert torch.equal(a[1], b[1]), f"indices n={n}"
            if state is not None:
                assert_bit_equal(a[2], b[2], f"residual n={n}")


def _tie_inputs(n: int, g: torch.Generator) -> list[torch.Tensor]:
    """Inputs that stress the selection: ties everywhere, zeros, +-0, a few distinct values."""
    ints = torch.randint(-3, 4, (n,), generator=g).to(torch.float32)
    signed_zeros = torch.zeros(n)
    signed_zeros[::2] = -0.0
    signed_zeros[::7] = 1.0
    sparse = torch.zeros(n)
    sparse[::97] = torch.randn(len(range(0, n, 97)), generator=g)
    same = torch.full((n,), -2.5)
    same[1::2] = 2.5
    spiky = torch.randn(n, generator=g)
    spiky[::5] = -1.25
    spiky[3::11] = 1.25
    return [ints, signed_zeros, sparse, same, spiky]


@needs_cpp
@pytest.mark.parametrize(
    "chunk,ratio", [(4096, 64 / 4096), (4096, 0.01), (64, 0.05), (100, 0.3), (16, 0.5), (3, 1.0)]
)
def test_topk_chunked_ties_and_degenerate_inputs_bit_equal(chunk, ratio):
    """The threshold-from-group-maxima path and its fallbacks select exactly the reference set
    (ties to the lower index) on tie-heavy data, with and without error feedback."""
    g = torch.Generator().manual_seed(chunk)
    for n in (1, chunk - 1 or 1, chunk, chunk + 1, 3 * chunk + 17, 70_001):
        kc = ops.k_of(ratio, chunk)
        kl = ops.k_of(ratio, n - ((n - 1) // chunk) * chunk)
        for i, x in enumerate(_tie_inputs(n, g)):
            for state in (None, torch.zeros(n), torch.randn(n, generator=g) * 1e-3):
                a = ops.topk_chunked(x, chunk, kc, kl, state=state, impl="torch")
                b = ops.topk_chunked(x, chunk, kc, kl, state=state, impl="cpp")
                what = f"n={n} input={i} state={state is not None}"
                assert_bit_equal(a[0], b[0], f"values {what}")
                assert torch.equal(a[1], b[1]), f"indices {what}"
                if state is not None:
                    assert_bit_equal(a[2], b[2], f"residual {what}")


SPARSELOCO_CASES = [(4096, 64), (4096, 41), (64, 7), (100, 30), (7, 3), (16, 16), (65536, 655)]


@needs_cpp
@pytest.mark.parametrize("chunk,k_chunk", SPARSELOCO_CASES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_sparseloco_encode_bit_equal(chunk, k_chunk, stochastic):
    g = torch.Generator().manual_seed(chunk + k_chunk)
    for n in [n for n in SIZES if n] + [chunk, 2 * chunk + 1]:
        kl = min(k_chunk, n - ((n - 1) // chunk) * chunk)
        inputs = [torch.randn(n, generator=g), *_tie_inputs(n, g)[:2]]
        inputs.append(torch.randn(n, generator=g).to(torch.bfloat16))
        inputs.append(torch.randn(n, generator=g).to(torch.float16))
        for i, x in enumerate(inputs):
            for state, bf16 in ((None, False), (torch.randn(n, generator=g) * 0.1, False),
                                (torch.randn(n, generator=g) * 0.1, True)):
                kw = dict(stochastic=stochastic, seed=n + i, state=state, bf16_scales=bf16)
                a = ops.sparseloco_encode(x, chunk, k_chunk, kl, impl="torch", **kw)
                b = ops.sparseloco_encode(x, chunk, k_chunk, kl, impl="cpp", **kw)
                what = f"n={n} input={i} state={state is not None} bf16={bf16}"
                assert torch.equal(a[0], b[0]), f"codes {what}"
                assert torch.equal(a[1], b[1]), f"offsets {what}"
                assert_bit_equal(a[2], b[2], f"scales {what}")
                if state is not None:
                    assert_bit_equal(a[3], b[3], f"residual {what}")
                assert a[4] == b[4] == 0


def test_sparseloco_bf16_scales_are_bf16_values_and_the_residual_is_exact():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3)) * 1.2345
    codes, offsets, scales, s_out, _ = ops.sparseloco_encode(
        x, 100, 9, 9, state=torch.zeros(1000), bf16_scales=True, impl="torch"
    )
    assert torch.equal(scales, scales.to(torch.bfloat16).to(torch.float32))
    plain = ops.sparseloco_encode(x, 100, 9, 9, impl="torch")[2]
    assert not torch.equal(scales, plain)  # the levels were rounded
    decoded = torch.zeros(1000)
    values = ops.reference.sparseloco_values(codes, scales, 1000, 100, 9, 9)
    ids = ops.reference.chunk_ids(1000, 100, 9, 9)
    decoded[ids * 100 + offsets.to(torch.int64)] = values
    assert torch.equal(s_out, x - decoded)  # EF residual against the transmitted levels


def test_sparseloco_reference_semantics():
    # one chunk of 8, keep 4: |v| levels lo = 1, hi = 4; t = (|v| - 1) / 3 -> level t >= 0.5
    x = torch.tensor([0.1, -4.0, 2.0, 0.0, 3.0, -1.0, 0.2, 0.3])
    codes, offsets, scales, s_out, bad = ops.sparseloco_encode(
        x, 8, 4, 4, state=torch.zeros(8), impl="torch"
    )
    assert bad == 0 and offsets.tolist() == [1, 2, 4, 5] and scales.tolist() == [1.0, 4.0]
    # codes: -4 -> sign 1, hi (3); 2 -> lo (0: t = 1/3); 3 -> hi (2); -1 -> sign, lo (1)
    assert codes.tolist() == [3 | (0 << 2) | (2 << 4) | (1 << 6)]
    # residual p - D(C(p)): kept entries -4 - -4, 2 - 1, 3 - 4, -1 - -1; others p
    assert s_out.tolist() == pytest.approx([0.1, 0.0, 1.0, 0.0, -1.0, 0.0, 0.2, 0.3])


@needs_cpp
@pytest.mark.parametrize("kind", ["topk", "sparseloco"])
def test_chunked_sparse_sum_bit_equal(kind):
    """Sum of several members' payloads, with and without accumulation and division, also
    above the size where the kernel writes with streaming stores (and unaligned outputs)."""
    g = torch.Generator().manual_seed(11)
    for chunk, kc in ((4096, 64), (64, 5), (100, 7), (7, 2)):
        for n in (1, chunk, chunk + 3, 50_001, (2 << 20) + 17):
            kl = min(kc, n - ((n - 1) // chunk) * chunk)
            payloads = []
            for _ in range(3):
                x = torch.randn(n, generator=g)
                if kind == "topk":
                    v, i, _, _ = ops.topk_chunked(x, chunk, kc, kl)
                    payloads.append((v, i))
                else:
                    payloads.append(ops.sparseloco_encode(x, chunk, kc, kl)[:3])
            for accumulate in (False, True):
                for divisor in (1, 2, 3):
                    for off in (0, 1):
                        base = torch.randn(n + off, generator=g)
                        outs = []
                        for impl in ("torch", "cpp"):
                            out = base.clone()[off:]
                            ops.chunked_sparse_sum(
                                out, payloads, chunk, kc, kl, accumulate=accumulate,
                                divisor=divisor, impl=impl,
                            )  # fmt: skip
                            outs.append(out)
                        assert_bit_equal(
                            outs[0], outs[1], f"chunk={chunk} n={n} acc={accumulate} d={divisor}"
                        )


@needs_cpp
@pytest.mark.parametrize("wire_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cast_encode_decode_bit_equal(wire_dtype, dtype):
    """Casts into the wire dtype with error, scaled copy, inf/nan and overflow; sizes past the
    streaming-store threshold, unaligned views."""
    g = torch.Generator().manual_seed(5)
    for n in [*SIZES, (3 << 20) + 5]:
        for off in (0, 1) if n > 1000 else (0,):
            x = (torch.randn(n + off, generator=g) * 100).to(dtype)[off:]
            if n > 20:
                x[3], x[7] = float("nan"), float("-inf")
                x[9] = 70_000.0 if dtype != torch.float16 else 60_000.0  # fp16 overflow / fine
            for with_state in (False, True):
                state = torch.randn(n + off, generator=g)[off:] if with_state else None
                outs = []
                for impl in ("torch", "cpp"):
                    wire = torch.empty(n + off, dtype=wire_dtype)[off:]
                    err = torch.empty(n + off)[off:]
                    scaled = torch.empty(n + off)[off:]
                    bad = ops.cast_encode(
                        x, wire, state=state, err=err, scaled=scaled, divisor=3, impl=impl
                    )
                    dec2 = ops.cast_decode(wire, torch.empty(n), 2, impl=impl)
                    dec3 = ops.cast_decode(wire, torch.empty(n), 3, impl=impl)
                    outs.append((bad, wire, err, scaled, dec2, dec3))
                a, b = outs
                what = f"n={n} off={off} state={with_state}"
                assert a[0] == b[0], what
                for i, name in enumerate(("wire", "err", "scaled", "dec2", "dec3"), start=1):
                    assert_bit_equal(a[i], b[i], f"{name} {what}")


@needs_cpp
def test_cast_encode_scaled_in_place_and_counts():
    x = torch.tensor([1.0, 2.0, float("inf"), 3.0] * 5)
    wire = torch.empty(20, dtype=torch.bfloat16)
    assert ops.cast_encode(x, wire) == 5
    big = torch.full((33,), 3.4e38)  # finite, but rounds past the largest bfloat16: inf
    assert ops.cast_encode(big, torch.empty(33, dtype=torch.bfloat16)) == 33
    assert ops.cast_encode(big, torch.empty(33)) == 0
    for impl in ("torch", "cpp"):
        y = torch.arange(40, dtype=torch.float32)
        backup = torch.empty(40)
        assert ops.cast_encode(y, backup, scaled=y, divisor=4, impl=impl) == 0
        assert torch.equal(backup, torch.arange(40, dtype=torch.float32))
        assert torch.equal(y, torch.arange(40, dtype=torch.float32) / 4)


@needs_cpp
def test_lowrank_product_bit_equal():
    g = torch.Generator().manual_seed(2)
    for m, n, r in [(1, 1, 1), (3, 5, 2), (17, 33, 4), (100, 257, 3), (64, 1024, 1), (1500, 1600, 4)]:
        p, q = torch.randn(m, r, generator=g), torch.randn(n, r, generator=g)
        a = ops.lowrank_product(p, q, impl="torch")
        b = ops.lowrank_product(p, q, impl="cpp")
        assert_bit_equal(a, b, f"{m}x{n} r={r}")
        assert torch.allclose(b, p @ q.t(), atol=1e-4)


@needs_cpp
def test_new_kernels_do_not_depend_on_thread_count():
    n, chunk = 1_000_003, 4096
    x, e = torch.randn(n), torch.randn(n) * 0.1
    p, q = torch.randn(1000, 4), torch.randn(1001, 4)
    old = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            sl = ops.sparseloco_encode(x, chunk, 64, 64, stochastic=True, seed=3, state=e)
            tk = ops.topk_chunked(x, chunk, 41, 41, state=e)
            wire, err = torch.empty(n, dtype=torch.bfloat16), torch.empty(n)
            ops.cast_encode(x, wire, state=e, err=err)
            total = ops.chunked_sparse_sum(torch.empty(n), [sl[:3], sl[:3]], chunk, 64, 64, divisor=3)
            c8, s8, _, _ = ops.quantize(x, 2, 64)
            dq = ops.dequantize(c8, s8, n, 2, 64)
            outs.append([*sl[:4], *tk[:3], wire, err, total, dq, ops.lowrank_product(p, q)])
    finally:
        torch.set_num_threads(old)
    for i, (a, b) in enumerate(zip(*outs)):
        assert_bit_equal(a, b, f"output {i}")


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_topk_nonfinite_selects_nothing(impl):
    if impl == "cpp" and not HAVE_CPP:
        pytest.skip("no C++ kernels")
    x = torch.randn(100)
    x[3] = float("nan")
    assert ops.topk(x, 5, impl=impl)[3] == 1
    assert ops.topk_chunked(x, 16, 2, 2, impl=impl)[3] == 1


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_step_bit_equal(dtype, nesterov):
    for n in (1, 17, 100_003):
        snap, mom, delta = torch.randn(n), torch.randn(n), torch.randn(n)
        local = torch.empty(n, dtype=dtype)
        outs = []
        for impl in ("torch", "cpp"):
            s, m, loc = snap.clone(), mom.clone(), local.clone()
            ops.nesterov_outer_(
                s,
                m,
                delta,
                lr=0.7,
                mu=0.9,
                delta_scale=1 / 3,
                nesterov=nesterov,
                local=loc,
                impl=impl,
            )
            outs.append((s, m, loc, ops.pseudo_gradient(s, loc, impl=impl)))
        for a, b, what in zip(outs[0], outs[1], ("snapshot", "momentum", "local", "pseudo")):
            assert_bit_equal(a, b, f"{what} n={n}")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outer_step_from_averaged_params_bit_equal(dtype):
    """The fused variant computes the pseudo-gradient snapshot - average in the same pass."""
    n = 100_003
    snap, mom, avg = torch.randn(n), torch.randn(n), torch.randn(n)
    outs = []
    for impl in ("torch", "cpp"):
        s, m, loc = snap.clone(), mom.clone(), torch.empty(n, dtype=dtype)
        ops.nesterov_outer_(
            s, m, average=avg, lr=0.7, mu=0.9, delta_scale=0.5, local=loc, impl=impl
        )
        outs.append((s, m, loc))
    for a, b, what in zip(outs[0], outs[1], ("snapshot", "momentum", "local")):
        assert_bit_equal(a, b, what)
    # and it equals pseudo_gradient followed by the delta form
    s2, m2 = snap.clone(), mom.clone()
    delta = ops.pseudo_gradient(snap, avg)
    ops.nesterov_outer_(s2, m2, delta, lr=0.7, mu=0.9, delta_scale=0.5)
    assert_bit_equal(s2, outs[1][0], "two-pass snapshot")
    with pytest.raises(ValueError, match="exactly one"):
        ops.nesterov_outer_(snap, mom, delta, average=avg, lr=0.1, mu=0.9)


def test_outer_step_reference_maths():
    snap, mom, delta = torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([2.0])
    local = torch.zeros(1)
    ops.nesterov_outer_(
        snap, mom, delta, lr=0.1, mu=0.9, delta_scale=0.5, local=local, impl="torch"
    )
    # d = 1; m = 0.45 + 1 = 1.45; u = 1 + 0.9 * 1.45 = 2.305; w = 1 - 0.2305
    assert torch.allclose(mom, torch.tensor([1.45])) and torch.allclose(
        snap, torch.tensor([0.7695])
    )
    assert torch.equal(local, snap)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="bits"):
        ops.quantize(x, 3, 8)
    with pytest.raises(ValueError, match="multiple of 2"):
        ops.quantize(x, 4, 7)
    with pytest.raises(TypeError, match="unsupported dtype"):
        ops.quantize(torch.arange(10), 8, 8)
    with pytest.raises(ValueError, match="needs a state"):
        ops.quantize(x, 8, 8, mode="ef")
    with pytest.raises(ValueError, match="contiguous with 10"):
        ops.quantize(x, 8, 8, mode="ef", state=torch.zeros(9))
    with pytest.raises(ValueError, match="k must be"):
        ops.topk(x, 11)
    with pytest.raises(ValueError, match="chunk"):
        ops.topk_chunked(x, 70_000, 1, 1)


def test_backend_reports_cpp_here_and_torch_when_forced():
    # Where a C++ compiler exists (all project machines and CI) the C++ path must be active.
    if shutil.which(os.environ.get("CXX", "c++")) is not None:
        assert ops.backend() in ("cpp", "cuda") and ops.backend("cpu") == "cpp", (
            _build.unavailable_reason("cpu")
        )
    code = "from lococomm import ops; print(ops.backend())"
    env = {**os.environ, "LOCOCOMM_OPS_BACKEND": "torch", "PYTHONPATH": SRC}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"


def test_without_compiler_falls_back_with_one_warning(tmp_path):
    code = textwrap.dedent(
        """
        import warnings, torch
        from lococomm import ops
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            print(ops.backend())
            x = torch.randn(1000)
            c, s, _, _ = ops.quantize(x, 8, 256)
            ops.dequantize(c, s, 1000, 8, 256)
            ops.topk(x, 10)
            print(ops.backend())
        print(sum("kernels unavailable" in str(m.message) for m in w))
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": SRC,
        "LOCOCOMM_BUILD_DIR": str(tmp_path / "cache"),  # nothing cached there
        "CXX": str(tmp_path / "no-such-compiler"),
    }
    env.pop("LOCOCOMM_OPS_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch", "torch", "1"], out.stdout + out.stderr


def test_build_lock_is_exclusive_across_processes(tmp_path):
    """The flock serialising first builds: a second process blocks until the first releases."""
    lock = tmp_path / "lock"
    code = textwrap.dedent(
        f"""
        import sys, time
        from lococomm.ops._build import _file_lock
        from pathlib import Path
        with _file_lock(Path({str(lock)!r})):
            print(time.monotonic(), flush=True)
            time.sleep(float(sys.argv[1]))
            print(time.monotonic(), flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, "1.0"], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    spans = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        spans.append([float(v) for v in out.split()])
    (_a0, a1), (b0, _b1) = sorted(spans)
    assert b0 >= a1, f"critical sections overlap: {spans}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_concurrent_first_builds_compile_once(tmp_path):
    """Two processes start with an empty cache: both get the C++ backend, one compiles."""
    code = "from lococomm import ops; print(ops.backend())"
    env = {**os.environ, "PYTHONPATH": SRC, "LOCOCOMM_BUILD_DIR": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=800)[0].strip() for p in procs]
    assert outs == ["cpp", "cpp"]
    builds = list((tmp_path / "cache").glob("cpu-*/*.so"))
    assert len(builds) == 1
    assert builds[0].with_suffix(".ok").is_file()  # marked complete: later imports skip the lock


def test_build_tag_changes_with_every_source_and_header(tmp_path):
    """The JIT cache directory is named by a hash of every source and header: editing any of
    them gives a new tag, so a stale build is never imported."""
    src = _build.csrc_dir()
    assert src is not None
    copy = tmp_path / "csrc"
    shutil.copytree(src, copy)
    tag = _build._tag("cpu", copy, _build.CPU_SOURCES, _build.CPU_CFLAGS)
    assert tag == _build._tag("cpu", src, _build.CPU_SOURCES, _build.CPU_CFLAGS)
    for rel in (*_build.CPU_SOURCES, *_build.HEADERS):
        f = copy / rel
        original = f.read_bytes()
        f.write_bytes(original + b"\n// edited\n")
        assert _build._tag("cpu", copy, _build.CPU_SOURCES, _build.CPU_CFLAGS) != tag, rel
        f.write_bytes(original)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 31, 1000, 4097, (1 << 20) + 3])
def test_checksum_kernel_equals_reference_and_sees_every_byte_and_position(n):
    gen = torch.Generator().manual_seed(n)
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    value = ops.checksum(data, impl="torch")
    assert 0 <= value < 1 << 64
    if ops.backend() == "cpp":
        assert ops.checksum(data, impl="cpp") == value
        if n > 1:  # unaligned views (a slice starting mid-word)
            assert ops.checksum(data[1:], impl="cpp") == ops.checksum(data[1:], impl="torch")
    if n == 0:
        return
    for position in {0, n // 2, n - 1}:
        flipped = data.clone()
        flipped[position] ^= 1 << (position % 8)
        assert ops.checksum(flipped, impl="torch") != value
    if n >= 16:  # swapping two 8-byte words changes the sum (position-dependent keys)
        swapped = data.clone()
        swapped[:8], swapped[8:16] = data[8:16].clone(), data[:8].clone()
        if not torch.equal(swapped, data):
            assert ops.checksum(swapped, impl="torch") != value
    assert ops.checksum(torch.cat([data, torch.zeros(1, dtype=torch.uint8)]), impl="torch") != value


@pytest.mark.parametrize("n", [0, 1, 7, 8, 31, 33, 4099, (1 << 20) + 5])
def test_checksum_copy_copies_every_byte_and_returns_the_checksum(n):
    gen = torch.Generator().manual_seed(n + 1)
    src = torch.randint(0, 256, (n + 3,), dtype=torch.uint8, generator=gen)
    impls = ["torch", "cpp"] if ops.backend() == "cpp" else ["torch"]
    for impl in impls:
        for offset in (0, 3):  # aligned and mid-word source and destination
            data = src[offset : offset + n]
            dst_storage = torch.full((n + 5,), 0xAB, dtype=torch.uint8)
            dst = dst_storage[offset + 1 : offset + 1 + n]
            assert ops.checksum_copy(dst, data, impl=impl) == ops.checksum(data, impl="torch")
            assert torch.equal(dst, data)
            # bytes around the destination are untouched
            assert int(dst_storage[offset]) == 0xAB and int(dst_storage[offset + 1 + n]) == 0xAB


def test_checksum_copy_rejects_bad_arguments():
    a = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="8 bytes, src 7"):
        ops.checksum_copy(a, a[:7])
    with pytest.raises(TypeError, match="uint8"):
        ops.checksum_copy(torch.zeros(2), torch.zeros(2))
    if ops.backend() == "cpp":
        with pytest.raises(RuntimeError, match="overlap"):
            ops.checksum_copy(a[2:], a[:6], impl="cpp")


def test_checksum_rejects_non_bytes():
    with pytest.raises(TypeError, match="uint8"):
        ops.checksum(torch.zeros(4))
    with pytest.raises(ValueError, match="impl"):
        ops.checksum(torch.zeros(4, dtype=torch.uint8), impl="cuda")



def test_load_if_built_never_compiles(tmp_path):
    """The heal path asks for the kernels with load_if_built: with an empty build cache it
    must answer None at once (the torch reference runs) and leave the cache empty."""
    code = textwrap.dedent(
        """
        import importlib.util, time
        from lococomm.ops import _build, kernels
        import torch
        if importlib.util.find_spec("lococomm._C") is None:
            started = time.monotonic()
            assert _build.load_if_built("cpu") is None
            assert time.monotonic() - started < 5
            data = torch.arange(100, dtype=torch.uint8)
            assert kernels.checksum(data) == kernels.checksum(data, impl="torch")
        print("ok")
        """
    )
    env = {**os.environ, "LOCOCOMM_BUILD_DIR": str(tmp_path / "cache")}
    env.pop("LOCOCOMM_OPS_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.rglob("*.so"))
