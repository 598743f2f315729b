"""A worker that trains a tiny model with replicated state (model + Adam + extras) for healing
and parity tests. Each worker starts from a different random init; healing makes them equal."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

import torch

import lococomm as lc


def _stall_heal_streams(chunks: int) -> None:
    """Make this worker's heal sends stop after `chunks` chunks of each stream and hang (a
    source that dies mid-transfer, at a known point, however fast the transfer would be)."""
    import lococomm.ops

    real = lococomm.ops.heal_stream

    def stalled(fds, pieces, chunk_ends, headers, sending, abort_fd, timeout, **kw):
        if not sending:
            return real(fds, pieces, chunk_ends, headers, sending, abort_fd, timeout, **kw)
        ends = [e[:chunks] for e in chunk_ends]
        err = real(fds, [p[: e[-1] if e else 0] for p, e in zip(pieces, ends)], ends, headers, True, abort_fd, timeout, **kw)
        logging.getLogger("heal_worker").warning("heal: stalled after %d chunk(s) (%s)", chunks, err or "sent")
        time.sleep(3600)
        return "stalled"

    lococomm.ops.heal_stream = stalled


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", default=os.environ.get("LOCOCOMM_COORDINATOR"))
    parser.add_argument("--replica", default=os.environ.get("LOCOCOMM_REPLICA_ID"))
    parser.add_argument("--out", required=True, help="log path; {replica} is substituted")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--parity-every", type=int, default=100)
    parser.add_argument("--corrupt-at", type=int, default=-1)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--extra-mb", type=float, default=0.0, help="extra replicated buffer")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--save", default="", help="torch.save the final state here")
    parser.add_argument("--stop-after-member", default="", help="run until this replica has been "
                        "a member for --extra-steps committed steps (instead of --steps; every "
                        "member stops at the same step, whoever finishes its start-up last)")
    parser.add_argument("--extra-steps", type=int, default=3)
    parser.add_argument("--stall-heal-after-chunks", type=int, default=-1, help="as a heal source "
                        "(TCP streams), send this many chunks, then stall (to be killed mid-transfer)")
    args = parser.parse_args()
    if not args.coordinator or not args.replica:
        parser.error("--coordinator/--replica (or LOCOCOMM_COORDINATOR/LOCOCOMM_REPLICA_ID) needed")
    args.out = args.out.replace("{replica}", args.replica)
    logging.basicConfig(
        level=getattr(logging, os.environ.get("HEAL_WORKER_LOG", "INFO")), format=f"%(asctime)s {args.replica} %(name)s: %(message)s", stream=sys.stderr
    )
    torch.set_num_threads(1)
    if args.stall_heal_after_chunks >= 0:
        _stall_heal_streams(args.stall_heal_after_chunks)
    torch.manual_seed(int(args.replica.lstrip("w")) + 100)  # a different init on every worker
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    extra = {"counter": 0, "note": "replicated"}
    state = {"model": model, "optimizer": optimizer, "extra": extra}
    if args.extra_mb:
        state["blob"] = {"data": torch.randn(int(args.extra_mb * (1 << 20) / 4))}
    manager = lc.Manager(
        args.coordinator,
        replica_id=args.replica,
        timeout=30,
        state=state,
        parity_every=args.parity_every,
        token=os.environ.get("LOCOCOMM_TOKEN") or None,
    )
    if os.environ.get("LOCOCOMM_SIGTERM_LEAVE") == "1":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    out = open(args.out, "a", buffering=1)
    out.write(json.dumps({"event": "start", "pid": os.getpid(), "time": time.time()}) + "\n")
    corrupted = False
    target = args.steps
    if args.stop_after_member:
        target = 10_000  # lowered at the first committed step with that member
    while manager.step < target:
        manager.start_step()
        step = manager.step
        if step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        generator = torch.Generator().manual_seed(step * 1000 + int(args.replica.lstrip("w")))
        x = torch.randn(16, 32, generator=generator)
        y = torch.randint(0, 4, (16,), generator=generator)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        manager.allreduce(flat, op="mean")
        committed = manager.commit()
        if committed:
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            optimizer.step()
            extra["counter"] += 1
        if committed and args.stop_after_member in manager.members and target == 10_000:
            target = manager.step + args.extra_steps
        if committed and step == args.corrupt_at and not corrupted:
            corrupted = True
            with torch.no_grad():
                model[2].weight[0, 0] += 1.0  # silent corruption of one replica
        out.write(json.dumps({
            "event": "step", "step": step, "committed": committed, "members": manager.members,
            "epoch": manager.epoch, "loss": loss.item(), "digest": manager.digest(),
            "counter": extra["counter"], "time": time.time(),
        }) + "\n")
        manager.report(loss=round(loss.item(), 4))
        if args.step_sleep:
            time.sleep(args.step_sleep)
    final = {"event": "done", "step": manager.step, "digest": manager.digest(), "counter": extra["counter"]}
    out.write(json.dumps(final) + "\n")
    if args.save:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "extra": extra}, args.save)
    manager.close()


if __name__ == "__main__":
    main()
