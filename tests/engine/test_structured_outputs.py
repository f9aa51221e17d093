"""Structured outputs with the embedded SmolLM2 (fp32, greedy): JSON that validates against its schema, a choice, a
regex matched in full, any JSON object; unconstrained requests in the same batch unchanged; grammars compiled off
the step loop and cached; preemption does not advance a matcher twice; an invalid schema, regex or grammar is a
ValueError offline and a 400 on the server, and the engine goes on serving."""

import json
import re
import threading

import jsonschema
import openai
import pytest
from conftest import start_server, stop_server

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import Status
from nanovllm.sampling_params import GuidedDecodingParams, StructuredOutputsParams

SCHEMAS = {  # nested objects, a pattern, enums, an array with bounds, numbers with bounds
    "person": {
        "type": "object",
        "required": ["name", "age", "address"],
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "address": {
                "type": "object",
                "required": ["city", "zip"],
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
            },
        },
    },
    "enums": {
        "type": "object",
        "required": ["color", "size"],
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L"]},
        },
    },
    "array": {
        "type": "object",
        "required": ["tags"],
        "properties": {
            "tags": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "string", "maxLength": 10}}
        },
    },
    "numbers": {
        "type": "object",
        "required": ["temperature", "count"],
        "properties": {
            "temperature": {"type": "number", "minimum": -50, "maximum": 60},
            "count": {"type": "integer", "minimum": 1, "maximum": 10},
        },
    },
}
QUESTIONS = [
    "Describe a person as JSON.",
    "Pick a color and a size, as JSON.",
    "Give some tags for a cat picture, as JSON.",
    "Give a weather report as JSON.",
]
DATE = r"(19|20)\d{2}-(0[1-9]|1[0-2])-[0-3]\d"


def chat(llm: LLM, question: str) -> dict:
    return {"prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": question}])}


def greedy(max_tokens: int, **constraint) -> SamplingParams:
    so = StructuredOutputsParams(**constraint) if constraint else None
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=so)


def test_outputs_follow_their_grammar_and_unconstrained_rows_are_unchanged(embedded_llm):
    llm = embedded_llm
    plain = [chat(llm, "What is the capital of France?"), "The quick brown fox"]
    constrained = [chat(llm, q) for q in QUESTIONS] + [
        chat(llm, 'Reply with {"ok": true}'),
        chat(llm, "Is Paris in France?"),
        "Today's date is ",
    ]
    params = [greedy(60, json=s, disable_any_whitespace=True) for s in SCHEMAS.values()] + [
        greedy(40, json_object=True),
        greedy(5, choice=["yes", "no", "maybe so"]),
        greedy(20, regex=DATE),
    ]
    outs = llm.generate(plain[:1] + constrained + plain[1:], [greedy(16)] + params + [greedy(16)], use_tqdm=False)
    alone = llm.generate(plain, greedy(16), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in (outs[0], outs[-1])] == [o.outputs[0].token_ids for o in alone]
    for out, schema in zip(outs[1:], SCHEMAS.values()):
        c = out.outputs[0]
        jsonschema.validate(json.loads(c.text), schema)
        # the output ends where the grammar does: EOS, allowed only there
        assert c.finish_reason == "stop" and c.token_ids[-1] in llm.engine.eos_token_ids, c.text
    any_object, choice, date = (o.outputs[0] for o in outs[5:8])
    assert any_object.finish_reason == "stop" and isinstance(json.loads(any_object.text), dict)
    assert choice.text in ("yes", "no", "maybe so") and choice.finish_reason == "stop"
    assert re.fullmatch(DATE, date.text) and date.finish_reason == "stop"


