"""Replicated-state plumbing without processes: flattening, digests, chunk plans."""

from __future__ import annotations

import time

import pytest
import torch

from lococomm.ft.healing import chunk_nbytes, plan_chunks
from lococomm.ft.state import ReplicatedState, TensorSpec, flatten, unflatten


def test_optimizer_state_round_trips_with_int_keys_and_tuples():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    tensors, specs = [], []
    skeleton = flatten(sd, "opt", tensors, specs)
    back = unflatten(skeleton, [t.clone() for t in tensors])
    assert back["param_groups"][0]["betas"] == (0.8, 0.9)  # a tuple, not a list
    assert set(back["state"]) == {0, 1}  # int keys survive
    assert torch.equal(back["state"][0]["exp_avg"], sd["state"][0]["exp_avg"])
    assert [s.path for s in specs][:1] == ["opt.state.0.step"]


def test_unsupported_values_are_refused_with_their_path():
    with pytest.raises(TypeError, match=r"'x.bad'.*object"):
        flatten({"bad": object()}, "x", [], [])
    with pytest.raises(TypeError, match="key"):
        flatten({(1, 2): 1}, "x", [], [])


def test_digest_changes_with_one_bit_and_names_the_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    state = ReplicatedState()
    state.register("model", model)
    state.register("meta", {"tokens": 10})
    before, per_tensor, paths = state.digest()
    with torch.no_grad():
        model[1].weight.view(-1)[0] = torch.nextafter(model[1].weight.view(-1)[0], torch.tensor(1.0))
    after, per_tensor_after, _ = state.digest()
    assert before != after
    changed = [p for p, a, b in zip(paths, per_tensor, per_tensor_after) if a != b]
    assert changed == ["model.1.weight"]


def test_plain_dict_state_is_loaded_in_place():
    meta = {"tokens": 10, "name": "run"}
    state = ReplicatedState()
    state.register("meta", meta)
    snap = state.snapshot()
    other = {"tokens": 0}
    target = ReplicatedState()
    target.register("meta", other)
    target.load(snap.skeleton, snap.tensors)
    assert other == {"tokens": 10, "name": "run"}
    with pytest.raises(ValueError, match="names differ"):
        ReplicatedState().load(snap.skeleton, snap.tensors)


def test_chunk_plan_covers_every_byte_once_and_packs_small_tensors():
    specs = [
        TensorSpec("big", "float32", (5_000_000,), "cpu"),  # 20 MB: split
        TensorSpec("small1", "float32", (10,), "cpu"),
        TensorSpec("empty", "float32", (0,), "cpu"),
        TensorSpec("small2", "bfloat16", (3, 3), "cpu"),
        TensorSpec("scalar", "int64", (), "cpu"),
    ]
    chunks = plan_chunks(specs, chunk_bytes=8 << 20)
    covered: dict[int, list[tuple[int, int]]] = {}
    for chunk in chunks:
        assert 0 < chunk_nbytes(chunk) <= 8 << 20
        for seg in chunk:
            covered.setdefault(seg.tensor, []).append((seg.start, seg.end))
    for index, spec in enumerate(specs):
        ranges = sorted(covered.get(index, []))
        assert sum(b - a for a, b in ranges) == spec.nbytes
        assert all(a == (ranges[i - 1][1] if i else 0) for i, (a, _) in enumerate(ranges))
    assert len(chunks) == 4  # 3 pieces of "big" + one packed chunk of the small ones
    assert plan_chunks(specs, 8 << 20) == chunks  # pure: the same on every member


def test_heal_targets_receive_owned_tensors_in_place_and_repoint_them_on_abandon():
    """A receiver lands optimizer state and plain-dict values (the state holds the tensor
    objects themselves) straight from the wire, module parameters (aliases) through staging,
    and tensors it lacks in fresh memory; an abandoned heal re-points the owned tensors so a
    late write can only reach their old storage."""
    from types import SimpleNamespace

    from lococomm.ft.heal_landing import FRESH, OWNED, SHARED, choose_targets
    from lococomm.ft.healing import Healer

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    ema = {"ema": torch.zeros(2)}
    state = ReplicatedState()
    state.register("model", model)
    state.register("opt", opt)
    state.register("extra", ema)
    snap = state.snapshot()
    specs = [*snap.specs, TensorSpec("extra.new", "float32", (5,), "cpu")]
    comm = SimpleNamespace(device=torch.device("cpu"), timeout=5.0)
    healer = Healer(comm, None, state, [0], [1], groups=None)  # type: ignore[arg-type]
    targets, kinds = choose_targets(state, specs, comm.device)
    kind = {s.path: k for s, k in zip(specs, kinds)}
    assert kind["model.weight"] == SHARED
    assert kind["opt.state.0.exp_avg"] == OWNED and kind["extra.ema"] == OWNED
    assert kind["extra.new"] == FRESH
    exp_avg = opt.state[model.weight]["exp_avg"]
    index = [s.path for s in specs].index("opt.state.0.exp_avg")
    assert targets[index] is exp_avg
    old_view = exp_avg.view(-1)
    before = exp_avg.clone()
    healer._repoint([targets[index]])
    assert opt.state[model.weight]["exp_avg"] is exp_avg  # the same object, new storage
    assert exp_avg.data_ptr() != old_view.data_ptr()
    old_view.fill_(7.0)  # a zombie write into the old storage
    assert not torch.equal(exp_avg, torch.full_like(exp_avg, 7.0))
    assert torch.equal(old_view.view_as(before), torch.full_like(before, 7.0))


