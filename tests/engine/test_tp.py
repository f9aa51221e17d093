"""Tensor parallelism on CPU: 2 processes over gloo give token for token what 1 process gives, and the worker
processes never outlive the engine, whatever happens to them."""

import gc
import json
import multiprocessing
import os
import signal
import time
import urllib.request

import pytest
from conftest import random_prompts, save_tiny_model, start_server

from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def assert_no_children(pids: list[int]) -> None:
    deadline = time.time() + 10
    while not all(gone(p) for p in pids):
        assert time.time() < deadline, f"worker processes {pids} are still alive"
        time.sleep(0.1)
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tp2_equals_tp1_with_prefix_cache_chunks_and_preemption(arch, tmp_path):
    # vocab 259: not divisible by 2, so the last vocabulary range is padded
    path = save_tiny_model(arch, str(tmp_path / arch), vocab_size=259)
    shared = random_prompts(1, 40, 40, seed=5)[0]
    prompts = random_prompts(6, 5, 60, seed=1) + random_prompts(4, 3, 20, seed=2, prefix=shared)
    ref = [o.outputs[0].token_ids for o in LLM(path, dtype="float32").generate(prompts, GREEDY, use_tqdm=False)]
    with LLM(path, dtype="float32", tensor_parallel_size=2, num_kv_blocks=14, max_num_batched_tokens=48) as llm:
        pids = llm.engine.runner.workers.pids
        out = llm.generate(prompts, GREEDY, use_tqdm=False)
        stats = llm.engine.stats()
    assert [o.outputs[0].token_ids for o in out] == ref
    assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert_no_children(pids)


def test_killed_worker_makes_generate_raise_and_leaves_no_process(model_path):
    llm = LLM(model_path, dtype="float32", tensor_parallel_size=2)
    pids = llm.engine.runner.workers.pids
    os.kill(pids[0], signal.SIGKILL)
    start = time.time()
    with pytest.raises(RuntimeError, match=r"worker 1 died \(exit code -9\)"):
        llm.generate(random_prompts(3, 5, 20), GREEDY, use_tqdm=False)
    assert time.time() - start < 10
    assert_no_children(pids)
    with pytest.raises(RuntimeError, match="cannot continue"):
        llm.generate(random_prompts(1, 5, 20), GREEDY, use_tqdm=False)


def test_failing_worker_error_reaches_the_main_process(model_path):
    llm = LLM(model_path, dtype="float32", tensor_parallel_size=2)
    pids = llm.engine.runner.workers.pids
    llm.engine.runner.workers.conns[0].send_bytes(b"not a step")  # the worker cannot unpack this and fails
    start = time.time()
    with pytest.raises(RuntimeError, match=r"(?s)worker 1: Traceback.*Error"):
        llm.generate(random_prompts(3, 5, 20), GREEDY, use_tqdm=False)
    assert time.time() - start < 10
    assert_no_children(pids)


def test_interrupt_mid_step_stops_the_workers(model_path, monkeypatch):
    llm = LLM(model_path, dtype="float32", tensor_parallel_size=2)
    pids = llm.engine.runner.workers.pids

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.engine.runner, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(random_prompts(2, 5, 20), GREEDY, use_tqdm=False)
    assert_no_children(pids)


def test_engines_one_after_another_and_garbage_collection(model_path):
    prompts = random_prompts(3, 5, 30, seed=3)
    with LLM(model_path, dtype="float32", tensor_parallel_size=2) as llm:
        first = llm.generate(prompts, GREEDY, use_tqdm=False)
        pids = llm.engine.runner.workers.pids
    assert_no_children(pids)
    llm = LLM(model_path, dtype="float32", tensor_parallel_size=2)  # the port and the process group are free again
    second = llm.generate(prompts, GREEDY, use_tqdm=False)
    pids = llm.engine.runner.workers.pids
    del llm
    gc.collect()
    assert_no_children(pids)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in second]


def test_clear_errors(model_path, tmp_path):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=\d+ needs a CPU core per process"):
        LLM(model_path, tensor_parallel_size=(os.cpu_count() or 1) + 1)
    one_kv_head = save_tiny_model("llama", str(tmp_path / "mqa"), num_key_value_heads=1)
    with pytest.raises(ValueError, match="num_key_value_heads=1 is not divisible by tensor_parallel_size=2"):
        LLM(one_kv_head, tensor_parallel_size=2)
    assert not multiprocessing.active_children()


def test_serve_with_tp2(model_path):
    proc, url = start_server([model_path, "--dtype", "float32", "--tensor-parallel-size", "2"])
    try:
        prompt = random_prompts(1, 10, 10, seed=4)[0]
        req = urllib.request.Request(
            url + "/v1/completions",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}).encode(),
        )
        text = json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]["text"]
        expected = (
            LLM(model_path, dtype="float32")
            .generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
            .outputs[0]
            .text
        )
        assert text == expected
        children = []  # the worker, spawned by the engine's loop thread: children are listed per thread
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{task}/children") as f:
                children += [int(pid) for pid in f.read().split()]
        assert children
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the server and its worker stop
        proc.wait(30)
    assert_no_children(children)
