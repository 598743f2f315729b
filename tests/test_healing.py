"""Healing joiners and laggards, and bit-parity checks, with real processes."""

from __future__ import annotations

import signal

import pytest
import torch


def _heal_worker(workers, coordinator, name, *args, env=None):
    return workers.start(
        name, "heal_worker.py", "--coordinator", coordinator.address, "--replica", name, *args, env=env
    )


def _assert_states_equal(paths):
    states = [torch.load(p, weights_only=False) for p in paths]
    reference = states[0]
    for other in states[1:]:
        for key in ("model",):
            for name, tensor in reference[key].items():
                assert torch.equal(tensor, other[key][name]), name
        ref_opt, opt = reference["optimizer"]["state"], other["optimizer"]["state"]
        assert ref_opt.keys() == opt.keys() and ref_opt
        for index in ref_opt:
            for name, tensor in ref_opt[index].items():
                assert torch.equal(tensor, opt[index][name]), (index, name)
        assert reference["extra"] == other["extra"]


@pytest.mark.timeout(120)
def test_joiner_state_bit_equal_after_heal(workers, coordinator_factory, tmp_path):
    coordinator = coordinator_factory(heartbeat_timeout=2.0, initial_workers=3)
    # Everyone runs until w3 has been a member for 20 steps: a fixed step count could end
    # before the joiner's start-up does on a loaded machine.
    until = ("--stop-after-member", "w3", "--extra-steps", "20")
    for i in range(3):
        _heal_worker(workers, coordinator, f"w{i}", *until, "--step-sleep", "0.08",
                     "--save", str(tmp_path / f"w{i}.pt"))
    workers.wait_for(lambda: len(workers.records("w0", "step")) >= 15, 60, "step 15")
    _heal_worker(workers, coordinator, "w3", *until, "--save", str(tmp_path / "w3.pt"))
    for name in ("w0", "w1", "w2", "w3"):
        assert workers.wait_exit(name, 90) == 0, workers.dump()
    # Different random inits were made identical at the very first step...
    firsts = {workers.records(n, "step")[0]["digest"] for n in ("w0", "w1", "w2")}
    assert len(firsts) == 1
    # ...and the joiner became bit-identical (digest at every commit and every tensor at the end).
    # (Committed rows only: a member that misses a decision -- e.g. expelled for silence on an
    # overloaded machine just after voting -- fails a step the others commit, and is healed.)
    joiner = [r for r in workers.records("w3", "step") if r["committed"]]
    assert joiner[0]["step"] >= 15
    for row in joiner:
        others = {r["digest"] for n in ("w0", "w1", "w2") for r in workers.records(n, "step")
                  if r["step"] == row["step"] and r["committed"]}
        assert others == {row["digest"]}, (row, workers.stderr("w3")[-3000:])
    finals = [workers.records(n, "done")[0] for n in ("w0", "w1", "w2", "w3")]
    assert len({f["digest"] for f in finals}) == 1
    # non-tensor state travelled too: the counter of committed steps equals the step everywhere
    assert len({(f["counter"], f["step"]) for f in finals}) == 1 and finals[0]["counter"] == finals[0]["step"]
    _assert_states_equal([tmp_path / f"w{i}.pt" for i in range(4)])
    assert "healed" in workers.stderr("w3")
    # w1 and w2 were healed at the first step; when w3 joined they were up to date and held
    # their digest until w3's state had landed (healing.wait_landed)
    for name in ("w1", "w2"):
        assert "for the healed members' state to land before hashing" in workers.stderr(name), name


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", ["streams", "groups"])
def test_source_killed_during_transfer_joiner_heals_from_another(workers, coordinator_factory, transport):
    coordinator = coordinator_factory(heartbeat_timeout=2.0, initial_workers=3)
    # Everyone runs until w3 has been a member for 3 steps: the joiner's start-up (torch import,
    # 384 MB of state) may take longer than any fixed number of steps on a loaded machine.
    big = ("--extra-mb", "384", "--stop-after-member", "w3", "--step-sleep", "0.05")
    env = {"LOCOCOMM_HEAL_STREAMS": "1" if transport == "streams" else "0"}
    # Over TCP streams the 384 MB move in ~0.2 s: w1 stops after one chunk of its stream (a
    # source dying mid-transfer at a known point); the gloo broadcasts are slow enough to be
    # caught in flight.
    stall = ("--stall-heal-after-chunks", "1") if transport == "streams" else ()
    # Each worker on a loopback address of its own, as on three hosts: the 384 MB are spread
    # over the sources (one per host), so w1 is one of them.
    for i in range(3):
        host = {"LOCOCOMM_GLOO_HOST": f"127.0.0.{i + 1}"}
        _heal_worker(workers, coordinator, f"w{i}", *big, *(stall if i == 1 else ()), env={**env, **host})
    workers.wait_for(lambda: len(workers.records("w0", "step")) >= 3, 90, "training")
    _heal_worker(workers, coordinator, "w3", *big, env=env)
    ready = "stalled after 1 chunk(s) (sent)" if transport == "streams" else "sending"
    workers.wait_for(lambda: ready in workers.stderr("w1"), 60, "w1 to start sending state")
    workers.signal("w1", signal.SIGKILL)
    for name in ("w0", "w2", "w3"):
        assert workers.wait_exit(name, 150) == 0, workers.dump()
    joiner_log = workers.stderr("w3")
    assert "healing failed" in joiner_log, joiner_log[-2000:]
    failure = next(line for line in joiner_log.splitlines() if "healing failed" in line)
    if transport == "streams" and "rendezvous" not in failure:
        # w1's stream broke after its first chunk had landed in the joiner's live tensors (or
        # the epoch's abort for w1's death reached the joiner, or another source, first)
        assert "receiving the state failed: " in failure, failure
        assert "peer closed the connection" in failure or "aborted" in failure, failure
        assert "holds a partial transfer" in joiner_log, joiner_log[-2000:]
    elif transport == "groups" and "rendezvous" not in failure:
        # the joiner's blob (a plain-dict value it holds exclusively) was being received in
        # place: an abandoned broadcast must have moved it to new memory before the retry (a
        # kill that lands before the joiner posted a receive fails the heal at the group
        # rendezvous, with nothing to re-point)
        assert "re-pointed 1 owned tensor(s)" in joiner_log, joiner_log[-2000:]
    assert "healed" in joiner_log
    finals = {workers.records(n, "done")[0]["digest"] for n in ("w0", "w2", "w3")}
    assert len(finals) == 1


