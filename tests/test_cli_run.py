"""`lococomm run` end to end: chaos of every kind, a summary, equal final digests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def lococomm() -> str:
    return str(Path(sys.executable).with_name("lococomm"))


@pytest.mark.timeout(240)
def test_run_with_every_chaos_kind_ends_with_equal_digests(tmp_path):
    chaos = "kill:1@15,stop:2@25-35,join@40,coordinator-restart@50,leave:0@60"
    result = subprocess.run(
        [lococomm(), "run", "--workers", "3", "--chaos", chaos, "--heartbeat-timeout", "1",
         str(HERE / "heal_worker.py"), "--out", str(tmp_path / "{replica}.jsonl"),
         "--steps", "80", "--step-sleep", "0.03", "--parity-every", "10"],
        capture_output=True, text=True, timeout=220,
    )
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-3000:]
    assert "result: OK" in out
    summary = out[out.index("== lococomm run summary"):]
    for item in ("kill w1@15", "stop w2@25-35", "join@40", "coordinator-restart@50", "leave w0@60"):
        assert item in summary, summary
    assert "not recovered" not in summary
    assert "all equal" in summary
    assert "committed steps: 80" in summary
    # Worker output was streamed with prefixes, with progress lines in between.
    assert "[w1]" in out and "[lococomm] step" in out
    # Per-commit bit-parity across every worker that took part (including the restarted w1,
    # the resumed w2 and the joiner w3).
    by_step: dict[int, set[str]] = {}
    for path in tmp_path.glob("w*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("event") == "step" and row["committed"]:
                by_step.setdefault(row["step"], set()).add(row["digest"])
    assert sorted(by_step) == list(range(80))
    assert all(len(d) == 1 for d in by_step.values())


def test_run_refuses_bad_input(tmp_path):
    bad = subprocess.run(
        [lococomm(), "run", "--chaos", "explode@3", str(HERE / "heal_worker.py")],
        capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2 and "unknown kind" in bad.stderr
    missing = subprocess.run(
        [lococomm(), "run", str(tmp_path / "nope.py")], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_progress_bytes_do_not_drop_when_workers_leave_or_restart():
    from lococomm.cli.run import BytesTally

    tally = BytesTally()
    assert tally.update({"w0": {"bytes": 100}, "w1": {"bytes": 50, "loss": 2.0}}) == 150
    assert tally.update({"w0": {"bytes": 120}}) == 170  # w1 left (or the coordinator restarted)
    assert tally.update({"w0": {"bytes": 130}, "w1": {"bytes": 5}}) == 130 + 50 + 5  # w1 restarted
    assert tally.update({"w2": {"loss": 1.0}, "w3": "not a dict"}) == 185
