"""The restart policy and exit wording of `sheep up`'s children (sheep/children.py)."""

from __future__ import annotations

from sheep.children import Backoff, exit_reason


def test_backoff_doubles_while_the_child_keeps_dying_and_stops_at_the_cap() -> None:
    """A node that dies at once must not be restarted in a tight loop."""
    backoff = Backoff(first=1, cap=30, stable=60)
    assert [backoff.delay(uptime=2) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def test_backoff_starts_over_once_the_child_stayed_up_a_while() -> None:
    """A node that crashed once a day must not wait the cap because of older crashes."""
    backoff = Backoff(first=1, cap=30, stable=60)
    for _ in range(5):
        backoff.delay(uptime=2)
    assert backoff.delay(uptime=61) == 1
    assert backoff.delay(uptime=2) == 2


def test_exit_reason_names_the_signal_or_the_exit_code() -> None:
    assert exit_reason(-9) == "killed by SIGKILL"
    assert exit_reason(1) == "exited with 1"
    assert exit_reason(-200) == "killed by signal 200"
