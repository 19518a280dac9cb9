"""What every connection of ours gets: the per-plane connection cap."""

from __future__ import annotations

from sheep.tcp import ConnectionCap


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_a_full_plane_closes_new_connections_at_once_and_counts_them() -> None:
    cap = ConnectionCap(2, "test")
    first, second, third = FakeTransport(), FakeTransport(), FakeTransport()
    assert cap.admit(first) and cap.admit(second)  # type: ignore[arg-type]
    assert not cap.admit(third)  # type: ignore[arg-type]
    assert third.aborted and not first.aborted and (cap.open, cap.refused) == (2, 1)


def test_a_closed_connection_frees_its_place() -> None:
    cap = ConnectionCap(1, "test")
    assert cap.admit(FakeTransport())  # type: ignore[arg-type]
    cap.release()
    assert cap.admit(FakeTransport()) and cap.open == 1  # type: ignore[arg-type]
