"""What dog shows of a VM's console when it attaches."""

from __future__ import annotations

from qemu_driver.console import replayable


def test_a_replayed_console_asks_the_terminal_nothing() -> None:
    # busybox's shell asks for the cursor position; replayed, the terminal's answer would
    # be typed into the guest's shell
    log = "/ # \x1b[6nls\r\n\x1b[c\x1b]11;?\x07\x1b[1;32mgreen\x1b[0m\r\n"
    assert replayable(log) == "/ # ls\r\n\x1b[1;32mgreen\x1b[0m\r\n"
