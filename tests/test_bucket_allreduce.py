"""BucketAllreduce outcomes (OK / FAILED / ABANDONED) against a scripted process group."""

from __future__ import annotations

import time

import torch

from lococomm.collectives.abort import AbortSignal
from lococomm.collectives.bucket_allreduce import BucketAllreduce, Outcome
from scripted_group import ScriptedGroup, scripted_communicator


def test_success_sums_in_place_and_divides_by_scale():
    buf = torch.full((10 << 20,), 3.0)  # 40 MiB: several chunks
    group, failures = ScriptedGroup(["ok"] * 8), []
    op = BucketAllreduce(scripted_communicator(group, failures), buf, "bucket0")
    assert len(op.chunks) >= 2
    assert op.start()
    assert op.wait(scale=2) is Outcome.OK
    assert torch.equal(buf, torch.full_like(buf, 3.0)) and failures == []
    assert all(w.tensor.data_ptr() >= buf.data_ptr() for w in group.works)  # no copies


def test_completed_failure_returns_the_buffer_to_its_owner():
    buf = torch.ones(1000)
    group, failures = ScriptedGroup(["error"]), []
    comm = scripted_communicator(group, failures)
    op = BucketAllreduce(comm, buf, "bucket3")
    op.start()
    assert op.wait(scale=2) is Outcome.FAILED
    assert len(comm.graveyard) == 0
    assert failures and failures[0].startswith("bucket3: peer failure")


def test_pending_op_after_abort_buries_the_buffer():
    buf = torch.ones(1000)
    abort = AbortSignal()
    group, failures = ScriptedGroup(["hang"]), []
    comm = scripted_communicator(group, failures, abort)
    op = BucketAllreduce(comm, buf, "bucket1")
    op.start()
    abort.abort("member w2 hung")
    started = time.monotonic()
    assert op.wait(scale=2) is Outcome.ABANDONED
    assert time.monotonic() - started < 1.0  # never waits for the hung op
    assert len(comm.graveyard) == 1  # buffer kept alive with its zombie op
    assert "aborted: member w2 hung" in failures[0]


def test_give_up_without_waiting_decides_by_pending_ops():
    group, failures = ScriptedGroup(["ok", "hang"]), []
    comm = scripted_communicator(group, failures)
    done_op = BucketAllreduce(comm, torch.ones(10), "bucket0")
    hung_op = BucketAllreduce(comm, torch.ones(10), "bucket1")
    done_op.start()
    hung_op.start()
    assert done_op.give_up("step failed") is Outcome.FAILED
    assert hung_op.give_up("step failed") is Outcome.ABANDONED
    assert failures == []  # the step had already failed elsewhere: nothing more to report


def test_one_member_moves_nothing():
    comm = scripted_communicator(ScriptedGroup([]), [])
    comm.world_size = 1
    op = BucketAllreduce(comm, torch.ones(10), "bucket0")
    assert op.start() and op.wait(scale=1) is Outcome.OK
