"""drivers.listeners.Listeners: add() returns the undo; one failing listener
is logged and counted and does not stop the others."""

from __future__ import annotations

from pbmd.drivers.listeners import Listeners


def test_add_returns_a_remover_that_can_be_called_twice() -> None:
    seen: list[int] = []
    listeners: Listeners[int] = Listeners("numbers")
    remove = listeners.add(seen.append)
    listeners(1)
    remove()
    remove()
    listeners(2)
    assert seen == [1] and len(listeners) == 0 and not listeners


def test_a_failing_listener_is_counted_and_the_others_still_run() -> None:
    seen: list[int] = []
    errors: list[None] = []

    def broken(_n: int) -> None:
        raise RuntimeError("boom")

    listeners: Listeners[int] = Listeners("numbers", on_error=lambda: errors.append(None))
    listeners.add(broken)
    listeners.add(seen.append)
    listeners(7)
    listeners(8)
    assert seen == [7, 8]
    assert listeners.errors == 2 and len(errors) == 2


def test_a_listener_may_remove_itself_while_being_called() -> None:
    calls: list[str] = []
    listeners: Listeners[str] = Listeners("once")

    def once(value: str) -> None:
        calls.append(value)
        remove()

    remove = listeners.add(once)
    listeners("a")
    listeners("b")
    assert calls == ["a"]
