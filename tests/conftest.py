"""Shared fixtures: tiny random-weight models saved like HF checkpoints, their HF references, and the
invariant that every engine ends each test with all KV blocks free."""

import os
import tempfile
import weakref

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub
# converted GGUF metadata goes to a fresh folder: tests neither read nor leave anything in ~/.cache
os.environ["NANOVLLM_CACHE"] = tempfile.mkdtemp(prefix="nanovllm-test-cache-")

import pytest
import torch

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.layers.attention import AttentionMetadata

ENGINES: "weakref.WeakSet[LLMEngine]" = weakref.WeakSet()
_init = LLMEngine.__init__


def _tracked_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    ENGINES.add(self)


LLMEngine.__init__ = _tracked_init


@pytest.fixture(autouse=True)
def all_blocks_free_after_test():
    yield
    for engine in list(ENGINES):
        assert not engine.has_unfinished(), "an engine still has unfinished requests after the test"
        assert not engine.requests
        engine.block_manager.check_all_free()


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> str:
    """A tiny random Llama (llama3 rope scaling) saved like an HF checkpoint, with the byte tokenizer."""
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def llm(model_path):
    from nanovllm import LLM

    return LLM(model_path, dtype="float32")


def serve_in_thread(app):
    """A uvicorn server for `app` on a free port of 127.0.0.1, run by a daemon thread: (server, thread, base url)."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def stop_server(proc) -> None:
    """Terminate a server from start_server; kill it if it does not stop within 10 s."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def start_server(args: list[str], env: dict | None = None, timeout: float = 180):
    """`nanovllm serve ARGS` on a free port of 127.0.0.1, once /health answers: (process, base url)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanovllm.entrypoints.cli", "serve", "--port", str(port), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url, deadline = f"http://127.0.0.1:{port}", time.time() + timeout
    while True:
        try:
            if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start:\n{proc.stdout.read()}")
        time.sleep(0.3)


@pytest.fixture(scope="session")
def embedded_llm():
    """The embedded SmolLM2-135M-Instruct in fp32, loaded once for every test that needs it; its weights dequantized
    (quantization="dequantize"), so that a sequence's tokens do not depend on what shares its steps (kept GGUF
    blocks: quantized activations in steps of few rows, float tiles in larger ones)."""
    from nanovllm import LLM

    return LLM(dtype="float32", kv_cache_gib=1, quantization="dequantize")


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 byte tokens + specials): real HF tokenizer behaviour,
    made here without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1, **{ch: i + 2 for i, ch in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return fast


def add_byte_vocabulary(writer) -> int:
    """byte_tokenizer's vocabulary into a gguf.GGUFWriter as a gpt2 tokenizer (<s> = BOS, </s> = EOS); returns its
    size."""
    vocab = sorted(byte_tokenizer().get_vocab().items(), key=lambda item: item[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if i < 2 else 1 for i in range(len(vocab))])  # <s>, </s>: control
    writer.add_token_scores([0.0] * len(vocab))
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    return len(vocab)


VOCAB = 258


def tiny_config(arch: str, **overrides):
    from transformers import (
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        OlmoeConfig,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        initializer_range=0.2,
    )
    if arch == "llama":
        cfg = LlamaConfig(
            **common,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        )
    elif arch == "mistral":
        cfg = MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common, tie_word_embeddings=True)
    elif arch == "qwen3":
        cfg = Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    elif arch == "qwen3_moe":  # 3 layers, the middle one dense (mlp_only_layers), the others 8 experts, top 3
        cfg = Qwen3MoeConfig(
            **{**common, "num_hidden_layers": 3},
            head_dim=32,
            tie_word_embeddings=False,
            moe_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        )
    elif arch == "mixtral":
        cfg = MixtralConfig(
            **{**common, "intermediate_size": 48},
            tie_word_embeddings=False,
            num_local_experts=6,
            num_experts_per_tok=2,
            sliding_window=None,
        )
    elif arch == "olmoe":  # norm_topk_prob False, as OLMoE-1B-7B
        cfg = OlmoeConfig(
            **{**common, "intermediate_size": 48},
            tie_word_embeddings=False,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            pad_token_id=None,
        )
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def save_tiny_model(arch: str, path: str, max_shard_size: str | None = None, **overrides) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=["llama", "mistral", "qwen2", "qwen3"])
def tiny_model(request, tmp_path_factory) -> str:
    return save_tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """HF transformers' own greedy generation, one prompt at a time (no padding effects), EOS ignored."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    outs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
            outs.append(out[0, len(ids) :].tolist())
    return outs


def random_prompts(n: int, lo: int, hi: int, seed: int = 0, prefix: list[int] | None = None) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [(prefix or []) + torch.randint(2, VOCAB, (L,), generator=g).tolist() for L in lens]


def make_step(seqs: list[tuple[int, int]], block_size: int, num_blocks: int, gen: torch.Generator, device: str = "cpu"):
    """seqs: (context length after this step, query tokens this step) per sequence. Random block tables (no
    block shared), slots for the new tokens, and the metadata the model runner would build."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots, query_start, lens = [], [], [0], []
    for ctx, qlen in seqs:
        n = -(-ctx // block_size)
        table, perm = perm[:n], perm[n:]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx - qlen, ctx)]
        query_start.append(query_start[-1] + qlen)
        lens.append(ctx)
    width = max(map(len, tables))
    decode = [i for i, (_, q) in enumerate(seqs) if q == 1]
    prefill = [i for i, (_, q) in enumerate(seqs) if q > 1]

    def t(x):
        return torch.tensor(x, dtype=torch.long, device=device)

    return AttentionMetadata(
        query_start=t(query_start),
        context_lens=t(lens),
        block_tables=t([b + [0] * (width - len(b)) for b in tables]),
        slot_mapping=t(slots),
        query_start_cpu=query_start,
        context_lens_cpu=lens,
        decode_rows=t(decode),
        decode_tokens=t([query_start[i] for i in decode]),
        decode_max_context=max([lens[i] for i in decode] or [0]),
        prefill_rows=t(prefill),
        prefill_max_query=max([seqs[i][1] for i in prefill] or [0]),
    )


# ---- the fast tier: `pytest -m "not slow"` -----------------------------------------------------------------------
# Whole files that start servers, spawn tensor-parallel workers or load the embedded model many ways, and single
# tests that spawn tensor-parallel workers or build a second kernel library; `-m slow` runs just these.
SLOW_FILES = {
    "server/test_server.py",
    "server/test_server_fuzz.py",
    "server/test_server_limits.py",
    "server/test_server_tools.py",
    "engine/test_tp.py",
    "engine/test_embedded.py",
    "engine/test_structured_outputs.py",
    "engine/test_from_vllm.py",
    "engine/test_logits_processors.py",
    "unit/test_errors.py",
}
SLOW_NAMES = ("tensor_parallel", "tp2", "portable", "compile_for_hopper", "cli_streams", "embedded_model")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.path.as_posix()
        if any(path.endswith("tests/" + f) for f in SLOW_FILES) or any(n in item.name for n in SLOW_NAMES):
            item.add_marker(pytest.mark.slow)
