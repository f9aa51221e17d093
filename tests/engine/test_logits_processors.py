"""vLLM's logits processors: its own example processor runs with only its imports changed, per-request functions
through the adapter, the server's flag and vllm_xargs, validate_params refusing a request, and a processor's
per-row state following its requests while they finish and join mid-run (the persistent batch)."""

import json
import random
import urllib.error
import urllib.request

import pytest
import torch
from conftest import serve_in_thread

from nanovllm import LLM, SamplingParams
from nanovllm.config import EngineConfig as VllmConfig
from nanovllm.engine.sequence import Sequence
from nanovllm.logits_processor import (
    AdapterLogitsProcessor,
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
    process_dict_updates,
)
from nanovllm.sampling.persistent_batch import LogitsProcessors


# ---- vLLM's example (examples/offline_inference/logits_processor/custom.py), its imports changed -------------
class DummyLogitsProcessor(LogitsProcessor):
    """Fake logit processor to support unit testing and examples"""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.req_info: dict[int, int] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None):
        process_dict_updates(
            self.req_info,
            batch_update,
            # This function returns the LP's per-request state based on the
            # request details, or None if this LP does not apply to the
            # request.
            lambda params, _, __: params.extra_args and (params.extra_args.get("target_token")),
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.req_info:
            return logits

        # Save target values before modification
        cols = torch.tensor(list(self.req_info.values()), dtype=torch.long, device=logits.device)
        rows = torch.tensor(list(self.req_info.keys()), dtype=torch.long, device=logits.device)
        values_to_keep = logits[rows, cols].clone()

        # Mask all but target tokens
        logits[rows] = float("-inf")
        logits[rows, cols] = values_to_keep

        return logits


# ---- the same as a per-request function (vLLM's custom_req.py), through the adapter -------------------------
class DummyPerReqLogitsProcessor:
    def __init__(self, target_token: int) -> None:
        self.target_token = target_token

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        val_to_keep = logits[self.target_token].item()
        logits[:] = float("-inf")
        logits[self.target_token] = val_to_keep
        return logits


class WrappedPerReqLogitsProcessor(AdapterLogitsProcessor):
    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams):
        if not params.extra_args or "target_token" not in params.extra_args:
            return None
        return DummyPerReqLogitsProcessor(params.extra_args["target_token"])


class ValidatedLogitsProcessor(DummyLogitsProcessor):
    """Refuses a target_token that is not a token id."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        target = (sampling_params.extra_args or {}).get("target_token")
        if target is not None and not (isinstance(target, int) and target >= 0):
            raise ValueError(f"target_token must be a token id (an integer >= 0), got {target!r}")


PROMPTS = ["Hello, my name is", "The president of the United States is", "The capital of France is", "The future"]
TARGETS = [128, None, 67, None]  # half the prompts ask for a token


def params(target: int | None, max_tokens: int = 12) -> SamplingParams:
    extra = {"target_token": target} if target is not None else None
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra)


@pytest.fixture(scope="module")
def plain(model_path) -> list[list[int]]:
    """Each prompt's tokens without any processor."""
    llm = LLM(model_path, dtype="float32")
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, [params(None)] * 4, use_tqdm=False)]


def check_outputs(llm: LLM, plain: list[list[int]]) -> None:
    outs = llm.generate(PROMPTS, [params(t) for t in TARGETS], use_tqdm=False)
    for out, target, alone in zip(outs, TARGETS, plain):
        ids = out.outputs[0].token_ids
        if target is not None:
            assert ids == [target] * 12
        else:
            assert ids == alone  # the rows that did not ask are unchanged


@pytest.mark.parametrize("processor", [DummyLogitsProcessor, WrappedPerReqLogitsProcessor], ids=["batch", "adapter"])
def test_vllm_example_processor(model_path, plain, processor):
    check_outputs(LLM(model_path, dtype="float32", logits_processors=[processor]), plain)


def test_processor_by_name_and_with_async_scheduling(model_path, plain):
    """A "package.module:Class" string loads the class; async scheduling gives the same tokens."""
    name = f"{__name__}:DummyLogitsProcessor"
    check_outputs(LLM(model_path, dtype="float32", logits_processors=[name], async_scheduling=True), plain)


def test_a_name_that_is_not_a_processor_is_refused(model_path):
    with pytest.raises(ValueError, match="LogitsProcessor"):
        LLM(model_path, dtype="float32", logits_processors=[f"{__name__}:params"])
    with pytest.raises(ValueError, match="cannot be loaded"):
        LLM(model_path, dtype="float32", logits_processors=["no_such_module:Thing"])


