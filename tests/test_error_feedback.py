"""Error feedback: the known optimisation behaviour on small problems, and the transactional
state contract (commit/rollback, checkpoints, fused kernels equal to the generic path)."""

from __future__ import annotations

import json

import pytest
import torch

from lococomm import ops
from lococomm.compress import EF21, Codec, EControl, ErrorFeedback, codecs

pytestmark = pytest.mark.timeout(120)
# Load (on a fresh machine: compile, ~35 s once) the kernels at collection time, outside the
# per-test timeouts.
ops.backend("cpu")
W = 4  # simulated workers, heterogeneous data


class Problem:
    """Distributed deterministic problem: worker i holds f_i, the goal is min mean f_i."""

    def __init__(self, kind: str):
        g = torch.Generator().manual_seed(0 if kind == "quadratic" else 1)
        self.kind = kind
        if kind == "quadratic":  # f_i = 1/2 |A_i x - b_i|^2, b_i shifted per worker
            d, m = 20, 80
            self.A = [torch.randn(m, d, generator=g, dtype=torch.float64) for _ in range(W)]
            self.b = [
                torch.randn(m, generator=g, dtype=torch.float64) * 3 + 2 * i for i in range(W)
            ]
            h = sum(a.T @ a for a in self.A) / W
            self.opt = torch.linalg.solve(h, sum(a.T @ b for a, b in zip(self.A, self.b)) / W)
            self.L = float(torch.linalg.eigvalsh(h).max())
        else:  # l2-regularised logistic regression, feature shift per worker
            d, m = 10, 200
            self.A = [
                torch.randn(m, d, generator=g, dtype=torch.float64) + (i - 1.5) for i in range(W)
            ]
            wt = torch.randn(d, generator=g, dtype=torch.float64)
            self.b = [
                (
                    torch.rand(m, generator=g, dtype=torch.float64)
                    < torch.sigmoid(a @ wt + 0.5 * i)
                ).double()
                for i, a in enumerate(self.A)
            ]
            x = torch.zeros(d, dtype=torch.float64)
            for _ in range(3000):
                x = x - 0.5 * sum(self.grad(i, x) for i in range(W)) / W
            self.opt = x
        self.d = d

    def grad(self, i: int, x: torch.Tensor) -> torch.Tensor:
        a, b = self.A[i], self.b[i]
        if self.kind == "quadratic":
            return a.T @ (a @ x - b)
        return a.T @ (torch.sigmoid(a @ x) - b) / a.shape[0] + 0.1 * x

    def run(self, codec: Codec, make_ef=None, steps: int = 600, lr=lambda t: 0.1) -> float:
        """Compressed distributed GD; returns |x - x*| / |x*|."""
        x = torch.zeros(self.d, dtype=torch.float64)
        efs = [make_ef(codec) if make_ef else None for _ in range(W)]
        for t in range(steps):
            acc = torch.zeros(self.d)
            for i in range(W):
                g = self.grad(i, x).float()
                seed = t * W + i
                p = codec.encode(g, seed) if efs[i] is None else efs[i].compress("x", g, seed)
                codec.decode_accumulate_(acc, p)
            update = acc / W
            for ef in efs:
                if ef is not None:
                    update = ef.aggregate("x", acc / W)
                    ef.commit()
            x = x - lr(t) * update.double()
        return float((x - self.opt).norm() / self.opt.norm())


@pytest.fixture(scope="module")
def quadratic():
    return Problem("quadratic")


@pytest.fixture(scope="module")
def logistic():
    return Problem("logistic")


def test_biased_topk_without_ef_stalls_on_heterogeneous_quadratic(quadratic):
    tk = codecs.TopK(0.1)
    step = lambda t: 0.5 / quadratic.L  # noqa: E731
    exact = quadratic.run(codecs.Identity(), steps=300, lr=step)
    early, late = quadratic.run(tk, steps=300, lr=step), quadratic.run(tk, steps=900, lr=step)
    assert exact < 1e-5
    # stuck at a wrong point: far from x*, and 3x more steps do not help
    assert early > 0.3 and late > 0.3 and abs(late - early) < 0.05


