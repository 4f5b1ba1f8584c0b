"""py-spy's raw stacks sorted into where the consumer's threads spend the wall time."""

from __future__ import annotations

import pytest

from consumer.bench.profile import shares

RAW = [
    "thread (1): model;embed (/app/consumer/embedders/local.py:9);forward (/x/torch/nn/m.py:3) 40\n",
    "thread (2): MainThread;run (app.py:1);execute (/x/psycopg/cursor_async.py:5) 5\n",
    "thread (2): MainThread;run (app.py:1);getmany (/x/aiokafka/consumer/consumer.py:1) 2\n",
    "thread (2): MainThread;decode (/app/consumer/events.py:7);loads (/py/json/__init__.py:3) 3\n",
    "thread (2): MainThread;run (app.py:1) 1\n",
    "a line that is no sample\n",
]


def test_samples_become_shares_of_the_wall_time() -> None:
    got = shares(RAW, wall_samples=100)
    assert got == pytest.approx(
        {
            "model": 0.40,
            "database": 0.05,
            "kafka": 0.02,
            "decoding": 0.03,
            "metrics and logs": 0.0,
            "other": 0.01,
        }
    )


def test_no_wall_time_gives_no_shares() -> None:
    assert shares(RAW, wall_samples=0) == {}
