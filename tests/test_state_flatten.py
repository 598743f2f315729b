"""Replicated-state plumbing without processes: flattening, digests, chunk plans."""

from __future__ import annotations

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


def test_optimizers_adopt_loaded_tensors_modules_and_dicts_do_not():
    """Healing receives an optimizer's tensors into fresh memory because load_state_dict keeps
    them (no copy): check that premise on the installed torch, and that modules and plain
    dicts are received in place."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = ReplicatedState()
    state.register("model", model)
    state.register("opt", opt)
    state.register("opt2", {"ema": torch.zeros(2)})
    snap = state.snapshot()
    adopts = {s.path: state.adopts_loaded_tensors(s.path) for s in snap.specs}
    assert adopts["model.weight"] is False and adopts["opt2.ema"] is False
    assert adopts["opt.state.0.exp_avg"] is True
    fresh = [t.clone() for t in snap.tensors]
    state.load(snap.skeleton, fresh)
    loaded = {s.path: t for s, t in zip(snap.specs, fresh)}
    exp_avg = opt.state[model.weight]["exp_avg"]
    assert exp_avg.data_ptr() == loaded["opt.state.0.exp_avg"].data_ptr()  # adopted, not copied
    assert model.weight.data_ptr() != loaded["model.weight"].data_ptr()  # copied into the param


def test_chunk_digest_copy_copies_into_every_piece_and_hashes_the_chunk():
    from lococomm.ft.healing import chunk_digest, chunk_digest_copy

    staged = torch.randint(0, 256, (100,), dtype=torch.uint8)
    a, b = torch.zeros(60, dtype=torch.uint8), torch.zeros(40, dtype=torch.uint8)
    assert chunk_digest_copy(staged, [(a, 0), (b, 60)]) == chunk_digest(staged)
    assert torch.equal(torch.cat([a, b]), staged)
    whole = torch.zeros(100, dtype=torch.uint8)
    assert chunk_digest_copy(staged, [(whole, 0)]) == chunk_digest(staged)
    assert torch.equal(whole, staged)
