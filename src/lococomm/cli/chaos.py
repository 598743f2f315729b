"""Chaos specs for `lococomm run`: which failure to inject, at which committed step.

    kill:1@50               SIGKILL worker w1 when the job reaches step 50
    stop:2@80-90            SIGSTOP w2 at step 80, SIGCONT at step 90
    join@120                start a new worker
    coordinator-restart@150 kill the coordinator's state and restart it on the same address
    leave:3@200             SIGTERM w3: it leaves gracefully
    random:rate=0.05,seed=7 draw events: each step has probability `rate` of one event

Parsing and the random draw are pure functions, so a spec is tested without processes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

KINDS = ("kill", "stop", "join", "coordinator-restart", "leave")

# The default of `make run` / `--chaos default`, sized for examples/train_ft.py --steps 300.
DEFAULT_SPEC = "kill:1@40,stop:2@80-100,join@130,coordinator-restart@170,leave:3@210,join@240"


@dataclass(order=True)
class ChaosEvent:
    step: int
    kind: str = field(compare=False)
    target: int | None = field(default=None, compare=False)  # worker index (None for join/coord)
    until: int | None = field(default=None, compare=False)  # SIGCONT step for `stop`

    def describe(self) -> str:
        who = f" w{self.target}" if self.target is not None else ""
        span = f"-{self.until}" if self.until is not None else ""
        return f"{self.kind}{who}@{self.step}{span}"


@dataclass
class RandomChaos:
    rate: float
    seed: int
    stop_steps: tuple[int, int] = (5, 20)


def parse(spec: str) -> list[ChaosEvent] | RandomChaos:
    """Parse a chaos spec; raises ValueError naming the bad item."""
    spec = spec.strip()
    if spec in ("", "none"):
        return []
    if spec == "default":
        spec = DEFAULT_SPEC
    if spec.startswith("random"):
        return _parse_random(spec)
    events = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        head, at, when = item.partition("@")
        if not at or not when:
            raise ValueError(f"chaos item {item!r} needs '@<step>'")
        kind, _, target = head.partition(":")
        if kind not in KINDS:
            raise ValueError(f"chaos item {item!r}: unknown kind {kind!r} (one of {', '.join(KINDS)})")
        needs_target = kind in ("kill", "stop", "leave")
        if needs_target != bool(target):
            raise ValueError(
                f"chaos item {item!r}: {kind} {'needs' if needs_target else 'takes no'} worker index"
            )
        until = None
        if kind == "stop":
            start, dash, end = when.partition("-")
            if not dash:
                raise ValueError(f"chaos item {item!r}: stop needs a range, e.g. stop:2@80-90")
            step, until = _int(start, item), _int(end, item)
            if until <= step:
                raise ValueError(f"chaos item {item!r}: the range must end after it starts")
        else:
            step = _int(when, item)
        events.append(ChaosEvent(step, kind, _int(target, item) if target else None, until))
    return sorted(events)


def _parse_random(spec: str) -> RandomChaos:
    _, _, args = spec.partition(":")
    values = {"rate": "0.05", "seed": "0"}
    for part in filter(None, args.split(",")):
        key, eq, value = part.partition("=")
        if not eq or key not in values:
            raise ValueError(f"random chaos takes rate=<p>,seed=<n>; got {part!r}")
        values[key] = value
    try:
        rate, seed = float(values["rate"]), int(values["seed"])
    except ValueError:
        raise ValueError(f"bad random chaos spec {spec!r}") from None
    if not 0 <= rate <= 1:
        raise ValueError(f"random chaos rate must be in [0, 1], got {rate}")
    return RandomChaos(rate, seed)


def _int(text: str, item: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"chaos item {item!r}: {text!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"chaos item {item!r}: negative value {value}")
    return value


def draw_random(
    chaos: RandomChaos, steps: int, workers: int, min_alive: int = 2
) -> list[ChaosEvent]:
    """Expand random chaos into concrete events over `steps`, keeping >= min_alive workers up.

    Killed workers are restarted by the launcher, so a kill only dips the count briefly; stopped
    workers count as down until their SIGCONT step.
    """
    rng = random.Random(chaos.seed)
    events: list[ChaosEvent] = []
    alive = set(range(workers))
    down_until: dict[int, int] = {}
    next_index = workers
    last_coordinator = -100
    for step in range(5, steps):
        for worker, until in list(down_until.items()):
            if until <= step:
                del down_until[worker]
                alive.add(worker)
        if rng.random() >= chaos.rate:
            continue
        kind = rng.choice(KINDS)
        candidates = sorted(alive)
        if kind in ("kill", "stop", "leave") and len(candidates) <= min_alive:
            kind = "join"
        if kind == "coordinator-restart" and step - last_coordinator < 20:
            kind = "join"
        if kind == "join":
            events.append(ChaosEvent(step, "join"))
            alive.add(next_index)
            next_index += 1
        elif kind == "coordinator-restart":
            events.append(ChaosEvent(step, kind))
            last_coordinator = step
        else:
            target = rng.choice(candidates)
            if kind == "stop":
                until = step + rng.randint(*chaos.stop_steps)
                events.append(ChaosEvent(step, "stop", target, until))
                alive.discard(target)
                down_until[target] = until
            else:
                events.append(ChaosEvent(step, kind, target))
                if kind == "leave":
                    alive.discard(target)
    return events
