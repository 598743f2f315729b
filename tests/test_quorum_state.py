"""The coordinator's rules as a pure state machine (no sockets, no clocks)."""

from __future__ import annotations

import pytest

from lococomm.membership.quorum import Close, QuorumState, Send


def sends(actions, kind=None):
    return [a for a in actions if isinstance(a, Send) and (kind is None or a.message["type"] == kind)]


def make(n=3, **kwargs):
    state = QuorumState(heartbeat_timeout=1.0, **kwargs)
    for i in range(n):
        # Registered just before asking: a quorum waits join_timeout for fresh registrations.
        state.register(i, f"r{i}", 0, 1, 0, 0, [], now=0.8)
    return state


def form(state, conns, now=1.0, step=None):
    actions = []
    for c in conns:
        actions += state.request_quorum(c, state.workers[c].step if step is None else step, now)
    return actions


def vote_all(state, conns, ok=True, now=2.0, signature="s"):
    epoch = state.current
    actions = []
    for c in conns:
        actions += state.vote(c, epoch.number, epoch.step, ok, signature, [signature], "", {}, now)
    return actions


def test_epoch_forms_when_all_registered_workers_asked():
    state = make(3)
    assert sends(state.request_quorum(0, 0, 1.0), "epoch") == []
    assert sends(state.request_quorum(1, 0, 1.0), "epoch") == []
    epochs = sends(state.request_quorum(2, 0, 1.0), "epoch")
    assert len(epochs) == 3
    ranks = sorted(a.message["rank"] for a in epochs)
    assert ranks == [0, 1, 2]
    assert all(a.message["world_size"] == 3 and a.message["epoch"] == 1 for a in epochs)
    assert epochs[0].message["store_prefix"] == "lococomm/1/0"


def test_commit_true_only_when_every_member_voted_ok():
    state = make(2)
    form(state, [0, 1])
    assert sends(state.vote(0, 1, 0, True, "s", ["s"], "", {}, 2.0)) == []
    decisions = sends(state.vote(1, 1, 0, True, "s", ["s"], "", {}, 2.0), "decision")
    assert len(decisions) == 2 and all(d.message["ok"] for d in decisions)
    assert state.current.step == 1 and state.current.live


def test_a_failed_vote_decides_false_at_once_and_ends_the_epoch():
    state = make(3)
    form(state, [0, 1, 2])
    decisions = sends(state.vote(1, 1, 0, False, "", [], "peer reset", {}, 2.0), "decision")
    # Every member hears it, including those who have not voted yet (they abandon their ops).
    assert {d.conn for d in decisions} == {0, 1, 2}
    assert not any(d.message["ok"] for d in decisions)
    assert all(d.message["reconfigure"] for d in decisions)
    late = sends(state.vote(0, 1, 0, True, "s", ["s"], "", {}, 2.1), "decision")
    assert len(late) == 1 and not late[0].message["ok"]


def test_crash_of_member_pushes_failed_decision_to_the_others():
    state = make(3)
    form(state, [0, 1, 2])
    actions = state.disconnect(2, "connection closed", now=2.0)
    decisions = sends(actions, "decision")
    assert {d.conn for d in decisions} == {0, 1}
    assert not state.current.live
    # The survivors re-form without the dead one.
    epochs = sends(form(state, [0, 1], now=2.5), "epoch")
    assert {a.message["world_size"] for a in epochs} == {2}
    assert state.current.number == 2 and state.current.replicas == ["r0", "r1"]


def test_joiner_is_admitted_at_the_next_commit_without_failing_the_step():
    state = make(2)
    form(state, [0, 1])
    state.register(5, "r5", 0, 1, 0, 0, [], now=3.0)
    assert sends(state.request_quorum(5, 0, 3.0)) == []
    decisions = sends(vote_all(state, [0, 1], now=3.5), "decision")
    assert all(d.message["ok"] and d.message["reconfigure"] for d in decisions)
    epochs = sends(form(state, [0, 1], now=3.6, step=1), "epoch")
    assert len(epochs) == 3
    msg = next(a.message for a in epochs if a.conn == 5)
    assert msg["replicas"] == ["r0", "r1", "r5"] and msg["max_step"] == 1
    assert msg["steps"]["r5"] == 0  # behind: must be healed


def test_hang_is_expelled_after_heartbeat_timeout():
    state = make(2)
    form(state, [0, 1], now=1.0)
    state.touch(0, 2.5)
    state.touch(1, 1.0)
    assert state.tick(1.95) == []
    actions = state.tick(2.05)
    closed = [a for a in actions if isinstance(a, Close)]
    assert [c.conn for c in closed] == [1]
    assert sends(actions, "expelled")[0].conn == 1
    assert not state.current.live
    assert any(e.kind == "hang" and e.replica_id == "r1" for e in state.events)


