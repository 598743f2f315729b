"""`lococomm run`: an embedded coordinator, N local CPU workers, chaos, progress and a summary.

The launcher is the coordinator's process: a `coordinator-restart` event throws its state away
(every worker connection drops, as in a crash) and starts a fresh one on the same port.
Workers are plain `python script.py` processes with LOCOCOMM_* in their environment; their
output is streamed with a `[w<i>]` prefix. Killed workers are restarted under the same replica
id after `restart_delay` seconds (a fresh process that must be healed), as a supervisor would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, TextIO

from lococomm.cli.chaos import ChaosEvent, RandomChaos, draw_random, parse
from lococomm.membership.coordinator import Coordinator

DRAIN_GRACE_SECONDS = 5.0


class BytesTally:
    """Job total of the workers' cumulative `bytes` reports for the progress line: it does not
    drop when a worker leaves or the coordinator restarts (the last report of each replica is
    kept), nor when a restarted process counts from 0 again."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self.earlier = 0  # what processes sent before they restarted

    def update(self, info: dict[str, Any]) -> int:
        for replica, values in info.items():
            reported = values.get("bytes") if isinstance(values, dict) else None
            if not isinstance(reported, int):
                continue
            previous = self.last.get(replica, 0)
            if reported < previous:
                self.earlier += previous
            self.last[replica] = reported
        return self.earlier + sum(self.last.values())


@dataclasses.dataclass
class WorkerProcess:
    index: int
    proc: subprocess.Popen
    started: float
    restarts: int = 0
    expected_exit: bool = False  # killed/left by chaos: a non-zero exit is not a failure
    stopped: bool = False

    @property
    def name(self) -> str:
        return f"w{self.index}"


@dataclasses.dataclass
class EventRecord:
    event: ChaosEvent
    time: float
    committed_at_event: int
    recovered_after: float | None = None  # seconds until the next committed step
    member: str | None = None  # replica that should (re)join: joiner, restarted or resumed worker
    rejoined_after: float | None = None  # seconds until `member` is in an epoch again
    seen_absent: bool = False


@dataclasses.dataclass
class RunConfig:
    script: str
    script_args: list[str]
    workers: int = 4
    chaos: str = "none"
    token: str | None = None
    heartbeat_timeout: float = 2.0
    min_workers: int = 1
    restart_delay: float = 1.0  # seconds before a killed worker is restarted; < 0: never
    port: int = 0
    chaos_steps: int = 1000  # horizon for random chaos
    status_every: float = 1.0  # seconds between progress lines
    stall_timeout: float = 120.0  # seconds without a committed step before the job is failed
    quiet: bool = False  # do not stream worker output
    summary_json: str | None = None  # also write the summary here as JSON


