"""DiLoCo with one real worker (in-process coordinator and manager): the protocol against the
arithmetic it must reduce to, and checkpoint/resume."""

from __future__ import annotations

import pytest
import torch

import lococomm as lc
from lococomm.algorithms.diloco import DiLoCo
from lococomm.algorithms.outer import OuterSGD


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 8, generator=g)
    return x, x.sum(1, keepdim=True)


def _inner_step(model, opt, x, y) -> None:
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture
def manager(coordinator_factory):
    coordinator = coordinator_factory()
    with lc.Manager(coordinator.address, replica_id="solo", timeout=10) as m:
        yield m


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant", [dict(), dict(fragments=2), dict(fragments=2, delayed=True)])
def test_one_worker_with_a_unit_outer_step_is_plain_local_training(manager, variant):
    """With one member the mean pseudo-gradient is G - L: an outer SGD step with lr 1 and no
    momentum lands exactly on L (up to rounding), whatever the schedule; delayed mode must
    keep the progress made while an exchange was in flight."""
    model, ref = _model(), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    diloco = DiLoCo(model, opt, manager, sync_every=4, outer_optimizer=OuterSGD(lr=1.0, momentum=0.0),
                    **variant)
    x, y = _data()
    for _ in range(22):
        _inner_step(model, opt, x, y)
        _inner_step(ref, ref_opt, x, y)
        diloco.step()
    diloco.finish()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert diloco.metrics.syncs == (5 if "fragments" not in variant else 11)
    assert diloco.metrics.failed == 0 and diloco.metrics.bytes_total == 0  # nobody to talk to
    assert manager.metrics.extra["diloco"]["syncs"] == diloco.metrics.syncs


@pytest.mark.timeout(60)
def test_outer_momentum_moves_the_global_model_past_the_local_one(manager):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    diloco = DiLoCo(model, opt, manager, sync_every=5)  # lr 0.7, Nesterov 0.9
    x, y = _data()
    before = [g.clone() for g in diloco.global_parameters()]
    for _ in range(5):
        _inner_step(model, opt, x, y)
        local = [p.detach().clone() for p in model.parameters()]
        diloco.step()
    # first outer step: u = d + 0.9 d = 1.9 d, G <- G - 0.7 u = G - 1.33 (G - L)
    flat_local = torch.cat([p.reshape(-1) for p in local])
    expected = before[0] - 1.33 * (before[0] - flat_local)
    torch.testing.assert_close(diloco.global_parameters()[0], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                       diloco.global_parameters()[0])  # plain DiLoCo: L <- G
    with diloco.global_model() as m:
        assert m is model
    assert diloco.syncs == 2  # bootstrap + one exchange


def _run(coordinator, steps: int, state=None, replica="solo"):
    """Train `steps` inner steps (continuing from `state` if given); returns the state."""
    model = _model(seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = _data()
    with lc.Manager(coordinator.address, replica_id=replica, timeout=10) as m:
        diloco = DiLoCo(model, opt, m, sync_every=5, fragments=1, join=False)
        if state is not None:
            diloco.load_state_dict(state)
        diloco.join()
        start = diloco.inner_step
        while diloco.inner_step < start + steps:
            _inner_step(model, opt, x, y)
            diloco.step()
        diloco.finish()
        return diloco.state_dict(), m.step


@pytest.mark.timeout(90)
def test_checkpoint_resume_continues_bit_identically(coordinator_factory):
    straight, steps_straight = _run(coordinator_factory(), 30)
    half, _ = _run(coordinator_factory(), 15)
    half = {**half}  # resumed in a fresh job (new coordinator), as after a full restart
    resumed, steps_resumed = _run(coordinator_factory(), 15, state=half)
    assert resumed["inner_step"] == straight["inner_step"] == 30
    assert steps_resumed == steps_straight  # the manager's step was resumed, not restarted
    for a, b in zip(straight["global"]["global"], resumed["global"]["global"]):
        assert torch.equal(a, b)
    for a, b in zip(straight["local"], resumed["local"]):
        assert torch.equal(a, b)
    assert straight["global"]["syncs"] == resumed["global"]["syncs"] == 7


@pytest.mark.timeout(60)
def test_load_state_dict_after_join_is_refused(manager):
    model = _model()
    diloco = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), manager, sync_every=5)
    with pytest.raises(RuntimeError, match="before join"):
        diloco.load_state_dict(diloco.state_dict())
    with pytest.raises(RuntimeError, match="already"):
        diloco.join()