def test_reregistering_replica_is_a_new_member_and_old_connection_dies():
    state = make(2)
    form(state, [0, 1])
    actions = state.register(9, "r1", 0, 1, 0, 1, ["r0", "r1"], now=2.0)
    assert any(isinstance(a, Close) and a.conn == 1 for a in actions)
    assert not state.current.live
    assert state.workers[9].incarnation != 2


def test_min_workers_and_initial_workers_gate_progress():
    state = make(2, min_workers=3)
    assert sends(form(state, [0, 1]), "epoch") == []
    state.register(2, "r2", 0, 1, 0, 0, [], now=1.0)
    assert len(sends(state.request_quorum(2, 0, 1.0), "epoch")) == 3

    state = make(2, initial_workers=3, quorum_timeout=5.0)
    assert sends(form(state, [0, 1], now=1.0), "epoch") == []
    for c in (0, 1):
        state.touch(c, 5.9)
    assert sends(state.tick(5.95), "epoch") == []
    later = sends(state.tick(6.05), "epoch")  # quorum_timeout after the round started
    assert len(later) == 2


def test_quorum_does_not_wait_for_long_idle_workers_but_waits_for_fresh_ones():
    state = QuorumState(heartbeat_timeout=10.0, join_timeout=0.5)
    state.register(0, "r0", 0, 1, 0, 0, [], now=0.0)
    state.register(1, "idle", 0, 1, 0, 0, [], now=0.0)
    assert len(sends(state.request_quorum(0, 0, 2.0), "epoch")) == 1  # idle for 2 s: not waited
    state = QuorumState(heartbeat_timeout=10.0, join_timeout=0.5)
    state.register(0, "r0", 0, 1, 0, 0, [], now=0.0)
    state.register(1, "fresh", 0, 1, 0, 0, [], now=1.9)
    assert sends(state.request_quorum(0, 0, 2.0), "epoch") == []
    assert len(sends(state.tick(2.6), "epoch")) == 1  # waited join_timeout, then went ahead


def test_signature_clash_fails_the_step_and_names_the_collective():
    state = make(2)
    form(state, [0, 1])
    state.vote(0, 1, 0, True, "a", ["allreduce(sum) float32[4]"], "", {}, 2.0)
    decisions = sends(state.vote(1, 1, 0, True, "b", ["allreduce(sum) float32[5]"], "", {}, 2.0))
    assert not decisions[0].message["ok"]
    assert "collective #0" in decisions[0].message["reason"]
    assert "float32[5]" in decisions[0].message["reason"]


def test_replica_group_is_member_only_when_all_its_ranks_are_ready():
    state = QuorumState(heartbeat_timeout=1.0)
    state.register(0, "big", 0, 2, 0, 0, [], now=0.8)
    state.register(1, "big", 1, 2, 0, 0, [], now=0.8)
    state.register(2, "small", 0, 1, 0, 0, [], now=0.8)
    form(state, [0, 2])
    assert state.current is None
    epochs = {a.conn: a.message for a in sends(state.request_quorum(1, 0, 1.0), "epoch")}
    assert set(epochs) == {0, 1, 2}
    assert epochs[0]["world_size"] == 2 and epochs[2]["world_size"] == 2
    assert epochs[1]["world_size"] == 1 and epochs[1]["store_prefix"].endswith("/1")
    # Losing one rank of the replica group ends the epoch for everyone.
    decisions = sends(state.disconnect(1, "killed", now=2.0), "decision")
    assert {d.conn for d in decisions} == {0, 2}


def test_restarted_coordinator_waits_for_reported_members():
    state = QuorumState(heartbeat_timeout=1.0, recovery_timeout=3.0, now=0.0)
    state.register(0, "r0", 0, 1, 40, 7, ["r0", "r1"], now=0.1)
    assert sends(state.request_quorum(0, 40, 0.2), "epoch") == []
    state.register(1, "r1", 0, 1, 40, 7, ["r0", "r1"], now=0.5)
    epochs = sends(state.request_quorum(1, 40, 0.6), "epoch")
    assert len(epochs) == 2 and epochs[0].message["epoch"] == 8  # epoch numbers keep increasing
    assert epochs[0].message["max_step"] == 40


def test_wrong_group_rank_is_refused():
    state = QuorumState(heartbeat_timeout=1.0)
    actions = state.register(0, "r", 3, 2, 0, 0, [], now=0.0)
    assert isinstance(actions[0], Close)


@pytest.mark.parametrize("bad", [{"heartbeat_timeout": 0}, {"min_workers": 0}])
def test_bad_configuration_is_refused(bad):
    with pytest.raises(ValueError):
        QuorumState(**bad)


