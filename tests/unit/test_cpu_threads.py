"""The thread governor of the CPU step: as many threads as the other processes leave cores free."""

import torch

import nanovllm.ops.cpu_threads as cpu_threads


def test_threads_follow_the_cores_others_leave(monkeypatch):
    clock = {"wall": 100.0, "ours": 0.0, "busy": 0.0}
    monkeypatch.setattr(cpu_threads.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(cpu_threads.time, "process_time", lambda: clock["ours"])
    monkeypatch.setattr(cpu_threads, "machine_busy_seconds", lambda: clock["busy"])
    monkeypatch.delenv("NANOVLLM_ADAPT_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        governor = cpu_threads.ThreadGovernor(max_threads=2)
        governor.cpus = 2

        def interval(ours: float, others: float) -> int:
            """One interval of a second in which we used `ours` cores and the other processes `others`."""
            clock["wall"] += 1.0
            clock["ours"] += ours
            clock["busy"] += ours + others
            governor.adjust()
            return torch.get_num_threads()

        governor.adjust()  # the first reading
        assert interval(ours=2.0, others=0.0) == 2  # the machine is ours
        assert interval(ours=1.3, others=0.7) == 1  # a busy process beside our two threads
        assert interval(ours=1.0, others=1.0) == 1  # it stays
        assert interval(ours=1.0, others=0.1) == 2  # it left
        clock["wall"] += 0.1  # within CHECK_EVERY_S: nothing is read
        clock["busy"] += 5.0
        governor.adjust()
        assert torch.get_num_threads() == 2
        clock["wall"] += 10.0  # the engine sat idle while another process ran: that interval is not used
        clock["busy"] += 20.0
        governor.adjust()
        assert torch.get_num_threads() == 2
        assert interval(ours=1.0, others=1.0) == 1  # the next interval, read again
    finally:
        torch.set_num_threads(before)


def test_off_by_environment_or_with_one_thread(monkeypatch):
    monkeypatch.setenv("NANOVLLM_ADAPT_THREADS", "0")
    assert not cpu_threads.ThreadGovernor(max_threads=2).enabled
    monkeypatch.delenv("NANOVLLM_ADAPT_THREADS")
    assert not cpu_threads.ThreadGovernor(max_threads=1).enabled
    assert cpu_threads.ThreadGovernor(max_threads=2).enabled


def test_reads_this_machine():
    busy = cpu_threads.machine_busy_seconds()
    assert busy is None or busy > 0
