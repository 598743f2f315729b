"""The fault-tolerant core end to end: real worker processes, gloo on 127.0.0.1, real signals."""

from __future__ import annotations

import signal
import time

import pytest

from fault_worker import value_of

STEPS = 30


def expected_sum(members: list[str], step: int) -> float:
    return sum(value_of(m, step) for m in members)


def check_committed_history(rows: list[dict], *, op: str = "sum") -> None:
    """Every committed step appears exactly once, in order, with the exact sum over its members."""
    committed = [r for r in rows if r["committed"]]
    assert [r["step"] for r in committed] == sorted({r["step"] for r in committed}), "doubled step"
    for r in committed:
        assert r["uniform"], r
        want = expected_sum(r["members"], r["step"])
        if op == "mean":
            want /= len(r["members"])
        assert r["value"] == pytest.approx(want, rel=1e-6), r
    for r in rows:
        if not r["committed"]:
            check_failed_row(r, op=op)


def check_failed_row(r: dict, *, op: str = "sum") -> None:
    """A step that did not commit left the caller's tensor as it was (restored or never
    written) -- unless this member's own all-reduce completed (`ok`) before a peer failed the
    step, and then it holds the exact result over the epoch's members; never anything else."""
    if r["ok"]:
        want = expected_sum(r["members"], r["step"])
        if op == "mean":
            want /= len(r["members"])
        assert r["value"] == pytest.approx(want, rel=1e-6), r
    else:
        assert r["value"] == value_of_row(r), r


def value_of_row(r: dict) -> float:
    return r["own"]


# Exact CPU all-reduces ride lococomm's ring; "gloo" runs the same tests on gloo's all-reduce
# with the pipelined backup copy (what NCCL epochs use, and LOCOCOMM_EXACT_RING=0).
TRANSPORTS = {"ring": None, "gloo": {"LOCOCOMM_EXACT_RING": "0"}}


def start_four(
    workers, coordinator, *extra_per_worker, steps=STEPS, numel=1 << 16, common=(), env=None
):
    for i in range(4):
        extra = extra_per_worker[i] if i < len(extra_per_worker) else ()
        workers.start(
            f"w{i}",
            "fault_worker.py",
            "--coordinator",
            coordinator.address,
            "--replica",
            f"w{i}",
            "--steps",
            str(steps),
            "--numel",
            str(numel),
            *common,
            *extra,
            env=env,
        )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_survivors_commit_exact_sum_after_sigkill(workers, coordinator_factory, transport):
    coordinator = coordinator_factory(heartbeat_timeout=1.0, initial_workers=4)
    start_four(
        workers, coordinator, (), (), ("--kill-at", "12"), numel=1 << 20, env=TRANSPORTS[transport]
    )
    for name in ("w0", "w1", "w3"):
        assert workers.wait_exit(name, 90) == 0, workers.dump()
    assert workers.wait_exit("w2", 5) == -signal.SIGKILL
    for name in ("w0", "w1", "w3"):
        rows = workers.records(name, "step")
        committed = [r for r in rows if r["committed"]]
        # No committed step lost or doubled: every step from the worker's first one (a late
        # starter joins at the current step) to the last, in order, exactly once.
        assert [r["step"] for r in committed] == list(range(STEPS)), [r["step"] for r in rows]
        for r in committed:
            assert r["uniform"]
            assert r["value"] == expected_sum(r["members"], r["step"]), r
        # Survivors continued without restart and without the dead member.
        assert all("w2" not in r["members"] for r in committed if r["step"] > 12)
        assert any(len(r["members"]) == 4 for r in committed)
        failed = [r for r in rows if not r["committed"]]
        assert len(failed) <= 2, failed
        assert all(r["step"] == 12 for r in failed), failed
    # Failed attempts left the caller's tensor untouched (or, if this member's own all-reduce
    # had completed before w2 died, holding the exact sum).
    for name in ("w0", "w1", "w3"):
        for r in workers.records(name, "step"):
            if not r["committed"]:
                assert r["ok"] or r["value"] == value_of(name, r["step"]), r
                check_failed_row(r)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_sigstop_survivors_resume_within_heartbeat_timeout_and_stopped_worker_rejoins(
    workers, coordinator_factory, transport
):
    heartbeat_timeout = 1.0
    coordinator = coordinator_factory(heartbeat_timeout=heartbeat_timeout, initial_workers=4)
    start_four(
        workers,
        coordinator,
        (),
        ("--stop-at", "8"),
        (),
        (),
        steps=60,
        common=("--step-sleep", "0.02"),
        env=TRANSPORTS[transport],
    )
    workers.wait_for(lambda: workers.records("w1", "stop"), 60, "w1 to stop itself")
    stop_time = workers.records("w1", "stop")[0]["time"]
    # Survivors resume: their first commit after the stop comes within timeout + 0.5 s.
    def resumed():
        return all(
            any(r["committed"] and r["time"] > stop_time for r in workers.records(n, "step"))
            for n in ("w0", "w2", "w3")
        )

    workers.wait_for(resumed, 30, "survivors to commit again")
    for name in ("w0", "w2", "w3"):
        first = min(
            r["time"] for r in workers.records(name, "step") if r["committed"] and r["time"] > stop_time
        )
        assert first - stop_time <= heartbeat_timeout + 0.5, (name, first - stop_time)
    # Let the others move on, then wake the stopped worker: it learns it was expelled, rejoins.
    workers.wait_for(
        lambda: max(r["step"] for r in workers.records("w0", "step")) >= 20, 60, "w0 to reach 20"
    )
    workers.signal("w1", signal.SIGCONT)
    for name in ("w0", "w1", "w2", "w3"):
        assert workers.wait_exit(name, 90) == 0, workers.dump()
    w1 = workers.records("w1", "step")
    assert not w1[0]["committed"] or w1[0]["step"] < 8
    stopped_row = next(r for r in w1 if r["step"] == 8)
    assert not stopped_row["committed"]
    # On waking, its old-epoch op may have completed with the others' abandoned ops (then the
    # tensor holds that exact sum) or been abandoned (then it is restored); never anything else.
    assert stopped_row["value"] in (value_of("w1", 8), expected_sum(["w0", "w1", "w2", "w3"], 8))
    rejoined = [r for r in w1 if r["committed"] and r["step"] > 20]
    assert rejoined and all(len(r["members"]) == 4 for r in rejoined[-3:])
    assert "expelled" in workers.stderr("w1") or "closed the connection" in workers.stderr("w1")
    for name in ("w0", "w2", "w3"):
        rows = workers.records(name, "step")
        committed = [r["step"] for r in rows if r["committed"]]
        assert committed == list(range(60))
        check_committed_history(rows)  # and failed attempts left the tensor alone


