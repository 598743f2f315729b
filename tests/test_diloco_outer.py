"""The DiLoCo family's maths without processes: schedule, fragments, outer step, merges,
decayed error feedback, replicated-state round trips and argument checks."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lococomm.algorithms.diloco import DiLoCo
from lococomm.algorithms.diloco_state import FragmentParams, GlobalState
from lococomm.algorithms.outer import (
    OuterSGD,
    Schedule,
    assign_fragments,
    decayed_contribution,
    layer_key,
    mix_,
    outer_sgd_,
    rebase_,
)
from lococomm.compress import codecs
from lococomm.compress.error_feedback import EF21, ErrorFeedback
from lococomm.ft.manager import StepMetrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import charlm


# ---------------------------------------------------------------------------- schedule
def test_streaming_schedule_syncs_each_fragment_every_h_steps_in_turn():
    s = Schedule(sync_every=8, fragments=4, overlap=2)
    assert s.period == 2
    starts = [t for t in range(1, 33) if s.starts_at(t)]
    assert starts == list(range(2, 33, 2))
    frags = [s.fragment_at(t) for t in starts]
    assert frags == [0, 1, 2, 3] * 4
    for f in range(4):  # the same fragment comes back exactly every H steps
        at = [t for t in starts if s.fragment_at(t) == f]
        assert all(b - a == 8 for a, b in itertools.pairwise(at))
    assert not s.starts_at(0) and s.next_start(0) == 2 and s.next_start(2) == 4 and s.next_start(3) == 4
    with pytest.raises(ValueError, match="no exchange starts"):
        s.fragment_at(3)


def test_uneven_streaming_schedule_staggers_as_evenly_as_h_allows():
    s = Schedule(sync_every=50, fragments=4, overlap=2)
    assert s.offsets == (12, 25, 37, 50) and s.period == 12
    starts = [t for t in range(1, 151) if s.starts_at(t)]
    assert starts == [12, 25, 37, 50, 62, 75, 87, 100, 112, 125, 137, 150]
    assert [s.fragment_at(t) for t in starts] == [0, 1, 2, 3] * 3
    assert [s.next_start(t) for t in (0, 11, 12, 49, 50, 51)] == [12, 12, 25, 50, 62, 62]
    assert s.finish_at(25) == 27
    delayed = Schedule(sync_every=50, fragments=4, delayed=True)
    assert [delayed.finish_at(t) for t in (12, 25, 37, 50)] == [25, 37, 50, 62]
    assert delayed.overlapped and not Schedule(50).overlapped


def test_plain_schedule_is_one_fragment_every_h_steps():
    s = Schedule(50)
    assert [t for t in range(1, 201) if s.starts_at(t)] == [50, 100, 150, 200]
    assert {s.fragment_at(t) for t in (50, 100)} == {0}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sync_every=10, fragments=11), r"fragments must be an int in \[1, sync_every=10\]"),
        (dict(sync_every=8, delayed=True, overlap=1), "delayed"),
        (dict(sync_every=8, fragments=4, overlap=3), r"overlap_steps must be an int in \[0, 2\]"),
        (dict(sync_every=0), "positive int"),
        (dict(sync_every=8, fragments=0), "fragments must be"),
        (dict(sync_every=8, overlap=-1), "overlap_steps"),
    ],
)
def test_schedule_rejects_inconsistent_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


# ---------------------------------------------------------------------------- fragments
def test_layer_key_finds_the_numbered_layer():
    assert layer_key("blocks.layers.3.linear1.weight") == "blocks.layers.3"
    assert layer_key("h.12.attn.bias") == "h.12"
    assert layer_key("embed.weight") is None and layer_key("position") is None


def test_fragments_stripe_layers_and_balance_the_rest():
    model = charlm.CharModel(context=16, width=32, layers=4, heads=2)
    named = [(n, p) for n, p in model.named_parameters()]
    names, numels = [n for n, _ in named], [p.numel() for _, p in named]
    groups = assign_fragments(names, numels, 4)
    assert sorted(i for g in groups for i in g) == list(range(len(names)))  # each exactly once
    for f, g in enumerate(groups):
        layers = {layer_key(names[i]) for i in g} - {None}
        assert layers == {f"blocks.layers.{f}"}  # block f -> fragment f
        assert g == sorted(g)
    sizes = [sum(numels[i] for i in g) for g in groups]
    loose = [numels[i] for i, n in enumerate(names) if layer_key(n) is None]
    assert max(sizes) - min(sizes) <= max(loose)  # greedy: loose ones went to the smallest
    assert assign_fragments(names, numels, 4) == groups  # deterministic
    assert assign_fragments(names, numels, 1) == [list(range(len(names)))]


def test_fragments_refuse_to_leave_one_empty():
    with pytest.raises(ValueError, match="would be empty"):
        assign_fragments(["a.weight", "b.weight"], [4, 4], 3)
    with pytest.raises(ValueError, match="no trainable"):
        assign_fragments([], [], 1)


# ---------------------------------------------------------------------------- outer step
def test_outer_sgd_matches_torch_sgd_nesterov():
    torch.manual_seed(0)
    g = torch.randn(1000)
    ref = g.clone().requires_grad_(False)
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    m = torch.zeros(1000)
    for _ in range(5):
        delta = torch.randn(1000)
        outer_sgd_(g, m, delta, OuterSGD())
        ref.grad = delta.clone()
        opt.step()
    torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-6)


def test_outer_sgd_without_momentum_is_a_plain_step_and_clip_bounds_momentum():
    g, delta = torch.ones(10), torch.full((10,), 0.5)
    outer_sgd_(g, None, delta, OuterSGD(lr=1.0, momentum=0.0))
    assert torch.equal(g, torch.full((10,), 0.5))
    m = torch.zeros(10)
    g = torch.zeros(10)
    for _ in range(20):
        outer_sgd_(g, m, torch.full((10,), 1.0), OuterSGD(lr=0.1, momentum=0.9, clip=2.0))
        assert m.abs().max() <= 2.0
    with pytest.raises(ValueError, match="momentum buffer"):
        outer_sgd_(g, None, delta, OuterSGD())
    with pytest.raises(ValueError, match="outer lr"):
        OuterSGD(lr=0.0)
    with pytest.raises(ValueError, match="momentum"):
        OuterSGD(momentum=1.0)


def test_merges():
    local, glob, snap = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0]), torch.tensor([0.5, 1.0])
    assert torch.equal(mix_(local.clone(), glob, 1.0), glob)
    assert torch.equal(mix_(local.clone(), glob, 0.5), torch.tensor([2.0, 4.0]))
    # rebase keeps the progress made since the snapshot (local - snap) on top of global
    assert torch.equal(rebase_(local.clone(), glob, snap), torch.tensor([3.5, 7.0]))


def test_decayed_error_feedback_encodes_delta_plus_decayed_residual():
    torch.manual_seed(1)
    ef = ErrorFeedback(codecs.Int2())
    codec = ef.codec
    first = torch.randn(512)
    ef.compress("k", first)
    ef.commit()
    e = ef.state("k", "e").clone()
    assert e.abs().sum() > 0
    delta = torch.randn(512)
    x = decayed_contribution(delta.clone(), ef.state("k", "e"), 0.9)
    payload = ef.compress("k", x)
    ef.commit()
    # EF invariant: what was encoded = decoded + new residual; it must be delta + 0.9 e
    encoded = codec.decode(payload).reshape(-1) + ef.state("k", "e")
    torch.testing.assert_close(encoded, delta + 0.9 * e, rtol=1e-5, atol=1e-5)
    same = torch.randn(4)
    assert decayed_contribution(same, None, 0.9) is same


# ---------------------------------------------------------------------------- replicated state
def _fragments(model, parts):
    params = list(model.parameters())
    return [FragmentParams([params[i] for i in g]) for g in parts]


def test_global_state_round_trip_and_layout_checks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    a = GlobalState(_fragments(model, [[0, 1], [2, 3]]), OuterSGD())
    a.apply(0, torch.randn(a.fragments[0].numel))
    a.syncs = 7
    b = GlobalState(_fragments(model, [[0, 1], [2, 3]]), OuterSGD())
    b.load_state_dict(a.state_dict())
    assert b.syncs == 7 and b.outer_steps == 1
    for x, y in zip(a.global_params + a.momentum, b.global_params + b.momentum):
        assert torch.equal(x, y)
    other = GlobalState(_fragments(model, [[0, 1, 2, 3]]), OuterSGD())
    with pytest.raises(ValueError, match="fragments of"):
        other.load_state_dict(a.state_dict())
    c = GlobalState(_fragments(model, [[0, 1], [2, 3]]), OuterSGD(lr=0.5))
    with pytest.raises(ValueError, match="config"):
        c.load_state_dict(a.state_dict())


def test_global_state_with_a_torch_outer_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    a = GlobalState(_fragments(model, [[0, 1]]), lambda ps: torch.optim.Adam(ps, lr=0.1))
    a.apply(0, torch.randn(15))
    b = GlobalState(_fragments(model, [[0, 1]]), lambda ps: torch.optim.Adam(ps, lr=0.1))
    b.load_state_dict(a.state_dict())
    delta = torch.randn(15)
    a.apply(0, delta)
    b.apply(0, delta.clone())
    assert torch.equal(a.global_params[0], b.global_params[0])
    with pytest.raises(TypeError, match=r"must return a torch\.optim\.Optimizer"):
        GlobalState(_fragments(model, [[0, 1]]), lambda ps: None)
    sgd = GlobalState(_fragments(model, [[0, 1]]), OuterSGD())
    with pytest.raises(ValueError, match="outer optimizer"):
        sgd.load_state_dict(a.state_dict())


# ---------------------------------------------------------------------------- argument checks
def _fake_manager():
    return SimpleNamespace(register_state=lambda name, obj: None, metrics=StepMetrics())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mix=0.0), ValueError, "mix"),
        (dict(mix=1.5), ValueError, "mix"),
        (dict(delayed=True, overlap_steps=1), ValueError, "overlap_steps"),
        (dict(delayed=True, mix=0.5), ValueError, "mix"),
        (dict(feedback_decay=0.9), ValueError, "classic error feedback"),
        (dict(codec=codecs.Int4(), error_feedback=EF21(codecs.Int4()), feedback_decay=0.9), ValueError,
         "classic error feedback"),
        (dict(staleness_penalty=0.5), ValueError, "staleness_penalty"),
        (dict(error_feedback=True), ValueError, "needs a codec"),
        (dict(codec="int4"), TypeError, "Codec"),
        (dict(codec=codecs.Int4(), error_feedback=ErrorFeedback(codecs.Int8())), ValueError, "wraps"),
        (dict(fragments=11), ValueError, "fragments must be"),
        (dict(fragments=2, overlap_steps=6), ValueError, "overlap_steps"),
        (dict(outer_optimizer="sgd"), TypeError, "outer_optimizer"),
    ],
)
def test_diloco_rejects_bad_arguments(kwargs, error, match):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error, match=match):
        DiLoCo(model, opt, _fake_manager(), sync_every=10, join=False, **kwargs)


def test_diloco_before_join_refuses_to_step():
    model = torch.nn.Linear(4, 4)
    d = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), _fake_manager(), 10, join=False)
    with pytest.raises(RuntimeError, match="join"):
        d.step()
    assert d.fragment_sizes == [20] and d.inner_step == 0 and not d.in_flight
