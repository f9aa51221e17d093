"""Prometheus metrics for the server: counters and latency histograms fed by the engine loop, gauges read from
the engine's stats snapshot at scrape time. Names follow vLLM's with the `nanovllm:` prefix."""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # no *_created series: they only add noise to a scrape
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("nanovllm:prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("nanovllm:generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter(
            "nanovllm:request_success", "Finished sequences by finish reason", ["finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "nanovllm:time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "nanovllm:inter_token_latency_seconds",
            "Time between a request's tokens",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "nanovllm:e2e_request_latency_seconds", "Arrival to finish", buckets=LATENCY_BUCKETS, registry=r
        )
        r.register(_EngineStats(stats))

    # called from the engine loop thread (prometheus_client is thread-safe)
    def on_request(self, stream) -> None:
        self.prompt_tokens.inc(stream.num_prompt_tokens)

    def on_token(self, stream, new_tokens: int, gap: float, first: bool) -> None:
        self.generation_tokens.inc(new_tokens)
        (self.ttft if first else self.itl).observe(gap)

    def on_finish(self, stream) -> None:
        for reason in stream.reasons:
            self.finished.labels(reason or "abort").inc()
        if stream.last_token is not None:
            self.e2e.observe(stream.last_token - stream.arrival)


class _EngineStats:
    """Gauges and engine-side counters, read from the stats snapshot the loop thread keeps."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        for name, doc, value in [
            ("num_requests_running", "Sequences in the running batch", s["running"]),
            ("num_requests_waiting", "Sequences waiting to be admitted", s["waiting"]),
            ("num_requests_in_engine", "Requests the engine holds any state for (0 when idle)", s["requests"]),
            ("kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full)", 1 - s["free_blocks"] / s["num_blocks"]),
            ("num_free_blocks", "KV blocks in the free pool", s["free_blocks"]),
            (
                "prefix_cache_hit_rate",
                "Prompt tokens found in the prefix cache / prompt tokens looked up",
                s["prefix_cache_hits"] / max(s["prefix_cache_queries"], 1),
            ),
        ]:
            yield GaugeMetricFamily(f"nanovllm:{name}", doc, value=value)
        for name, doc, value in [
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", s["prefix_cache_queries"]),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache", s["prefix_cache_hits"]),
            ("num_preemptions", "Sequences preempted for lack of KV blocks", s["preemptions"]),
        ]:
            yield CounterMetricFamily(f"nanovllm:{name}", doc, value=value)
        if "spec_decode_num_drafts" in s:  # speculative decoding is on
            yield from _spec_decode_metrics(s)


def _spec_decode_metrics(s: dict):
    """vLLM's spec_decode counters, and the two figures read off them."""
    for name, doc in [
        ("num_drafts", "Verifications: steps of a sequence with proposals"),
        ("num_draft_tokens", "Proposed tokens checked by the target"),
        ("num_accepted_tokens", "Proposed tokens the target kept"),
    ]:
        yield CounterMetricFamily(f"nanovllm:spec_decode_{name}", doc, value=s[f"spec_decode_{name}"])
    per_pos = CounterMetricFamily(
        "nanovllm:spec_decode_num_accepted_tokens_per_pos",
        "Proposed tokens kept, by position in the proposal",
        labels=["position"],
    )
    for position, value in enumerate(s["spec_decode_num_accepted_tokens_per_pos"]):
        per_pos.add_metric([str(position)], value)
    yield per_pos
    yield GaugeMetricFamily(
        "nanovllm:spec_decode_acceptance_rate", "Proposed tokens kept / checked", value=s["spec_decode_acceptance_rate"]
    )
    yield GaugeMetricFamily(
        "nanovllm:spec_decode_mean_acceptance_length",
        "Tokens a verification yields (the target's own included)",
        value=s["spec_decode_mean_acceptance_length"],
    )
