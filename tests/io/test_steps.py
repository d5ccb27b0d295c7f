"""The step drivers: a generator's steps are carried out in order, outcomes sent back, a
step's exception thrown in at its yield, and the generator's return value returned."""

from __future__ import annotations

import asyncio

import pytest

from meshq.io.steps import drive, drive_async


def _flow(log):
    a = yield "one"
    log.append(a)
    try:
        yield "fail"
    except ValueError as exc:
        log.append(f"caught {exc}")
    b = yield "two"
    return a + b


def _do(step):
    if step == "fail":
        raise ValueError("boom")
    return {"one": 1, "two": 2}[step]


async def _ado(step):
    await asyncio.sleep(0)
    return _do(step)


def test_drive_sends_outcomes_throws_errors_in_and_returns_the_value():
    log: list = []
    assert drive(_flow(log), _do) == 3
    assert log == [1, "caught boom"]


def test_drive_async_does_the_same_awaiting_each_step():
    log: list = []
    assert asyncio.run(drive_async(_flow(log), _ado)) == 3
    assert log == [1, "caught boom"]


def test_an_error_the_generator_does_not_handle_reaches_the_caller():
    def flow():
        yield "fail"

    with pytest.raises(ValueError, match="boom"):
        drive(flow(), _do)
    with pytest.raises(ValueError, match="boom"):
        asyncio.run(drive_async(flow(), _ado))