def test_chunk_digest_copy_copies_into_every_piece_and_hashes_the_chunk():
    from lococomm.ft.healing import chunk_digest, chunk_digest_copy

    staged = torch.randint(0, 256, (100,), dtype=torch.uint8)
    a, b = torch.zeros(60, dtype=torch.uint8), torch.zeros(40, dtype=torch.uint8)
    assert chunk_digest_copy(staged, [(a, 0), (b, 60)]) == chunk_digest(staged)
    assert torch.equal(torch.cat([a, b]), staged)
    whole = torch.zeros(100, dtype=torch.uint8)
    assert chunk_digest_copy(staged, [(whole, 0)]) == chunk_digest(staged)
    assert torch.equal(whole, staged)


def test_chunk_size_cuts_small_states_finer_and_caps_large_ones():
    from lococomm.ft.healing import CHUNK_BYTES, chunk_size_for

    assert chunk_size_for(10 << 30) == CHUNK_BYTES
    assert chunk_size_for(64 << 20) == 4 << 20  # ~16 chunks
    assert chunk_size_for(10 << 20) == 1 << 20  # never below 1 MiB
    assert chunk_size_for(100) == 1 << 20  # never below 1 MiB
    assert all(chunk_size_for(n) % 4096 == 0 for n in (1, 5 << 20, 77_777_777))


class _RecordingGraveyard:
    def __init__(self) -> None:
        self.retired: list = []

    def retire_groups(self, groups: list) -> None:
        self.retired.extend(groups)
        groups.clear()


@pytest.mark.timeout(30)
def test_heal_groups_rendezvous_in_the_background_and_late_ones_are_retired():
    """HealGroups starts every rendezvous at once (a receiver joins one group per source, a
    source its own, a bystander none); a group that finishes after the heal was given up is
    handed to the graveyard rather than leaked."""
    import threading

    from lococomm.collectives.abort import AbortSignal
    from lococomm.ft.healing import HealError, HealGroups

    release = threading.Event()
    calls: list[tuple[str, int, int]] = []

    def make_group(suffix: str, rank: int, size: int) -> object:
        calls.append((suffix, rank, size))
        if suffix == "heal/2":
            release.wait(10)
        return ("group", suffix)

    abort = AbortSignal()
    receiver = HealGroups(3, [2, 0], [3, 1], make_group, abort)  # rank 3: second receiver
    assert receiver.wanted == {"heal/0": (2, 3), "heal/2": (2, 3)}
    with pytest.raises(HealError, match="timed out"):
        receiver.wait(time.monotonic() + 0.2)  # heal/2 is still rendezvousing
    graveyard = _RecordingGraveyard()
    receiver.retire(graveyard)
    assert graveyard.retired == [("group", "heal/0")]
    release.set()
    deadline = time.monotonic() + 5
    while len(graveyard.retired) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert graveyard.retired == [("group", "heal/0"), ("group", "heal/2")]

    source = HealGroups(0, [0, 2], [1, 3], make_group, abort)
    assert source.wait(time.monotonic() + 5) == {"heal/0": ("group", "heal/0")}
    assert HealGroups(5, [0, 2], [1, 3], make_group, abort).wanted == {}  # bystander

    def broken(suffix: str, rank: int, size: int) -> object:
        raise RuntimeError("connection refused")

    with pytest.raises(HealError, match="connection refused"):
        HealGroups(1, [0], [1], broken, abort).wait(time.monotonic() + 5)


@pytest.mark.timeout(30)
def test_rendezvous_borrow_store_clients_from_a_pool(monkeypatch):
    """Concurrent rendezvous never share a store client (a blocking wait holds the client's
    lock: cross-process deadlock), and sequential ones reuse one instead of connecting anew
    (every 25th TCPStore client a process creates takes 5 s to connect here)."""
    import threading
    from types import SimpleNamespace

    from lococomm.ft import epoch

    client = SimpleNamespace(host="127.0.0.1", store_port=1, generation=1, local_address="127.0.0.1")
    groups = epoch.EpochGroups("gloo", 5.0, torch.device("cpu"), client)
    made: list[object] = []
    monkeypatch.setattr(groups, "_connect", lambda: made.append(object()) or made[-1])
    used: list[object] = []
    inside = threading.Barrier(2)

    def fake_group(backend, prefix_store, rank, size, timeout, address, device_index):
        used.append(prefix_store.underlying)
        if rank == 9:  # two rendezvous in flight at once
            inside.wait(5)
        return ("group", rank)

    class FakePrefixStore:
        def __init__(self, prefix, store):
            self.underlying = store

    monkeypatch.setattr(epoch, "new_process_group", fake_group)
    monkeypatch.setattr(epoch.dist, "PrefixStore", FakePrefixStore)
    for r in range(3):
        assert groups.new_group("p", r, 3) == ("group", r)
    assert len(made) == 1 and used == [made[0]] * 3  # one client, reused
    threads = [threading.Thread(target=groups.new_group, args=("q", 9, 2)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(made) == 2 and used[3] is not used[4]  # concurrent: distinct clients
    client.generation = 2  # re-registered with a restarted coordinator: new store
    groups.new_group("r", 0, 1)
    assert len(made) == 3 and used[5] is made[2]
    # An NCCL group uses the store again at its first collective: it keeps its client.
    nccl = epoch.EpochGroups("nccl", 5.0, torch.device("cpu"), client)
    monkeypatch.setattr(nccl, "_connect", lambda: made.append(object()) or made[-1])
    nccl.new_group("s", 0, 1)
    nccl.new_group("t", 0, 1)
    assert len(made) == 5 and used[6] is not used[7]
