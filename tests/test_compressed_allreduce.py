"""Compressed all-reduce through the manager: real worker processes, gloo on 127.0.0.1.

Every worker knows every member's inputs (seeded by member and step, compressed_worker.py), so
it reports the error of the compressed result against the exact mean it computes itself, and
a digest of the result's bytes that must be equal on every member.
"""

from __future__ import annotations

import json
import math
import signal

import pytest

CODECS = [
    {"name": "identity", "config": {}},
    {"name": "fp16", "config": {}},
    {"name": "bf16", "config": {}},
    {"name": "fp8e4m3", "config": {}},
    {"name": "int8", "config": {}},
    {"name": "int4", "config": {"rounding": "stochastic"}},
    {"name": "int2", "config": {}},
    {"name": "topk", "config": {"ratio": 0.05}},
    {"name": "topk", "config": {"ratio": 0.05, "chunk": 4096}},
    {"name": "sparseloco", "config": {}},
    {"name": "sign", "config": {}},
    {"name": "randk", "config": {"ratio": 0.1}},
    {"name": "powersgd", "config": {"rank": 4}},
]
RING = {"identity", "fp16", "bf16", "fp8e4m3", "int8", "int4", "int2"}  # summable codecs
NATIVE = {"identity", "bf16"}  # cast + gloo all-reduce of the wire dtype (native.py)
PROJECTIONS = {"randk", "powersgd"}  # result = a projection of the exact mean: error <= |mean|


def start(workers, coordinator, n, *args, names=None):
    for i in range(n):
        name = names[i] if names else f"w{i}"
        workers.start(
            name, "compressed_worker.py", "--coordinator", coordinator.address, "--replica", name,
            *args,
        )  # fmt: skip


def committed_rows(workers, names):
    return {n: [r for r in workers.records(n, "step") if r["committed"]] for n in names}


def check_error(row: dict, world: int) -> None:
    """The result is within the codec's error of the exact mean (see module docstring)."""
    name = row["codec"]
    if name == "identity":
        assert row["rel_err"] < 1e-6, row
    elif name in RING:
        # W encodings of partial sums: at most ~2 sqrt(W) times one encoding of the mean
        assert row["rel_err"] <= 2 * math.sqrt(world) * row["codec_rel_err"] + 1e-6, row
    elif name in PROJECTIONS:
        assert row["rel_err"] <= 1.0 + 1e-5, row
    else:  # mean of individually decoded payloads: triangle inequality
        assert row["rel_err"] <= row["bound_rel"] * (1 + 1e-4) + 1e-6, row


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_codec_identical_on_every_member_and_within_its_error(workers, coordinator_factory, world):
    coordinator = coordinator_factory(initial_workers=world)
    steps = len(CODECS)
    start(workers, coordinator, world, "--codecs", json.dumps(CODECS), "--steps", str(steps),
          "--shape", "300x257")  # fmt: skip
    names = [f"w{i}" for i in range(world)]
    for name in names:
        assert workers.wait_exit(name, 120) == 0, workers.dump()
    rows = committed_rows(workers, names)
    for name in names:
        assert [r["step"] for r in rows[name]] == list(range(steps)), rows[name]
    for step in range(steps):
        by_member = [rows[name][step] for name in names]
        assert len({r["digest"] for r in by_member}) == 1, by_member  # bit-identical
        for r in by_member:
            assert r["members"] == names
            if world == 1:
                assert r["unchanged"], r  # one member: the exact mean of one, no traffic
                assert r["stats"] == {}
                continue
            check_error(r, world)
            stats = r["stats"]
            assert stats["ok"] and stats["numel"] == 300 * 257
            assert stats["bytes_sent"] > 0 and stats["bytes_received"] > 0
            total = stats["encode_seconds"] + stats["communicate_seconds"] + stats["decode_seconds"]
            assert total == pytest.approx(stats["total_seconds"], rel=1e-6, abs=1e-9)
            if r["codec"] in NATIVE:
                assert stats["algorithm"] == "native"
            elif r["codec"] in RING:
                assert stats["algorithm"] == "ring"
            if r["codec"] == "int8":
                # ring: 2 (W-1)/W of the tensor at 8 bits + one fp32 scale per 256 values
                want = 2 * (world - 1) / world * 300 * 257 * (1 + 4 / 256)
                assert stats["bytes_sent"] == pytest.approx(want, rel=0.02)