@pytest.mark.timeout(120)
def test_joiner_admitted_at_step_boundary_without_disturbing_members(workers, coordinator_factory):
    coordinator = coordinator_factory(heartbeat_timeout=1.0, initial_workers=3)
    # The members run 100 steps, and on until w3 has been a member for 10 of them: the
    # joiner's start-up (torch import) may outlast any fixed number of steps under load.
    for i in range(3):
        workers.start(
            f"w{i}", "fault_worker.py", "--coordinator", coordinator.address, "--replica", f"w{i}",
            "--steps", "100", "--step-sleep", "0.05", "--until-member", "w3",
        )
    workers.wait_for(
        lambda: any(r["step"] >= 15 for r in workers.records("w0", "step")), 60, "step 15"
    )
    workers.start(
        "w3", "fault_worker.py", "--coordinator", coordinator.address, "--replica", "w3",
        "--steps", "100", "--until-member", "w3",
    )
    for name in ("w0", "w1", "w2", "w3"):
        assert workers.wait_exit(name, 90) == 0, workers.dump()
    for name in ("w0", "w1", "w2"):
        rows = workers.records(name, "step")
        assert all(r["committed"] for r in rows), [r for r in rows if not r["committed"]]
        assert len(rows) >= 100 and [r["step"] for r in rows] == list(range(len(rows)))
        for r in rows:
            assert r["value"] == expected_sum(r["members"], r["step"]), r
        assert any(len(r["members"]) == 4 for r in rows)
    joiner = workers.records("w3", "step")
    assert joiner and joiner[0]["step"] >= 15 and all(r["committed"] for r in joiner)
    assert all(r["members"] == ["w0", "w1", "w2", "w3"] for r in joiner)


@pytest.mark.timeout(90)
def test_graceful_leave_is_seen_as_leave_and_others_continue(workers, coordinator_factory):
    coordinator = coordinator_factory(heartbeat_timeout=1.0, initial_workers=3)
    for i in range(3):
        extra = ("--leave-at", "10") if i == 2 else ()
        workers.start(
            f"w{i}", "fault_worker.py", "--coordinator", coordinator.address, "--replica", f"w{i}",
            "--steps", "25", *extra,
        )
    for name in ("w0", "w1", "w2"):
        assert workers.wait_exit(name, 60) == 0, workers.dump()
    kinds = [(e["kind"], e["replica_id"]) for e in coordinator.events()]
    assert ("leave", "w2") in kinds
    assert ("crash", "w2") not in kinds and ("hang", "w2") not in kinds
    for name in ("w0", "w1"):
        rows = workers.records(name, "step")
        committed = [r for r in rows if r["committed"]]
        assert [r["step"] for r in committed] == list(range(25))
        assert all(sorted(r["members"]) == ["w0", "w1"] for r in committed if r["step"] >= 11)
        for r in committed:
            assert r["value"] == expected_sum(r["members"], r["step"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_view_tensor_uses_private_path_and_mean_is_exact(workers, coordinator_factory, transport):
    coordinator = coordinator_factory(heartbeat_timeout=1.0, initial_workers=2)
    for i in range(2):
        workers.start(
            f"w{i}", "fault_worker.py", "--coordinator", coordinator.address, "--replica", f"w{i}",
            "--steps", "5", "--view", "--op", "mean", "--numel", str(3 << 20),
            env=TRANSPORTS[transport],
        )
    for name in ("w0", "w1"):
        assert workers.wait_exit(name, 50) == 0, workers.dump()
        rows = workers.records(name, "step")
        assert [r["step"] for r in rows if r["committed"]] == list(range(5))
        for r in rows:
            assert r["uniform"] and r["value"] == expected_sum(r["members"], r["step"]) / 2


@pytest.mark.timeout(30)
def test_wrong_token_is_refused(coordinator_factory):
    import lococomm as lc

    coordinator = coordinator_factory(token="right-token")
    start = time.monotonic()
    with pytest.raises(lc.AuthenticationError):
        lc.Manager(coordinator.address, replica_id="intruder", token="wrong-token")
    with pytest.raises(lc.AuthenticationError, match="requires a token"):
        lc.Manager(coordinator.address, replica_id="intruder")
    assert time.monotonic() - start < 10
    with lc.Manager(coordinator.address, replica_id="ok", token="right-token") as manager:
        manager.start_step()
        assert manager.world_size == 1
        assert manager.commit()
