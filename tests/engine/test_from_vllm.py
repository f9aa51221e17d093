"""A vLLM user changes only the import: docs/from-vllm.md's table of engine arguments holds (each accepted or
refused as it says), the serve flags parse, and scripts written the way vLLM's offline examples are run as they
are, on the embedded model and on a tiny HF folder."""

import ast
import pathlib
import re

import pytest
from conftest import save_tiny_model

from nanovllm import SamplingParams
from nanovllm.config import EngineConfig
from nanovllm.engine_args import RENAMED, engine_config

TABLE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "from-vllm.md"
ROW = re.compile(r"^\| `(\w+)` \| `(.+?)` \| (implemented|accepted|refused) \|")


def table_rows() -> list[tuple[str, object, str]]:
    rows = [ROW.match(line) for line in TABLE.read_text().splitlines()]
    return [(m[1], ast.literal_eval(m[2]), m[3]) for m in rows if m]


def test_the_table_is_read():
    kinds = {kind for _, _, kind in table_rows()}
    assert len(table_rows()) >= 40 and kinds == {"implemented", "accepted", "refused"}


@pytest.mark.parametrize("name,value,kind", table_rows(), ids=lambda x: str(x)[:24])
def test_every_engine_argument_is_treated_as_documented(name, value, kind):
    if kind == "refused":
        with pytest.raises(ValueError, match=f"{name}={value!r} is not supported; supported: "):
            engine_config(**{name: value})
        return
    config = engine_config(**{name: value})
    if kind == "implemented":
        field = "kv_cache_gib" if name == "kv_cache_memory_bytes" else RENAMED.get(name, name)
        expected = ("float16" if value == "half" else value) if name != "kv_cache_memory_bytes" else value / 2**30
        assert getattr(config, field) == expected
    else:
        assert config == EngineConfig()  # nothing changes


def test_an_unknown_argument_is_a_value_error_not_a_type_error():
    with pytest.raises(ValueError, match="no_such_knob=1: unknown engine argument"):
        engine_config(no_such_knob=1)


def test_serve_takes_vllms_flags():
    from nanovllm.entrypoints.cli import build_parser, engine_kwargs

    args = build_parser().parse_args(
        [
            "serve",
            "some/model",
            "--host",
            "127.0.0.1",
            "--port",
            "8001",
            "--api-key",
            "k",
            "--served-model-name",
            "a",
            "b",
            "--max-model-len",
            "512",
            "--gpu-memory-utilization",
            "0.8",
            "--tensor-parallel-size",
            "1",
            "--dtype",
            "half",
            "--max-num-seqs",
            "8",
            "--max-num-batched-tokens",
            "1024",
            "--no-enable-prefix-caching",
            "--enable-chunked-prefill",
            "--seed",
            "3",
            "--chat-template",
            "{{ messages }}",
            "--generation-config",
            "vllm",
            "--trust-remote-code",
            "--disable-log-requests",
            "--uvicorn-log-level",
            "info",
            "--enforce-eager",
        ]
    )
    assert args.model_pos == "some/model" and args.served_model_name == ["a", "b"] and args.log_level == "info"
    config = engine_config("some/model", **engine_kwargs(args))
    assert (
        config.max_model_len,
        config.dtype,
        config.max_num_seqs,
        config.max_num_batched_tokens,
        config.seed,
        config.enable_prefix_caching,
        config.enforce_eager,
        config.generation_config,
    ) == (512, "float16", 8, 1024, 3, False, True, "vllm")
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for group in ("Frontend", "ModelConfig", "CacheConfig", "SchedulerConfig", "ParallelConfig"):
        assert group in help_text


def test_sampling_params_have_vllms_fields():
    p = SamplingParams(
        temperature=0.7,
        logit_bias={5: 2.0},
        allowed_token_ids=[5, 6],
        bad_words=["x"],
        truncate_prompt_tokens=4,
        detokenize=True,
        spaces_between_special_tokens=True,
        extra_args={},
    )
    q = p.clone()
    q.temperature = 0.1
    assert p.temperature == 0.7 and q.logit_bias == {5: 2.0} and q is not p
    with pytest.raises(ValueError, match="stop needs detokenize=True"):
        SamplingParams(stop=["a"], detokenize=False)


SCRIPTS = {
    "basic": """
from vllm import LLM, SamplingParams
prompts = ["Hello, my name is", "The capital of France is", "The future of AI is"]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)
llm = LLM(model=MODEL, max_model_len=512, max_num_seqs=8, trust_remote_code=True, enable_chunked_prefill=True,
          gpu_memory_utilization=0.9, swap_space=4, disable_log_stats=True, seed=0)
outputs = llm.generate(prompts, sampling_params)
for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs[0].text
    print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")
assert len(outputs) == 3 and all(o.finished and len(o.outputs[0].token_ids) <= 16 for o in outputs)
RESULT = [o.outputs[0].token_ids for o in outputs]
""",
    "chat": """
from vllm import LLM, SamplingParams
llm = LLM(model=MODEL, max_model_len=512, max_num_seqs=8)
conversation = [{"role": "system", "content": "You are a helpful assistant"},
                {"role": "user", "content": "Write an essay about the importance of higher education."}]
outputs = llm.chat([conversation, conversation[:1] + [{"role": "user", "content": "Hello"}]],
                   SamplingParams(temperature=0.5, max_tokens=12), use_tqdm=True)
assert len(outputs) == 2 and all(o.outputs[0].text for o in outputs)
RESULT = [o.outputs[0].token_ids for o in outputs]
""",
    "tokens": """
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model=MODEL, max_model_len=512, max_num_seqs=8)
ids = llm.get_tokenizer()("The capital of France is").input_ids
params = llm.get_default_sampling_params()
params.max_tokens, params.temperature = 8, 0
outputs = llm.generate([TokensPrompt(prompt_token_ids=ids)], params)
assert outputs[0].prompt_token_ids == ids and len(outputs[0].outputs[0].token_ids) <= 8
assert llm.llm_engine is llm.engine and llm.reset_prefix_cache()
RESULT = [outputs[0].outputs[0].token_ids]
""",
    "seeded_n": """
from vllm import LLM, SamplingParams
llm = LLM(model=MODEL, max_model_len=512, max_num_seqs=8)
params = SamplingParams(n=3, seed=42, temperature=1.0, max_tokens=10)
first = llm.generate("Once upon a time", params)[0]
again = llm.generate("Once upon a time", params.clone())[0]
assert len(first.outputs) == 3
assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
RESULT = [c.token_ids for c in first.outputs]
""",
}