@pytest.mark.timeout(120)
def test_corrupted_parameter_is_detected_and_repaired(workers, coordinator_factory):
    coordinator = coordinator_factory(heartbeat_timeout=2.0, initial_workers=3)
    for i in range(3):
        extra = ("--corrupt-at", "7") if i == 1 else ()
        _heal_worker(workers, coordinator, f"w{i}", "--steps", "25", "--parity-every", "5", *extra)
    for name in ("w0", "w1", "w2"):
        assert workers.wait_exit(name, 90) == 0, workers.dump()
    log = workers.stderr("w1")
    assert "bit-parity mismatch" in log and "'model.2.weight'" in log, log[-3000:]
    assert any(e["kind"] == "parity-mismatch" and e["replica_id"] == "w1" for e in coordinator.events())
    # The corrupted digest never survived a parity step: after the repair all agree again.
    rows = {n: {r["step"]: r for r in workers.records(n, "step") if r["committed"]} for n in ("w0", "w1", "w2")}
    assert rows["w1"][8]["digest"] != rows["w0"][8]["digest"]  # corrupted after step 7
    for step in range(11, 25):
        assert len({rows[n][step]["digest"] for n in rows}) == 1, step
    finals = {workers.records(n, "done")[0]["digest"] for n in ("w0", "w1", "w2")}
    assert len(finals) == 1
