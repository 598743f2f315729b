"""FP4 E3M0 codec: the codec contract (shapes, dtypes, wire sizes, chunks, inf/nan), its grid,
rounding, and a ring all-reduce hop."""

from __future__ import annotations

import json

import pytest
import torch

from lococomm.collectives.hop_codec import HopCodec
from lococomm.compress import Payload
from lococomm.compress.fp4 import FP4E3M0, LEVELS, encode_magnitudes
from lococomm.compress.payload import buffer_bytes

pytestmark = pytest.mark.timeout(60)


def make(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2).to(dtype)


@pytest.mark.parametrize("codec", [FP4E3M0(), FP4E3M0(block=32, rounding="stochastic")], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_contract_shapes_dtypes_parts_and_wire_bytes(codec, dtype):
    for shape in [(), (0,), (1,), (7,), (3, 0, 2), (33, 17), (4, 5, 300)]:
        x = make(shape, dtype)
        p = codec.encode(x, seed=3)
        d = codec.decode(p)
        assert d.shape == x.shape and d.dtype == torch.float32
        assert codec.empty_payload(shape, dtype).meta == p.meta
        meta, tensors = p.to_parts()
        q = Payload.from_parts(json.loads(json.dumps(meta)), [t.clone() for t in tensors])
        assert torch.equal(codec.decode(q), d)
        assert p.to_buffer().numel() == buffer_bytes(meta)
        n = x.numel()
        assert tensors[0].numel() == (n + 1) // 2 and tensors[1].numel() == -(-n // codec.block)
        acc = torch.ones(shape)
        assert torch.equal(codec.decode_accumulate_(acc, p), torch.ones(shape) + d)


def test_values_land_on_the_power_of_two_grid_of_the_block_absmax():
    codec = FP4E3M0(block=8)
    x = torch.tensor([4.0, -2.0, 1.0, 0.5, 0.3, -0.06, 0.001, 0.0, 1.0, 0.0, 0, 0, 0, 0, 0, 0])
    d = codec.decode(codec.encode(x))
    # block 0: absmax 4 -> levels 4 * {0, 1/64, ..., 1}; 0.3 -> 0.25, 0.06 -> 0.0625, 0.001 -> 0
    assert d[:8].tolist() == [4.0, -2.0, 1.0, 0.5, 0.25, -0.0625, 0.0, 0.0]
    assert d[8:].tolist() == [1.0] + [0.0] * 7
    levels = encode_magnitudes(LEVELS, None)
    assert levels.tolist() == list(range(8))  # every level encodes to itself


def test_nearest_error_bound_and_stochastic_rounding_is_unbiased():
    x = make((4096,), seed=1)
    codec = FP4E3M0()
    d = codec.decode(codec.encode(x))
    blocks = x.view(-1, 128)
    absmax = blocks.abs().amax(1, keepdim=True)
    err = (d.view(-1, 128) - blocks).abs()
    # nearest on a power-of-two grid: at most 1/3 of |x| above 1/64 of absmax, else 1/128
    bound = torch.maximum(blocks.abs() / 3, absmax / 128) + 1e-6
    assert bool((err <= bound).all())
    sto = FP4E3M0(rounding="stochastic")
    mean = torch.stack([sto.decode(sto.encode(x, seed=s)) for s in range(400)]).mean(0)
    assert (mean - x).abs().mean() < 0.05 * x.abs().mean()
    assert torch.equal(sto.encode(x, seed=5).tensors[0], sto.encode(x, seed=5).tensors[0])
    assert not torch.equal(sto.encode(x, seed=5).tensors[0], sto.encode(x, seed=6).tensors[0])


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_block_aligned_chunks_equal_the_whole_encoding(rounding):
    codec = FP4E3M0(block=64, rounding=rounding)
    x = make((1000,), seed=2)
    whole = codec.encode_flat(x, seed=9)
    for a, b in [(0, 256), (256, 640), (640, 1000)]:
        part = codec.encode_flat(x[a:b], seed=9, index_offset=a)
        assert torch.equal(part.tensors[0], whole.tensors[0][a // 2 : (b + 1) // 2])
        assert torch.equal(part.tensors[1], whole.tensors[1][a // 64 : -(-b // 64)])
    with pytest.raises(ValueError, match="multiple"):
        codec.encode_flat(x[10:], index_offset=10)


def test_bits_per_value_and_nonfinite_handling():
    x = make((128 * 64,))
    p = FP4E3M0().encode(x)
    bits = 8 * sum(t.numel() * t.element_size() for t in p.tensors) / x.numel()
    assert bits == 4.25
    bad = x.clone()
    bad[5] = float("nan")
    with pytest.raises(ValueError, match="inf/nan"):
        FP4E3M0().encode(bad)
    d = FP4E3M0(nonfinite="propagate").decode(FP4E3M0(nonfinite="propagate").encode(bad))
    assert bool(d[:128].isnan().all()) and bool(torch.isfinite(d[128:]).all())


def test_ring_hop_encodes_and_accumulates_like_the_codec():
    codec = FP4E3M0()
    hop = HopCodec(codec)
    x = make((512,), seed=4)
    message = torch.empty(hop.message_bytes(512), dtype=torch.uint8)
    err = torch.empty(512)
    hop.encode(x, 0, 7, message, err=err)
    acc = torch.zeros(512)
    hop.accumulate(acc, message)
    assert torch.equal(acc, codec.decode(codec.encode(x, seed=7)))
    torch.testing.assert_close(acc + err, x)