def test_vllms_names_n_and_sampling(embedded_llm):
    """guided_decoding=GuidedDecodingParams(...) (vLLM's name before 0.11), n > 1 with sampling: each sequence
    has its own matcher."""
    params = SamplingParams(
        n=3,
        temperature=1.0,
        seed=1,
        max_tokens=24,
        guided_decoding=GuidedDecodingParams(json=json.dumps(SCHEMAS["enums"]), disable_any_whitespace=True),
    )
    assert params.guided_decoding is None and params.structured_outputs.json
    for c in embedded_llm.generate([chat(embedded_llm, QUESTIONS[1])], params, use_tqdm=False)[0].outputs:
        jsonschema.validate(json.loads(c.text), SCHEMAS["enums"])
    with pytest.raises(ValueError, match="exactly one of json, regex, choice, grammar, json_object; got regex, choice"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="StructuredOutputsParams.json is not valid JSON"):
        StructuredOutputsParams(json="{nope")


def test_json_object_ebnf_and_lark(embedded_llm):
    """Compact JSON objects; EBNF (GBNF) and Lark grammars alike."""
    ebnf = 'root ::= "The answer is " ("yes" | "no") "."'
    lark = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"'
    outs = embedded_llm.generate(
        ['JSON: {"a": 1}\nJSON: {"b": 2}\nJSON:'] + ["Question: is 2 > 1?"] * 2,
        [greedy(20, json_object=True, disable_any_whitespace=True), greedy(12, grammar=ebnf), greedy(12, grammar=lark)],
        use_tqdm=False,
    )
    obj, by_ebnf, by_lark = (o.outputs[0] for o in outs)
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict) and "\n" not in obj.text
    assert by_ebnf.text == by_lark.text and re.fullmatch(r"The answer is (yes|no)\.", by_ebnf.text)


@pytest.mark.parametrize(
    "constraint,problem",
    [
        ({"json": {"type": "object", "properties": {"a": {"type": "foo"}}}}, "invalid JSON schema .*foo"),
        (
            {"json": {"type": "integer", "minimum": 5, "maximum": 1}},
            "invalid JSON schema .*minimum greater than maximum",
        ),
        ({"regex": "a(b"}, "invalid regex .*parenthesis is not closed"),
        ({"grammar": "root ::= missing"}, "invalid grammar .*missing"),
    ],
)
def test_an_invalid_spec_is_a_value_error_and_the_engine_still_serves(embedded_llm, constraint, problem):
    with pytest.raises(ValueError, match=f"prompt 1: {problem}"):
        embedded_llm.generate(["a", "b"], [greedy(4), greedy(4, **constraint)], use_tqdm=False)
    assert embedded_llm.generate(["a"], greedy(4, choice=["x"]), use_tqdm=False)[0].outputs[0].text == "x"


def test_compiling_never_blocks_the_step_loop(embedded_llm, monkeypatch):
    """A request waits in the queue while its grammar compiles (on the compile thread); the others run. A grammar
    that fails fails its request alone (through the raw engine API, which does not wait for it)."""
    engine = embedded_llm.engine
    manager, compile_grammar = engine.structured_outputs, engine.structured_outputs._compile
    release = threading.Event()
    monkeypatch.setattr(manager, "_compile", lambda key: release.wait(60) and compile_grammar(key))
    engine.add_request("held", "Pick one:", greedy(4, regex="(held|free) [a-z]{3}"))
    engine.add_request("bad", "Pick one:", greedy(4, regex="(unclosed"))
    engine.add_request("plain", "The capital of France is", greedy(3))
    outs = {}
    while "plain" not in outs:
        outs.update({o.request_id: o for o in engine.step() if o.finished})
        assert engine.requests["held"].seqs[0].status == Status.WAITING
    release.set()
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert re.fullmatch("(held|free) [a-z]{3}", outs["held"].outputs[0].text)
    assert "invalid regex" in outs["bad"].error and outs["bad"].outputs[0].finish_reason == "abort"
    key = StructuredOutputsParams(regex="(held|free) [a-z]{3}")
    assert manager.compile(key, engine.tokenizer) is manager.compile(key, engine.tokenizer)  # cached by spec


