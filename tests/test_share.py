"""Login: the one account is checked in constant time, and repeated wrong guesses are slowed down."""

from __future__ import annotations

from lowvram_studio.ui.share import LoginGuard


class Clock:
    """Time that moves only when the test says so (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_after_three_wrong_guesses_even_the_right_password_waits_a_doubling_delay():
    clock = Clock()
    guard = LoginGuard("me", "long-secret", clock=clock)
    assert [guard("me", f"guess{i}") for i in range(3)] == [False, False, False]
    assert guard("me", "long-secret") is False  # locked for 1 s: not even checked
    clock.now += 1.0
    assert guard("me", "guess4") is False  # the 4th failure locks for 2 s
    clock.now += 1.5
    assert guard("me", "long-secret") is False
    clock.now += 0.5
    assert guard("me", "long-secret") is True


def test_a_success_resets_the_count_and_the_delay_is_capped():
    clock = Clock()
    guard = LoginGuard("me", "long-secret", clock=clock, max_delay_s=60.0)
    guard("me", "a"), guard("me", "b")
    assert guard("me", "long-secret") is True
    assert [guard("me", f"x{i}") for i in range(2)] == [False, False] and guard("me", "long-secret") is True
    for _ in range(2000):  # a long attack: the delay stops at the cap (and 2**2000 does not overflow)
        clock.now += 61.0
        assert guard("me", "wrong") is False
    clock.now += 60.0
    assert guard("me", "long-secret") is True


def test_guesses_while_locked_are_refused_unchecked_so_they_buy_nothing():
    clock = Clock()
    guard = LoginGuard("me", "long-secret", clock=clock)
    for i in range(3):
        guard("me", f"guess{i}")
    refused = [guard("me", "long-secret") for _ in range(1000)]
    assert not any(refused)
    clock.now += 1.0
    assert guard("me", "long-secret") is True  # the refused guesses did not lengthen the lock


def test_wrong_user_and_non_ascii_input_are_plain_failures():
    guard = LoginGuard("me", "pässwörd", clock=Clock())
    assert guard("you", "pässwörd") is False
    assert guard("me", "pässwörd") is True
    assert guard("me", "pässword") is False
