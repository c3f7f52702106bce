"""The sim engine's Prometheus metrics, under vLLM's names (so vLLM dashboards work)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .engine import EngineObserver, Sequence

TTFT_BUCKETS = (
    0.001,
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
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
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
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class EngineMetrics(EngineObserver):
    """vllm:* metrics for one engine, in its own registry."""

    def __init__(self, model_name: str, engine: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name", "engine"]
        self.labels = {"model_name": model_name, "engine": engine}
        self.running = Gauge(
            "vllm:num_requests_running", "Requests in model execution batches.", labels, registry=r
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting to be processed.", labels, registry=r
        )
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", labels, registry=r
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefill tokens processed.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens processed.", labels, registry=r
        )
        self.preemptions = Counter(
            "vllm:num_preemptions", "Cumulative preemptions.", labels, registry=r
        )
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prefix-cache queries, in queried tokens.", labels,
            registry=r,
        )  # fmt: skip
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prefix-cache hits, in cached tokens.", labels, registry=r
        )
        self.success = Counter(
            "vllm:request_success",
            "Successfully finished requests.",
            [*labels, "finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Inter-token latency.",
            labels,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.request_prompt = Histogram(
            "vllm:request_prompt_tokens",
            "Prompt tokens per request.",
            labels,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.request_generation = Histogram(
            "vllm:request_generation_tokens",
            "Generated tokens per request.",
            labels,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )

        for metric in (
            self.running,
            self.waiting,
            self.kv_usage,
            self.prompt_tokens,
            self.generation_tokens,
            self.preemptions,
            self.prefix_queries,
            self.prefix_hits,
            self.ttft,
            self.itl,
            self.e2e,
            self.request_prompt,
            self.request_generation,
        ):
            metric.labels(**self.labels)  # export every series from the start, at zero

    def describe_cache(self, block_size: int, num_blocks: int, prefix_caching: bool) -> None:
        """vllm:cache_config_info: vLLM's cache settings as labels of a gauge set to 1 (a
        router reads num_gpu_blocks to turn KV usage into blocks)."""
        info = {"engine": self.labels["engine"], "block_size": str(block_size),
                "num_gpu_blocks": str(num_blocks),
                "enable_prefix_caching": str(prefix_caching)}  # fmt: skip
        gauge = Gauge(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", list(info),
            registry=self.registry,
        )  # fmt: skip
        gauge.labels(**info).set(1)

    def refresh(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.labels(**self.labels).set(running)
        self.waiting.labels(**self.labels).set(waiting)
        self.kv_usage.labels(**self.labels).set(kv_usage)

    def on_first_token(self, seq: Sequence, ttft: float) -> None:
        self.ttft.labels(**self.labels).observe(ttft)

    def on_token(self, seq: Sequence, itl: float | None) -> None:
        self.generation_tokens.labels(**self.labels).inc()
        if itl is not None:
            self.itl.labels(**self.labels).observe(itl)

    def on_finish(self, seq: Sequence) -> None:
        import time

        self.success.labels(**self.labels, finished_reason=seq.finish_reason or "stop").inc()
        self.e2e.labels(**self.labels).observe(time.monotonic() - seq.arrival)
        self.request_prompt.labels(**self.labels).observe(len(seq.prompt))
        self.request_generation.labels(**self.labels).observe(len(seq.output))

    def on_preempt(self, seq: Sequence) -> None:
        self.preemptions.labels(**self.labels).inc()

    def on_step(self, prefill_tokens: int, decode_tokens: int) -> None:
        if prefill_tokens:
            self.prompt_tokens.labels(**self.labels).inc(prefill_tokens)

    def on_prefix_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries.labels(**self.labels).inc(queried_tokens)
        self.prefix_hits.labels(**self.labels).inc(hit_tokens)
