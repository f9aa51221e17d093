"""The engine for many clients: one background thread owns the LLMEngine and runs its step loop; asyncio callers
hand it work through a queue and get each request's outputs through their own asyncio queue.

Only the loop thread touches the engine (scheduler, blocks, the tokenizer used for detokenizing); callers
tokenize with their own copy of the tokenizer. New requests join the running batch at the next step."""

import asyncio
import copy
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from nanovllm.config import EngineConfig
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.request import Request, tokenize
from nanovllm.inputs import PromptType
from nanovllm.outputs import DeltaTracker, RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop has stopped: no request can be served any more."""


class EngineBusyError(RuntimeError):
    """The waiting queue is full (max_waiting): try again later; nothing was queued."""


class RequestTimeoutError(RuntimeError):
    """The request ran past its deadline and was aborted (its blocks are free)."""


@dataclass
class Stream:
    """One request's way back to its caller, and the times its metrics need."""

    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float
    last_token: float | None = None
    num_tokens: int = 0
    num_prompt_tokens: int = 0
    reasons: list[str] = field(default_factory=list)
    added: bool = False  # the engine took the request (its id was free)
    deadline: float | None = None  # perf_counter time after which the loop aborts the request

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            pass


class AsyncEngine:
    """Give it an EngineConfig and the engine is built on the loop thread itself. That is the fast way on CPU:
    OpenMP keeps one worker pool per thread that has run parallel work, and with two pools on few cores the
    workers sleep between ops (measured: decode steps 25% slower when the model was loaded on another thread).
    An LLMEngine already built elsewhere works too."""

    def __init__(
        self,
        engine: LLMEngine | EngineConfig,
        request_timeout: float | None = None,
        on_death: Callable[[BaseException], None] | None = None,
    ):
        """request_timeout: seconds a request may take, from arrival to its last token, before the loop aborts it;
        on_death(error): called on the loop thread once the loop has died and failed every request."""
        self.metrics = None  # the server's: on_request(stream), on_token(stream, n, gap, first), on_finish(stream)
        self.request_timeout, self.on_death = request_timeout, on_death
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # (fn, fail): fail(error) if the loop dies first
        self.streams: dict[str, Stream] = {}  # loop thread only
        self.error: BaseException | None = None
        # sequences handed to the loop and not yet in its scheduler: each counter has one writer thread
        self.num_submitted, self.num_taken = 0, 0
        self._ids = itertools.count()
        built = threading.Event()
        self.thread = threading.Thread(target=self._loop, args=(engine, built), name="nanovllm-engine", daemon=True)
        self.thread.start()
        built.wait()
        if self.error is not None:
            raise self.error
        self.tokenizer = copy.deepcopy(self.engine.tokenizer)  # the callers' own: not shared across threads

    # ---- the caller's side (asyncio) ------------------------------------------------------------------
    @property
    def dead(self) -> bool:
        return self.error is not None

    def check_alive(self) -> None:
        if self.error is not None:
            raise self._dead_error()

    def _dead_error(self) -> EngineDeadError:
        return EngineDeadError(f"the engine loop has stopped: {type(self.error).__name__}: {self.error}")

    def make_request(
        self, prompt: PromptType, params: SamplingParams | None = None, request_id: str | None = None
    ) -> Request:
        """Validate and tokenize (with the callers' tokenizer) without queueing: raises ValueError on bad input."""
        self.check_alive()
        text, ids = tokenize(self.tokenizer, prompt)
        prompt = {"prompt": text, "prompt_token_ids": ids}
        return self.engine.make_request(
            request_id or f"req-{next(self._ids)}", prompt, params or SamplingParams(), self.tokenizer
        )

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for a place in the batch: queued for the loop, or in the scheduler's waiting queue
        (as of the last step; what the metric nanovllm:num_requests_waiting shows)."""
        return self.num_submitted - self.num_taken + self.stats["waiting"]

    def submit(self, requests: list[Request], max_waiting: int | None = None) -> list[AsyncIterator[RequestOutput]]:
        """Queue requests (from make_request) now, all or none, and return a reader of each one's outputs (see
        generate). EngineBusyError, with nothing queued, if their sequences would make more than max_waiting
        waiting. Queueing here rather than in the readers makes the check exact under a burst of callers."""
        self.check_alive()
        new = sum(len(r.seqs) for r in requests)
        if max_waiting is not None and self.num_waiting + new > max_waiting:
            raise EngineBusyError(
                f"the server is at its limit of {max_waiting} waiting requests (--max-waiting-requests): retry later"
            )
        loop, now = asyncio.get_running_loop(), time.perf_counter()
        readers = []
        for request in requests:
            stream = Stream(
                asyncio.Queue(),
                loop,
                now,
                num_prompt_tokens=len(request.prompt_token_ids),
                deadline=now + self.request_timeout if self.request_timeout else None,
            )
            self.num_submitted += len(request.seqs)
            self._submit(lambda r=request, s=stream: self._add(r, s), stream.put)
            readers.append(self._read(request, stream))
        return readers

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Queue a request (from make_request) and yield its outputs as they change, the last one finished: as
        its SamplingParams.output_kind says, cumulative (the default), deltas, or the final one only. Leaving the
        iteration early (or being cancelled) aborts the request and frees its blocks."""
        async with aclosing(self.submit([request])[0]) as outputs:
            async for out in outputs:
                yield out

    async def _read(self, request: Request, stream: Stream) -> AsyncIterator[RequestOutput]:
        kind = request.seqs[0].params.output_kind
        delta = DeltaTracker() if kind == RequestOutputKind.DELTA else None
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                while not stream.queue.empty() and isinstance(item, RequestOutput) and not item.finished:
                    item = stream.queue.get_nowait()  # a slow reader skips to the newest (outputs are cumulative)
                if isinstance(item, BaseException):
                    finished = not stream.added  # refused: there is nothing of ours to abort (its id may be another's)
                    raise item
                finished = item.finished
                if finished or kind != RequestOutputKind.FINAL_ONLY:
                    yield delta(item) if delta else item
        finally:
            if not finished and self.error is None:
                self._submit(lambda: self._abort(request.request_id, stream))

    def abort(self, request_id: str) -> None:
        if self.error is None:
            self._submit(lambda: self._abort(request_id))

    def _submit(self, fn: Callable[[], None], fail: Callable[[BaseException], None] | None = None) -> None:
        """Queue fn for the loop thread; if the loop has died (or dies before running it), fail(error) instead."""
        self.check_alive()
        self.inbox.put((fn, fail))
        if self.error is not None:  # died between the check and the put: nobody else will drain it
            self._fail_pending()

    def _fail_pending(self) -> None:
        dead = self._dead_error()
        while True:  # both threads may drain at once
            try:
                _, fail = self.inbox.get_nowait()
            except queue.Empty:
                return
            if fail:
                fail(dead)

    # ---- the loop thread ------------------------------------------------------------------------------
    def _add(self, request: Request, stream: Stream) -> None:
        self.num_taken += len(request.seqs)
        try:
            self.engine.add(request)  # a ValueError if the id is in use: for this caller alone
        except Exception as e:
            return stream.put(e)
        stream.added = True
        self.streams[request.request_id] = stream
        if self.metrics:
            self.metrics.on_request(stream)

    def _abort(self, request_id: str, stream: Stream | None = None) -> None:
        """Abort the request of that id; given its stream, only if the request is still that stream's."""
        if stream is not None and self.streams.get(request_id) is not stream:
            return
        self.engine.abort(request_id)
        stream = self.streams.pop(request_id, None)
        if stream and self.metrics:
            stream.reasons = ["abort"]
            self.metrics.on_finish(stream)

    def _loop(self, engine: LLMEngine | EngineConfig, built: threading.Event) -> None:
        try:
            self.engine = engine if isinstance(engine, LLMEngine) else LLMEngine(engine)
            self.stats = self._snapshot()  # refreshed after every step
        except BaseException as e:
            self.error = e
            return
        finally:
            built.set()
        try:
            while True:
                if not self.engine.has_unfinished():
                    self._idle()
                while not self.inbox.empty():
                    self.inbox.get_nowait()[0]()
                self._expire()
                self.stats = self._snapshot()  # the requests just taken count as waiting now, not after the step
                if self.engine.has_unfinished():
                    self._dispatch(self.engine.step())
                self.stats = self._snapshot()
        except BaseException as e:  # the engine's state is unknown now: fail everything, refuse what comes
            self.error = e
            dead = self._dead_error()
            for stream in self.streams.values():
                stream.put(dead)
            self.streams.clear()
            self._fail_pending()
            if self.on_death:
                self.on_death(e)
            if not isinstance(e, Exception):
                raise

    def _snapshot(self) -> dict:
        """The engine's stats, and the requests it or this loop holds any state for (0 when idle: none leaked)."""
        return {**self.engine.stats(), "requests": len(self.engine.requests.keys() | self.streams.keys())}

    def _idle(self) -> None:
        """Sleep until there is work; meanwhile notice a tensor-parallel worker that died (its engine is broken
        even though no step has failed yet), so /health says so before a request finds out."""
        while True:
            try:
                return self.inbox.get(timeout=1.0)[0]()
            except queue.Empty:
                workers = self.engine.runner.workers
                dead = [p for p in workers.procs if p.exitcode is not None] if workers else []
                if dead:
                    raise workers.failure(RuntimeError(f"{dead[0].name} exited (exit code {dead[0].exitcode})"))

    def _expire(self) -> None:
        now = time.perf_counter()
        for request_id, stream in list(self.streams.items()):
            if stream.deadline is not None and now > stream.deadline:
                self._abort(request_id, stream)
                stream.put(
                    RequestTimeoutError(
                        f"the request took longer than this server's request timeout of "
                        f"{self.request_timeout:g} s (--request-timeout) and was aborted"
                    )
                )

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        for out in outputs:
            stream = self.streams.get(out.request_id)
            if stream is None:
                continue
            if self.metrics:
                new = sum(len(c.token_ids) for c in out.outputs) - stream.num_tokens
                if new > 0:
                    self.metrics.on_token(
                        stream, new, now - (stream.last_token or stream.arrival), first=stream.last_token is None
                    )
                    stream.num_tokens, stream.last_token = stream.num_tokens + new, now
            stream.put(RuntimeError(f"request {out.request_id} failed: {out.error}") if out.error else out)
            if out.finished:
                del self.streams[out.request_id]
                if self.metrics:
                    stream.reasons = ["error"] if out.error else [c.finish_reason for c in out.outputs]
                    self.metrics.on_finish(stream)


async def merged(
    engine: AsyncEngine, requests: list[Request], readers: list[AsyncIterator[RequestOutput]]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of queued requests (engine.submit's readers) as they come, tagged with the request's position;
    only the newest of each is kept for a slow reader (they are cumulative). Closing this (a client that went
    away) cancels the readers and aborts the unfinished requests (also those whose reader never ran)."""
    newest: dict[int, RequestOutput | Exception] = {}
    ready = asyncio.Event()
    finished: set[int] = set()

    async def read(i: int, outputs: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in outputs:
                newest[i] = out
                ready.set()
        except Exception as e:
            newest[i] = e
            ready.set()

    tasks = [asyncio.create_task(read(i, r)) for i, r in enumerate(readers)]
    try:
        while len(finished) < len(tasks):
            await ready.wait()
            ready.clear()
            items = list(newest.items())
            newest.clear()
            for i, item in items:
                if isinstance(item, Exception):
                    raise item
                if item.finished:
                    finished.add(i)
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for i, request in enumerate(requests):
            if i not in finished:
                engine.abort(request.request_id)
