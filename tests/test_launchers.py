"""launch/ scripts end to end: replica groups of 2 torchrun ranks on CPU/gloo, a rank killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Long enough (~12 s of DP steps after the kill) for torchrun to restart the group (~6 s
# here under load) while replica group 0 is still training.
DP_STEPS, DILOCO_STEPS, SYNC_EVERY = 120, 30, 5


def rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut short by SIGKILL
    return out


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path.name} missing)"


@pytest.mark.timeout(240)
def test_two_torchrun_replica_groups_survive_a_killed_rank_and_agree(tmp_path):
    logs = tmp_path / "logs"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "REPLICAS": "2", "NPROC_PER_NODE": "2", "LOG_DIR": str(logs),
        "LOCOCOMM_HEARTBEAT_TIMEOUT": "2", "LOCOCOMM_TIMEOUT": "20",
        "MAX_RESTARTS": "2", "MONITOR_INTERVAL": "0.2", "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    for var in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCOCOMM_COORDINATOR", "LOCOCOMM_REPLICA_ID"):
        env.pop(var, None)
    cmd = [
        str(ROOT / "launch" / "local_cpu.sh"), str(ROOT / "examples" / "torchrun_train.py"),
        "--dp-steps", str(DP_STEPS), "--diloco-steps", str(DILOCO_STEPS),
        "--sync-every", str(SYNC_EVERY), "--step-sleep", "0.08",
        "--out", str(tmp_path / "{replica}-{rank}.jsonl"),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / "launcher.log", "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)

    def dump() -> str:
        return "\n".join(f"--- {p.name} ---\n{tail(p)}" for p in [tmp_path / "launcher.log", *sorted(logs.glob("*.log"))])

    victim = tmp_path / "replica1-1.jsonl"
    try:
        deadline = time.monotonic() + 120
        while True:
            done = [r for r in rows(victim) if r["event"] == "dp" and r["committed"]]
            if done and done[-1]["step"] >= 6:
                break
            assert proc.poll() is None, dump()
            assert time.monotonic() < deadline, "replica1 rank 1 never reached DP step 6\n" + dump()
            time.sleep(0.05)
        killed_pid = done[-1]["pid"]
        os.kill(killed_pid, signal.SIGKILL)  # one rank of replica group 1
        assert proc.wait(180) == 0, dump()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    final: dict[tuple[str, int], dict] = {}
    for replica in ("replica0", "replica1"):
        for rank in (0, 1):
            log = rows(tmp_path / f"{replica}-{rank}.jsonl")
            ends = [r for r in log if r["event"] == "done"]
            assert ends, f"{replica} rank {rank} did not finish\n{dump()}"
            final[(replica, rank)] = ends[-1]
            assert any(r["event"] == "diloco" and r["committed"] for r in log)
            assert any(r["event"] == "dp" and r["committed"] for r in log)

    # The whole of replica group 1 was restarted by torchrun (both ranks: new processes)...
    for rank in (0, 1):
        log = rows(tmp_path / f"replica1-{rank}.jsonl")
        starts = [r for r in log if r["event"] == "start"]
        assert [r["restart"] for r in starts] == [0, 1], starts
        assert final[("replica1", rank)]["pid"] != starts[0]["pid"]
        # ...and healed from replica group 0 before its first step.
        assert final[("replica1", rank)]["heal_bytes"] > 0
    assert final[("replica1", 1)]["pid"] != killed_pid
    # Replica group 0 never restarted and committed every DP step exactly once, in order.
    for rank in (0, 1):
        log = rows(tmp_path / f"replica0-{rank}.jsonl")
        assert [r["restart"] for r in log if r["event"] == "start"] == [0]
        committed = [r["step"] for r in log if r["event"] == "dp" and r["committed"]]
        assert committed == list(range(DP_STEPS)), committed
    # At the end, every local rank's cross-replica group agrees bit for bit.
    for rank in (0, 1):
        a, b = final[("replica0", rank)], final[("replica1", rank)]
        assert a["digest"] == b["digest"], (a, b)
        assert a["step"] == b["step"] and a["syncs"] == b["syncs"]
        assert sorted(a["members"]) == ["replica0", "replica1"]
    assert final[("replica0", 0)]["digest"] != final[("replica0", 1)]["digest"]  # separate groups
