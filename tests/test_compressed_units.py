"""The pure parts of the compressed collectives: ring schedule, hop codec, seeds, choose()."""

from __future__ import annotations

import math

import pytest
import torch

import lococomm as lc
from lococomm.collectives.compressed import algorithm_for, tensor_id
from lococomm.collectives.feedback import Feedback
from lococomm.collectives.finite import check_finite
from lococomm.collectives.hop_codec import HopCodec
from lococomm.collectives.ring_plan import plan_ring
from lococomm.compress import EF21, ErrorFeedback, codecs
from lococomm.compress.choose import MEASURED


@pytest.mark.parametrize("numel, world, align", [(0, 3, 256), (3, 4, 256), (1000, 2, 1),
                                                 (70001, 3, 128), (1 << 20, 4, 64)])  # fmt: skip
def test_ring_plan_covers_the_tensor_once_in_aligned_chunks(numel, world, align):
    plan = plan_ring(numel, world, align, chunk_elements=4096)
    spans = sorted(c for seg in plan.chunks for c in seg if c[0] < c[1])
    covered = 0
    for a, b in spans:
        assert a == covered and a % align == 0
        covered = b
    assert covered == numel
    assert len({len(seg) for seg in plan.chunks}) == 1  # same chunk count in every segment


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_ring_schedule_each_member_encodes_every_segment_once_and_owner_finalises(world):
    plan = plan_ring(10_000, world, 8, chunk_elements=1000)
    order = plan.order()
    position = {m: i for i, m in enumerate(order)}
    for j, s in order:
        if s:
            assert position[(j, s - 1)] < position[(j, s)]  # a send only needs earlier receives
    for r in range(world):
        encoded = [plan.sent_segment(r, s) for s in range(world)]
        assert sorted(encoded) == list(range(world))  # stages 0..W-1: each segment once
        assert plan.sent_segment(r, world - 1) == plan.owned_segment(r)
        # what r receives at stage s is what its left neighbour sent at stage s
        for s in range(2 * world - 2):
            assert plan.received_segment(r, s) == plan.sent_segment((r - 1) % world, s)
        finals = {plan.received_segment(r, s) for s in range(world - 1, 2 * world - 2)}
        assert finals | {plan.owned_segment(r)} == set(range(world))


@pytest.mark.parametrize(
    "codec",
    [codecs.Identity(), codecs.FP16(), codecs.BF16(), codecs.FP8E4M3(), codecs.Int8(),
     codecs.Int4(rounding="stochastic"), codecs.Int2()],
    ids=lambda c: c.name,
)  # fmt: skip
@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
def test_hop_messages_decode_to_exactly_the_codecs_own_encoding(codec, n):
    hop = HopCodec(codec)
    gen = torch.Generator().manual_seed(n)
    x, state = torch.randn(n, generator=gen), 0.1 * torch.randn(n, generator=gen)
    message = torch.empty(hop.message_bytes(n), dtype=torch.uint8)
    err = torch.empty(n)
    hop.encode(x, 512, 99, message, state=state, err=err)
    want = codec.decode(codec.encode_flat(x + state, 99, index_offset=512)).reshape(-1)
    got = torch.empty(n)
    hop.decode_into(got, message)
    assert torch.equal(got, want)
    assert torch.allclose(err, x + state - got, atol=1e-6)
    acc = torch.ones(n)
    hop.accumulate(acc, message)
    assert torch.allclose(acc, 1 + got)


def test_hop_refuses_codecs_that_do_not_sum():
    with pytest.raises(TypeError, match="does not sum"):
        HopCodec(codecs.TopK(0.1))


