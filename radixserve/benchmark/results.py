"""From per-request measurements to the numbers a report quotes: latency percentiles,
throughput, prefix-cache hit rate, prefill tokens saved, and what the input would cost at a
provider that bills cached input tokens at a discount.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from radixserve.benchmark.loadgen import LoadRun, RequestResult


@dataclass(slots=True)
class Pricing:
    """Dollars per million tokens, billed the way the providers bill prompt caching: a cached
    input token costs (1 - cached_discount) x the input price (OpenAI, Anthropic and Gemini
    reads: 0.9 off on current models), an uncached one the full price."""

    input_per_mtok: float = 3.0
    output_per_mtok: float = 15.0
    cached_discount: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 <= self.cached_discount <= 1.0:
            raise ValueError(f"cached_discount must be within [0, 1], got {self.cached_discount}")
        if self.input_per_mtok < 0 or self.output_per_mtok < 0:
            raise ValueError("prices must be >= 0")

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        """Dollars for one or many requests' token counts."""
        if not 0 <= cached_tokens <= prompt_tokens:
            raise ValueError(f"cached tokens ({cached_tokens}) must be within [0, prompt tokens ({prompt_tokens})]")
        uncached = prompt_tokens - cached_tokens
        cached_price = self.input_per_mtok * (1.0 - self.cached_discount)
        return (uncached * self.input_per_mtok + cached_tokens * cached_price
                + completion_tokens * self.output_per_mtok) / 1e6


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between order statistics (numpy's default);
    None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(slots=True)
class RunSummary:
    """The headline numbers of one LoadRun (seconds, tokens, dollars)."""

    num_requests: int
    num_failed: int
    duration: float
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_p99: float | None
    tpot_p50: float | None
    e2e_p50: float | None
    e2e_p99: float | None
    request_throughput: float  # finished requests / s
    output_throughput: float  # output tokens / s
    prompt_tokens: int
    cached_tokens: int | None  # None: the server reports no cached-token count
    completion_tokens: int
    cost: float | None  # dollars for the whole run (None without token counts)

    @property
    def hit_rate(self) -> float | None:
        """Prompt tokens read from the prefix cache / prompt tokens."""
        if self.cached_tokens is None or not self.prompt_tokens:
            return None
        return self.cached_tokens / self.prompt_tokens

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens the server had to compute."""
        return self.prompt_tokens - (self.cached_tokens or 0)

    def cost_per_1k_requests(self) -> float | None:
        ok = self.num_requests - self.num_failed
        return None if self.cost is None or ok == 0 else self.cost * 1000 / ok


def summarize(run: LoadRun, pricing: Pricing | None = None) -> RunSummary:
    pricing = pricing or Pricing()
    ok = run.ok_results
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    e2es = [r.e2e for r in ok]
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    known = all(r.cached_tokens is not None for r in ok) and bool(ok)
    cached = sum(r.cached_tokens or 0 for r in ok) if known else None
    completion = sum(r.completion_tokens for r in ok)
    have_counts = bool(ok) and all(r.prompt_tokens is not None for r in ok)
    duration = run.duration if run.duration > 0 else float("nan")
    return RunSummary(
        num_requests=len(run.results),
        num_failed=len(run.results) - len(ok),
        duration=run.duration,
        ttft_p50=percentile(ttfts, 50),
        ttft_p90=percentile(ttfts, 90),
        ttft_p99=percentile(ttfts, 99),
        tpot_p50=percentile(tpots, 50),
        e2e_p50=percentile(e2es, 50),
        e2e_p99=percentile(e2es, 99),
        request_throughput=len(ok) / duration,
        output_throughput=completion / duration,
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
        cost=pricing.cost(prompt, cached or 0, completion) if have_counts else None,
    )


def hit_rate_over_time(results: Sequence[RequestResult]) -> tuple[list[float], list[float]]:
    """(finish times, cumulative hit rate so far) over the requests in finishing order."""
    done = sorted((r for r in results if r.ok and r.prompt_tokens and r.cached_tokens is not None),
                  key=lambda r: r.end)
    times, rates, prompt, cached = [], [], 0, 0
    for r in done:
        prompt += r.prompt_tokens or 0
        cached += r.cached_tokens or 0
        times.append(r.end)
        rates.append(cached / prompt)
    return times, rates


@dataclass(slots=True)
class WorkloadResult:
    """One workload of a suite: its description and a run per server (label -> run)."""

    name: str
    summary: str  # the workload's shape, one line
    shares_prefix: bool
    runs: dict[str, LoadRun] = field(default_factory=dict)
    kind: str = ""  # Workload.kind ("" in results saved before it existed: read shares_prefix)


@dataclass(slots=True)
class SuiteResult:
    """Everything a suite run measured, with what is needed to reproduce and report it."""

    label: str  # "cpu", "gpu", ...: names the report section and the PNG files
    command: str
    machine: str
    date: str
    model: str
    discipline: str
    seed: int
    token_scale: float
    server_args: list[str]
    load_before: tuple[float, float, float] | None  # os.getloadavg() at start and end: the noise
    load_after: tuple[float, float, float] | None
    pricing: Pricing
    workloads: list[WorkloadResult]
    duration: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> SuiteResult:
        data = json.loads(Path(path).read_text())
        workloads = []
        for w in data.pop("workloads"):
            runs = {}
            for label, r in w.pop("runs").items():
                r["results"] = [RequestResult(**x) for x in r["results"]]
                runs[label] = LoadRun(**r)
            workloads.append(WorkloadResult(runs=runs, **w))
        data["pricing"] = Pricing(**data["pricing"])
        for key in ("load_before", "load_after"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(workloads=workloads, **data)
