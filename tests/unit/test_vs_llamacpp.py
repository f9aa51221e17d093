"""benchmarks/vs_llamacpp.py's pure parts: reading llama-batched-bench's table, medians per engine, the rows of
the report. The peers themselves (llama.cpp's binaries, llama-cpp-python's venv) are outside the repository."""

import argparse
import importlib.util
import os

import pytest

PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "vs_llamacpp.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_llamacpp", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the shape of llama-batched-bench's output: a log line, then its markdown table
TABLE = """
main: n_kv_max = 8192, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, n_threads = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |    128 |    1 |    256 |    0.250 |   512.00 |    1.000 |   128.00 |    1.250 |   204.80 |
|   128 |    128 |    8 |   2048 |    2.000 |   512.00 |    4.000 |   256.00 |    6.000 |   341.33 |

llama_perf_context_print:        load time =     100.00 ms
"""


def test_parse_batched_bench_reads_columns_by_name(bench):
    rows = bench.parse_batched_bench(TABLE)
    assert sorted(rows) == [1, 8]
    assert rows[8]["S_PP t/s"] == 512.0
    assert rows[8]["S_TG t/s"] == 256.0
    assert rows[8]["S t/s"] == 341.33
    assert rows[1]["N_KV"] == 256


def test_parse_batched_bench_without_table_is_empty(bench):
    assert bench.parse_batched_bench("error: unable to load model\n") == {}


def test_rounds_median_per_engine(bench):
    rounds = bench.Rounds()
    for value in [3.0, 1.0, 2.0]:
        rounds.add("chat decode", "nanovllm", value)
    rounds.add("chat decode", "llama.cpp", 5.0)
    assert rounds.median("chat decode", "nanovllm") == 2.0
    assert rounds.median("chat decode", "llama.cpp") == 5.0
    assert rounds.median("prompt 128", "nanovllm") is None


def test_measures_cover_every_asked_row(bench):
    args = argparse.Namespace(tokens=128, prompt_lengths=[128, 512], batch_prompt=128, batch_sizes=[1, 8, 32])
    rows = bench.measures(args, {"chat_tokens": 37, "plain_tokens": 4})
    keys = [m.key for m in rows]
    assert keys[:4] == ["chat ttft", "chat decode", "plain ttft", "plain decode"]
    assert "prompt 512" in keys
    assert sum(k.startswith("batched 32 ") for k in keys) == 3  # S_PP, S_TG, S
    assert [m.lower_is_better for m in rows if m.unit == "ms"] == [True, True]


def test_common_prefix(bench):
    assert bench.common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert bench.common_prefix([], [1]) == 0
