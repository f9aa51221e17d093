"""Async scheduling (vLLM's async_scheduling=True): the engine's step with one launched step kept in flight, so
that the host schedules and prepares step N+1 while the device computes step N."""

from nanovllm.outputs import RequestOutput


class OverlappedSteps:
    """What `LLMEngine.step` is with async scheduling. Each call launches a step and returns the outputs of the
    previous one: its sampled tokens were on their way while this step was scheduled and prepared (its sequences'
    inputs read them on the device), and a sequence that stopped there has one token computed here in vain,
    dropped when this step is postprocessed. A step whose tokens the next draw needs on the host (penalties, a
    grammar, logprobs: `SamplerOutput.needs_tokens`) is postprocessed before the next is scheduled."""

    def __init__(self, engine) -> None:
        self.engine = engine  # its in_flight holds the step launched last, not yet postprocessed

    def __call__(self) -> list[RequestOutput]:
        engine = self.engine
        outputs, previous = [], engine.in_flight
        if previous is not None and previous.output.needs_tokens:
            engine.in_flight = None
            outputs, previous = engine.postprocess(previous), None
        launched = engine.launch()
        if launched is None and previous is None:
            engine.scheduler.wait_until_ready()
        engine.in_flight = launched
        return outputs + (engine.postprocess(previous) if previous else [])