def run_script(source: str, model: str) -> list:
    namespace = {"MODEL": model}
    exec(compile(source.replace("from vllm", "from nanovllm"), "<vllm script>", "exec"), namespace)
    return namespace["RESULT"]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_vllm_scripts_run_on_the_embedded_model(script):
    from nanovllm.loader import default_model_path

    assert run_script(SCRIPTS[script], default_model_path())


@pytest.mark.parametrize("script", ["basic", "tokens", "seeded_n"])
def test_vllm_scripts_run_on_a_tiny_hf_folder(script, tmp_path):
    path = save_tiny_model("llama", str(tmp_path / "llama"))
    assert run_script(SCRIPTS[script], path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from nanovllm import LLM

    path = save_tiny_model("llama", str(tmp_path_factory.mktemp("llama")))
    return LLM(path, dtype="float32", max_model_len=128, max_num_seqs=8)


def greedy_ids(llm, prompt, **kw):
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, **kw), use_tqdm=False)
    return out[0].outputs[0]


def test_sampling_controls_do_what_vllm_says(tiny):
    prompt = [5, 6, 7, 8, 9, 10]
    base = greedy_ids(tiny, prompt)
    assert set(greedy_ids(tiny, prompt, allowed_token_ids=[20, 21, 22]).token_ids) <= {20, 21, 22}
    assert greedy_ids(tiny, prompt, logit_bias={42: 1000.0}).token_ids == [42] * 8
    first = base.token_ids[0]
    word = tiny.get_tokenizer().decode([first])
    assert first not in greedy_ids(tiny, prompt, bad_words=[word]).token_ids
    quiet = greedy_ids(tiny, prompt, detokenize=False)
    assert quiet.token_ids == base.token_ids and quiet.text == ""
    cut = tiny.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, truncate_prompt_tokens=3), use_tqdm=False
    )[0]
    assert cut.prompt_token_ids == prompt[-3:] and cut.outputs[0].token_ids == greedy_ids(tiny, prompt[-3:]).token_ids
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    a = tiny.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    b = (
        tiny.generate(
            [prompt],
            SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True, logit_bias={3: 0.0}),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .token_ids
    )
    assert a == b  # a zero bias changes nothing (and takes the torch sampler's path)


def test_output_kinds_in_the_async_engine(tiny):
    import asyncio

    from nanovllm.engine.async_engine import AsyncEngine
    from nanovllm.sampling_params import RequestOutputKind

    engine = AsyncEngine(tiny.engine)
    expected = greedy_ids(tiny, [5, 6, 7])

    async def collect(kind):
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, output_kind=kind)
        return [o async for o in engine.generate(engine.make_request([5, 6, 7], params))]

    async def main():
        return [await collect(kind) for kind in RequestOutputKind]

    cumulative, delta, final = asyncio.run(main())
    assert cumulative[-1].outputs[0].token_ids == expected.token_ids
    assert [t for o in delta for c in o.outputs for t in c.token_ids] == expected.token_ids and len(delta) > 1
    assert len(final) == 1 and final[0].finished and final[0].outputs[0].token_ids == expected.token_ids


def test_without_chunked_prefill_a_prompt_is_one_step(tmp_path):
    from conftest import hf_greedy, random_prompts

    from nanovllm import LLM

    path = save_tiny_model("llama", str(tmp_path / "llama"))
    with pytest.raises(ValueError, match="max_num_batched_tokens=64 is smaller than max_model_len=128"):
        LLM(path, enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=128)
    llm = LLM(path, dtype="float32", enable_chunked_prefill=False, max_model_len=128)
    assert llm.engine.config.max_num_batched_tokens == 2048
    steps = []
    schedule = llm.engine.scheduler.schedule
    llm.engine.scheduler.schedule = lambda: steps.append(b := schedule()) or b
    prompts = random_prompts(6, 40, 100, seed=3)
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == hf_greedy(path, prompts, 6)
    for batch in steps:  # every prefill chunk is a whole prompt
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert n == 1 or n == seq.num_prompt_tokens - (seq.num_cached_tokens if seq.num_cached_tokens > 0 else 0)


def test_chat_can_continue_the_final_message(tiny):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is"}]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    out = tiny.chat(messages, params, add_generation_prompt=False, continue_final_message=True, use_tqdm=False)[0]
    assert tiny.get_tokenizer().decode(out.prompt_token_ids).endswith("The answer is")
    with pytest.raises(ValueError, match="continue_final_message=True needs add_generation_prompt=False"):
        tiny.chat(messages, params, continue_final_message=True, use_tqdm=False)
