"""The engine's CPU thread count follows the cores other processes leave free (lora_serving/handler/cpu_threads.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lora_serving import handler
from lora_serving.handler import cpu_threads
from lora_serving.handler.config import Config
from lora_serving.handler.cpu_threads import CpuThreads
from lora_serving.handler.errors import ConfigError


def tuner(cores: int, threads: int) -> CpuThreads:
    tuned = CpuThreads.__new__(CpuThreads)
    tuned.cores, tuned.threads, tuned.max_threads = cores, threads, cores
    return tuned


@pytest.mark.parametrize("cores,threads,others,wanted", [
    (2, 2, 0.0, 2),  # quiet
    (2, 2, 0.5, 2),  # half a core taken: not worth a thread yet
    (2, 2, 1.0, 1),  # one core busy: give it up
    (2, 1, 1.0, 1),  # still busy: keep one
    (2, 1, 0.5, 1),  # hysteresis: not back yet
    (2, 1, 0.2, 2),  # the other process is gone
    (2, 1, 2.0, 1),  # never below one
    (8, 8, 3.2, 5),
    (8, 5, 3.0, 5),
    (8, 5, 2.5, 5),  # six threads would not fit beside 2.5 busy cores
    (8, 5, 2.3, 6),  # back one at a time
])
def test_threads_follow_the_cores_left_free(cores, threads, others, wanted):
    assert tuner(cores, threads).wanted_threads(others) == wanted


def test_the_engine_step_sets_torch_threads_from_what_others_used(monkeypatch):
    # (wall seconds, machine busy seconds, own seconds, own Python threads' seconds): over 1 s the machine was busy 1.9 core-seconds, this
    # process 0.9, so others held a whole core.
    samples = iter([(0.0, 10.0, 5.0, {}), (1.0, 11.9, 5.9, {}), (2.0, 12.1, 6.0, {})])
    monkeypatch.setattr(cpu_threads, "_sample", lambda: next(samples))
    monkeypatch.setattr(cpu_threads, "CHECK_INTERVAL_SECONDS", 0.0)
    set_to = [2]  # torch's count, as torch.set_num_threads leaves it
    monkeypatch.setattr(cpu_threads.torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(cpu_threads.torch, "get_num_threads", lambda: set_to[-1])
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: {0, 1})
    threads = CpuThreads()
    threads.maybe_adjust()
    assert set_to == [2, 1]
    threads.maybe_adjust()  # the second interval: others used 0.1 of a core
    assert set_to == [2, 1, 2]


class FakeClock:
    """time.monotonic and time.process_time, moved by the test."""

    def __init__(self) -> None:
        self.wall, self.cpu = 100.0, 10.0

    def monotonic(self) -> float:
        return self.wall

    def process_time(self) -> float:
        return self.cpu


def test_what_others_did_while_the_engine_sat_idle_does_not_cost_the_next_burst_a_thread(monkeypatch):
    # Over the 8 s the engine sat idle another process kept a core busy (a client starting up), then stopped.
    samples = iter([(0.0, 10.0, 5.0, {}), (8.0, 18.0, 5.0, {}), (9.0, 20.0, 6.9, {}), (10.0, 22.0, 7.0, {})])
    monkeypatch.setattr(cpu_threads, "_sample", lambda: next(samples))
    clock = FakeClock()
    monkeypatch.setattr(cpu_threads, "time", clock)
    set_to = [2]
    monkeypatch.setattr(cpu_threads.torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(cpu_threads.torch, "get_num_threads", lambda: set_to[-1])
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: {0, 1})
    threads = CpuThreads()
    clock.wall += 8.0  # idle: this process used no CPU
    threads.maybe_adjust()  # the burst's first step: a new window, no decision
    assert set_to == [2]
    clock.wall, clock.cpu = clock.wall + 1.0, clock.cpu + 1.9  # stepping on both cores; others used 0.1 core
    threads.maybe_adjust()
    assert set_to == [2]
    clock.wall, clock.cpu = clock.wall + 1.0, clock.cpu + 0.5  # still stepping, while another process takes a core
    threads.maybe_adjust()  # others used 1.9 core-seconds: a thread is given up, as without the idle rule
    assert set_to == [2, 1]


# /proc/stat's cpu line: user, nice, system, idle, iowait, irq, softirq, steal, guest, guest_nice.
CPU_LINE = [100, 40, 20, 500, 5, 1, 2, 3, 0, 0]


def test_niced_processes_do_not_count_as_busy_unless_this_one_is_niced_too():
    assert cpu_threads.busy_ticks(CPU_LINE, own_niceness=0) == 100 + 20 + 1 + 2 + 3
    # A niced engine competes with other niced work on equal terms, and its own time is in `nice`.
    assert cpu_threads.busy_ticks(CPU_LINE, own_niceness=10) == 100 + 40 + 20 + 1 + 2 + 3


def others_busy_while_running(command: list[str]) -> float:
    spinner = subprocess.Popen(command)
    try:
        time.sleep(0.3)  # let it start
        before = cpu_threads._sample()
        time.sleep(1.0)
        return cpu_threads._others_busy_cores(before, cpu_threads._sample())
    finally:
        spinner.kill()
        spinner.wait()


@pytest.mark.skipif(not Path("/proc/stat").exists() or os.getpriority(os.PRIO_PROCESS, 0) > 0,
                    reason="needs Linux's /proc/stat, and a test process that is not niced itself")
def test_a_spinning_process_counts_as_a_busy_core_unless_it_is_niced():
    spin = [sys.executable, "-c", "while True: pass"]
    plain = others_busy_while_running(spin)
    niced = others_busy_while_running(["nice", "-n", "19", *spin])
    assert plain > 0.6, plain
    assert niced < plain - 0.5, (niced, plain)


def test_this_process_s_other_python_threads_count_as_busy_but_not_the_stepping_one():
    # 1 s: the machine 1.5 core-seconds busy, all of it this process's: 0.1 in the stepping thread (its
    # ops' other 0.7 in torch's workers), 0.7 in an event loop thread; thread 9 ended meanwhile.
    before = (0.0, 10.0, 5.0, {1: 2.0, 2: 3.0, 9: 0.5})
    after = (1.0, 11.5, 6.5, {1: 2.1, 2: 3.7})
    assert cpu_threads._others_busy_cores(before, after, stepping_thread=1) == pytest.approx(0.7)


def test_a_spinning_python_thread_of_this_process_counts_as_a_busy_core():
    stop = threading.Event()
    spinner = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)], daemon=True)
    spinner.start()
    try:
        before = cpu_threads._sample()
        stop.wait(1.0)
        busy = cpu_threads._others_busy_cores(before, cpu_threads._sample(), stepping_thread=threading.get_native_id())
    finally:
        stop.set()
        spinner.join()
    assert busy > 0.6, busy


def test_the_cpu_threads_option():
    assert Config.from_options(cpu_threads="4").cpu_threads == "4"
    assert Config.from_options().cpu_threads == "auto"
    with pytest.raises(ConfigError, match="cpu_threads"):
        Config.from_options(cpu_threads="many")


def openmp_settings_after(imports: str) -> dict:
    code = (f"{imports}\nimport json, os\nfrom lora_serving import handler\n"
            "print(json.dumps([os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), "
            "handler.OPENMP_WAIT_CHOSEN]))")
    env = {name: value for name, value in os.environ.items() if name not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_handler_first_makes_openmp_spin_briefly_then_sleep():
    assert openmp_settings_after("") == ["PASSIVE", handler.GOMP_SPINCOUNT, True]


def test_torch_imported_first_is_noticed():
    # Too late to choose for OpenMP, which read its environment when torch loaded it: the engine warns.
    assert openmp_settings_after("import torch") == [None, None, False]
