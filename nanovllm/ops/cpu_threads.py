"""Threads that share the machine: how many of our threads a CPU step should use, from what the other processes
take of the CPUs we may run on.

Our kernels split each op over torch's OpenMP threads and wait for all of them at its end. Where another process
holds one of two cores, one of our threads keeps losing its core for whole scheduler slices, and every op waits for
it: single-stream decode of the embedded model on a 2-core AVX2 EPYC went from 98.9 tok/s quiet to 28.4 with one
busy process beside it (libgomp's default spinning; 20.2 with GOMP_SPINCOUNT=10000, 39.7 with 1000, 56.9 with
OMP_WAIT_POLICY=PASSIVE, which costs 40% when quiet: 59.8), while one thread kept 82.8 there (81.4 quiet).
So the step asks, a few times a second, how busy the CPUs were without us, and uses as many threads as cores are
left (at least one, at most the engine's num_threads): two when the machine is ours, one beside a busy process.
Figures: docs/benchmarks.md. NANOVLLM_ADAPT_THREADS=0 keeps the thread count fixed."""

import os
import time

import torch

CHECK_EVERY_S = 0.25  # how often the CPUs' use is read: /proc/stat costs ~20 us, a step ~10 ms
STALE_AFTER_S = 4 * CHECK_EVERY_S  # a longer interval between two reads: the engine was idle, the read is not used
PROC_STAT = "/proc/stat"


def machine_busy_seconds() -> float | None:
    """CPU seconds all CPUs spent on anything but idling since boot (user, nice, system, irq, softirq, steal), or
    None where /proc/stat cannot be read (not Linux)."""
    try:
        with open(PROC_STAT) as f:
            fields = f.readline().split()
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class ThreadGovernor:
    """`adjust()` before a step: sets torch's thread count (which our kernels read) to the cores the other
    processes left free over the last interval."""

    def __init__(self, max_threads: int):
        self.max_threads = max_threads
        self.cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.enabled = os.environ.get("NANOVLLM_ADAPT_THREADS", "1") != "0" and max_threads > 1
        self.last: tuple[float, float, float] | None = None  # (wall, our CPU seconds, the machine's busy seconds)
        self.next_check = 0.0

    def adjust(self) -> None:
        now = time.monotonic()
        if not self.enabled or now < self.next_check:
            return
        self.next_check = now + CHECK_EVERY_S
        busy = machine_busy_seconds()
        if busy is None:
            self.enabled = False
            return
        sample = (now, time.process_time(), busy)
        # an interval much longer than CHECK_EVERY_S spans time the engine sat idle: what other processes did then
        # (a benchmark's other engine, a build) says nothing about now, and cost the first steps after it a thread
        if self.last is not None and now - self.last[0] <= STALE_AFTER_S:
            wall = sample[0] - self.last[0]
            ours = sample[1] - self.last[1]
            others = max(0.0, (sample[2] - self.last[2]) - ours) / wall  # cores the other processes used
            threads = max(1, min(self.max_threads, int(self.cpus - others + 0.5)))
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        self.last = sample