@pytest.mark.timeout(120)
def test_tiny_tensors_smaller_than_the_member_count_go_through_the_ring(workers, coordinator_factory):
    coordinator = coordinator_factory(initial_workers=4)
    codecs = [{"name": "int8", "config": {}}, {"name": "fp16", "config": {}}]
    start(workers, coordinator, 4, "--codecs", json.dumps(codecs), "--steps", "2", "--shape", "3",
          "--ring-min-bytes", "0")  # fmt: skip
    names = [f"w{i}" for i in range(4)]
    for name in names:
        assert workers.wait_exit(name, 90) == 0, workers.dump()
    rows = committed_rows(workers, names)
    for step in range(2):
        by_member = [rows[n][step] for n in names]
        assert len({r["digest"] for r in by_member}) == 1, by_member
        for r in by_member:
            assert r["stats"]["algorithm"] == "ring"
            check_error(r, 4)


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "ef, codecs",
    [
        ("ef", [{"name": "int4", "config": {}}, {"name": "topk", "config": {"ratio": 0.02}},
                {"name": "powersgd", "config": {"rank": 32}}]),
        ("ef21", [{"name": "int2", "config": {}}, {"name": "randk", "config": {"ratio": 0.05}}]),
        ("econtrol", [{"name": "sparseloco", "config": {}}]),
    ],
)
def test_error_feedback_accumulated_error_stays_bounded(workers, coordinator_factory, ef, codecs):
    coordinator = coordinator_factory(initial_workers=3)
    steps = 50 * len(codecs)
    start(workers, coordinator, 3, "--codecs", json.dumps(codecs), "--ef", ef, "--steps",
          str(steps), "--shape", "300x257")  # fmt: skip
    names = ["w0", "w1", "w2"]
    for name in names:
        assert workers.wait_exit(name, 140) == 0, workers.dump()
    rows = committed_rows(workers, names)
    for step in range(steps):
        assert len({rows[n][step]["digest"] for n in names}) == 1
    for which, spec in enumerate(codecs):
        mine = [r for r in rows["w0"] if r["step"] % len(codecs) == which]
        assert len(mine) == 50
        single = max(r["rel_err"] for r in mine)
        if ef == "ef":
            # Classic EF telescopes: sum of results = sum of exact means - mean of the members'
            # residuals at every step, so the accumulated error is bounded by the residuals.
            for step_rows in zip(*(
                [r for r in rows[n] if r["step"] % len(codecs) == which] for n in names
            )):  # fmt: skip
                bound = sum(r["residual_norm"] for r in step_rows) / len(names)
                assert step_rows[0]["running_abs_err"] <= bound * (1 + 1e-3) + 1e-3, step_rows
            # ... and it does not grow: from steps 5-10 to step 50 it stays put
            early = max(r["running_abs_err"] for r in mine[5:10])
            assert mine[-1]["running_abs_err"] <= 1.5 * early, (spec, early, mine[-1])
            # so relative to the growing exact running sum it ends well below one step's error
            assert mine[-1]["running_rel_err"] <= 0.5 * single, (spec, single, mine[-1])
        else:
            # EF21/EControl estimate the current gradient (no compensation of past errors, so
            # no running-sum guarantee with biased codecs on noisy inputs): their per-step
            # error settles and stays bounded, from steps 5-10 to steps 40-50.
            early = max(r["rel_err"] for r in mine[5:10])
            assert max(r["rel_err"] for r in mine[40:]) <= 1.5 * early, (spec, early)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "codec, ef, kill_wait",
    [({"name": "int8", "config": {}}, "ef", "2"), ({"name": "topk", "config": {"ratio": 0.05}}, "none", "1+"),
     ({"name": "powersgd", "config": {"rank": 4}}, "none", "2")],
    ids=["ring-ef", "allgather", "powersgd"],
)  # fmt: skip
def test_sigkill_mid_compressed_allreduce_leaves_survivors_unchanged_and_retry_is_exact(
    workers, coordinator_factory, codec, ef, kill_wait
):
    """(Error feedback only with Int8, whose residual is small enough for the error bound.)

    w2 dies at its kill_wait-th network wait of step 3: inside the ring / PowerSGD's first data
    op (the survivors need w2 for every later hop), and for the all-gather -- one op, which
    w2's gloo thread may finish in the background before the kill lands, so the call could
    succeed everywhere and only the commit fail -- once the signature check has returned ("1+"),
    before its payload exists: the survivors' call itself fails. (Dying at the signature check
    itself raced the survivors on a loaded machine: if they had not yet started step 3, the
    abort reached them first and step 3 simply ran in the next epoch.)
    """
    coordinator = coordinator_factory(initial_workers=3)
    common = ["--codecs", json.dumps([codec]), "--ef", ef, "--steps", "6", "--shape", "300x257"]
    start(workers, coordinator, 2, *common)
    workers.start("w2", "compressed_worker.py", "--coordinator", coordinator.address,
                  "--replica", "w2", *common, "--kill-at", "3", "--kill-wait", kill_wait.rstrip("+"),
                  *(["--kill-after-wait"] if kill_wait.endswith("+") else []))  # fmt: skip
    for name in ("w0", "w1"):
        assert workers.wait_exit(name, 100) == 0, workers.dump()
    assert workers.wait_exit("w2", 10) == -signal.SIGKILL
    assert workers.records("w2", "kill"), "w2 did not die inside the collective"
    for name in ("w0", "w1"):
        rows = workers.records(name, "step")
        failed = [r for r in rows if not r["committed"]]
        assert failed and all(r["step"] == 3 for r in failed), rows
        for r in failed:
            assert not r["ok"], r  # the call itself failed (not only the commit)
            assert r["unchanged"], r  # the caller's tensor as before the call
            assert r["ef_after_call"] == r["ef_before"], r  # nothing staged by the failed call
            assert r["ef_after"] == r["ef_before"], r  # and nothing after the rollback
        committed = [r for r in rows if r["committed"]]
        assert [r["step"] for r in committed] == list(range(6))
        retried = committed[3]
        assert retried["members"] == ["w0", "w1"], retried
        check_error(retried, 2)
    for step in range(6):
        a = next(r for r in workers.records("w0", "step") if r["committed"] and r["step"] == step)
        b = next(r for r in workers.records("w1", "step") if r["committed"] and r["step"] == step)
        assert a["digest"] == b["digest"]


