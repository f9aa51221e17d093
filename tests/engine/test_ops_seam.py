"""The seam (nanovllm/ops): the reference backend alone, the CPU backend against it, and the house rules that
keep the model free of kernels: no import cycle, and nothing under models/ or layers/ imports kernels/."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import hf_greedy, random_prompts

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "nanovllm"


def import_graph() -> dict[str, set[str]]:
    """Every nanovllm module and the nanovllm modules it imports, at any depth (imports inside functions count)."""
    files = {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }
    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def test_no_import_cycle_and_models_do_not_import_kernels():
    graph = import_graph()
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    leaks = {
        m: sorted(t for t in targets if t.startswith("nanovllm.kernels"))
        for m, targets in graph.items()
        if m.startswith(("nanovllm.models", "nanovllm.layers"))
    }
    assert not any(leaks.values()), f"models/ and layers/ import kernels/: {leaks}"


def test_the_checks_above_see_a_cycle_and_a_leak(tmp_path, monkeypatch):
    """The graph is read right: a planted cycle and a planted kernels import are both found."""
    pkg = tmp_path / "nanovllm"
    (pkg / "layers").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "layers" / "__init__.py").write_text("")
    (pkg / "layers" / "a.py").write_text("def f():\n    from nanovllm.layers import b\n")
    (pkg / "layers" / "b.py").write_text("import nanovllm.layers.a\nfrom nanovllm.kernels import cpu\n")
    (pkg / "kernels").mkdir()
    (pkg / "kernels" / "__init__.py").write_text("")
    (pkg / "kernels" / "cpu.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    graph = import_graph()
    assert "nanovllm.layers.b" in graph["nanovllm.layers.a"] and "nanovllm.layers.a" in graph["nanovllm.layers.b"]
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycle_and_models_do_not_import_kernels()


REFERENCE_RUN = """
import json, sys
from nanovllm import LLM, SamplingParams
import nanovllm.ops as ops
llm = LLM(sys.argv[1], dtype="float32")
prompts = json.loads(sys.argv[2])
outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
maps = open("/proc/self/maps").read()
print(json.dumps({"tokens": [o.outputs[0].token_ids for o in outs], "ops": ops.active.NAME,
                  "config_ops": llm.engine.config.ops, "triton": "triton" in sys.modules,
                  "c_library": "nanovllm_cpu" in maps or "cpu_attention" in maps}))
"""


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_reference_ops_alone_give_hf_greedy_tokens(arch, tmp_path):
    """NANOVLLM_OPS=torch: the engine runs with no C library loaded and no Triton imported, on HF's tokens."""
    from conftest import save_tiny_model

    path = save_tiny_model(arch, str(tmp_path / arch))
    prompts = random_prompts(4, 5, 40, seed=21) + random_prompts(2, 3, 10, seed=22, prefix=list(range(2, 36)))
    env = {**os.environ, "NANOVLLM_OPS": "torch"}
    run = subprocess.run(
        [sys.executable, "-c", REFERENCE_RUN, path, json.dumps(prompts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["ops"] == got["config_ops"] == "torch"
    assert not got["triton"] and not got["c_library"]
    assert got["tokens"] == hf_greedy(path, prompts, 16)


def test_ops_config_is_checked():
    from nanovllm.config import EngineConfig

    with pytest.raises(ValueError, match="EngineConfig.ops must be auto, torch, cpu or cuda"):
        EngineConfig(ops="fast")


@pytest.mark.slow
def test_torch_and_cpu_ops_agree_in_bf16_on_the_embedded_model():
    """bf16 on CPU: the reference ops and our C kernels give the same greedy tokens on the embedded model for the
    first tokens. They need not agree to the end: the C RMSNorm and SiLU-and-mul can differ from torch's by one
    ulp (the order of a sum, libm's exp), and decode attention sums in another order than SDPA, so after enough
    tokens a near-tie between two candidates can flip. Measured on an AVX2-only AMD EPYC (2026-12-01, 64 tokens
    each): three prompts agree on all 64, "The capital of France is" parts at token 18; the test asks for 8."""
    from nanovllm import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at", "List three colors:"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    runs = {}
    for name in ("torch", "cpu"):
        # the float weights (the kept GGUF blocks' C matmuls quantize activations to int8: test_gguf_quant.py)
        llm = LLM(dtype="bfloat16", ops=name, kv_cache_gib=0.25, max_num_seqs=4, quantization="dequantize")
        assert llm.engine.config.ops == name
        runs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
    for prompt, a, b in zip(prompts, runs["torch"], runs["cpu"]):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        assert same >= 8, f"{prompt!r}: the two backends part after {same} tokens: {a} vs {b}"