def test_preemption_does_not_advance_a_matcher_twice(embedded_llm):
    """A pool too small for the batch: sequences are preempted and recomputed mid-output; their matchers must
    not see their tokens again, so the outputs equal those of a pool with room for all."""
    params = [greedy(40, json=s, disable_any_whitespace=True) for s in SCHEMAS.values()]
    roomy = embedded_llm.generate([chat(embedded_llm, q) for q in QUESTIONS], params, use_tqdm=False)
    with LLM(dtype="float32", num_kv_blocks=12, quantization="dequantize") as llm:
        small = llm.generate([chat(llm, q) for q in QUESTIONS], params, use_tqdm=False)
        assert llm.engine.stats()["preemptions"] > 0
    assert [o.outputs[0].text for o in small] == [o.outputs[0].text for o in roomy]


def test_constrained_rows_are_not_speculated_on(embedded_llm):
    """With n-gram speculation on, a constrained sequence gets no proposals (its matcher takes tokens one by one):
    its output equals the one without speculation, while an unconstrained repeating prompt is still speculated on."""
    params = [greedy(40, json=SCHEMAS["enums"], disable_any_whitespace=True), greedy(24)]
    prompts = [chat(embedded_llm, QUESTIONS[1]), "one two three four one two three four one two three four one two"]
    plain = embedded_llm.generate(prompts, params, use_tqdm=False)
    with LLM(
        dtype="float32",
        quantization="dequantize",
        speculative_config={"method": "ngram", "num_speculative_tokens": 3},
    ) as llm:
        spec = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.stats()["spec_decode_num_draft_tokens"] > 0
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    jsonschema.validate(json.loads(spec[0].outputs[0].text), SCHEMAS["enums"])


# ---- the server --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    proc, url = start_server(
        ["--dtype", "float32", "--max-model-len", "512", "--kv-cache-gib", "0.1", "--quantization", "dequantize"],
        timeout=900,
    )
    yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    stop_server(proc)


def test_server_response_format_and_vllms_fields(client):
    schema = SCHEMAS["enums"]
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=messages,
        temperature=0,
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}},
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        temperature=0,
        max_tokens=40,
        stream=True,
        messages=[{"role": "user", "content": 'Reply with {"ok": true}'}],
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), dict)
    for extra, check in [
        ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"guided_regex": DATE}, lambda t: re.fullmatch(DATE, t)),
        ({"guided_json": schema}, lambda t: jsonschema.validate(json.loads(t), schema) or True),
        ({"guided_grammar": 'root ::= "a" | "b"'}, lambda t: t in ("a", "b")),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
    ]:
        text = (
            client.completions.create(
                model="SmolLM2-135M-Instruct", prompt="Answer: ", temperature=0, max_tokens=40, extra_body=extra
            )
            .choices[0]
            .text
        )
        assert check(text), (extra, text)


def test_server_an_invalid_spec_is_a_400_naming_it(client):
    def bad(**kwargs) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=4, **kwargs)
        return e.value

    e = bad(extra_body={"guided_json": {"type": "object", "properties": {"a": {"type": "foo"}}}})
    assert "invalid JSON schema" in e.message and "foo" in e.message and e.body["param"] == "guided_json"
    e = bad(extra_body={"guided_regex": "a(b"})
    assert "invalid regex" in e.message and e.body["param"] == "guided_regex"
    e = bad(extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
    assert "needs json_schema.schema" in e.message
    e = bad(extra_body={"guided_regex": "a", "guided_choice": ["a"]})
    assert "one structured-output constraint" in e.message
    e = bad(extra_body={"structured_outputs": {"regex": "a", "json_object": True}})
    assert "exactly one of" in e.message
    ok = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="x", max_tokens=4, temperature=0, extra_body={"guided_choice": ["fine"]}
    )
    assert ok.choices[0].text == "fine"


def test_the_mask_touches_only_the_constrained_rows():
    import torch

    from nanovllm.sampling.sampler import apply_token_bitmask

    vocab, rows = 100, [0, 2]
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, 4), dtype=torch.int32)
    logits = torch.randn(3, vocab)
    masked = logits.clone()
    apply_token_bitmask(masked, rows, bitmask)
    for r, row in enumerate(rows):
        allowed = torch.tensor([bool(int(bitmask[r, t // 32]) >> (t % 32) & 1) for t in range(vocab)])
        assert torch.equal(masked[row], logits[row].masked_fill(~allowed, float("-inf")))
    assert torch.equal(masked[1], logits[1])