def test_classic_ef_converges_to_the_optimum_with_decaying_step(quadratic):
    tk = codecs.TopK(0.1)
    step = lambda t: 0.5 / quadratic.L / (1 + t / 50)  # noqa: E731
    no_ef = quadratic.run(tk, steps=1500, lr=step)
    mid = quadratic.run(tk, ErrorFeedback, steps=500, lr=step)
    end = quadratic.run(tk, ErrorFeedback, steps=1500, lr=step)
    assert no_ef > 0.3
    assert end < 0.04 and end < mid / 2  # O(1/t) convergence, as theory predicts for EF


@pytest.mark.parametrize(
    "make_ef", [EF21, lambda c: EControl(c, eta=0.1)], ids=["EF21", "EControl"]
)
def test_ef21_and_econtrol_converge_linearly_with_constant_step(quadratic, make_ef):
    step = lambda t: 0.5 / quadratic.L  # noqa: E731
    assert quadratic.run(codecs.TopK(0.1), make_ef, steps=600, lr=step) < 1e-5


def test_logistic_signsgd_needs_error_feedback(logistic):
    sign = codecs.SignSGD(block=10)
    step = lambda t: 0.3  # noqa: E731
    assert logistic.run(sign, steps=800, lr=step) > 0.1
    assert logistic.run(sign, ErrorFeedback, steps=800, lr=step) < 0.03
    assert logistic.run(sign, EF21, steps=800, lr=step) < 1e-5
    assert logistic.run(sign, lambda c: EControl(c, eta=0.1), steps=800, lr=step) < 1e-5


# ---- transactional state --------------------------------------------------------------------
EF_KINDS = [
    ("ef", lambda c: ErrorFeedback(c)),
    ("ef21", lambda c: EF21(c)),
    ("econtrol", lambda c: EControl(c, eta=0.3)),
]
CODECS = [codecs.Int8(rounding="stochastic"), codecs.TopK(0.05), codecs.Int4(), codecs.PowerSGD(2)]


def step(ef, key, g, seed):
    p = ef.compress(key, g, seed)
    mean = ef.codec.decode(p)
    return p, ef.aggregate(key, mean)


def same_payload(a, b):
    return a.meta == b.meta and all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))


@pytest.mark.parametrize("kind,make", EF_KINDS, ids=[k for k, _ in EF_KINDS])
@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_rollback_restores_state_and_retry_is_bit_identical(kind, make, codec):
    ef = make(codec)
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(32, 24, generator=g) for _ in range(4)]
    for t in range(2):
        step(ef, "w", grads[t], t)
        ef.commit()
    before = ef.state_dict()
    p1, u1 = step(ef, "w", grads[2], 2)
    assert ef.pending_keys() == ["w"]
    ef.rollback("w")
    after = ef.state_dict()
    assert before["meta"] == after["meta"]
    assert before["tensors"].keys() == after["tensors"].keys()
    assert all(torch.equal(before["tensors"][k], after["tensors"][k]) for k in before["tensors"])
    p2, u2 = step(ef, "w", grads[2], 2)  # the retried step produces the same bytes
    assert same_payload(p1, p2) and torch.equal(u1, u2)
    ef.commit("w")
    changed = ef.state_dict()["tensors"]
    assert any(not torch.equal(changed[k], before["tensors"][k]) for k in changed)


@pytest.mark.parametrize("kind,make", EF_KINDS, ids=[k for k, _ in EF_KINDS])
def test_state_dict_is_a_snapshot_and_loads_into_a_fresh_instance(kind, make):
    codec = codecs.Int4(rounding="stochastic")
    ef = make(codec)
    g = torch.Generator().manual_seed(3)
    grads = {k: torch.randn(1000, generator=g) for k in ("a", "b/c")}
    for t in range(3):
        for k, v in grads.items():
            step(ef, k, v * (t + 1), t)
        ef.commit()
    sd = ef.state_dict()
    json.dumps(sd["meta"])  # metadata is JSON
    snapshot = {k: v.clone() for k, v in sd["tensors"].items()}
    other = make(codec)
    other.load_state_dict(sd)
    for k, v in grads.items():  # both continue identically
        pa, ua = step(ef, k, v, 10)
        pb, ub = step(other, k, v, 10)
        assert same_payload(pa, pb) and torch.equal(ua, ub)
    ef.commit()
    for k, v in snapshot.items():  # buffers are reused, the snapshot is not
        assert torch.equal(sd["tensors"][k], v)


