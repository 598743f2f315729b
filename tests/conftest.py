from __future__ import annotations

import logging
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import Workers


@pytest.fixture
def workers(tmp_path):
    w = Workers(tmp_path)
    yield w
    w.cleanup()


@pytest.fixture
def coordinator_factory():
    import lococomm as lc

    started = []

    def make(**kwargs):
        kwargs.setdefault("heartbeat_timeout", 1.0)
        c = lc.Coordinator(**kwargs).start()
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="lococomm")
