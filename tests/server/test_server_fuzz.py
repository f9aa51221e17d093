"""schemathesis against the server's own OpenAPI document (/openapi.json): for every operation, generated valid
and invalid requests; no answer is a 5xx and every answer (status, content type, headers, body) is what the
document says. A small budget here (a tiny random-weight model, max_model_len 64); `scripts/soak.py
--fuzz-examples N` runs a larger one.

schemathesis runs as its own process, as does the server: the C kernels are built with -ffast-math, which sets
flush-to-zero for the process that loads them, and hypothesis refuses to generate floats in such a process."""

import shutil
import subprocess

import pytest
from conftest import start_server

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
    "response_schema_conformance"
)


def fuzz(url: str, examples: int, timeout: float, cwd: str) -> subprocess.CompletedProcess:
    """`schemathesis run` over every operation of url's /openapi.json, the checks on what the server answers.
    (Its request-side checks are left out: the document cannot state every rule of a valid request, such as
    a prompt plus max_tokens within max_model_len.)"""
    return subprocess.run(
        [
            shutil.which("schemathesis") or "schemathesis",
            "run",
            f"{url}/openapi.json",
            "--max-examples",
            str(examples),
            "--generation-deterministic",
            "--request-timeout",
            "60",
            "--checks",
            CHECKS,
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )  # its cache goes to cwd


def metrics(url: str) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


@pytest.mark.skipif(shutil.which("schemathesis") is None, reason="pip install schemathesis (the test extra)")
def test_every_operation_answers_as_documented(model_path, tmp_path):
    proc, url = start_server([model_path, "--dtype", "float32", "--max-model-len", "64", "--max-num-seqs", "32"])
    try:
        run = fuzz(url, examples=8, timeout=300, cwd=str(tmp_path))
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert "7 selected / 7 total" in run.stdout  # every operation
        m = metrics(url)  # and the server is left as it was: alive, nothing running, every KV block free
        assert m["nanovllm:num_requests_running"] == 0 and m["nanovllm:num_requests_waiting"] == 0
        assert m["nanovllm:kv_cache_usage_perc"] == 0
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode in (0, -15), proc.stdout.read()[-3000:]
