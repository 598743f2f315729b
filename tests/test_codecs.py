"""Codec contract: shapes, dtypes, empty and non-contiguous inputs, inf/nan handling, exact
wire sizes, payload serialisation without pickle, error bounds, determinism."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from lococomm import ops
from lococomm.compress import Payload, codecs
from lococomm.compress.base import Codec
from lococomm.compress.payload import buffer_bytes

pytestmark = pytest.mark.timeout(120)
# Load (on a fresh machine: compile, ~35 s once) the kernels at collection time, outside the
# per-test timeouts.
ops.backend("cpu")

ALL = [
    codecs.Identity(),
    codecs.FP16(),
    codecs.BF16(),
    codecs.Int8(),
    codecs.Int4(),
    codecs.Int2(),
    codecs.FP4E3M0(),
    codecs.Int8(block=64, rounding="stochastic"),
    codecs.Int4(rounding="stochastic"),
    codecs.SignSGD(),
    codecs.TopK(0.1),
    codecs.TopK(0.1, chunk=256),
    codecs.RandK(0.1),
    codecs.RandK(0.05, unbiased=True),
    codecs.SparseLoCo(),
    codecs.SparseLoCo(ratio=0.1, chunk=64, rounding="stochastic"),
    codecs.SparseLoCo(ratio=1 / 16, chunk=256, scale_dtype="bfloat16"),
    codecs.PowerSGD(2),
]
if codecs.HAS_FP8:
    ALL += [codecs.FP8E4M3(), codecs.FP8E5M2()]
SHAPES = [(), (0,), (1,), (7,), (3, 0, 2), (33, 17), (4, 5, 300), (1000,)]
IDS = [repr(c) for c in ALL]


def make(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2).to(dtype)


@pytest.mark.parametrize("codec", ALL, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_shape_dtype_and_payload_parts(codec, dtype):
    for shape in SHAPES:
        x = make(shape, dtype)
        p = codec.encode(x, seed=11)
        d = codec.decode(p)
        assert d.shape == x.shape, (codec, shape)
        expect_dtype = dtype if isinstance(codec, codecs.Identity) else torch.float32
        assert d.dtype == expect_dtype
        # receivers can size buffers without seeing data: meta is data independent
        empty = codec.empty_payload(shape, dtype) if codec.name != "randk" else None
        if empty is not None:
            assert empty.meta == p.meta
        # parts: JSON meta + tensors, no pickle
        meta, tensors = p.to_parts()
        q = Payload.from_parts(json.loads(json.dumps(meta)), [t.clone() for t in tensors])
        assert torch.equal(codec.decode(q), d)
        # one flat byte buffer
        buf = p.to_buffer()
        assert buf.numel() == buffer_bytes(meta)
        assert torch.equal(codec.decode(Payload.from_buffer(meta, buf.clone())), d)
        # exact wire size: tensor bytes + canonical JSON
        tbytes = sum(t.numel() * t.element_size() for t in tensors)
        jbytes = len(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
        assert codec.wire_bytes(p) == tbytes + jbytes


@pytest.mark.parametrize("codec", ALL, ids=IDS)
def test_non_contiguous_input_equals_contiguous(codec):
    x = make((40, 30), seed=3).t()  # non-contiguous view
    assert not x.is_contiguous()
    a = codec.decode(codec.encode(x, seed=5))
    b = codec.decode(codec.encode(x.contiguous(), seed=5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("codec", ALL, ids=IDS)
def test_same_seed_same_bytes(codec):
    x = make((5000,), seed=4)
    a, b = codec.encode(x, seed=99), codec.encode(x.clone(), seed=99)
    assert a.meta == b.meta
    assert all(torch.equal(s, t) for s, t in zip(a.to_buffer(), b.to_buffer()))


@pytest.mark.parametrize("codec", ALL, ids=IDS)
def test_decode_accumulate_adds_decode(codec):
    x = make((3000,), seed=6)
    p = codec.encode(x, seed=1)
    acc0 = make((3000,), seed=7)
    acc = codec.decode_accumulate_(acc0.clone(), p)
    assert torch.allclose(acc, acc0 + codec.decode(p).reshape(-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_identity_round_trips_exactly(dtype):
    x = make((17, 3), dtype)
    x[0, 0] = -0.0
    d = codecs.Identity().decode(codecs.Identity().encode(x))
    assert d.dtype == dtype and torch.equal(d, x)
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]
    assert torch.equal(d.view(as_int), x.view(as_int))  # bit for bit, sign of zero included
    x.add_(1.0)  # the payload owns a copy
    assert not torch.equal(d, x)


@pytest.mark.parametrize("codec", ALL, ids=IDS)
def test_unsupported_dtype_is_a_clear_error(codec):
    with pytest.raises(TypeError, match="unsupported dtype"):
        codec.encode(torch.arange(10))
    if not isinstance(codec, codecs.Identity):
        with pytest.raises(TypeError, match="unsupported dtype"):
            codec.encode(torch.randn(10, dtype=torch.float64))
    with pytest.raises(TypeError):
        codec.encode([1.0, 2.0])


@pytest.mark.parametrize("codec", ALL, ids=IDS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_input_raises_by_default(codec, bad):
    x = make((600,), seed=8)
    x[123] = bad
    with pytest.raises(ValueError, match="inf/nan"):
        codec.encode(x)


@pytest.mark.parametrize(
    "codec",
    [codecs.Int8(nonfinite="propagate"), codecs.Int4(nonfinite="propagate")]
    + ([codecs.FP8E4M3(nonfinite="propagate")] if codecs.HAS_FP8 else []),
    ids=repr,
)
def test_propagate_marks_only_the_affected_block_nan(codec):
    x = make((1000,), seed=9)
    x[300] = float("inf")
    d = codec.decode(codec.encode(x))
    b = codec.block
    blk = 300 // b
    assert torch.isnan(d[blk * b : (blk + 1) * b]).all()
    mask = torch.ones(1000, dtype=torch.bool)
    mask[blk * b : (blk + 1) * b] = False
    assert torch.isfinite(d[mask]).all()


def test_casts_overflow_and_propagation():
    x = torch.tensor([1.0, 70000.0])
    with pytest.raises(ValueError, match="overflows"):
        codecs.FP16().encode(x)
    d = codecs.FP16(nonfinite="propagate").decode(codecs.FP16(nonfinite="propagate").encode(x))
    assert d[0] == 1.0 and torch.isinf(d[1])
    y = torch.tensor([1.0, float("nan")])
    assert torch.isnan(
        codecs.BF16(nonfinite="propagate").decode(codecs.BF16(nonfinite="propagate").encode(y))[1]
    )
    for cls in (codecs.TopK, codecs.RandK, codecs.PowerSGD, codecs.SignSGD, codecs.SparseLoCo):
        with pytest.raises(ValueError, match="cannot propagate"):
            cls(nonfinite="propagate")


def rel_err(codec, x, seed=0):
    d = codec.decode(codec.encode(x, seed))
    return float((d - x).norm() / x.norm())


def test_quantiser_error_bounds_at_default_blocks():
    x = make((1 << 20,), seed=10) / 2
    assert rel_err(codecs.Int8(), x) <= 0.01
    assert rel_err(codecs.Int4(), x) <= 0.15
    assert rel_err(codecs.Int2(), x) <= 0.80
    assert rel_err(codecs.Int8(rounding="stochastic"), x) <= 0.015
    assert rel_err(codecs.FP16(), x) <= 1e-3
    assert rel_err(codecs.BF16(), x) <= 5e-3
    if codecs.HAS_FP8:
        assert rel_err(codecs.FP8E4M3(), x) <= 0.04
        assert rel_err(codecs.FP8E5M2(), x) <= 0.08
    assert rel_err(codecs.SignSGD(), x) <= 0.65  # sqrt(1 - 2/pi) = 0.60 for Gaussian data


def test_stochastic_rounding_is_unbiased_and_seeded():
    x = make((4096,), seed=12) / 3
    c = codecs.Int4(rounding="stochastic")
    mean = torch.stack([c.decode(c.encode(x, seed=s)) for s in range(400)]).mean(0)
    step = float(x.abs().max()) / 7
    # averaging 400 draws shrinks the error of each element to ~ step / sqrt(4 * 400)
    assert float((mean - x).abs().mean()) < step / 15
    assert not torch.equal(c.encode(x, seed=1).tensors[0], c.encode(x, seed=2).tensors[0])
    nearest = codecs.Int4()
    assert torch.equal(nearest.encode(x, seed=1).tensors[0], nearest.encode(x, seed=2).tensors[0])


def test_bits_per_value_match_the_documented_formats():
    n = 1 << 20  # the ~100 bytes of JSON metadata are < 0.001 bit/value here
    x = make((n,), seed=13)

    def bpv(c):
        return 8 * c.wire_bytes(c.encode(x)) / n

    assert abs(bpv(codecs.Int8()) - 8.125) < 0.01
    assert abs(bpv(codecs.Int4()) - 4.25) < 0.01
    assert abs(bpv(codecs.Int2()) - 2.5) < 0.01
    assert abs(bpv(codecs.SignSGD()) - 1.125) < 0.01
    assert abs(bpv(codecs.TopK(0.1)) - 0.1 * 64) < 0.01
    assert abs(bpv(codecs.TopK(0.1, chunk=4096)) - 0.1 * 48) < 0.1
    assert abs(bpv(codecs.TopK(0.1, chunk=256)) - 0.1 * 40) < 0.1  # uint8 offsets
    assert abs(bpv(codecs.SparseLoCo()) - (2 + 16) / 64 - 64 / 4096) < 0.01
    # chunks of <= 256: 8-bit offsets; 13 of every 256 kept, 2 fp32 scales per chunk
    assert abs(bpv(codecs.SparseLoCo(ratio=0.05, chunk=256)) - (2 + 8) * 13 / 256 - 64 / 256) < 0.01
    bf16 = codecs.SparseLoCo(ratio=1 / 16, chunk=256, scale_dtype="bfloat16")
    assert abs(bpv(bf16) - (2 + 8) * 16 / 256 - 32 / 256) < 0.01


def test_summable_chunks_equal_the_whole_encoding():
    x = make((10_000,), seed=14)
    for codec in (
        codecs.Int8(rounding="stochastic"),
        codecs.Int4(),
        codecs.FP16(),
        codecs.Identity(),
    ):
        assert codec.summable
        whole = codec.encode_flat(x, seed=3)
        a = codec.align
        cuts = [0, 7 * a, 20 * a, 10_000]
        acc = torch.zeros(10_000)
        for s, e in itertools.pairwise(cuts):
            part = codec.encode_flat(x[s:e], seed=3, index_offset=s)
            codec.decode_accumulate_(acc[s:e], part)
            if codec.name.startswith("int"):
                per = 8 // codec.bits
                assert torch.equal(part.tensors[0], whole.tensors[0][s // per : -(-e // per)])
        assert torch.equal(acc, codec.decode(whole).float())
    with pytest.raises(ValueError, match="multiple of"):
        codecs.Int8().encode_flat(x[:512], index_offset=100)


def test_topk_keeps_exactly_the_largest():
    x = torch.tensor([0.1, -5.0, 0.3, 4.0, -0.2, 3.0, 0.0, 0.05])
    c = codecs.TopK(3 / 8)
    d = c.decode(c.encode(x))
    assert d.tolist() == [0, -5.0, 0, 4.0, 0, 3.0, 0, 0]
    cc = codecs.TopK(0.25, chunk=4)  # one per chunk
    assert cc.decode(cc.encode(x)).tolist() == [0, -5.0, 0, 0, 0, 3.0, 0, 0]
    assert c.kept(8) == 3 and cc.kept(8) == 2 and cc.kept(9) == 3


def test_randk_indices_come_from_the_seed():
    c = codecs.RandK(0.01)
    x = make((100_000,), seed=15)
    a, b = c.encode(x, seed=5), c.encode(x * 2, seed=5)
    assert torch.equal(c.decode(a) != 0, c.decode(b) != 0)  # same support for the same seed
    assert not torch.equal(c.decode(a) != 0, c.decode(c.encode(x, seed=6)) != 0)
    assert c.wire_bytes(a) < 1000 * 4 + 120  # values only (+ JSON), no index tensor
    u = codecs.RandK(0.1, unbiased=True)
    y = torch.ones(1000)
    mean = torch.stack([u.decode(u.encode(y, seed=s)) for s in range(300)]).mean(0)
    assert abs(float(mean.mean()) - 1.0) < 0.05


def test_powersgd_recovers_low_rank_and_warm_start_helps():
    g = torch.Generator().manual_seed(16)
    low = torch.randn(64, 3, generator=g) @ torch.randn(3, 48, generator=g)
    c = codecs.PowerSGD(3)
    assert rel_err(c, low) < 1e-4
    full = torch.randn(64, 48, generator=g) + low * 0.5
    c2 = codecs.PowerSGD(2)
    cold = rel_err(c2, full, seed=1)
    warm_payload = c2.encode(full, seed=1)
    for _ in range(10):  # subspace iteration towards the top-2 singular space
        warm_payload = c2._encode_warm(full, 1, c2.warm_state(warm_payload))
    warm = float((c2.decode(warm_payload) - full).norm() / full.norm())
    best = torch.linalg.svdvals(full)
    optimal = float(best[2:].square().sum().sqrt() / best.square().sum().sqrt())
    assert warm <= cold and abs(warm - optimal) < 0.02
    assert codecs.PowerSGD(4).encode(torch.randn(10)).meta["mode"] == "raw"


def test_sparseloco_values_are_two_level_per_chunk():
    x = make((4096 * 3 + 100,), seed=17)
    c = codecs.SparseLoCo()
    d = c.decode(c.encode(x))
    kept = d[d != 0]
    assert kept.numel() == c.kept(x.numel())
    for k in range(4):
        chunk = d[k * 4096 : (k + 1) * 4096]
        assert chunk[chunk != 0].abs().unique().numel() <= 2
    assert rel_err(c, x) < 0.95


SPARSELOCOS = [
    codecs.SparseLoCo(),
    codecs.SparseLoCo(ratio=0.1, chunk=64, rounding="stochastic"),
    codecs.SparseLoCo(ratio=0.3, chunk=7),
]
SUMMED = [
    codecs.TopK(0.01, chunk=4096),
    codecs.TopK(0.1, chunk=100),
    codecs.SparseLoCo(),
    codecs.SparseLoCo(ratio=0.2, chunk=30),
    codecs.TopK(0.1),
    codecs.Int8(),
    codecs.BF16(),
]


@pytest.mark.parametrize("codec", SPARSELOCOS)
def test_sparseloco_fused_error_feedback_equals_the_generic_path(codec):
    """One fused kernel pass (select on x + e, 2-bit values, residual) gives the bytes of
    encode(x + e) and the residual p - decode(payload) of the generic Codec path."""
    for n in (1, 63, 4097, 20_011):
        x, e = make((n,), seed=n), make((n,), seed=n + 1) * 0.1
        fused, s_fused = codec.encode_feedback(x, e, 5, mode="ef")
        generic, s_generic = Codec.encode_feedback(codec, x, e, 5, mode="ef")
        for a, b in zip(fused.tensors, generic.tensors):
            assert torch.equal(a, b)
        assert torch.equal(s_fused.view(torch.int32), s_generic.view(torch.int32))
        out = torch.empty(n)
        _, s2 = codec.encode_feedback(x, e, 5, mode="ef", state_out=out)
        assert s2 is out and torch.equal(out, s_fused)


@pytest.mark.parametrize("codec", SUMMED)
def test_decode_sum_equals_zero_accumulate_divide(codec):
    """decode_sum_ (fused for chunked sparse codecs) = zero, decode_accumulate_ in order, / W."""
    for n in (5, 4096 * 2 + 3, 100_000):
        payloads = [codec.encode(make((n,), seed=n + r), seed=r) for r in range(3)]
        for divisor in (1, 3, 4):
            want = torch.zeros(n)
            for p in payloads:
                codec.decode_accumulate_(want, p)
            if divisor != 1:
                want.div_(divisor)
            got = codec.decode_sum_(torch.full((n,), 7.0), payloads, divisor)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (n, divisor)
        # decode and decode_accumulate_ of chunked payloads agree with scattering the values
        one = payloads[0]
        d = codec.decode(one).reshape(-1)
        acc = make((n,), seed=99)
        want_acc = acc + d
        codec.decode_accumulate_(acc, one)
        assert torch.equal(acc.view(torch.int32), want_acc.view(torch.int32))


def test_signsgd_signs_and_scales():
    x = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.0])
    c = codecs.SignSGD(block=4)
    assert c.decode(c.encode(x)).tolist() == [2.5, -2.5, 2.5, -2.5, 0.0]


def test_specs_round_trip_and_compare():
    for c in ALL:
        spec = json.loads(json.dumps(c.spec()))
        assert codecs.from_spec(spec) == c
    assert codecs.Int8() != codecs.Int8(block=128)
    assert codecs.Int8() != codecs.Int4()
    with pytest.raises(ValueError, match="unknown codec"):
        codecs.from_spec({"name": "zip", "config": {}})


def test_decode_rejects_foreign_payloads_and_bad_buffers():
    p = codecs.Int8().encode(torch.randn(10))
    with pytest.raises(ValueError, match="encoded by"):
        codecs.Int4().decode(p)
    meta, _ = p.to_parts()
    with pytest.raises(ValueError, match="bytes"):
        Payload.from_buffer(meta, torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="meta says"):
        Payload.from_parts(meta, [torch.zeros(3), torch.zeros(1)])


def test_constructor_validation():
    with pytest.raises(ValueError, match="ratio"):
        codecs.TopK(0.0)
    with pytest.raises(ValueError, match="chunk"):
        codecs.TopK(0.1, chunk=100_000)
    with pytest.raises(ValueError, match="rounding"):
        codecs.Int8(rounding="up")
    with pytest.raises(ValueError, match="block"):
        codecs.Int4(block=0)
    with pytest.raises(ValueError, match="rank"):
        codecs.PowerSGD(0)
    with pytest.raises(ValueError, match="nonfinite"):
        codecs.Int8(nonfinite="ignore")
