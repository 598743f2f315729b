"""The DiLoCo family with real worker processes (gloo on 127.0.0.1): learning, exact byte
counts, and a worker killed in the middle of an exchange that rejoins bit-identically.

The workers (diloco_worker.py) train a tiny char-level transformer on stdlib text.
"""

from __future__ import annotations

import signal

import pytest
import torch

from lococomm.collectives.compressed import RING_CHUNK_ELEMENTS
from lococomm.collectives.hop_codec import HopCodec
from lococomm.collectives.ring_plan import plan_ring
from lococomm.collectives.ring_requant import ring_bytes_sent
from lococomm.compress import codecs
from lococomm.compress.payload import buffer_bytes

STEPS = 200


def _start(workers, coordinator, name, *args):
    return workers.start(name, "diloco_worker.py", "--coordinator", coordinator.address,
                         "--replica", name, *args)


def _payload_bytes(codec, numel: int) -> int:
    return buffer_bytes(codec.empty_payload((numel,), torch.float32).to_parts()[0])


def expected_sync_bytes(variant: str, numel: int, world: int) -> int:
    """What one member sends in one exchange of a fragment of `numel` fp32 elements.

    Exact: ring all-reduce, 2 (W-1)/W of the tensor. Int4 (summable): DiLoCo asks for the
    re-quantising ring at any size, whose messages member 0 sends are counted from the ring
    plan. SparseLoCo: the payload all-gather, W-1 copies of the payload. (The 16-byte control
    all-gather only runs in the first exchange of an epoch that did not bootstrap: never
    without failures.)
    """
    if variant in ("diloco", "delayed"):
        main = 2 * (world - 1) * numel * 4 // world
    elif variant == "streaming":
        codec = codecs.Int4()
        plan = plan_ring(numel, world, codec.align, RING_CHUNK_ELEMENTS)
        main = ring_bytes_sent(HopCodec(codec), plan, rank=0)
    else:
        main = (world - 1) * _payload_bytes(codecs.SparseLoCo(ratio=1 / 16, chunk=256), numel)
    return main


@pytest.mark.timeout(90)
@pytest.mark.parametrize("variant", ["diloco", "streaming", "delayed", "sparseloco"])
def test_every_variant_learns_and_counts_bytes_exactly(workers, coordinator_factory, variant):
    coordinator = coordinator_factory(heartbeat_timeout=3.0, initial_workers=2)
    args = ("--variant", variant, "--steps", str(STEPS), "--sync-every", "10",
            "--fragments", "2", "--overlap", "2")
    for name in ("w0", "w1"):
        _start(workers, coordinator, name, *args)
    for name in ("w0", "w1"):
        assert workers.wait_exit(name, 80) == 0, workers.dump()
    done = {n: workers.records(n, "done")[0] for n in ("w0", "w1")}
    assert done["w0"]["digest"] == done["w1"]["digest"]
    for row in done.values():
        # 200 steps of a 43k-parameter model: ln(256) = 5.5 nats -> well under 3.3
        assert row["final"] < 0.6 * row["initial"], row
    syncs = workers.records("w0", "sync")
    per_fragment = STEPS // 10  # every fragment is exchanged every 10 steps
    assert len(syncs) == per_fragment * (2 if variant == "streaming" else 1)
    sizes = done["w0"]["fragment_sizes"]
    for row in syncs:
        assert row["committed"] and row["members"] == row["contributors"] == 2
        assert row["bytes"] == expected_sync_bytes(variant, sizes[row["fragment"]], 2), row
    metrics = done["w0"]["metrics"]
    assert metrics["bytes_total"] == sum(r["bytes"] for r in syncs)
    assert metrics["peak_sync_bytes"] == max(r["bytes"] for r in syncs)
    if variant == "streaming":  # peak per exchange: about 1/P of the model, at 4.25 bits
        assert metrics["peak_sync_bytes"] < expected_sync_bytes("diloco", sum(sizes), 2) / 2 / 6
    # the two members agree on every exchange (replicated state digest after it)
    other = {r["sync"]: r["digest"] for r in workers.records("w1", "sync")}
    assert all(other[r["sync"]] == r["digest"] for r in syncs)


@pytest.mark.timeout(150)
def test_worker_killed_mid_exchange_rejoins_bit_identical(workers, coordinator_factory, tmp_path):
    """w1 dies while an Int4 exchange is in flight: the survivors' exchange fails and is
    applied nowhere; the restarted w1 joins a later exchange with weight 0, is healed with
    the global parameters and outer state, and all end bit-identical."""
    coordinator = coordinator_factory(heartbeat_timeout=2.0, initial_workers=3)
    common = ("--variant", "streaming", "--until-full", "3", "--after-clock", "48", "--sync-every", "8",
              "--fragments", "2", "--overlap", "2", "--step-sleep", "0.03")
    for i in range(3):
        extra = ("--kill-at", "49") if i == 1 else ()  # exchange issued at 48, applied at 50
        _start(workers, coordinator, f"w{i}", *common, *extra, "--save", str(tmp_path / f"w{i}.pt"))
    workers.wait_for(lambda: workers.procs["w1"].poll() is not None, 90, "w1 to kill itself")
    assert workers.procs["w1"].returncode == -signal.SIGKILL
    # Restart w1 only once the survivors committed an exchange without it (on a loaded machine
    # a restart after a fixed delay may already be back before their next exchange).
    workers.wait_for(
        lambda: any(r["committed"] and r["members"] == 2 for r in workers.records("w0", "sync")),
        90, "an exchange of the two survivors",
    )  # fmt: skip
    _start(workers, coordinator, "w1", *common, "--save", str(tmp_path / "w1.pt"))
    for name in ("w0", "w1", "w2"):
        assert workers.wait_exit(name, 120) == 0, workers.dump()

    # Nothing of the failed exchange was applied: the survivors' digests did not move.
    for name in ("w0", "w2"):
        rows = workers.records(name, "sync")
        failed = [i for i, r in enumerate(rows) if not r["committed"]]
        assert failed, f"{name} saw no failed exchange"
        for i in failed:
            assert rows[i]["clock"] == 48 and rows[i]["digest"] == rows[i - 1]["digest"]
        sizes = [(r["members"], r["contributors"]) for r in rows if r["committed"]]
        assert (2, 2) in sizes and (3, 2) in sizes and sizes[-1] == (3, 3)  # members logged
    joined = workers.records("w1", "joined")[-1]
    assert joined["inner_step"] > 50 and joined["syncs"] > 10  # joined a running group
    assert "DiLoCo global state received" in workers.stderr("w1")
    finals = [workers.records(n, "done")[0] for n in ("w0", "w1", "w2")]
    assert len({f["digest"] for f in finals}) == 1
    states = [torch.load(tmp_path / f"w{i}.pt") for i in range(3)]
    for other in states[1:]:
        for a, b in zip(states[0]["global"], other["global"]):
            assert torch.equal(a, b)
        for a, b in zip(states[0]["state"]["outer"]["momentum"], other["state"]["outer"]["momentum"]):
            assert torch.equal(a, b)
    assert finals[0]["final"] < 0.7 * finals[0]["initial"]
