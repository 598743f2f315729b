"""Chaos specs: parsing and the seeded random draw (pure, no processes)."""

from __future__ import annotations

import pytest

from lococomm.cli.chaos import DEFAULT_SPEC, ChaosEvent, RandomChaos, draw_random, parse


def test_parse_every_kind_sorted_by_step():
    events = parse("leave:3@200,kill:1@50,stop:2@80-90,join@120,coordinator-restart@150")
    assert [e.describe() for e in events] == [
        "kill w1@50", "stop w2@80-90", "join@120", "coordinator-restart@150", "leave w3@200",
    ]
    assert events[1] == ChaosEvent(80, "stop", 2, 90)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("kill@5", "needs worker index"),
        ("join:1@5", "takes no worker index"),
        ("explode:1@5", "unknown kind"),
        ("kill:1", "needs '@<step>'"),
        ("stop:1@5", "needs a range"),
        ("stop:1@9-5", "must end after"),
        ("kill:x@5", "not an integer"),
        ("random:rate=2", "rate must be in"),
        ("random:speed=1", "rate=<p>,seed=<n>"),
    ],
)
def test_bad_specs_are_refused_with_a_reason(spec, message):
    with pytest.raises(ValueError, match=message):
        parse(spec)


def test_default_and_none():
    assert parse("none") == []
    assert [e.describe() for e in parse("default")] == [e.describe() for e in parse(DEFAULT_SPEC)]


def test_random_draw_is_seeded_and_keeps_workers_alive():
    chaos = parse("random:rate=0.05,seed=7")
    assert isinstance(chaos, RandomChaos)
    first = draw_random(chaos, steps=300, workers=4)
    assert first == draw_random(chaos, steps=300, workers=4)
    assert first != draw_random(RandomChaos(0.05, 8), steps=300, workers=4)
    assert len(first) >= 8
    assert {e.kind for e in first} >= {"kill", "stop", "join"}
    # Never fewer than two workers up: replay the draw's own bookkeeping.
    up = set(range(4))
    resumes: dict[int, int] = {}
    next_index = 4
    for event in first:
        for worker, until in list(resumes.items()):
            if until <= event.step:
                up.add(worker)
                del resumes[worker]
        if event.kind == "join":
            up.add(next_index)
            next_index += 1
        elif event.kind == "stop":
            up.discard(event.target)
            resumes[event.target] = event.until
        elif event.kind == "leave":
            up.discard(event.target)
        assert len(up) >= 2
