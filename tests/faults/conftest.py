"""The fault suite's tallies: each test adds what it proved, and the summary prints the totals."""

from __future__ import annotations

from collections import Counter

# e.g. "bad inputs with a clean exit 2", "kills survived identical", "corruptions detected",
# "races handled"
TALLY: Counter[str] = Counter()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if TALLY:
        terminalreporter.section("fault suite")
        for key, count in sorted(TALLY.items()):
            terminalreporter.write_line(f"{count:4d} {key}")