def test_epoch_plan_says_where_each_member_is():
    state = QuorumState(heartbeat_timeout=1.0)
    state.register(0, "r0", 0, 1, 0, 0, [], now=0.8, host="10.0.0.1")
    state.register(1, "r1", 0, 1, 0, 0, [], now=0.8)  # an older worker: no host
    epochs = sends(form(state, [0, 1]), "epoch")
    assert len(epochs) == 2
    assert all(a.message["hosts"] == {"r0": "10.0.0.1", "r1": ""} for a in epochs)


def test_state_regression_is_refused_until_the_job_completes_gracefully():
    state = make(2)
    form(state, [0, 1])
    for _ in range(3):
        vote_all(state, [0, 1])
    assert state.max_committed_step == 3
    # Both members crash; a fresh worker must not silently restart training at step 0.
    state.disconnect(0, "killed", now=3.0)
    state.disconnect(1, "killed", now=3.0)
    state.register(7, "fresh", 0, 1, 0, 0, [], now=3.0)
    assert sends(state.request_quorum(7, 0, 3.1), "epoch") == []
    assert sends(state.tick(3.2), "epoch") == []
    # A worker resumed from a checkpoint at step 3 unblocks it (and heals the fresh one).
    state.register(8, "resumed", 0, 1, 3, 0, [], now=3.3)
    epochs = sends(state.request_quorum(8, 3, 3.4), "epoch")
    assert len(epochs) == 2 and epochs[0].message["max_step"] == 3
    assert epochs[0].message["receivers"] == ["fresh"]

    # When every member leaves gracefully the job is over: newcomers may start afresh.
    done = make(2)
    form(done, [0, 1])
    vote_all(done, [0, 1])
    done.disconnect(0, "left", now=3.0, kind="leave")
    done.disconnect(1, "left", now=3.0, kind="leave")
    done.register(7, "next-job", 0, 1, 0, 0, [], now=3.0)
    assert len(sends(done.request_quorum(7, 0, 3.1), "epoch")) == 1


def test_restarted_process_of_a_member_is_a_joiner_not_a_required_member():
    state = make(3)
    form(state, [0, 1, 2])
    state.disconnect(2, "killed", now=2.0)
    # The supervisor restarts it at once: it registers, but will not ask for a while.
    state.register(9, "r2", 0, 1, 0, 0, [], now=2.0)
    state.touch(9, 2.0)
    epochs = sends(form(state, [0, 1], now=2.6), "epoch")  # 0.6 s later: not fresh any more
    assert {a.message["world_size"] for a in epochs} == {2}


def test_resumed_coordinator_does_not_start_over_with_a_fresh_worker_that_reconnects_first():
    """Soak regression: a restarted process (step 0, no previous epoch) reached a restarted
    coordinator before the survivors re-registered, formed an epoch alone and committed steps
    0-2 a second time. A coordinator told it resumes a job waits for reporting members."""
    state = QuorumState(heartbeat_timeout=10.0, recovery_timeout=3.0, resume=True, now=0.0)
    state.register(0, "w1", 0, 1, 0, 0, [], now=0.01)  # the fresh process, first to arrive
    assert sends(state.request_quorum(0, 0, 0.02), "epoch") == []
    assert sends(state.tick(1.0), "epoch") == []  # still within recovery_timeout
    state.register(1, "w0", 0, 1, 3530, 52, ["w0", "w2"], now=1.1)
    state.register(2, "w2", 0, 1, 3530, 52, ["w0", "w2"], now=1.1)
    state.request_quorum(1, 3530, 1.2)
    epochs = sends(state.request_quorum(2, 3530, 1.7), "epoch")
    assert len(epochs) == 3 and {e.message["max_step"] for e in epochs} == {3530}
    assert epochs[0].message["epoch"] == 53
    assert set(epochs[0].message["receivers"]) == {"w1"}  # the fresh process is healed


def test_resumed_coordinator_starts_over_after_recovery_timeout_if_nobody_reports():
    state = QuorumState(heartbeat_timeout=10.0, recovery_timeout=3.0, resume=True, now=0.0)
    state.register(0, "w1", 0, 1, 0, 0, [], now=0.01)
    assert sends(state.request_quorum(0, 0, 0.02), "epoch") == []
    epochs = sends(state.tick(3.1), "epoch")
    assert len(epochs) == 1 and epochs[0].message["max_step"] == 0
    # Without resume (a coordinator starting a job) the fresh worker starts at once.
    state = QuorumState(heartbeat_timeout=10.0, recovery_timeout=3.0, now=0.0)
    state.register(0, "w1", 0, 1, 0, 0, [], now=0.01)
    assert len(sends(state.request_quorum(0, 0, 0.6), "epoch")) == 1
