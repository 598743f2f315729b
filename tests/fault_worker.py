"""A worker process for fault tests: all-reduces known values and logs every step as JSON.

Worker `w<i>` contributes (i + 1) * (step + 1) at step `step`, so the exact committed sum over
an epoch's members is known. It can kill or stop itself in the middle of a collective (after
issuing it, before waiting), which puts the signal exactly where the tests want it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

import torch

import lococomm as lc


def value_of(replica_id: str, step: int) -> float:
    return float((int(replica_id.lstrip("w")) + 1) * (step + 1))


def send_signal(out, step: int, event: str, signum: int) -> None:
    """Log the event, then signal this very process (SIGSTOP stops every thread)."""
    out.write(json.dumps({"event": event, "step": step, "time": time.time()}) + "\n")
    os.kill(os.getpid(), signum)
    out.write(json.dumps({"event": "continued", "time": time.time()}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--replica", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--numel", type=int, default=1 << 16)
    parser.add_argument("--op", default="sum")
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--stop-at", type=int, default=-1)
    parser.add_argument("--leave-at", type=int, default=-1)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--token", default=None)
    parser.add_argument("--view", action="store_true", help="all-reduce a view (private path)")
    parser.add_argument("--sync", action="store_true", help="blocking all-reduce (large tensors "
                        "take the zero-copy ring); --kill-at/--stop-at then signal from a timer "
                        "thread --signal-delay seconds after the call began")
    parser.add_argument("--signal-delay", type=float, default=0.005)
    parser.add_argument("--mismatch-at", type=int, default=-1, help="use a wrong shape/dtype here")
    parser.add_argument("--mismatch", default="shape", choices=["shape", "dtype"])
    parser.add_argument("--mismatch-always", action="store_true", help="never fix the mismatch")
    parser.add_argument("--max-retries", type=int, default=100)
    parser.add_argument("--until-member", default="", help="after --steps, keep going until this "
                        "replica has been a member for --extra-steps committed steps")
    parser.add_argument("--extra-steps", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {args.replica} %(name)s: %(message)s", stream=sys.stderr
    )
    torch.set_num_threads(1)
    out = open(args.out, "a", buffering=1)
    manager = lc.Manager(
        args.coordinator,
        replica_id=args.replica,
        timeout=args.timeout,
        token=args.token,
        max_retries=args.max_retries,
    )
    out.write(json.dumps({"event": "registered", "time": time.time()}) + "\n")
    stopped = False
    mismatched = False  # only the first attempt of --mismatch-at uses the wrong tensor
    target = args.steps
    while manager.step < target or (args.until_member and target == args.steps):
        if manager.step == args.leave_at:
            out.write(json.dumps({"event": "leave", "step": manager.step, "time": time.time()}) + "\n")
            manager.close()
            return
        manager.start_step()
        step = manager.step
        value = value_of(args.replica, step)
        if args.view:
            base = torch.full((args.numel + 8,), value)
            tensor = base[4:-4]
        elif step == args.mismatch_at and not mismatched and args.mismatch == "shape":
            tensor = torch.full((args.numel + 1,), value)
            mismatched = not args.mismatch_always
        elif step == args.mismatch_at and not mismatched and args.mismatch == "dtype":
            tensor = torch.full((args.numel,), value, dtype=torch.float64)
            mismatched = not args.mismatch_always
        else:
            tensor = torch.full((args.numel,), value)
        signal_now = None
        if step == args.kill_at:
            signal_now = ("kill", signal.SIGKILL)
        elif step == args.stop_at and not stopped:
            stopped = True
            signal_now = ("stop", signal.SIGSTOP)
        if args.sync:
            timer = None
            if signal_now is not None:
                timer = threading.Timer(args.signal_delay, send_signal, (out, step, *signal_now))
                timer.start()
            ok = manager.allreduce(tensor, op=args.op, name="grads")
            if timer is not None:
                timer.join()
        else:
            handle = manager.allreduce(tensor, op=args.op, async_op=True, name="grads")
            if signal_now is not None:
                send_signal(out, step, *signal_now)
            ok = handle.wait()
        committed = manager.commit()
        first = tensor.view(-1)[0].item()
        out.write(
            json.dumps(
                {
                    "event": "step",
                    "step": step,
                    "epoch": manager.epoch,
                    "members": manager.members,
                    "ok": bool(ok),
                    "committed": committed,
                    "value": first,
                    "own": value,  # this worker's contribution: a failed step leaves it
                    "uniform": bool(torch.all(tensor == first)),
                    "failure": manager.last_failure if not committed else "",
                    "dtype": str(tensor.dtype),
                    "time": time.time(),
                }
            )
            + "\n"
        )
        if committed and args.until_member in manager.members and target == args.steps:
            target = max(args.steps, manager.step + args.extra_steps)
        if args.step_sleep:
            time.sleep(args.step_sleep)
    out.write(json.dumps({"event": "done", "step": manager.step, "time": time.time()}) + "\n")
    manager.close()


if __name__ == "__main__":
    main()
