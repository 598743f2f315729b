"""The zero-copy exact ring (collectives/exact_ring.py): results, storage rules, failures.

Real worker processes on gloo/127.0.0.1; blocking all-reduces take the ring (async ones keep
gloo's all-reduce, covered by test_fault_tolerance.py); the executor itself is tested in one
process by test_ring_executor.py.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch

from fault_worker import value_of
from lococomm.collectives.ownership import exclusively_owned, swappable

RING_NUMEL = 4 << 20  # 16 MiB of fp32: long enough for a signal to land mid-ring


def test_only_plain_sole_owners_may_have_their_storage_swapped():
    plain = torch.empty(16)
    assert swappable(plain)
    view = plain[:]
    assert not swappable(plain) and not swappable(view)  # another view sees the storage
    del view
    assert swappable(plain)
    assert not swappable(torch.empty(18)[1:-1])  # a slice of a larger storage
    numpy_backed = torch.from_numpy(np.zeros(16, dtype=np.float32))
    assert exclusively_owned(numpy_backed) and not swappable(numpy_backed)  # numpy sees it
    assert not swappable(torch.empty(16).share_memory_())  # other processes see it
    leaf = torch.zeros(16, requires_grad=True)
    assert swappable(leaf) and not swappable(leaf * 2)  # a non-leaf belongs to autograd


@pytest.mark.timeout(180)
@pytest.mark.parametrize("executors", ["cpp", "mixed"])
def test_ring_results_are_exact_and_bit_identical_on_every_member(workers, coordinator_factory, executors):
    # mixed: w1 runs the Python reference executor (LOCOCOMM_OPS_BACKEND=torch) in the same ring
    coordinator = coordinator_factory(heartbeat_timeout=2.0, initial_workers=3)
    names = ["w0", "w1", "w2"]
    for name in names:
        env = {"LOCOCOMM_OPS_BACKEND": "torch"} if executors == "mixed" and name == "w1" else None
        workers.start(
            name, "ring_worker.py", "--coordinator", coordinator.address, "--replica", name, env=env
        )
    for name in names:
        assert workers.wait_exit(name, 170) == 0, workers.dump()
    per_member = {name: workers.records(name, "step") for name in names}
    for rows in per_member.values():
        assert [r["step"] for r in rows] == [0, 1] and all(r["committed"] for r in rows), rows
        for row in rows:
            assert row["members"] == names
            for case in row["cases"]:
                assert case["ok"] and case["ring"], case
                assert case["same_object"] and case["numpy_agrees"], case
                # owned tensors take the result buffer's storage; views and numpy memory are
                # copied into, since someone else can see their storage
                assert case["swapped"] == case["case"].endswith("owned"), case
                exact = case["case"].startswith(("i64", "f64-max", "bf16-min"))
                assert case["error"] == 0.0 if exact else case["error"] < 1e-5, case
    for step in (0, 1):
        for index in range(len(per_member["w0"][step]["cases"])):
            digests = {per_member[n][step]["cases"][index]["digest"] for n in names}
            assert len(digests) == 1, (step, index)


def start_sync(workers, coordinator, count: int, steps: int, extra: dict[int, tuple[str, ...]]):
    for i in range(count):
        workers.start(
            f"w{i}", "fault_worker.py", "--coordinator", coordinator.address, "--replica", f"w{i}",
            "--steps", str(steps), "--numel", str(RING_NUMEL), "--sync", *extra.get(i, ()),
        )


def assert_history(rows: list[dict], steps: int) -> None:
    """Committed steps once each and in order, each the exact sum over its members; failed
    attempts left the caller's tensor as it was."""
    committed = [r for r in rows if r["committed"]]
    assert [r["step"] for r in committed] == list(range(steps)), [r["step"] for r in rows]
    for r in rows:
        assert r["uniform"], r
        if r["committed"]:
            assert r["value"] == sum(value_of(m, r["step"]) for m in r["members"]), r


@pytest.mark.timeout(150)
def test_sigkill_during_the_ring_leaves_survivors_tensors_untouched(workers, coordinator_factory):
    coordinator = coordinator_factory(heartbeat_timeout=1.0, initial_workers=3)
    start_sync(workers, coordinator, 3, 12, {2: ("--kill-at", "5")})
    for name in ("w0", "w1"):
        assert workers.wait_exit(name, 140) == 0, workers.dump()
    assert workers.wait_exit("w2", 5) == -signal.SIGKILL
    for name in ("w0", "w1"):
        rows = workers.records(name, "step")
        assert_history(rows, 12)
        failed = [r for r in rows if not r["committed"]]
        assert 1 <= len(failed) <= 2 and all(r["step"] == 5 for r in failed), failed
        assert all(r["value"] == value_of(name, 5) for r in failed), failed
        assert all(r["members"] == ["w0", "w1"] for r in rows if r["committed"] and r["step"] > 5)


@pytest.mark.timeout(150)
def test_sigstop_during_the_ring_survivors_resume_and_the_stopped_member_rejoins(
    workers, coordinator_factory
):
    heartbeat_timeout = 1.0
    coordinator = coordinator_factory(heartbeat_timeout=heartbeat_timeout, initial_workers=3)
    start_sync(workers, coordinator, 3, 25, {1: ("--stop-at", "4")})
    workers.wait_for(lambda: workers.records("w1", "stop"), 100, "w1 to stop itself")
    stop_time = workers.records("w1", "stop")[0]["time"]

    def resumed() -> bool:
        return all(
            any(r["committed"] and r["time"] > stop_time for r in workers.records(n, "step"))
            for n in ("w0", "w2")
        )

    workers.wait_for(resumed, 30, "survivors to commit again")
    for name in ("w0", "w2"):
        first = min(r["time"] for r in workers.records(name, "step") if r["committed"] and r["time"] > stop_time)
        assert first - stop_time <= heartbeat_timeout + 0.5, (name, first - stop_time)
    workers.wait_for(lambda: any(r["step"] >= 10 for r in workers.records("w0", "step")), 100, "w0 at 10")
    workers.signal("w1", signal.SIGCONT)
    for name in ("w0", "w1", "w2"):
        assert workers.wait_exit(name, 120) == 0, workers.dump()
    for name in ("w0", "w2"):
        rows = workers.records(name, "step")
        assert_history(rows, 25)
        failed = [r for r in rows if not r["committed"]]
        assert all(r["value"] == value_of(name, r["step"]) for r in failed), failed
    w1 = workers.records("w1", "step")
    stopped = next(r for r in w1 if r["step"] == 4)
    assert not stopped["committed"]
    # Its ring may have been abandoned (tensor untouched) or completed from the others' sends
    # that were already on their way (the full sum); never anything else.
    assert stopped["value"] in (value_of("w1", 4), sum(value_of(m, 4) for m in ("w0", "w1", "w2")))
    assert any(r["committed"] and len(r["members"]) == 3 and r["step"] > 10 for r in w1)