def test_load_state_dict_rejects_mismatches():
    ef = EControl(codecs.Int8(), eta=0.2)
    step(ef, "w", torch.randn(100), 0)
    ef.commit()
    sd = ef.state_dict()
    with pytest.raises(ValueError, match="codec"):
        EControl(codecs.Int4(), eta=0.2).load_state_dict(sd)
    with pytest.raises(ValueError, match="params"):
        EControl(codecs.Int8(), eta=0.5).load_state_dict(sd)
    with pytest.raises(ValueError, match="econtrol"):
        EF21(codecs.Int8()).load_state_dict(sd)


def test_misuse_is_a_clear_error():
    ef = ErrorFeedback(codecs.Int8())
    ef.compress("w", torch.randn(10), 0)
    with pytest.raises(RuntimeError, match="commit or rollback"):
        ef.compress("w", torch.randn(10), 1)
    ef.rollback()
    with pytest.raises(ValueError, match="10 elements"):
        ef.compress("w", torch.randn(11), 1)
    ef.reset("w")
    ef.compress("w", torch.randn(11), 1)
    e21 = EF21(codecs.Int8())
    e21.aggregate("w", torch.randn(5))
    with pytest.raises(RuntimeError, match="staged aggregate"):
        e21.aggregate("w", torch.randn(5))
    with pytest.raises(ValueError, match="eta"):
        EControl(codecs.Int8(), eta=-1)
    with pytest.raises(TypeError, match="Codec"):
        ErrorFeedback("int8")


def test_nonfinite_gradient_raises_and_leaves_state_untouched():
    ef = ErrorFeedback(codecs.Int8())
    step(ef, "w", torch.randn(600), 0)
    ef.commit()
    before = ef.state("w", "e").clone()
    bad = torch.randn(600)
    bad[7] = float("nan")
    with pytest.raises(ValueError, match="inf/nan"):
        ef.compress("w", bad, 1)
    assert ef.pending_keys() == [] and torch.equal(ef.state("w", "e"), before)


@pytest.mark.parametrize(
    "codec,mode",
    [
        (codecs.Int8(), "ef"),
        (codecs.Int4(rounding="stochastic"), "ef"),
        (codecs.Int2(block=16), "ef21"),
        (codecs.Int8(rounding="stochastic"), "ef21"),
        (codecs.TopK(0.01), "ef"),
        (codecs.TopK(0.02, chunk=512), "ef"),
    ],
    ids=repr,
)
def test_fused_feedback_pass_equals_generic_composition(codec, mode):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50_001, generator=g)
    state = torch.randn(50_001, generator=g) * 0.1
    fused_p, fused_s = codec.encode_feedback(x, state, 77, mode=mode)
    generic_p, generic_s = Codec.encode_feedback(codec, x, state, 77, mode=mode)
    assert same_payload(fused_p, generic_p)
    assert torch.equal(fused_s.view(torch.int32), generic_s.view(torch.int32))


def test_econtrol_with_eta_zero_is_ef21():
    codec = codecs.Int4(rounding="stochastic")
    a, b = EF21(codec), EControl(codec, eta=0.0)
    g = torch.Generator().manual_seed(5)
    for t in range(5):
        x = torch.randn(777, generator=g)
        pa, ua = step(a, "k", x, t)
        pb, ub = step(b, "k", x, t)
        assert same_payload(pa, pb) and torch.equal(ua, ub)
        a.commit()
        b.commit()


def test_ef21_aggregate_tracks_the_running_estimate():
    ef = EF21(codecs.Identity())
    x1, x2 = torch.randn(50), torch.randn(50)
    _, u1 = step(ef, "k", x1, 0)
    ef.commit()
    _, u2 = step(ef, "k", x2, 1)
    ef.commit()
    assert torch.allclose(u1, x1) and torch.allclose(u2, x2, atol=1e-6)
    assert torch.allclose(ef.state("k", "h"), x2, atol=1e-6)
