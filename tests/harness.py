"""Process harness for tests: start worker scripts, read their JSON logs, clean up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Workers:
    """Starts worker processes (each with its own JSON-lines log) and kills them at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        out = self.tmp / f"{name}.jsonl"
        err = open(self.tmp / f"{name}.stderr", "ab")
        full_env = {**os.environ, **(env or {})}
        full_env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.Popen(
            [sys.executable, str(HERE / script), "--out", str(out), *args],
            stdout=err,
            stderr=err,
            env=full_env,
        )
        self.procs[name] = proc
        self.logs[name] = out
        return proc

    def records(self, name: str, event: str | None = None) -> list[dict]:
        path = self.logs[name]
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by SIGKILL
            if event is None or row.get("event") == event:
                rows.append(row)
        return rows

    def stderr(self, name: str) -> str:
        path = self.tmp / f"{name}.stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.dump()}")

    def wait_exit(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not exit within {timeout}s\n{self.dump()}") from None

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].send_signal(sig)

    def dump(self) -> str:
        parts = []
        for name in self.procs:
            parts.append(f"--- {name} stderr (tail) ---\n{self.stderr(name)[-3000:]}")
        return "\n".join(parts)

    def cleanup(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
