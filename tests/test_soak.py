"""Soak: many random chaos events under `lococomm run`, bit-parity checked at every commit.

The CI version runs 4 workers for 300 steps with >= 10 events (kill, stop, join, coordinator
restart, leave). The long version (8 workers, 5000 steps) is marked slow:
    .venv/bin/python -m pytest tests/test_soak.py -m slow
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def stall_log(log: str, start: float, length: float) -> str:
    """The launcher and worker log lines written during a stall (wall-clock timestamps)."""
    lines = []
    for line in log.splitlines():
        stamp = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", line)
        if stamp is None:
            continue
        t = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(stamp.group(2)) / 1e3
        if start - 0.5 <= t <= start + length + 0.5:
            lines.append(line[:400])
    return "\n".join(lines[:200])


def run_soak(tmp_path: Path, workers: int, steps: int, seed: int, rate: float, timeout: float) -> dict:
    summary_path = tmp_path / "summary.json"
    cmd = [
        str(Path(sys.executable).with_name("lococomm")), "run", "--workers", str(workers),
        "--chaos", f"random:rate={rate},seed={seed}", "--chaos-steps", str(steps),
        "--heartbeat-timeout", "1", "--summary-json", str(summary_path),
        str(HERE / "heal_worker.py"), "--out", str(tmp_path / "{replica}.jsonl"),
        "--steps", str(steps), "--step-sleep", "0.01", "--parity-every", "25",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    (tmp_path / "run.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    summary = json.loads(summary_path.read_text())
    by_step: dict[int, set[str]] = {}
    times: list[float] = []
    for path in tmp_path.glob("w*.jsonl"):
        last_step = -1
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("event") == "start":
                last_step = -1  # a restarted process under the same replica id
                continue
            if row.get("event") != "step" or not row["committed"]:
                continue
            # Within one process, committed steps strictly increase.
            assert row["step"] > last_step, (path.name, row["step"], last_step)
            last_step = row["step"]
            by_step.setdefault(row["step"], set()).add(row["digest"])
            times.append(row["time"])
    # Every step committed exactly once globally, and every member agreed bit for bit.
    assert sorted(by_step) == list(range(steps))
    disagreements = {s: d for s, d in by_step.items() if len(d) != 1}
    assert not disagreements, disagreements
    assert summary["digests_agree"] and summary["committed"] == steps
    # No hang beyond its bound: the job never stood still much longer than a hang detection
    # plus a quorum and a worker restart.
    times.sort()
    worst, stall_start = max((b - a, a) for a, b in itertools.pairwise(times))
    assert worst < 1.0 + 8.0, (worst, stall_log(result.stdout + result.stderr, stall_start, worst))
    assert all(e["mttr"] is not None and e["mttr"] < 10 for e in summary["events"]), summary["events"]
    return summary


@pytest.mark.timeout(420)
def test_soak_random_chaos_four_workers_300_steps(tmp_path):
    summary = run_soak(tmp_path, workers=4, steps=300, seed=11, rate=0.05, timeout=400)
    kinds = [e["event"].split("@")[0].split()[0] for e in summary["events"]]
    assert len(kinds) >= 10, kinds
    assert {"kill", "stop", "join", "coordinator-restart"} <= set(kinds), kinds


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_random_chaos_eight_workers_5000_steps(tmp_path):
    summary = run_soak(tmp_path, workers=8, steps=5000, seed=5, rate=0.01, timeout=3500)
    assert len(summary["events"]) >= 30
