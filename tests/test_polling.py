"""Looks for work that are quick after activity and slow down to an idle interval."""

from __future__ import annotations

import time

import pytest

from fedcare.runtime import polling
from fedcare.runtime.polling import FIRST_LOOK, OBJECT_RETRY, LookingTime, Looks


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    return waits


def test_quiet_looks_double_up_to_the_idle_interval_and_activity_makes_them_quick(
        slept: list[float]) -> None:
    looks = Looks(idle=0.5)
    for _ in range(7):
        looks.sleep()
    looks.activity()
    looks.sleep()
    assert slept == [FIRST_LOOK, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5, FIRST_LOOK]


def test_flowers_idle_sleep_follows_the_looks_and_its_waits_on_local_state_are_short(
        slept: list[float]) -> None:
    looks = Looks(idle=0.5)
    clock = LookingTime(looks, idle_sleep=3.0)
    clock.sleep(3)  # Flower's SuperNode found no message
    clock.sleep(3)
    clock.sleep(0.5)  # Flower waiting for its ClientApp's reply
    clock.sleep(0.001)
    assert slept == [FIRST_LOOK, 2 * FIRST_LOOK, FIRST_LOOK, 0.001]
    assert clock.monotonic is time.monotonic  # every other function is time's


def test_an_idle_interval_shorter_than_the_first_look_is_kept() -> None:
    assert Looks(idle=0.01).wait == 0.01


def test_every_flower_object_pull_in_the_process_retries_after_object_retry(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.inflatable import inflatable_utils

    functions = (inflatable_utils.pull_objects,
                 inflatable_utils.pull_and_inflate_object_from_tree)
    for function in functions:  # restored after the test
        assert function.__kwdefaults__ is not None
        monkeypatch.setitem(function.__kwdefaults__, "initial_backoff", 1)
    polling.quick_object_retries()
    assert all(f.__kwdefaults__ is not None and f.__kwdefaults__["initial_backoff"]
               == OBJECT_RETRY for f in functions)
