"""ServerConfig: everything the HTTP layer needs besides the engine's own EngineConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from radixserve.request import CachePolicy


@dataclass(slots=True)
class ServerConfig:
    """HTTP server knobs. The engine is configured separately (EngineConfig).

    cache_ttl_scale multiplies Anthropic's cache_control TTLs ("5m" = 300 s, "1h" = 3600 s).
    It is a testing knob: 0.01 turns "5m" into 3 s so a test can watch a pin lapse.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # default: the engine's model id
    api_keys: list[str] = field(default_factory=list)  # empty (and no admin keys): no authentication
    namespace_from_api_key: bool = False  # each API key gets its own prefix-cache namespace (isolation)
    admin_keys: list[str] = field(default_factory=list)  # API keys that may also reset the cache
    metrics_keys: list[str] = field(default_factory=list)  # non-empty: /metrics needs one (or an admin key)
    default_cache_policy: str = "read_write"  # the most caching a request gets, unless its key says otherwise
    key_cache_policies: dict[str, str] = field(default_factory=dict)  # API key -> its cache policy ceiling
    min_cacheable_tokens: int = 1024  # cache_control breakpoints shorter than this are ignored
    max_request_bytes: int = 8 * 1024 * 1024  # larger bodies get 413
    body_read_timeout: float = 30.0  # seconds for a whole request body to arrive, else 408
    # On SIGTERM: stop accepting, let running requests finish for this long, then end the rest
    # (their streams get an error event) and exit.
    shutdown_timeout: float = 10.0
    cache_ttl_scale: float = 1.0
    named_cache_default_ttl: float = 3600.0  # seconds, when POST /v1/caches gives no ttl/expire_time
    cache_sweep_interval: float = 1.0  # how often expired named caches are unpinned (seconds)
    log_level: str = "info"
    request_log: str | None = None  # opt-in JSONL of request bodies for `radixserve advise`
    # Named caches and unexpired pins are saved here and re-created at start (off when None:
    # the file holds tenants' prompt text, so nothing is written unless asked for).
    state_dir: str | None = None
    max_named_caches: int = 1024  # live named caches one server keeps (bounds memory and the state file)
    cache_report: bool = False  # every response carries usage.cache_report (else: requests ask for it)
    shared_prefix_files: list[str] = field(default_factory=list)  # system prompts published at startup
    probe_rate_limit: float | None = None  # cache-reading requests per minute per key (None: no limit)
    probe_burst: int | None = None  # the most such requests at once (default: a minute's worth)
    shared_ttft_floor: float = 0.0  # seconds: requests reading a cache shared across keys answer no sooner
    # Where the engine steps: "on" in a process of its own (HTTP and the step loop then do not
    # share one interpreter lock), "off" on a thread of the server process. "auto" is on, CPU
    # included: measured faster there too (docs/benchmarks.md, engine-process-cpu). A server
    # given a built LLMEngine runs it in-thread.
    engine_process: Literal["auto", "on", "off"] = "auto"
    # CPU, engine process: how long (GOMP_SPINCOUNT, busy-wait iterations) an OpenMP thread of
    # the core spins for the next parallel op before it sleeps. 0 (default): it sleeps at once
    # (OMP_WAIT_POLICY=PASSIVE), the safe choice when the cores are shared: spinning threads
    # the OS deschedules stalled steps 2-10x on a loaded 2-core machine. On cores the server
    # has to itself, ~10000 keeps the threads awake between one forward's ops: a cached-prefix
    # TTFT 21% lower on an idle 2-core machine (docs/benchmarks.md, cpu-ttft-notes).
    engine_spin_count: int = 0

    @property
    def uses_engine_process(self) -> bool:
        """Whether an engine this server builds runs in its own process."""
        return self.engine_process != "off"

    def __post_init__(self) -> None:
        if self.min_cacheable_tokens < 0:
            raise ValueError(f"min_cacheable_tokens must be >= 0, got {self.min_cacheable_tokens}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        if not self.body_read_timeout > 0:
            raise ValueError(f"body_read_timeout must be > 0, got {self.body_read_timeout}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if self.max_named_caches < 0:
            raise ValueError(f"max_named_caches must be >= 0, got {self.max_named_caches}")
        if self.probe_rate_limit is not None and not self.probe_rate_limit > 0:
            raise ValueError(f"probe_rate_limit must be > 0 requests per minute, got {self.probe_rate_limit}")
        if self.probe_burst is not None and self.probe_burst < 1:
            raise ValueError(f"probe_burst must be >= 1, got {self.probe_burst}")
        if not self.shared_ttft_floor >= 0:
            raise ValueError(f"shared_ttft_floor must be >= 0 seconds, got {self.shared_ttft_floor}")
        if self.engine_spin_count < 0:
            raise ValueError(f"engine_spin_count must be >= 0, got {self.engine_spin_count}")
        if self.engine_process not in ("auto", "on", "off"):
            raise ValueError(f"engine_process must be auto, on or off, got {self.engine_process!r}")
        if self.cache_ttl_scale <= 0:
            raise ValueError(f"cache_ttl_scale must be > 0, got {self.cache_ttl_scale}")
        if any(not k for k in [*self.api_keys, *self.admin_keys, *self.metrics_keys]):
            raise ValueError("API keys must be non-empty strings")
        if self.namespace_from_api_key and not (self.api_keys or self.admin_keys):
            raise ValueError("per-key cache isolation (--namespace-from-api-key) needs API keys (--api-key)")
        policies = [p.value for p in CachePolicy]
        for policy in [self.default_cache_policy, *self.key_cache_policies.values()]:
            if policy not in policies:
                raise ValueError(f"a cache policy must be one of {policies}, got {policy!r}")
        unknown = set(self.key_cache_policies) - set(self.api_keys) - set(self.admin_keys)
        if unknown:
            raise ValueError(f"--key-cache-policy names {len(unknown)} key(s) that are not API keys")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)