@pytest.mark.timeout(150)
def test_training_continues_without_a_loss_spike_after_kill_and_join(workers, coordinator_factory):
    """Least squares, Int4 + error feedback, 3 workers; w2 is killed, restarted, healed."""
    coordinator = coordinator_factory(initial_workers=3)
    common = ["--codecs", json.dumps([{"name": "int4", "config": {}}]), "--ef", "ef",
              "--mode", "train", "--steps", "60", "--step-sleep", "0.03"]  # fmt: skip
    start(workers, coordinator, 2, *common, "--slow-after", "30", "--slow-until-members", "3")
    workers.start("w2", "compressed_worker.py", "--coordinator", coordinator.address,
                  "--replica", "w2", *common, "--kill-at", "20")  # fmt: skip
    assert workers.wait_exit("w2", 60) == -signal.SIGKILL
    workers.start("w2b", "compressed_worker.py", "--coordinator", coordinator.address,
                  "--replica", "w2", *common)  # fmt: skip
    for name in ("w0", "w1", "w2b"):
        assert workers.wait_exit(name, 120) == 0, workers.dump()
    rows = [r for r in workers.records("w0", "step") if r["committed"]]
    loss = {r["step"]: r["loss"] for r in rows}
    members = {r["step"]: len(r["members"]) for r in rows}
    assert loss[59] < 0.2 * loss[0], loss
    joined = [s for s in sorted(members) if s > 20 and members[s] == 3]
    assert joined, members  # the restarted worker took part again
    before = loss[19]
    # no spike: after the kill and after the join the loss never rises above the pre-kill loss
    assert max(loss[s] for s in loss if s >= 20) <= before * 1.05, loss
    # the joiner was healed: it reports the same losses as the survivors once it is in
    joiner = {r["step"]: r["loss"] for r in workers.records("w2b", "step") if r["committed"]}
    assert joiner and all(joiner[s] == loss[s] for s in joiner), (joiner, loss)
