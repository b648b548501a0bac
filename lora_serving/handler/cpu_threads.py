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

The check runs at the start of a step, so after the engine sat idle its window spans the idle time, when
nothing of ours competed for the cores: a client starting up, or a cron job that has since finished, would
cost the first steps of the next burst a thread (a burst's prefill is the longest step there is). A window
whose start is more than IDLE_GAP_SECONDS before the step, and in which this process used less than
IDLE_SHARE of a core, is taken as idle: it starts a new window instead of deciding.

The process's own other Python threads count as busy too (an application's worker thread beside an
Engine used as a library, a server's event loop): they are not part of torch's team, and a thread that
keeps a core busy takes it from the team just as another process would. What this cannot see is many
short wake-ups that use little CPU but each preempt one of the team's threads: DJL's async worker hands
every streamed token through two threads and its event loop, using about 0.2 of a core, and on 2 cores
one torch thread ran its steps faster than two (docs/BENCHMARKS.md, "DJL Serving").

Time of processes that lowered their priority (`nice`) is not counted as busy when this one did not: the
scheduler gives a nice-19 job about 1.5% of a core that one of our threads wants, so it takes almost nothing
from us, and giving a thread up for it (a test suite or a build run under `nice` beside the server) cost
the engine a quarter of its throughput for nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

logger = logging.getLogger(__name__)

CHECK_INTERVAL_SECONDS = 1.0
GIVE_UP_ABOVE = 0.6  # of a core used by others beyond the cores we leave free
TAKE_BACK_BELOW = 0.4
IDLE_GAP_SECONDS = 1.0
IDLE_SHARE = 0.25  # of a core
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class CpuThreads:
    def __init__(self, max_threads: int | None = None) -> None:
        self.max_threads = max_threads or torch.get_num_threads()
        self.cores = available_cores()
        self.threads = torch.get_num_threads()
        self._last = _sample()
        self._next_check = time.monotonic() + CHECK_INTERVAL_SECONDS
        self._last_call, self._last_call_cpu = time.monotonic(), time.process_time()

    def maybe_adjust(self) -> None:
        """Cheap unless a check is due; call it once per engine step."""
        now, own_cpu = time.monotonic(), time.process_time()
        since_last_call = now - self._last_call
        was_idle = since_last_call > IDLE_GAP_SECONDS and own_cpu - self._last_call_cpu < IDLE_SHARE * since_last_call
        self._last_call, self._last_call_cpu = now, own_cpu
        if was_idle:
            self._last = _sample()
            self._next_check = now + CHECK_INTERVAL_SECONDS
            return
        if now < self._next_check or self._last is None:
            return
        self._next_check = now + CHECK_INTERVAL_SECONDS
        sample = _sample()
        if sample is None:
            return
        others = _others_busy_cores(self._last, sample, stepping_thread=threading.get_native_id())
        self._last = sample
        self.threads = torch.get_num_threads()  # the count is process-wide: someone else may have set it
        wanted = self.wanted_threads(others)
        if wanted != self.threads:
            logger.info("other processes and threads keep %.1f of %d cores busy: torch threads %d -> %d", others,
                        self.cores, self.threads, wanted)
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


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# (wall seconds, machine busy seconds summed over cores, this process's CPU seconds, CPU seconds of each of
# this process's Python threads by native id)
Sample = tuple[float, float, float, dict[int, float]]


def _sample() -> Sample | None:
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        with open("/proc/self/stat") as own:
            own_seconds = _cpu_seconds(own.read())
    except (OSError, ValueError, IndexError):
        return None
    busy = busy_ticks(fields, own_niceness=os.getpriority(os.PRIO_PROCESS, 0)) / _CLOCK_TICKS
    return time.monotonic(), busy, own_seconds, _python_threads_seconds()


def _cpu_seconds(stat_line: str) -> float:
    """utime + stime of a /proc/.../stat line (after the command name, which may hold spaces)."""
    fields = stat_line.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _python_threads_seconds() -> dict[int, float]:
    seconds = {}
    for thread in threading.enumerate():
        if thread.native_id is None:
            continue
        try:
            with open(f"/proc/self/task/{thread.native_id}/stat") as stat:
                seconds[thread.native_id] = _cpu_seconds(stat.read())
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
    return seconds


def busy_ticks(cpu_fields: list[int], own_niceness: int) -> int:
    """The busy time in /proc/stat's first `cpu` line that can take a core from this process."""
    user, nice, system, idle, iowait, irq, softirq, steal = cpu_fields[:8]  # guest time is inside user
    busy = user + nice + system + irq + softirq + steal
    if own_niceness <= 0:
        busy -= nice  # they yield to us (and our own time is in `user`, not here)
    return busy


def _others_busy_cores(before: Sample, after: Sample, stepping_thread: int | None = None) -> float:
    """Cores kept busy by other processes and by this process's Python threads other than `stepping_thread`
    (the one that runs torch's ops; torch's own worker threads are not Python threads)."""
    wall = after[0] - before[0]
    if wall <= 0:
        return 0.0
    other_processes = max(0.0, (after[1] - before[1]) - (after[2] - before[2]))
    siblings = sum(max(0.0, after[3][tid] - before[3][tid]) for tid in after[3].keys() & before[3].keys()
                   if tid != stepping_thread)
    return (other_processes + siblings) / wall
