"""L-GreCo-style planning: the dynamic program is optimal (checked by brute force) and feasible,
and Adaptive re-plans per tensor from measured errors."""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch

from lococomm import ops
from lococomm.compress import Adaptive, codecs, lgreco_plan

pytestmark = pytest.mark.timeout(60)
# Load (on a fresh machine: compile, ~35 s once) the kernels at collection time, outside the
# per-test timeouts.
ops.backend("cpu")


def brute_force(errors, sizes, budget):
    best = None
    for plan in itertools.product(*[range(len(e)) for e in errors]):
        err = sum(errors[i][c] for i, c in enumerate(plan))
        size = sum(sizes[i][c] for i, c in enumerate(plan))
        if err <= budget and (best is None or size < best):
            best = size
    return best


def test_dp_is_feasible_and_optimal_up_to_the_discretisation():
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        layers, options = 5, 3
        errors = torch.rand(layers, options, generator=g).tolist()
        sizes = torch.randint(1, 100, (layers, options), generator=g).tolist()
        budget = float(torch.rand(1, generator=g)) * 3 + 0.5
        resolution = 500
        plan = lgreco_plan(errors, sizes, budget, resolution=resolution)
        opt = brute_force(errors, sizes, budget)
        if opt is None:
            continue
        err = sum(errors[i][c] for i, c in enumerate(plan))
        size = sum(sizes[i][c] for i, c in enumerate(plan))
        assert err <= budget + 1e-12, trial
        assert size >= opt
        # every plan within budget - layers * unit is visible to the DP
        tighter = brute_force(errors, sizes, budget - layers * budget / resolution)
        if tighter is not None:
            assert size <= tighter, trial


def test_exact_options_and_infeasible_budgets(caplog):
    errors = [[0.0, 1.0], [0.0, 2.0]]
    sizes = [[10, 1], [10, 1]]
    assert lgreco_plan(errors, sizes, 0.0) == [0, 0]
    assert lgreco_plan(errors, sizes, 1.0) == [1, 0]
    assert lgreco_plan(errors, sizes, 3.01) == [
        1,
        1,
    ]  # errors round up: L * budget / resolution slack
    with caplog.at_level(logging.WARNING, logger="lococomm"):
        assert lgreco_plan([[1.0, 2.0]], [[5, 1]], 0.5) == [0]
    assert "infeasible" in caplog.text
    with pytest.raises(ValueError, match="shape"):
        lgreco_plan([[1.0]], [[1, 2]], 1.0)
    with pytest.raises(ValueError, match="budget"):
        lgreco_plan([[1.0]], [[1]], float("nan"))


def layers():
    """Tensors whose int2/int4 errors differ: smooth ones quantise well, spiky ones badly."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for i in range(6):
        x = torch.randn(4096, generator=g)
        if i % 2:  # heavy-tailed: a few large values per block blow up absmax quantisation
            x = x * torch.rand(4096, generator=g).pow(8) * 10
        out[f"layer{i}"] = x
    return out


def test_adaptive_meets_the_budget_with_fewer_bytes_than_uniform_int8():
    cands = [codecs.Int8(), codecs.Int4(), codecs.Int2()]
    budget = 0.003
    ad = Adaptive(cands, budget, replan_every=3, default=0)
    tensors = layers()
    for step in range(4):
        for k, x in tensors.items():
            p = ad.encode(k, x, seed=step)
            assert p.meta["choice"] == ad.plan().get(k, 0) and ad.decode(p).shape == x.shape
        replanned = ad.step()
        assert replanned == (step % 3 == 0)
    plan = ad.plan()
    json.dumps(plan)
    assert set(plan) == set(tensors) and len(set(plan.values())) > 1
    err = sum(
        float((cands[plan[k]].decode(cands[plan[k]].encode(x)) - x).square().sum())
        for k, x in tensors.items()
    )
    norm = sum(float(x.square().sum()) for x in tensors.values())
    assert err <= budget * norm
    size = sum(cands[plan[k]].wire_bytes(cands[plan[k]].encode(x)) for k, x in tensors.items())
    int8 = sum(cands[0].wire_bytes(cands[0].encode(x)) for x in tensors.values())
    assert size < 0.8 * int8


def test_plan_transfer_and_validation():
    cands = [codecs.Int8(), codecs.Int4()]
    a = Adaptive(cands, 0.01, replan_every=1)
    for k, x in layers().items():
        a.encode(k, x)
    a.step()
    b = Adaptive(cands, 0.01, replan_every=1)
    sd = a.state_dict()
    b.load_state_dict({"meta": json.loads(json.dumps(sd["meta"])), "tensors": sd["tensors"]})
    assert b.plan() == a.plan()
    with pytest.raises(ValueError, match="candidate index"):
        b.set_plan({"layer0": 5})
    with pytest.raises(ValueError, match="different candidates"):
        Adaptive([codecs.Int2()], 0.01).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="choice"):
        a.decode(codecs.Int8().encode(torch.randn(4)))
