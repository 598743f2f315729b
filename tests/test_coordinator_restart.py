"""Killing the coordinator process mid-training and restarting it on the same address."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_coordinator(port: int, log: Path) -> subprocess.Popen:
    lococomm = Path(sys.executable).with_name("lococomm")
    proc = subprocess.Popen(
        [str(lococomm), "coordinator", "--port", str(port), "--heartbeat-timeout", "1.5",
         "--initial-workers", "3"],
        stdout=subprocess.PIPE, stderr=open(log, "ab"), text=True,
    )
    line = proc.stdout.readline().strip()
    assert line == f"127.0.0.1:{port}", line
    return proc


@pytest.mark.timeout(150)
def test_coordinator_killed_and_restarted_training_continues_nothing_lost(workers, tmp_path):
    port = free_port()
    coordinator = start_coordinator(port, tmp_path / "coordinator.log")
    try:
        for i in range(3):
            workers.start(
                f"w{i}", "heal_worker.py", "--coordinator", f"127.0.0.1:{port}", "--replica", f"w{i}",
                "--steps", "60", "--step-sleep", "0.05", "--parity-every", "10",
            )
        workers.wait_for(lambda: len(workers.records("w0", "step")) >= 15, 60, "step 15")
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait(10)
        killed_at = time.time()
        time.sleep(2.0)  # workers keep retrying meanwhile
        for name in ("w0", "w1", "w2"):
            assert workers.procs[name].poll() is None, f"{name} died while the coordinator was down"
        coordinator = start_coordinator(port, tmp_path / "coordinator.log")
        for name in ("w0", "w1", "w2"):
            assert workers.wait_exit(name, 100) == 0, workers.dump()
    finally:
        coordinator.kill()
    committed: dict[int, set[str]] = {}
    for name in ("w0", "w1", "w2"):
        rows = [r for r in workers.records(name, "step") if r["committed"]]
        steps = [r["step"] for r in rows]
        assert steps == sorted(set(steps)), f"{name}: committed steps not strictly increasing"
        for r in rows:
            committed.setdefault(r["step"], set()).add(r["digest"])
        assert "not reachable" in workers.stderr(name) or "reconnected" in workers.stderr(name)
        # Training went on after the restart.
        assert any(r["time"] > killed_at + 2.0 for r in rows)
    # Every step was committed by someone (a worker that missed the decision was healed), and
    # at every committed step all workers that committed it hold the same state.
    assert sorted(committed) == list(range(60))
    assert all(len(digests) == 1 for digests in committed.values())
    finals = {workers.records(n, "done")[0]["digest"] for n in ("w0", "w1", "w2")}
    assert len(finals) == 1