def test_validate_params_refuses_a_request(model_path):
    llm = LLM(model_path, dtype="float32", logits_processors=[ValidatedLogitsProcessor])
    with pytest.raises(ValueError, match="target_token must be a token id"):
        llm.generate(["Hello"], SamplingParams(extra_args={"target_token": "x"}), use_tqdm=False)
    out = llm.generate(["Hello"], params(5, max_tokens=3), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == [5, 5, 5]


def test_state_follows_requests_that_finish_and_join(model_path):
    """Seven requests through a batch of three: each with its own target and length, so rows empty and fill
    mid-run and the last rows move down; every request still gets only its own target. Two do not ask."""
    llm = LLM(model_path, dtype="float32", max_num_seqs=3, logits_processors=[DummyLogitsProcessor])
    targets = [10, None, 30, 40, None, 60, 70]
    lengths = [3, 9, 5, 2, 7, 4, 6]
    outs = llm.generate(
        [f"prompt {i}" for i in range(7)], [params(t, n) for t, n in zip(targets, lengths)], use_tqdm=False
    )
    for out, target, n in zip(outs, targets, lengths):
        ids = out.outputs[0].token_ids
        assert len(ids) == n
        if target is not None:
            assert ids == [target] * n


class RowRecorder(LogitsProcessor):
    """Keeps the request id of every row it was told about: the truth to compare with."""

    def __init__(self, vllm_config, device, is_pin_memory):
        self.rows: dict[int, str] = {}
        self.updates: list[BatchUpdate] = []

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.updates += [batch_update] if batch_update else []
        process_dict_updates(self.rows, batch_update, lambda params, _, __: params.extra_args["id"])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def test_batch_updates_keep_every_row_right():
    """Random churn (sequences leaving, joining, coming back after a step without them): after each step's
    BatchUpdate the processor's rows are exactly the batch's, and the logits it sees are its rows'."""
    rng = random.Random(0)
    processors = LogitsProcessors([RowRecorder], VllmConfig(), torch.device("cpu"), [0])
    recorder = processors.custom[0]
    pool = [
        Sequence(f"r{i}", 0, [1, 2, 3], 3, SamplingParams(extra_args={"id": f"r{i}"}), num_computed=2)
        for i in range(12)
    ]
    for _ in range(200):
        seqs = rng.sample(pool, rng.randint(0, 8))
        logits = torch.arange(len(seqs), dtype=torch.float32)[:, None].repeat(1, 4)  # row i holds i
        seen = []

        def look(batch):
            seen.append(batch.clone())
            return batch

        recorder.apply = look
        processors.apply(logits, seqs, asked=False, all_greedy=False)
        update, _ = processors.batch_update(seqs)  # nothing changed since: no update
        assert update is None
        assert sorted(recorder.rows) == list(range(len(seqs)))
        for row, request_id in recorder.rows.items():
            assert seen[0][row, 0].item() == next(i for i, s in enumerate(seqs) if s.request_id == request_id)
    moved = [m for u in recorder.updates for m in u.moved]
    assert moved and all(direction is MoveDirectionality.UNIDIRECTIONAL for *_, direction in moved)


def test_moves_are_vllms():
    """A hole left by a finished request is filled by the batch's last row, a one-way move."""
    processors = LogitsProcessors([RowRecorder], VllmConfig(), torch.device("cpu"), [0])
    a, b, c = (Sequence(x, 0, [1], 1, SamplingParams(extra_args={"id": x}), num_computed=1) for x in "abc")
    update, _ = processors.batch_update([a, b, c])
    assert [i for i, *_ in update.added] == [0, 1, 2] and not update.removed
    update, order = processors.batch_update([b, c])
    assert update.removed == [0] and update.moved == [(2, 0, MoveDirectionality.UNIDIRECTIONAL)]
    assert processors.slots == [c, b] and order == [1, 0]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_flag_and_vllm_xargs(model_path):
    """`--logits-processors` reaches the engine; a request's vllm_xargs reach its processor (a bad one is a 400)."""
    from nanovllm.engine.async_engine import AsyncEngine
    from nanovllm.engine_args import engine_config
    from nanovllm.entrypoints.cli import build_parser, engine_kwargs
    from nanovllm.entrypoints.server import build_app

    args = build_parser().parse_args(
        ["serve", model_path, "--dtype", "float32", "--logits-processors", f"{__name__}:ValidatedLogitsProcessor"]
    )
    kwargs = engine_kwargs(args, seqs=4)
    assert kwargs["logits_processors"] == [f"{__name__}:ValidatedLogitsProcessor"]
    engine = AsyncEngine(engine_config(model_path, **kwargs))
    server, thread, url = serve_in_thread(build_app(engine, "tiny"))
    try:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        status, answer = post(url + "/v1/completions", {**body, "vllm_xargs": {"target_token": 67}})
        assert status == 200
        assert answer["choices"][0]["text"] == engine.engine.tokenizer.decode([67] * 4)
        status, answer = post(url + "/v1/completions", {**body, "vllm_xargs": {"target_token": "x"}})
        assert status == 400 and "target_token must be a token id" in answer["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(10)