def test_algorithm_choice():
    assert algorithm_for(codecs.Int8(), 1 << 20) == "ring"
    assert algorithm_for(codecs.Int8(), 100) == "allgather"  # tiny: one all-gather
    assert algorithm_for(codecs.Int8(), 1 << 20, "ef21") == "allgather"  # contractive errors
    assert algorithm_for(codecs.TopK(0.01), 1 << 20) == "allgather"
    assert algorithm_for(codecs.RandK(0.01), 1 << 20) == "randk"
    assert algorithm_for(codecs.PowerSGD(4), 1 << 20) == "powersgd"
    # casts gloo can sum itself: cast + gloo all-reduce (any size)
    assert algorithm_for(codecs.Identity(), 1 << 20) == "native"
    assert algorithm_for(codecs.Identity(), 100, "ef") == "native"
    assert algorithm_for(codecs.BF16(), 1 << 20) == "native"
    assert algorithm_for(codecs.BF16(), 1 << 20, "ef") == "ring"  # member errors must add up
    assert algorithm_for(codecs.BF16(), 1 << 20, "ef21") == "allgather"
    assert algorithm_for(codecs.FP16(), 1 << 20) == "ring"  # fp16 sums overflow; gloo's is slow


def test_tensor_ids_come_from_names_or_positions():
    assert tensor_id("layer1", 3) == tensor_id("layer1", 7) != tensor_id("layer2", 3)
    assert tensor_id("", 3) == 3


def test_finiteness_check_raises_on_inf_nan_only():
    codec = codecs.Int8()
    check_finite(codec, torch.full((1000,), 3e38))  # the sum overflows, the values are finite
    for bad in (float("inf"), float("nan")):
        x = torch.zeros(100)
        x[17] = bad
        with pytest.raises(ValueError, match="inf/nan"):
            check_finite(codec, x)
    check_finite(codecs.Int8(nonfinite="propagate"), torch.tensor([float("nan")]))


def test_error_feedback_rules_across_epochs_and_pending_steps():
    ef = ErrorFeedback(codecs.Int8())
    ef.compress("k", torch.ones(300), 0)
    with pytest.raises(RuntimeError, match=r"ef.commit\(\)"):
        Feedback(ef, "k", 300, epoch=1)
    ef.commit()
    residual = ef.state("k", "e").clone()
    Feedback(ef, "k", 300, epoch=1)
    Feedback(ef, "k", 300, epoch=2)  # per-worker residual survives a new epoch
    assert torch.equal(ef.state("k", "e"), residual)

    ef21 = EF21(codecs.Int8())
    ef21.compress("k", torch.ones(300), 0)
    ef21.aggregate("k", torch.ones(300))
    ef21.commit()
    Feedback(ef21, "k", 300, epoch=5)  # first use in epoch 5: replicated H restarts at zero
    assert ef21.state("k", "H") is None
    ef21.compress("k", torch.ones(300), 0)
    ef21.aggregate("k", torch.ones(300))
    ef21.commit()
    Feedback(ef21, "k", 300, epoch=5)  # same epoch: kept
    assert ef21.state("k", "H") is not None


def test_choose_respects_the_error_budget_and_link_speed():
    big = 64 << 20
    slow = lc.codecs.choose(0.1, big, max_error=0.01)
    assert isinstance(slow, codecs.Int8)
    assert lc.codecs.choose(1000.0, big, max_error=0.01) is None  # very fast link: exact wins
    assert lc.codecs.choose(1.0, big, max_error=0.0) is None
    assert lc.codecs.choose(1.0, big, max_error=1.0) is not None
    assert lc.codecs.choose(1.0, 0) is None and lc.codecs.choose(1.0, big, world=1) is None
    for budget in (0.0, 0.005, 0.01, 0.2, 1.0):
        for link in (0.1, 1.0, 10.0):
            codec = lc.codecs.choose(link, big, max_error=budget)
            cost = next(c for c in MEASURED if (c.spec is None) == (codec is None)
                        and (codec is None or c.spec == codec.spec() or c.spec["name"] == codec.name))  # fmt: skip
            assert cost.rel_error <= budget
    with pytest.raises(ValueError):
        lc.codecs.choose(0.0, big)
    with pytest.raises(ValueError):
        lc.codecs.choose(1.0, -1)
    assert all(math.isfinite(c.seconds(1.0, big)) for c in MEASURED)