class Launcher:
    """Runs one `lococomm run` job; `run()` returns the process exit code."""

    def __init__(self, config: RunConfig, out: TextIO = sys.stdout) -> None:
        if config.workers < 1:
            raise ValueError("--workers must be >= 1")
        if not os.path.exists(config.script):
            raise FileNotFoundError(f"script {config.script!r} not found")
        self.config = config
        self.out = out
        chaos = parse(config.chaos)
        self.random_chaos = isinstance(chaos, RandomChaos)
        if isinstance(chaos, RandomChaos):
            chaos = draw_random(chaos, config.chaos_steps, config.workers)
        for event in chaos:
            if event.target is not None and event.target >= config.workers + 64:
                raise ValueError(f"chaos event {event.describe()} targets an unknown worker")
        self.pending: list[ChaosEvent] = list(chaos)
        self.continues: list[tuple[int, int]] = []  # (step, worker index) to SIGCONT
        self.records: list[EventRecord] = []
        self.workers: dict[int, WorkerProcess] = {}
        self.restart_at: dict[int, float] = {}
        self.failures: list[str] = []
        self.commit_times: list[tuple[float, int]] = []
        self.losses: list[tuple[int, float]] = []  # (committed step, mean reported loss)
        self.coordinator: Coordinator | None = None
        self.events_before_restart: list[dict[str, Any]] = []
        self.finals: dict[str, dict[str, Any]] = {}
        self._print_lock = threading.Lock()
        self._bytes = BytesTally()
        self._next_index = config.workers
        self.members: list[str] = []
        self._finished_ok = False
        self._finished_at = 0.0

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        self._start_coordinator(self.config.port)
        started = time.monotonic()
        try:
            for index in range(self.config.workers):
                self._spawn(index)
            self._loop()
        except KeyboardInterrupt:
            self._say("interrupted: stopping workers")
            self.failures.append("interrupted")
        finally:
            self._stop_all()
            assert self.coordinator is not None
            self.finals.update(self.coordinator.finals())
            events = self.events_before_restart + self.coordinator.events()
            self.coordinator.stop()
        return self._summary(time.monotonic() - started, events)

    def _start_coordinator(self, port: int, first: bool = True) -> None:
        self.coordinator = Coordinator(
            host="127.0.0.1",
            port=port,
            token=self.config.token,
            heartbeat_timeout=self.config.heartbeat_timeout,
            min_workers=self.config.min_workers,
            # The first epoch waits for every initial worker; after a restart the workers'
            # reports of their last epoch decide whom to wait for.
            initial_workers=self.config.workers if first else None,
            quorum_timeout=30.0,
            single_job=True,
            # A restart takes over the job: a restarted worker that reconnects before the
            # surviving members must not start a second history at step 0.
            resume=not first,
        ).start()
        self.address = self.coordinator.address

    def _spawn(self, index: int, restarts: int = 0) -> None:
        env = {
            **os.environ,
            "LOCOCOMM_COORDINATOR": self.address,
            "LOCOCOMM_REPLICA_ID": f"w{index}",
            "LOCOCOMM_SIGTERM_LEAVE": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONUNBUFFERED": "1",
        }
        if self.config.token:
            env["LOCOCOMM_TOKEN"] = self.config.token
        proc = subprocess.Popen(
            [sys.executable, self.config.script, *self.config.script_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        worker = WorkerProcess(index, proc, time.monotonic(), restarts)
        self.workers[index] = worker
        threading.Thread(target=self._pump, args=(worker,), daemon=True).start()

    def _pump(self, worker: WorkerProcess) -> None:
        assert worker.proc.stdout is not None
        for raw in worker.proc.stdout:
            if not self.config.quiet:
                self._say(f"[{worker.name}] {raw.decode(errors='replace').rstrip()}")

    def _say(self, text: str) -> None:
        with self._print_lock:
            self.out.write(text + "\n")
            self.out.flush()

    # ------------------------------------------------------------------ main loop
    def _loop(self) -> None:
        next_status = time.monotonic()
        last_committed = -1
        last_progress = time.monotonic()
        while True:
            now = time.monotonic()
            assert self.coordinator is not None
            snapshot = self.coordinator.snapshot()
            self.members = list(snapshot["members"]) if snapshot["live"] else []
            committed = int(snapshot["committed"])
            if now - last_progress > self.config.stall_timeout:
                self.failures.append(
                    f"no committed step for {self.config.stall_timeout:.0f} s (stuck at step "
                    f"{committed}): see the coordinator's log above"
                )
                self._say(f"[launcher] {self.failures[-1]}; stopping")
                return
            if committed != last_committed:
                self.commit_times.append((now, committed))
                last_committed = committed
                last_progress = now
                for record in self.records:
                    if record.recovered_after is None and committed > record.committed_at_event:
                        record.recovered_after = now - record.time
                losses = [
                    v["loss"]
                    for v in snapshot.get("info", {}).values()
                    if isinstance(v.get("loss"), int | float)
                ]
                if losses:
                    self.losses.append((committed, statistics.fmean(losses)))
            members = set(snapshot["members"]) if snapshot["live"] else set()
            for record in self.records:
                if not record.member or record.rejoined_after is not None:
                    continue
                if record.member not in members:
                    record.seen_absent = True  # out of the group (expelled, dead or not yet in)
                elif record.seen_absent:
                    record.rejoined_after = now - record.time
            self._fire_chaos(committed, now)
            self._reap(now)
            self._drain(now)
            if now >= next_status:
                self._status(snapshot)
                next_status = now + self.config.status_every
            if not any(w.proc.poll() is None for w in self.workers.values()) and not self.restart_at:
                return
            time.sleep(0.02)

    def _fire_chaos(self, committed: int, now: float) -> None:
        for step, index in [c for c in self.continues if c[0] <= committed]:
            self.continues.remove((step, index))
            worker = self.workers.get(index)
            if worker and worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGCONT)
                worker.stopped = False
                self._say(f"[chaos] SIGCONT w{index} at step {committed}")
        if self._finished_ok:
            return  # somebody finished: injecting more would only hit a draining job
        while self.pending and self.pending[0].step <= committed:
            event = self.pending.pop(0)
            member = self._apply(event, committed)
            if member is False:
                continue
            self.records.append(EventRecord(event, now, committed, member=member or None))
            self._say(f"[chaos] {event.describe()} (step {committed})")

    def _apply(self, event: ChaosEvent, committed: int) -> str | bool:
        """Carry out one event. Returns False if skipped, else the replica expected to (re)join
        afterwards ("" if none)."""
        if event.kind == "join":
            index = self._next_index
            self._next_index += 1
            self._spawn(index)
            return f"w{index}"
        if event.kind == "coordinator-restart":
            assert self.coordinator is not None
            port = self.coordinator.port
            self.events_before_restart += self.coordinator.events()
            self.finals.update(self.coordinator.finals())
            self.coordinator.stop()
            self._start_coordinator(port, first=False)
            return ""
        worker = self.workers.get(event.target if event.target is not None else -1)
        if worker is None or worker.proc.poll() is not None or worker.stopped:
            self._say(f"[chaos] skipping {event.describe()}: w{event.target} is not running")
            return False
        # Taking out the last member(s) holding the state would lose the job: random chaos keeps
        # two members, explicit chaos refuses only to remove the very last one.
        keep = 2 if self.random_chaos else 1
        members = self.members
        if worker.name in members and len(members) - 1 < keep:
            self._say(
                f"[chaos] skipping {event.describe()}: it would leave {len(members) - 1} "
                "member(s) holding the state"
            )
            return False
        if event.kind == "kill":
            worker.expected_exit = True
            worker.proc.send_signal(signal.SIGKILL)
            if self.config.restart_delay >= 0:
                self.restart_at[worker.index] = time.monotonic() + self.config.restart_delay
                return worker.name
        elif event.kind == "stop":
            worker.stopped = True
            worker.proc.send_signal(signal.SIGSTOP)
            assert event.until is not None
            self.continues.append((event.until, worker.index))
            return worker.name
        elif event.kind == "leave":
            worker.expected_exit = True
            worker.proc.send_signal(signal.SIGTERM)
        return ""

    def _reap(self, now: float) -> None:
        for index, when in list(self.restart_at.items()):
            worker = self.workers[index]
            if when <= now and worker.proc.poll() is not None:
                del self.restart_at[index]
                if self._finished_ok:
                    continue
                self._spawn(index, worker.restarts + 1)
                self._say(f"[launcher] restarted w{index} (fresh process, same replica id)")
        for worker in self.workers.values():
            code = worker.proc.poll()
            if code is None or getattr(worker, "_reaped", False):
                continue
            worker._reaped = True  # type: ignore[attr-defined]
            if worker.expected_exit:
                continue  # killed or told to leave by chaos
            if code == 0:
                if not self._finished_ok:
                    self._finished_ok, self._finished_at = True, now
                continue
            self.failures.append(f"w{worker.index} exited with code {code}")
            self._say(f"[launcher] w{worker.index} failed (exit code {code})")
            if self.config.restart_delay >= 0 and worker.restarts < 3 and not self._finished_ok:
                self.restart_at[worker.index] = now + self.config.restart_delay

    def _drain(self, now: float) -> None:
        """Once the job is done, workers still starting (or healing into a group that has
        finished) would begin a new run from scratch: stop them after a short grace period."""
        if not self._finished_ok or now - self._finished_at < DRAIN_GRACE_SECONDS:
            return
        self.restart_at.clear()
        for worker in self.workers.values():
            if worker.proc.poll() is None and not worker.expected_exit:
                worker.expected_exit = True
                worker.proc.send_signal(signal.SIGCONT)
                worker.proc.send_signal(signal.SIGTERM)
                self._say(f"[launcher] the job is done: stopping late worker {worker.name}")

    def _stop_all(self) -> None:
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGCONT)
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for worker in self.workers.values():
            try:
                worker.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()

    # ------------------------------------------------------------------ output
    def _status(self, snapshot: dict[str, Any]) -> None:
        info = snapshot.get("info", {})
        losses = [v["loss"] for v in info.values() if isinstance(v.get("loss"), int | float)]
        sent = self._bytes.update(info)
        loss = f" | loss {statistics.fmean(losses):.3f}" if losses else ""
        alive = sum(1 for w in self.workers.values() if w.proc.poll() is None and not w.stopped)
        self._say(
            f"[lococomm] step {snapshot['committed']} | epoch {snapshot['epoch']} | "
            f"members {len(snapshot['members'])}/{alive} | events {len(self.records)}{loss} | "
            f"sent {_human_bytes(sent)}"
        )

    def _summary(self, seconds: float, events: list[dict[str, Any]]) -> int:
        steps = [c for _, c in self.commit_times]
        final_step = max(steps) if steps else 0
        intervals = [
            b[0] - a[0] for a, b in zip(self.commit_times, self.commit_times[1:]) if b[1] == a[1] + 1
        ]
        typical = statistics.median(intervals) if intervals else 0.0
        self._say("")
        self._say(f"== lococomm run summary ({seconds:.1f} s) ==")
        self._say(f"committed steps: {final_step} (median step {typical * 1e3:.0f} ms)")
        epochs = sum(1 for e in events if e["kind"] == "epoch")
        self._say(f"epochs formed: {epochs}")
        for record in self.records:
            mttr = "not recovered" if record.recovered_after is None else f"{record.recovered_after:.2f} s"
            back = ""
            if record.member:
                seconds_back = record.rejoined_after
                back = f", {record.member} member again after " + (
                    f"{seconds_back:.2f} s" if seconds_back is not None else "never"
                )
            self._say(
                f"  {record.event.describe():<28} at step {record.committed_at_event:<5} "
                f"MTTR {mttr}{back}"
            )
        if self.losses:
            (first_step, first), (last_step, last) = self.losses[0], self.losses[-1]
            self._say(f"loss: {first:.3f} at step {first_step} -> {last:.3f} at step {last_step}")
        ok = True
        digests = {
            replica: final
            for replica, final in self.finals.items()
            if final.get("step") == final_step and final.get("digest")
        }
        if digests:
            agree = len({f["digest"] for f in digests.values()}) == 1
            names = ", ".join(sorted(digests))
            self._say(f"final state digests ({names}): {'all equal' if agree else 'DIFFER'}")
            ok &= agree
        else:
            self._say("final state digests: none reported at the final step")
        if not self._finished_ok:
            self.failures.append("no worker finished successfully")
        for failure in self.failures:
            self._say(f"failure: {failure}")
        ok &= not self.failures
        self.summary = {
            "committed": final_step,
            "seconds": seconds,
            "events": [
                {
                    "event": r.event.describe(),
                    "step": r.committed_at_event,
                    "mttr": r.recovered_after,
                    "rejoined_after": r.rejoined_after,
                }
                for r in self.records
            ],
            "losses": self.losses,
            "digests_agree": bool(digests) and len({f["digest"] for f in digests.values()}) == 1,
            "failures": list(self.failures),
        }
        self._say("result: " + ("OK" if ok else "FAILED"))
        self.summary["ok"] = ok
        if self.config.summary_json:
            with open(self.config.summary_json, "w") as f:
                json.dump(self.summary, f, indent=1)
        return 0 if ok else 1


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
