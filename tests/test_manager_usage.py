"""Bad use of the Manager gets a clear error; mismatched collectives fail the step, not gloo."""

from __future__ import annotations

import pytest
import torch

import lococomm as lc


@pytest.mark.timeout(60)
def test_protocol_misuse_raises_clear_errors(coordinator_factory):
    coordinator = coordinator_factory()
    with lc.Manager(coordinator.address, replica_id="solo") as manager:
        with pytest.raises(RuntimeError, match="outside a step"):
            manager.allreduce(torch.ones(3))
        with pytest.raises(RuntimeError, match="without start_step"):
            manager.commit()
        manager.start_step()
        with pytest.raises(RuntimeError, match="twice"):
            manager.start_step()
        with pytest.raises(TypeError, match=r"torch\.Tensor"):
            manager.allreduce([1, 2, 3])
        with pytest.raises(ValueError, match="op must be one of"):
            manager.allreduce(torch.ones(3), op="median")
        with pytest.raises(TypeError, match="floating"):
            manager.allreduce(torch.ones(3, dtype=torch.int64), op="mean")
        with pytest.raises(ValueError, match="src must be a rank"):
            manager.broadcast(torch.ones(3), src=5)
        t = torch.arange(4.0)
        assert manager.allreduce(t) and torch.equal(t, torch.arange(4.0))  # a group of one
        gathered = manager.allgather(t)
        assert gathered.shape == (1, 4)
        assert manager.commit() and manager.step == 1
    with pytest.raises(ValueError, match="host:port"):
        lc.Manager("no-port-here")
    with pytest.raises(ValueError, match="backend"):
        lc.Manager(coordinator.address, backend="mpi")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["shape", "dtype"])
@pytest.mark.parametrize("mode", ["async", "sync"])  # sync: the ring checks in its streams
def test_mismatched_collective_fails_the_step_with_a_message_naming_it(
    workers, coordinator_factory, kind, mode
):
    coordinator = coordinator_factory(heartbeat_timeout=2.0, initial_workers=2)
    for i in range(2):
        extra = ("--mismatch-at", "3", "--mismatch", kind) if i == 1 else ()
        sync = ("--sync",) if mode == "sync" else ()
        workers.start(
            f"w{i}", "fault_worker.py", "--coordinator", coordinator.address, "--replica", f"w{i}",
            "--steps", "6", "--numel", "1000", *extra, *sync,
        )
    for name in ("w0", "w1"):
        assert workers.wait_exit(name, 60) == 0, workers.dump()
    for name in ("w0", "w1"):
        rows = workers.records(name, "step")
        failed = [r for r in rows if not r["committed"]]
        assert [r["step"] for r in failed] == [3], rows
        message = failed[0]["failure"]
        assert "'grads'" in message and "mismatched" in message, message
        # Every member names who holds what (w1 is rank 1 of the epoch, see --replica).
        expected = (
            "numel 1000 on rank [0], 1001 on rank [1]"
            if kind == "shape"
            else "dtype float32 on rank [0], float64 on rank [1]"
        )
        assert expected in message, message
        # The step is retried (with the right tensor) and training carries on to the end.
        assert [r["step"] for r in rows if r["committed"]] == list(range(6))
        # Untouched on failure.
        assert failed[0]["value"] == (int(name[1]) + 1) * 4


@pytest.mark.timeout(90)
def test_a_step_that_always_fails_ends_with_an_error_instead_of_looping(workers, coordinator_factory):
    coordinator = coordinator_factory(heartbeat_timeout=2.0, initial_workers=2)
    for i in range(2):
        extra = ("--mismatch-at", "2", "--mismatch-always") if i == 1 else ()
        workers.start(
            f"w{i}", "fault_worker.py", "--coordinator", coordinator.address, "--replica", f"w{i}",
            "--steps", "5", "--numel", "100", "--max-retries", "5", *extra,
        )
    for name in ("w0", "w1"):
        assert workers.wait_exit(name, 60) == 1, workers.dump()
        err = workers.stderr(name)
        assert "StepRetriesExhausted" in err and "step 2 failed 5 times in a row" in err
        assert "mismatched collectives" in err
