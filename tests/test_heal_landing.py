"""A heal receiver's landing (ft/heal_landing.py): targets chosen from the metadata on a helper
thread, fresh memory paged in without ever being written, and the landed marks the members
wait for before hashing the healed state."""

from __future__ import annotations

import json
import threading

import pytest
import torch
import torch.distributed as dist

from lococomm.collectives.abort import AbortSignal
from lococomm.ft.heal_landing import FRESH, OWNED, SHARED, Landing, populate
from lococomm.ft.healing import HealError, ReceivePlan, mark_landed, receive_plan, wait_landed
from lococomm.ft.state import ReplicatedState, TensorSpec


def test_populate_never_changes_the_bytes():
    # it runs while the transfer writes the same memory: it must only fault pages in
    data = torch.arange(3 << 20, dtype=torch.int32)  # 12 MiB, pages already written
    before = data.clone()
    populate(data)
    assert torch.equal(data, before)
    fresh = torch.empty(5 << 20, dtype=torch.uint8)
    populate(fresh[1:])  # not page-aligned
    fresh.fill_(3)
    assert bool((fresh == 3).all())


def _state() -> ReplicatedState:
    model = torch.nn.Linear(3, 2)
    state = ReplicatedState()
    state.register("model", model)
    state.register("extra", {"ema": torch.zeros(2)})
    return state


@pytest.mark.timeout(30)
def test_landing_hands_over_metadata_and_targets():
    state = _state()
    snap = state.snapshot()
    specs = [*snap.specs, TensorSpec("extra.moments", "float32", (1 << 20,), "cpu")]
    meta = {"skeleton": snap.skeleton, "specs": [s.to_json() for s in specs], "sources": [0], "chunk_bytes": 1 << 20}
    store = dist.HashStore()
    abort = AbortSignal()
    landing = Landing(store, state, torch.device("cpu"), abort, 20.0, prepare=receive_plan)
    threading.Timer(0.2, store.set, ("heal/meta", json.dumps(meta))).start()
    got_meta, got_specs, targets, kinds = landing.wait(float("inf"))
    # the receive streams' plan is built on the landing thread too, into those very targets
    plan = landing.prepared
    assert isinstance(plan, ReceivePlan) and len(plan.headers) == 1
    assert any(p.data_ptr() == targets[-1].data_ptr() for p in plan.pieces[0])
    assert got_meta == meta and [s.path for s in got_specs] == [s.path for s in specs]
    kind = {s.path: k for s, k in zip(specs, kinds)}
    assert kind["model.weight"] == SHARED and kind["extra.ema"] == OWNED and kind["extra.moments"] == FRESH
    assert targets[-1].shape == (1 << 20,) and targets[-1].dtype == torch.float32
    landing.finished = True


@pytest.mark.timeout(30)
def test_landing_gives_up_on_abort():
    abort = AbortSignal()
    landing = Landing(dist.HashStore(), _state(), torch.device("cpu"), abort, 20.0)
    threading.Timer(0.2, abort.abort, ("epoch given up",)).start()
    with pytest.raises(RuntimeError, match="aborted"):
        landing.wait(float("inf"))


@pytest.mark.timeout(30)
def test_members_wait_for_every_receiver_to_land():
    # the up-to-date members hold their post-heal digest until the receivers' states are in
    store = dist.HashStore()
    abort = AbortSignal()
    results: list[str | None] = []
    waiter = threading.Thread(target=lambda: results.append(wait_landed(store, [1, 3], abort, 20.0)))
    waiter.start()
    mark_landed(store, 1)
    waiter.join(0.3)
    assert waiter.is_alive()  # receiver 3 is still landing
    mark_landed(store, 3)
    waiter.join(10)
    assert not waiter.is_alive() and results == [None]
    # bounded: a receiver that never lands ends the wait at the timeout, an abort at once
    assert "timed out" in (wait_landed(store, [2], abort, 0.2) or "")
    abort.abort("member gone")
    assert wait_landed(store, [2], abort, 20.0) == "aborted: member gone"

    class GoneStore:
        def set(self, key: str, value: str) -> None:
            raise RuntimeError("connection reset")

    # a receiver that cannot say it landed fails its heal (redone) rather than leave the
    # others waiting out their timeout
    with pytest.raises(HealError, match="could not tell the others"):
        mark_landed(GoneStore(), 1)
