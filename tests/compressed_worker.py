"""A worker process for compressed all-reduce tests; logs every step as one JSON line.

Worker `w<i>` contributes inputs drawn from a generator seeded by (i, step), so every worker
can compute the exact mean over any set of members itself (in float64) and report the error
of what the compressed collective returned, plus a digest of the result's bytes (compared
across members for bit-identity).

Modes:
  check  all-reduce the inputs every step (optionally with error feedback) and report the
         error, the running-sum error, EF state digests around failed steps.
  train  least squares: each worker owns rows (A_i, b_i); the gradient is all-reduced with
         the codec and error feedback; the global loss over all four workers' data is logged.

--kill-at S --kill-wait K: at step S the worker SIGKILLs itself at its K-th wait on the
network inside the collective (K = 2: just after the data ops were issued), which puts the
kill in the middle of the compressed all-reduce. --kill-after-wait: once that wait has
returned instead (the others are then known to be inside the same collective).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import time

import torch

import lococomm as lc
from lococomm.collectives.communicator import Communicator
from lococomm.compress import EF21, EControl, ErrorFeedback, from_spec

DIM = 64
ROWS = 48


def member_index(replica: str) -> int:
    return int(replica.lstrip("w"))


def input_of(replica: str, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * member_index(replica) + step)
    scale = 1.0 + member_index(replica)
    return torch.randn(shape, generator=gen) * scale + 0.1 * member_index(replica)


def exact_mean(members: list[str], step: int, shape: tuple[int, ...]) -> torch.Tensor:
    total = sum(input_of(m, step, shape).double() for m in members)
    return total / len(members)


def digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.detach().contiguous().view(torch.uint8).numpy().tobytes(), digest_size=8).hexdigest()


def state_digest(ef) -> str:
    if ef is None:
        return ""
    sd = ef.state_dict()
    h = hashlib.blake2b(json.dumps(sd["meta"], sort_keys=True).encode(), digest_size=8)
    for k in sorted(sd["tensors"]):
        h.update(k.encode())
        h.update(sd["tensors"][k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def make_ef(kind: str, codec):
    if kind == "none":
        return None
    if kind == "ef":
        return ErrorFeedback(codec)
    if kind == "ef21":
        return EF21(codec)
    if kind == "econtrol":
        return EControl(codec, eta=0.5)
    raise ValueError(kind)


def arm_kill(out, step: int, after_waits: int, once_returned: bool = False) -> None:
    """SIGKILL this process at its `after_waits`-th network wait from now on (or, with
    `once_returned`, as soon as that wait has returned)."""
    original = Communicator.wait
    count = {"n": 0}

    def die() -> None:
        out.write(json.dumps({"event": "kill", "step": step, "time": time.time()}) + "\n")
        out.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def wait(self, works, deadline=None):
        count["n"] += 1
        if count["n"] >= after_waits and not once_returned:
            die()
        result = original(self, works, deadline)
        if count["n"] >= after_waits:
            die()
        return result

    Communicator.wait = wait


def problem(replica: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(77 + member_index(replica))
    a = torch.randn(ROWS, DIM, generator=gen)
    truth = torch.linspace(-1, 1, DIM)
    b = a @ truth + 0.01 * torch.randn(ROWS, generator=gen) + 0.3 * member_index(replica)
    return a, b


def global_loss(w: torch.Tensor) -> float:
    total = 0.0
    for i in range(4):
        a, b = problem(f"w{i}")
        total += float(((a @ w - b) ** 2).mean())
    return total / 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--replica", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--codecs", required=True, help="JSON list of codec specs; step s uses s % len")
    parser.add_argument("--ef", default="none", choices=["none", "ef", "ef21", "econtrol"])
    parser.add_argument("--mode", default="check", choices=["check", "train"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--shape", default="4099")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--op", default="mean")
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--kill-wait", type=int, default=2)
    parser.add_argument("--kill-after-wait", action="store_true")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--slow-until-members", type=int, default=0,
                        help="after --slow-after, sleep 0.5 s per step while fewer members")
    parser.add_argument("--slow-after", type=int, default=0)
    parser.add_argument("--ring-min-bytes", type=int, default=-1, help="override (tiny-tensor rings)")
    args = parser.parse_args()
    if args.ring_min_bytes >= 0:
        from lococomm.collectives import compressed

        compressed.RING_MIN_BYTES = args.ring_min_bytes
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {args.replica} %(name)s: %(message)s", stream=sys.stderr
    )
    torch.set_num_threads(1)
    out = open(args.out, "a", buffering=1)
    codecs = [from_spec(spec) for spec in json.loads(args.codecs)]
    efs = [make_ef(args.ef, c) for c in codecs]
    shape = tuple(int(s) for s in args.shape.split("x"))
    dtype = getattr(torch, args.dtype)
    w = torch.zeros(DIM)
    state = {"model": {"w": w}} if args.mode == "train" else None
    manager = lc.Manager(args.coordinator, replica_id=args.replica, timeout=args.timeout, state=state)
    out.write(json.dumps({"event": "registered", "time": time.time()}) + "\n")
    running: dict[int, torch.Tensor] = {}
    running_exact: dict[int, torch.Tensor] = {}
    while manager.step < args.steps:
        manager.start_step()
        step = manager.step
        members = manager.members
        which = step % len(codecs)
        codec, ef = codecs[which], efs[which]
        if args.mode == "train":
            a, b = problem(args.replica)
            tensor = (2.0 / ROWS) * a.t() @ (a @ w - b)
            own = tensor.clone()
        else:
            own = input_of(args.replica, step, shape).to(dtype)
            tensor = own.clone()
        ef_before = state_digest(ef)
        if step == args.kill_at:
            arm_kill(out, step, args.kill_wait, args.kill_after_wait)
        ok = manager.allreduce(tensor, op=args.op, codec=codec, error_feedback=ef, name="t")
        ef_after_call = state_digest(ef)
        committed = manager.commit()
        if ef is not None:
            if committed:
                ef.commit()
            else:
                ef.rollback()
        row = {
            "event": "step",
            "step": step,
            "epoch": manager.epoch,
            "members": members,
            "ok": bool(ok),
            "committed": committed,
            "codec": codec.name,
            "digest": digest(tensor),
            "unchanged": bool(torch.equal(tensor, own)),
            "ef_before": ef_before,
            "ef_after_call": ef_after_call,
            "ef_after": state_digest(ef),
            "stats": manager.metrics.compressed.get("last", {}),
            "failure": manager.last_failure if not committed else "",
            "time": time.time(),
        }
        if committed and args.mode == "check":
            exact = exact_mean(members, step, shape)
            if args.op == "sum":
                exact = exact * len(members)
            result = tensor.double()
            row["rel_err"] = float((result - exact).norm() / exact.norm().clamp_min(1e-30))
            # triangle bound for algorithms that sum individually decoded payloads
            own_errs = [
                float((codec.decode(codec.encode(input_of(m, step, shape).to(dtype), 0)).double()
                       - input_of(m, step, shape).to(dtype).double()).norm())
                for m in members
            ]  # fmt: skip
            row["bound_rel"] = sum(own_errs) / len(members) / float(exact.norm().clamp_min(1e-30))
            row["codec_rel_err"] = float(
                (codec.decode(codec.encode(exact.float(), 0)).double() - exact).norm()
                / exact.norm().clamp_min(1e-30)
            )
            running[which] = running.get(which, 0) + result
            running_exact[which] = running_exact.get(which, 0) + exact
            diff = (running[which] - running_exact[which]).norm()
            row["running_rel_err"] = float(diff / running_exact[which].norm())
            row["running_abs_err"] = float(diff)
            row["norm"] = float(exact.norm())
        if ef is not None and committed and args.ef == "ef":
            e = ef.state("t", "e")
            row["residual_norm"] = float(e.double().norm()) if e is not None else 0.0
        if committed and args.mode == "train":
            w -= args.lr * tensor
            row["loss"] = global_loss(w)
        out.write(json.dumps(row) + "\n")
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if step >= args.slow_after and len(members) < args.slow_until_members:
            time.sleep(0.5)  # give a restarted worker time to start and join
    out.write(json.dumps({"event": "done", "step": manager.step, "metrics": manager.metrics.as_dict(), "time": time.time()}) + "\n")
    manager.close()


if __name__ == "__main__":
    main()
