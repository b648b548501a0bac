"""How many threads torch's CPU ops use, following what else runs on the machine.

torch splits each op over all its threads and every thread must finish before the op does. When another
process holds one of the cores, the thread that shares that core gets half of it (or waits a whole
scheduler time slice) and every op waits for it: on 2 cores with one busy, the engine ran at a fifth of its
quiet speed. One thread fewer then loses nothing and keeps the op on a core of its own.

So about once a second the engine reads how much CPU the rest of the machine used in that time
(/proc/stat's busy time, steal included, less this process's own) and sets torch's thread count to the
cores it can have: the cores this process may run on, less those the others kept busy, between 1 and the
count torch started with. Hysteresis keeps it from flapping: a thread is given up when others use more
than 0.6 of a core beyond what the current count leaves them, and taken back when they use less than 0.4.
Where /proc is not readable (not Linux) the thread count is left as it is.

Time of processes that lowered their priority (`nice`) is not counted as busy when this one did not: the
scheduler gives a nice-19 job about 1.5% of a core that one of our threads wants, so it takes almost nothing
from us, and giving a thread up for it (a test suite or a build run under `nice` beside the server) cost
the engine a quarter of its throughput for nothing.
"""

from __future__ import annotations

import logging
import os
import time

import torch

logger = logging.getLogger(__name__)

CHECK_INTERVAL_SECONDS = 1.0
GIVE_UP_ABOVE = 0.6  # of a core used by others beyond the cores we leave free
TAKE_BACK_BELOW = 0.4
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class CpuThreads:
    def __init__(self, max_threads: int | None = None) -> None:
        self.max_threads = max_threads or torch.get_num_threads()
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.threads = torch.get_num_threads()
        self._last = _sample()
        self._next_check = time.monotonic() + CHECK_INTERVAL_SECONDS

    def maybe_adjust(self) -> None:
        """Cheap unless a check is due; call it once per engine step."""
        now = time.monotonic()
        if now < self._next_check or self._last is None:
            return
        self._next_check = now + CHECK_INTERVAL_SECONDS
        sample = _sample()
        if sample is None:
            return
        others = _others_busy_cores(self._last, sample)
        self._last = sample
        self.threads = torch.get_num_threads()  # the count is process-wide: someone else may have set it
        wanted = self.wanted_threads(others)
        if wanted != self.threads:
            logger.info("other processes keep %.1f of %d cores busy: torch threads %d -> %d", others, self.cores,
                        self.threads, wanted)
            torch.set_num_threads(wanted)
            self.threads = wanted

    def wanted_threads(self, others_busy_cores: float) -> int:
        left_free = self.cores - self.threads  # what the current count leaves to the others
        excess = others_busy_cores - left_free
        threads = self.threads
        if excess > GIVE_UP_ABOVE:
            threads = self.cores - round(others_busy_cores)
        elif excess < TAKE_BACK_BELOW - 1:  # the others would still fit with one thread more
            threads = self.threads + 1
        return max(1, min(self.max_threads, threads))


def _sample() -> tuple[float, float, float] | None:
    """(wall seconds, machine busy seconds summed over cores, this process's CPU seconds)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        with open("/proc/self/stat") as own:
            own_fields = own.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    busy = busy_ticks(fields, own_niceness=os.getpriority(os.PRIO_PROCESS, 0)) / _CLOCK_TICKS
    own = (int(own_fields[11]) + int(own_fields[12])) / _CLOCK_TICKS  # utime, stime
    return time.monotonic(), busy, own


def busy_ticks(cpu_fields: list[int], own_niceness: int) -> int:
    """The busy time in /proc/stat's first `cpu` line that can take a core from this process."""
    user, nice, system, idle, iowait, irq, softirq, steal = cpu_fields[:8]  # guest time is inside user
    busy = user + nice + system + irq + softirq + steal
    if own_niceness <= 0:
        busy -= nice  # they yield to us (and our own time is in `user`, not here)
    return busy


def _others_busy_cores(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    wall = after[0] - before[0]
    if wall <= 0:
        return 0.0
    return max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / wall
