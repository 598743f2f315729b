"""DataParallel semantics with two members (threads of this process, real gloo groups)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lococomm as lc
from dp_helpers import average, batch, grads, init_, loss_of, member_grads, mlp, params, run_members
from lococomm.algorithms.data_parallel import DataParallel
from lococomm.algorithms.optimizer import Optimizer
from lococomm.compress import ErrorFeedback

SMALL = dict(bucket_mb=0.01, first_bucket_mb=0.002)  # several buckets on a small MLP


@pytest.fixture(autouse=True)
def _one_thread():
    """Bit-exact references need the same matmul kernels as the members (one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def coordinator(coordinator_factory):
    return coordinator_factory(heartbeat_timeout=2.0, initial_workers=2)


@pytest.mark.timeout(60)
def test_averaged_grads_and_updates_bit_equal_single_process_reference(coordinator):
    steps, lr = 3, 0.1

    def member(r, manager):
        net = mlp()
        model = DataParallel(net, manager, **SMALL)
        opt = Optimizer(torch.optim.SGD(net.parameters(), lr=lr), manager)
        rows = []
        for s in range(steps):
            opt.zero_grad()
            loss_of(model(batch(r, s))).backward()
            launched = model.metrics
            assert opt.step()
            rows.append((grads(net), params(net), launched.launched_in_backward))
        return rows, len(model.buckets)

    (rows0, n_buckets), (rows1, _) = run_members(coordinator, 2, member)
    assert n_buckets >= 3
    state = params(mlp())
    for s in range(steps):
        want = average([member_grads(mlp, state, [batch(r, s)]) for r in range(2)])
        for rows in (rows0, rows1):
            got_grads, _, launched = rows[s]
            assert all(torch.equal(g, w) for g, w in zip(got_grads, want)), s
            assert launched == n_buckets  # every bucket went out from a backward hook
        state = [p.add(g, alpha=-lr) for p, g in zip(state, want)]  # SGD's update op
        for rows in (rows0, rows1):
            assert all(torch.equal(p, w) for p, w in zip(rows[s][1], state)), s


@pytest.mark.timeout(60)
def test_grads_are_views_into_the_buckets_and_stay_views_across_steps(coordinator):
    def member(r, manager):
        net = mlp()
        model = DataParallel(net, manager, **SMALL)
        opt = Optimizer(torch.optim.SGD(net.parameters(), lr=0.1), manager)
        storages = set()
        for s in range(2):
            opt.zero_grad()  # torch's zero_grad(set_to_none=True) runs inside; views come back
            loss_of(model(batch(r, s))).backward()
            assert opt.step()
            for buf in model.bucket_buffers:
                storages.add(buf.untyped_storage().data_ptr())
            assert model.grads_are_views()
            for p in net.parameters():
                ptr = p.grad.untyped_storage().data_ptr()
                assert any(ptr == b.untyped_storage().data_ptr() for b in model.bucket_buffers)
        return len(storages), len(model.buckets)

    for n_storages, n_buckets in run_members(coordinator, 2, member):
        assert n_storages == n_buckets  # no re-allocation without failures


@pytest.mark.timeout(60)
def test_no_sync_accumulates_locally_then_one_exchange_averages_the_sums(coordinator):
    micro = 3

    def member(r, manager):
        net = mlp()
        model = DataParallel(net, manager, **SMALL)
        opt = Optimizer(torch.optim.SGD(net.parameters(), lr=0.1), manager)
        opt.zero_grad()
        before = manager.communicator.bytes_sent
        with model.no_sync():
            for k in range(micro - 1):
                loss_of(model(batch(r, 0, k))).backward()
        silent = manager.communicator.bytes_sent == before
        loss_of(model(batch(r, 0, micro - 1))).backward()
        assert opt.step()
        return grads(net), silent

    results = run_members(coordinator, 2, member)
    state = params(mlp())
    want = average([member_grads(mlp, state, [batch(r, 0, k) for k in range(micro)]) for r in range(2)])
    for got, silent in results:
        assert silent, "no_sync() must not communicate"
        assert all(torch.equal(g, w) for g, w in zip(got, want))


class Branchy(nn.Module):
    """Member-dependent control flow, a never-used layer and a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 16)
        self.b = nn.Linear(32, 16)
        self.never = nn.Linear(32, 16)
        self.frozen = nn.Linear(32, 16)
        self.frozen.requires_grad_(False)
        init_(self)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        y = self.a(x) + self.frozen(x)
        return y + self.b(x) if use_b else y


@pytest.mark.timeout(60)
@pytest.mark.parametrize("find_unused", [False, True])
def test_unused_and_frozen_parameters(coordinator, find_unused):
    def member(r, manager):
        net = Branchy()
        frozen_before = params(net.frozen)
        model = DataParallel(net, manager, find_unused_parameters=find_unused, **SMALL)
        opt = Optimizer(torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1), manager)
        opt.zero_grad()
        loss_of(model(batch(r, 0), use_b=(r == 1))).backward()
        assert opt.step()
        assert all(torch.equal(p, q) for p, q in zip(params(net.frozen), frozen_before))
        return {name: None if p.grad is None else p.grad.clone() for name, p in net.named_parameters()}

    results = run_members(coordinator, 2, member)
    ref = Branchy()
    per_member = []
    for r in range(2):
        ref.zero_grad(set_to_none=True)
        loss_of(ref(batch(r, 0), use_b=(r == 1))).backward()
        per_member.append({n: p.grad for n, p in ref.named_parameters()})
    for got in results:
        assert got["frozen.weight"] is None and got["frozen.bias"] is None
        for name in ("a.weight", "a.bias"):
            assert torch.equal(got[name], (per_member[0][name] + per_member[1][name]) / 2)
        for name in ("b.weight", "b.bias"):  # used by member 1 only: its gradient over 2
            assert torch.equal(got[name], per_member[1][name] / 2)
        for name in ("never.weight", "never.bias"):
            if find_unused:
                assert got[name] is None  # optimizers skip it, as with torch DDP
            else:
                assert torch.equal(got[name], torch.zeros_like(got[name]))


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f32 = nn.Linear(32, 32)
        self.f64 = nn.Linear(32, 32).double()
        self.bf16 = nn.Linear(32, 8).to(torch.bfloat16)
        init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bf16(self.f64(self.f32(x).double()).to(torch.bfloat16))


@pytest.mark.timeout(60)
def test_mixed_dtypes_get_their_own_buckets_and_exact_averages(coordinator):
    def member(r, manager):
        net = Mixed()
        model = DataParallel(net, manager, **SMALL)
        opt = Optimizer(torch.optim.SGD(net.parameters(), lr=0.1), manager)
        opt.zero_grad()
        loss_of(model(batch(r, 0))).backward()
        assert opt.step()
        return grads(net), [b.dtype for b in model.buckets]

    results = run_members(coordinator, 2, member)
    state = params(Mixed())
    want = average([member_grads(Mixed, state, [batch(r, 0)]) for r in range(2)])
    for got, dtypes in results:
        assert set(dtypes) == {"torch.float32", "torch.float64", "torch.bfloat16"}
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            if g.dtype == torch.bfloat16:  # gloo adds in bf16; the reference rounds once more
                torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-3)
            else:
                assert torch.equal(g, w)


@pytest.mark.timeout(90)
def test_int8_with_error_feedback_is_bit_identical_on_members_and_close_to_exact(coordinator):
    def member(r, manager):
        net = mlp()
        ef = ErrorFeedback(lc.codecs.Int8())
        model = DataParallel(net, manager, codec=lc.codecs.Int8(), error_feedback=ef, **SMALL)
        opt = Optimizer(torch.optim.SGD(net.parameters(), lr=0.1), manager)
        out = []
        for s in range(3):
            opt.zero_grad()
            state = params(net)
            loss_of(model(batch(r, s))).backward()
            assert opt.step()
            assert ef.pending_keys() == []  # the EF transaction was committed
            out.append((state, grads(net), model.metrics.launched_in_backward))
        keys = sorted({k for k in ef.state_dict()["tensors"]})
        return out, keys, len(model.buckets), manager.metrics.compressed.get("calls", 0)

    results = run_members(coordinator, 2, member)
    (out0, keys, n_buckets, calls), (out1, _, _, _) = results
    assert keys == sorted(f"e/bucket{i}" for i in range(n_buckets))
    assert calls == 3 * n_buckets
    for s in range(3):
        state0, g0, launched = out0[s]
        _, g1, _ = out1[s]
        assert launched == n_buckets  # handed to the comm thread during backward
        assert all(torch.equal(a, b) for a, b in zip(g0, g1))  # same bytes on every member
        if s == 0:  # no residual yet: the int8 mean is within quantisation error of the truth
            exact = average([member_grads(mlp, state0, [batch(r, s)]) for r in range(2)])
            for g, w in zip(g0, exact):
                assert (g - w).abs().max() <= 0.02 * w.abs().max() + 1e-6


@pytest.mark.timeout(60)
def test_failed_step_applies_nothing_zeroes_grads_and_next_step_commits(coordinator):
    def member(r, manager):
        net = mlp()
        model = DataParallel(net, manager, **SMALL)
        opt = Optimizer(torch.optim.SGD(net.parameters(), lr=0.1), manager)
        opt.zero_grad()
        before = params(net)
        loss_of(model(batch(r, 0))).backward()
        if r == 1:
            manager.fail_step("test: member 1 gives up")
        committed = opt.step()
        unchanged = all(torch.equal(p, q) for p, q in zip(params(net), before))
        zero = all(not p.grad.any() for p in net.parameters())
        opt.zero_grad()  # re-forms the group
        loss_of(model(batch(r, 0))).backward()
        retried = opt.step()
        return committed, unchanged, zero, retried, manager.step

    for committed, unchanged, zero, retried, step in run_members(coordinator, 2, member):
        assert (committed, unchanged, zero, retried, step) == (False, True, True, True, 1)


@pytest.mark.timeout(60)
def test_members_with_different_bucket_layouts_fail_with_a_clear_message(coordinator):
    def member(r, manager):
        net = mlp()
        model = DataParallel(net, manager, bucket_mb=0.01 * (r + 1), first_bucket_mb=0.002)
        opt = Optimizer(torch.optim.SGD(net.parameters(), lr=0.1), manager)
        opt.zero_grad()
        loss_of(model(batch(r, 0))).backward()
        return opt.step(), manager.last_failure

    for committed, failure in run_members(coordinator, 2, member):
        assert not committed
        assert "bucket layout" in failure and "bucket_mb" in failure


@pytest.mark.timeout(60)
def test_second_backward_in_one_step_without_no_sync_is_refused(coordinator):
    def member(r, manager):
        net = mlp()
        model = DataParallel(net, manager, **SMALL)
        opt = Optimizer(torch.optim.SGD(net.parameters(), lr=0.1), manager)
        opt.zero_grad()
        loss_of(model(batch(r, 0))).backward()
        with pytest.raises(RuntimeError, match="no_sync"):
            loss_of(model(batch(r, 1))).backward()
        return opt.step()

    assert run_members(coordinator, 2, member) == [False, False]


@pytest.mark.timeout(60)
def test_overlap_false_sends_everything_at_finish(coordinator):
    def member(r, manager):
        net = mlp()
        model = DataParallel(net, manager, overlap=False, **SMALL)
        opt = Optimizer(torch.optim.SGD(net.parameters(), lr=0.1), manager)
        opt.zero_grad()
        loss_of(model(batch(r, 0))).backward()
        assert opt.step()
        return model.metrics.launched_in_backward, grads(net)

    (l0, g0), (l1, g1) = run_members(coordinator, 2, member)
    assert l0 == l1 == 0
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_bad_arguments_are_rejected_with_clear_errors():
    manager = object()  # never used: construction fails first
    with pytest.raises(TypeError, match=r"nn\.Module"):
        DataParallel("not a module", manager)
    with pytest.raises(ValueError, match="no trainable parameters"):
        DataParallel(nn.Linear(2, 2).requires_grad_(False), manager)
    with pytest.raises(TypeError, match="codec"):
        DataParallel(nn.Linear(2, 2), manager, codec="int8")
    with pytest.raises(ValueError, match="needs a codec"):
        DataParallel(nn.Linear(2, 2), manager, error_feedback=True)
    with pytest.raises(ValueError, match="wraps"):
        DataParallel(nn.Linear(2, 2), manager, codec=lc.codecs.Int8(),
                     error_feedback=ErrorFeedback(lc.codecs.Int4()))
    with pytest.raises(ValueError, match="bucket sizes"):
        DataParallel(nn.Linear(2, 2), manager, bucket_mb=0)
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        Optimizer("sgd", manager)


@pytest.mark.timeout(60)
def test_one_member_keeps_its_own_gradients_and_remove_hooks_detaches(coordinator_factory):
    from lococomm.algorithms.data_parallel import attached

    coordinator = coordinator_factory(heartbeat_timeout=2.0)

    def member(r, manager):
        net = mlp()
        model = DataParallel(net, manager, **SMALL)
        opt = Optimizer(torch.optim.SGD(net.parameters(), lr=0.1), manager)
        assert opt.models == [model]
        opt.zero_grad()
        loss_of(model(batch(0, 0))).backward()
        assert opt.step() and manager.world_size == 1
        got = grads(net)
        model.remove_hooks()
        return got, attached(manager)

    (got, still_attached), = run_members(coordinator, 1, member)
    want = member_grads(mlp, params(mlp()), [batch(0, 0)])
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert still_attached == []
