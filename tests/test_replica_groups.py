"""Replica groups of several ranks (torchrun) beside single-rank replicas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from replica_worker import contribution

HERE = Path(__file__).resolve().parent


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(180)
def test_torchrun_replica_group_beside_single_rank_replica(tmp_path, coordinator_factory):
    coordinator = coordinator_factory(heartbeat_timeout=2.0, initial_workers=2)
    env = {**os.environ, "LOCOCOMM_COORDINATOR": coordinator.address, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    env.pop("LOCAL_WORLD_SIZE", None)
    torchrun = Path(sys.executable).with_name("torchrun")
    big = subprocess.Popen(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", str(HERE / "replica_worker.py"),
         "--out", str(tmp_path / "big{rank}.jsonl")],
        env={**env, "LOCOCOMM_REPLICA_ID": "big"},
        stdout=open(tmp_path / "big.log", "wb"), stderr=subprocess.STDOUT,
    )
    small = subprocess.Popen(
        [sys.executable, str(HERE / "replica_worker.py"), "--out", str(tmp_path / "small{rank}.jsonl")],
        env={**env, "LOCOCOMM_REPLICA_ID": "small"},
        stdout=open(tmp_path / "small.log", "wb"), stderr=subprocess.STDOUT,
    )
    try:
        assert big.wait(150) == 0, (tmp_path / "big.log").read_text()[-3000:]
        assert small.wait(30) == 0, (tmp_path / "small.log").read_text()[-3000:]
    finally:
        for p in (big, small):
            if p.poll() is None:
                p.kill()
    big0, big1, small0 = (read(tmp_path / f) for f in ("big0.jsonl", "big1.jsonl", "small0.jsonl"))
    assert {r["group_world_size"] for r in big0 + big1} == {2}
    for rows in (big0, big1, small0):
        assert [r["step"] for r in rows if r["committed"]] == list(range(10))
    # Local rank 0 of both replicas form one cross-replica group...
    for r in big0 + small0:
        assert r["members"] == ["big", "small"] or r["members"] == ["small", "big"]
        assert r["value"] == contribution("big", 0, r["step"]) + contribution("small", 0, r["step"])
    # ...while local rank 1 exists only in the two-rank replica, so its group is itself.
    for r in big1:
        assert r["members"] == ["big"] and r["world_size"] == 1
        assert r["value"] == contribution("big", 1, r["step"])
