"""The pure parts of the compressed collectives: ring schedule, hop codec, seeds, choose();
and the native cast path against a scripted process group."""

from __future__ import annotations

import math

import pytest
import torch

import lococomm as lc
from lococomm.collectives import compressed
from lococomm.collectives.compressed import algorithm_for, tensor_id
from lococomm.collectives.feedback import Feedback
from lococomm.collectives.finite import check_finite
from lococomm.collectives.hop_codec import HopCodec
from lococomm.collectives.ring_plan import plan_ring
from lococomm.compress import EF21, ErrorFeedback, codecs
from lococomm.compress.choose import MEASURED
from scripted_group import ScriptedGroup, scripted_communicator


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


@pytest.mark.parametrize(
    "codec",
    [codecs.FP16(), codecs.FP8E4M3(), codecs.Int8(), codecs.Int4(rounding="stochastic"),
     codecs.Int2(), codecs.Int8(block=20)],
    ids=lambda c: f"{c.name}-{getattr(c, 'block', '')}",
)  # fmt: skip
@pytest.mark.parametrize("n", [1, 7, 1000, 4099, 70_001])
def test_fused_hop_equals_decode_add_reencode(codec, n):
    """A hop given the received message (one kernel pass for block quantisers) sends the bytes
    and keeps the error of: acc = x + D(received); encode acc (+ state)."""
    hop = HopCodec(codec)
    gen = torch.Generator().manual_seed(n)
    x, state = torch.randn(n, generator=gen), 0.1 * torch.randn(n, generator=gen)
    received = torch.empty(hop.message_bytes(n), dtype=torch.uint8)
    hop.encode(torch.randn(n, generator=gen), 0, 7, received)
    for xin in (x, x.to(torch.bfloat16)):
        fused, err = torch.zeros_like(received), torch.empty(n)  # zeros: padding compares
        hop.encode(xin, 256, 5, fused, state=state, err=err, received=received)
        acc = xin.to(torch.float32, copy=True)
        hop.accumulate(acc, received)
        two_step, err2 = torch.zeros_like(received), torch.empty(n)
        hop.encode(acc, 256, 5, two_step, state=state, err=err2)
        assert torch.equal(fused, two_step)
        assert torch.equal(err.view(torch.int32), err2.view(torch.int32))


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


def test_requested_algorithm_overrides_the_size_rule_or_says_why_not():
    assert algorithm_for(codecs.Int4(), 100, requested="ring") == "ring"  # fewest bytes
    assert algorithm_for(codecs.Int4(), 100, "ef", requested="ring") == "ring"
    assert algorithm_for(codecs.Int8(), 1 << 20, requested="allgather") == "allgather"
    assert algorithm_for(codecs.Identity(), 100, requested="ring") == "native"
    assert algorithm_for(codecs.RandK(0.01), 100, requested="ring") == "randk"
    with pytest.raises(ValueError, match="summable codec"):
        algorithm_for(codecs.TopK(0.01), 1 << 20, requested="ring")
    with pytest.raises(ValueError, match="ef21"):
        algorithm_for(codecs.Int8(), 1 << 20, "ef21", requested="ring")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        algorithm_for(codecs.Int8(), 1 << 20, requested="tree")


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


# ---------------------------------------------------------------------------------------------
# Casts summed by gloo itself (native.py, exact.py's owned path for Identity), against a
# scripted 2-member process group: outcomes, and the caller's tensor on every failure.
# ---------------------------------------------------------------------------------------------
def _allreduce(comm, tensor, codec, ef=None):
    return compressed.allreduce(comm, tensor, "mean", codec, ef, verify=False).wait()


N_CHUNKED = 3 << 20  # 12 MiB of fp32: several pipelined chunks


def test_identity_on_an_owned_tensor_runs_in_place_prescaled():
    t = torch.randn(N_CHUNKED)
    want = t.clone()
    group, failures = ScriptedGroup([]), []
    assert _allreduce(scripted_communicator(group, failures), t, codecs.Identity())
    assert not failures and len(group.issued) >= 2
    # the chunks handed to gloo are the caller's memory, divided by W before the sum
    assert all(x.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for x in group.issued)
    assert torch.equal(t, want)  # (x / 2) * 2 == x: the mean of two equal members


def test_identity_rejects_nonfinite_input_and_restores_the_tensor():
    t = torch.randn(N_CHUNKED)
    t[-5] = float("nan")  # in the last chunk: earlier chunks were already scaled and summed
    want = t.clone()
    group, failures = ScriptedGroup([]), []
    comm = scripted_communicator(group, failures)
    assert not _allreduce(comm, t, codecs.Identity())
    assert failures and "inf/nan" in failures[0]
    assert torch.equal(t.view(torch.int32), want.view(torch.int32))
    assert len(comm.graveyard) == 0


def test_identity_abandoned_op_moves_the_tensor_to_its_backup():
    t = torch.randn(N_CHUNKED)
    want = t.clone()
    group, failures = ScriptedGroup(["ok", "hang"]), []
    comm = scripted_communicator(group, failures, timeout=0.05)
    old_ptr = t.untyped_storage().data_ptr()
    assert not _allreduce(comm, t, codecs.Identity())
    assert failures and "timed out" in failures[0]
    assert t.untyped_storage().data_ptr() != old_ptr  # the hung op keeps the old storage
    assert torch.equal(t, want) and len(comm.graveyard) == 1


@pytest.mark.parametrize("codec", [codecs.BF16(), codecs.Identity()])
def test_native_cast_on_a_view_decodes_once_everything_arrived(codec):
    base = torch.randn(2, N_CHUNKED)
    t = base[1]  # a view: not exclusively owned, so the private wire buffer path
    x = t.clone()
    group, failures = ScriptedGroup([]), []
    assert _allreduce(scripted_communicator(group, failures), t, codec)
    assert not failures
    want = x.to(torch.bfloat16).float() if isinstance(codec, codecs.BF16) else x
    assert torch.equal(t, want)  # 2 * cast(x) / 2
    assert all(b.untyped_storage().data_ptr() != base.untyped_storage().data_ptr() for b in group.issued)


def test_native_failure_leaves_tensor_and_error_feedback_untouched():
    base = torch.randn(2, N_CHUNKED)
    t = base[0]
    want = t.clone()
    ef = ErrorFeedback(codecs.Identity())
    group, failures = ScriptedGroup(["ok", "error"]), []
    comm = scripted_communicator(group, failures)
    assert not _allreduce(comm, t, codecs.Identity(), ef)
    assert failures and "peer failure" in failures[0]
    assert torch.equal(t, want)
    assert ef.state("allreduce#0", "e") is None and not ef._pending  # nothing staged
