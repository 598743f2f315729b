"""The exact all-reduce's signature exchange overlapping its backup copies, against a scripted
process group (no processes): the verdict gates every data op, and a mismatch leaves the
caller's tensor untouched."""

from __future__ import annotations

import pytest
import torch

from lococomm.collectives import exact, signature
from scripted_group import ScriptedGroup, scripted_communicator

NUMEL = 4 * exact.TARGET_CHUNK_BYTES // 4  # 16M fp32: 4 chunks


@pytest.mark.timeout(30)
@pytest.mark.parametrize("polls", [0, 2, 100])
@pytest.mark.parametrize("owned", [True, False])
def test_backup_copies_overlap_the_check_and_the_result_is_exact(monkeypatch, polls, owned):
    copies: list[int] = []
    group = ScriptedGroup([], check_polls=polls)
    real_copy = exact._copy_while_checking

    def spy(check, chunks, copy_chunk):
        copied, verdict = real_copy(check, chunks, copy_chunk)
        copies.append(copied)
        return copied, verdict

    monkeypatch.setattr(exact, "_copy_while_checking", spy)
    failures: list[str] = []
    comm = scripted_communicator(group, failures)
    base = torch.arange(NUMEL + 2, dtype=torch.float32)
    tensor = base.clone()[:NUMEL].clone() if owned else base[1:-1]  # a view takes the private path
    expected = tensor.clone() * 2
    assert exact.exclusively_owned(tensor) is owned
    assert exact.allreduce(comm, tensor, "sum").wait() is True
    assert failures == []
    assert torch.equal(tensor, expected)
    chunks = exact.plan_chunks(NUMEL, 4)
    assert len(chunks) == 4
    # The check was issued before any data op, and every data op after its verdict.
    assert group.log == ["check"] + ["allreduce"] * len(chunks)
    # Chunks were copied while the exchange was in flight: none when it was instant, one per
    # poll while pending, all of them when it outlasted the copies.
    assert copies == [min(polls, len(chunks))]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("owned", [True, False])
def test_mismatch_found_by_the_check_sends_nothing_and_leaves_the_tensor(owned):
    tensor = torch.full((NUMEL,), 3.0) if owned else torch.full((NUMEL + 2,), 3.0)[1:-1]
    fields = signature.fields("allreduce", exact.REDUCE_OPS["sum"], torch.empty(NUMEL + 1))
    group = ScriptedGroup([], check_polls=3, peer_row=fields)
    failures: list[str] = []
    comm = scripted_communicator(group, failures)
    assert exact.allreduce(comm, tensor, "sum", name="grads").wait() is False
    assert group.log == ["check"]  # no data op was issued
    assert torch.equal(tensor, torch.full((NUMEL,), 3.0))
    assert len(failures) == 1 and "'grads'" in failures[0]
    assert f"numel {NUMEL} on rank [0], {NUMEL + 1} on rank [1]" in failures[0]
    assert comm.bytes_sent == 0
    # The backup / private buffer went back to the pool (nothing was handed to gloo).
    assert len(comm.graveyard) == 0
