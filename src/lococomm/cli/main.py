"""The `lococomm` command: `lococomm coordinator` and `lococomm run`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence


def _coordinator(args: argparse.Namespace) -> int:
    from lococomm.membership.coordinator import Coordinator

    coordinator = Coordinator(
        host=args.host,
        port=args.port,
        token=args.token,
        heartbeat_timeout=args.heartbeat_timeout,
        min_workers=args.min_workers,
        initial_workers=args.initial_workers,
        store_port=args.store_port,
        resume=args.resume,
    )
    coordinator.start()
    print(coordinator.address, flush=True)

    def stop(signum: int, frame: object) -> None:
        coordinator.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    coordinator.serve_forever()
    return 0


def _run(args: argparse.Namespace) -> int:
    from lococomm.cli.run import Launcher, RunConfig

    config = RunConfig(
        script=args.script,
        script_args=list(args.script_args),
        workers=args.workers,
        chaos=args.chaos,
        token=args.token,
        heartbeat_timeout=args.heartbeat_timeout,
        min_workers=args.min_workers,
        restart_delay=args.restart_delay,
        port=args.port,
        chaos_steps=args.chaos_steps,
        quiet=args.quiet,
        summary_json=args.summary_json,
        stall_timeout=args.stall_timeout,
    )
    return Launcher(config).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lococomm", description="Fault-tolerant, low-communication collectives for PyTorch."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    coord = sub.add_parser("coordinator", help="run a standalone coordinator until SIGINT/SIGTERM")
    coord.add_argument("--host", default="127.0.0.1")
    coord.add_argument("--port", type=int, default=29400)
    coord.add_argument("--store-port", type=int, default=0, help="TCPStore port (0: any)")
    coord.add_argument("--token", default=None, help="shared secret (or LOCOCOMM_TOKEN)")
    coord.add_argument("--heartbeat-timeout", type=float, default=5.0, help="seconds")
    coord.add_argument("--min-workers", type=int, default=1)
    coord.add_argument("--initial-workers", type=int, default=None)
    coord.add_argument(
        "--resume",
        action="store_true",
        help="this coordinator replaces one that was running a job (restart on the same address): "
        "wait up to 5 s for workers reporting a previous epoch before starting from fresh ones",
    )
    coord.set_defaults(func=_coordinator)

    run = sub.add_parser("run", help="run a script on N local workers under an embedded coordinator")
    run.add_argument("--workers", type=int, default=4)
    run.add_argument("--chaos", default="none", help="e.g. kill:1@50,stop:2@80-90,join@120 | default | random:rate=0.05,seed=7")
    run.add_argument("--chaos-steps", type=int, default=1000, help="horizon for random chaos")
    run.add_argument("--token", default=None)
    run.add_argument("--port", type=int, default=0)
    run.add_argument("--heartbeat-timeout", type=float, default=2.0, help="seconds")
    run.add_argument("--min-workers", type=int, default=1)
    run.add_argument("--restart-delay", type=float, default=1.0, help="seconds; -1: never restart")
    run.add_argument("--quiet", action="store_true", help="do not stream worker output")
    run.add_argument("--summary-json", default=None, help="write the run summary to this file")
    run.add_argument(
        "--stall-timeout", type=float, default=120.0, help="fail after this many seconds without progress"
    )
    run.add_argument("script")
    run.add_argument("script_args", nargs=argparse.REMAINDER)
    run.set_defaults(func=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lococomm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
