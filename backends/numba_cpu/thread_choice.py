"""How many of Numba's threads an executable's calls run with, chosen by timing its calls.

On an idle machine every core helps; on a busy one a parallel kernel waits at its end for the
thread whose core another process holds, for up to a scheduler slice each time. lstm-28's step
(~90 parallel regions) ran in 5.8 ms on 2 threads on the idle machine; with another process
spinning on one of its 2 cores, 10.3-14.3 ms on 2 threads against 9.1 ms on one, and beside
bursts of compiles, medians of 68-950 ms on 2 threads. So an executable with parallel kernels
that the user did not pin (GRAPHC_NUM_THREADS) times its calls and keeps the faster of all
threads and one: beside the spinning process it settled on one thread, 9.3 ms a step. The
results do not depend on the choice: every kernel splits its work by the thread count it was
compiled for (scratch per thread, row blocks), not by the threads running it (training steps'
losses and weights were bitwise equal on 1 and 2 threads: tests/test_thread_choice.py). A scan's
compiled loop runs on the caller's thread count; one in row blocks (driver.RowBlockDriver) makes
the same choice between its blocks side by side and one after the other.

The choice starts by alternating the two for TRIALS calls each, then takes the faster median.
Every `interval` calls it tries the other count for PROBE calls; it switches when the other's
median (over its last TRIALS calls) beats the chosen one's by MARGIN, and else doubles the
interval up to LONGEST_INTERVAL: on an idle machine the probes cost ~0.1% of the calls.
"""
from __future__ import annotations

import statistics
from collections import deque

TRIALS = 3
PROBE = 2
FIRST_INTERVAL = 32
LONGEST_INTERVAL = 1024
MARGIN = 0.9  # the other count takes over from below 90% of the chosen one's median time


class ThreadChoice:
    """Which thread count the next call runs with (`threads()`), from the times `record`ed."""

    def __init__(self, most: int) -> None:
        self.counts = (most, 1)
        self.times = {count: deque(maxlen=TRIALS) for count in self.counts}
        self.chosen: int | None = None  # None while the first trials run
        self.interval = FIRST_INTERVAL
        self.until_probe = FIRST_INTERVAL
        self.probing = 0  # calls of the current probe still to run

    def _other(self) -> int:
        return self.counts[1] if self.chosen == self.counts[0] else self.counts[0]

    def threads(self) -> int:
        if self.chosen is None:
            most, one = self.counts
            return most if len(self.times[most]) <= len(self.times[one]) else one
        return self._other() if self.probing else self.chosen

    def record(self, threads: int, seconds: float) -> None:
        """The call that ran on `threads` threads took `seconds`."""
        self.times[threads].append(seconds)
        if self.chosen is None:
            if all(len(t) == TRIALS for t in self.times.values()):
                self.chosen = min(self.counts, key=lambda c: statistics.median(self.times[c]))
            return
        if self.probing:
            self.probing -= 1
            if not self.probing:
                self._decide()
            return
        self.until_probe -= 1
        if self.until_probe <= 0:
            self.probing = PROBE

    def _decide(self) -> None:
        """After a probe: switch to the other count if it was faster, else probe less often."""
        other = self._other()
        if statistics.median(self.times[other]) < MARGIN * statistics.median(self.times[self.chosen]):
            self.chosen, self.interval = other, FIRST_INTERVAL
        else:
            self.interval = min(2 * self.interval, LONGEST_INTERVAL)
        self.until_probe = self.interval
