"""Prefix-cache isolation audit: can one tenant tell that another sent a prompt?

The procedure of Gu et al., "Auditing Prompt Caching in Language Model APIs" (ICML 2025),
against any OpenAI-compatible server, with two API keys:

  1. for each trial, the victim (key A) sends a fresh random prompt P (it "plants" P);
  2. the attacker (key B) then sends two probes, in random order: a *hit probe*, P followed by a
     question, which would read A's cached prefix if the cache is shared; and a *miss probe*,
     an unrelated random prompt Q of the same length followed by the same question, which no
     one has sent before;
  3. each probe streams, and its time to first token (TTFT, until the first chunk with text or
     a finish reason) is measured client-side.

If B's cache is isolated from A's, both probes are cold prefills of equally long random text:
their TTFTs come from one distribution. If it is shared, hit probes skip most of the prefill
and are faster. A two-sample Kolmogorov-Smirnov test on the two TTFT samples decides: p below
alpha is a leak. Trials are sequential (no batching effects) and the probe order within a
trial is random, so drift in the server's load hits both samples alike; the false-positive
rate of the verdict is alpha.

It also checks the direct oracle: a server that reports cached prompt tokens
(usage.prompt_tokens_details.cached_tokens) on B's hit probes beyond what it reports on the
miss probes tells B outright that A's prefix was cached.
"""

from __future__ import annotations

import json
import random
import secrets
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx

from radixserve.benchmark.text import TextGenerator
from radixserve.security.ks import ks_2samp

QUESTION = "Summarize the text above in one word."


@dataclass(slots=True)
class AuditConfig:
    """What to audit and how hard.

    base_url: the server (with or without /v1). victim_key / attacker_key: the two tenants'
    API keys (None: send none, for a server without keys). trials: planted prefixes, i.e. hit
    probes (and as many miss probes). prompt_tokens: the random prompt's length, about (tokens
    of the embedded model's tokenizer): long enough that a cached prefix saves a clearly
    measurable prefill on the target. alpha: the KS test's significance level.
    """

    base_url: str
    victim_key: str | None = None
    attacker_key: str | None = None
    model: str | None = None  # default: the first model /v1/models lists
    api: str = "chat"  # or "completions"
    trials: int = 30
    prompt_tokens: int = 512
    warmup: int = 3
    alpha: float = 0.001
    seed: int | None = None  # default: fresh randomness, so no one can pre-plant the prompts
    timeout: float = 120.0
    extra_body: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.trials < 5:
            raise ValueError(f"trials must be >= 5 for the test to mean anything, got {self.trials}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {self.api!r}")
        if self.prompt_tokens < 16:
            raise ValueError(f"prompt_tokens must be >= 16, got {self.prompt_tokens}")

    @property
    def api_base(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"


@dataclass(slots=True)
class Probe:
    kind: str  # "hit" | "miss"
    ttft: float  # seconds
    cached_tokens: int | None  # usage.prompt_tokens_details.cached_tokens, if the server reports it
    prompt_tokens: int | None


@dataclass(slots=True)
class AuditResult:
    hit_ttfts: list[float]
    miss_ttfts: list[float]
    ks_statistic: float
    pvalue: float
    alpha: float
    timing_leak: bool
    cached_tokens_reported: bool
    cached_tokens_oracle: bool  # hit probes reported more cached tokens than their miss twins
    oracle_trials: int  # trials where the hit probe reported more cached tokens than the miss probe
    trials: int
    seconds: float
    probes: list[Probe]

    @property
    def leak(self) -> bool:
        return self.timing_leak or self.cached_tokens_oracle

    @property
    def verdict(self) -> str:
        if not self.leak:
            return "NO LEAK FOUND: the attacker's probes of planted prefixes are indistinguishable from misses"
        found = []
        if self.timing_leak:
            found.append(f"timing (hits {_ms(statistics.median(self.hit_ttfts))} vs misses "
                         f"{_ms(statistics.median(self.miss_ttfts))} median TTFT)")
        if self.cached_tokens_oracle:
            found.append(f"usage.cached_tokens ({self.oracle_trials}/{self.trials} hit probes reported "
                         "the victim's prefix as cached)")
        return "LEAK: another tenant's cached prefixes are detectable by " + " and ".join(found)

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(leak=self.leak, verdict=self.verdict)
        return data

    def report(self) -> str:
        lines = [
            f"isolation audit: {self.trials} planted prefixes, {self.trials} hit probes + {self.trials} miss probes "
            f"({self.seconds:.1f} s)",
            f"  TTFT hit probes   median {_ms(statistics.median(self.hit_ttfts))}  "
            f"p10 {_ms(_quantile(self.hit_ttfts, 0.1))}  p90 {_ms(_quantile(self.hit_ttfts, 0.9))}",
            f"  TTFT miss probes  median {_ms(statistics.median(self.miss_ttfts))}  "
            f"p10 {_ms(_quantile(self.miss_ttfts, 0.1))}  p90 {_ms(_quantile(self.miss_ttfts, 0.9))}",
            f"  two-sample KS: D = {self.ks_statistic:.3f}, p = {self.pvalue:.3g} (alpha {self.alpha:g}): "
            + ("different distributions" if self.timing_leak else "no difference detected"),
        ]
        if self.cached_tokens_reported:
            lines.append(f"  usage.cached_tokens: the hit probe reported more than its miss twin in "
                         f"{self.oracle_trials}/{self.trials} trials"
                         + (" (a direct oracle)" if self.cached_tokens_oracle else ""))
        else:
            lines.append("  usage.cached_tokens: not reported by the server")
        lines.append(self.verdict)
        return "\n".join(lines)


class _Tenant:
    """One API key's HTTP client: kept-alive connections, so TTFT excludes connection setup."""

    def __init__(self, config: AuditConfig, key: str | None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.config = config
        self.client = httpx.Client(base_url=config.api_base, headers=headers, timeout=config.timeout)

    def close(self) -> None:
        self.client.close()

    def model(self) -> str:
        response = self.client.get("/models")
        _check(response)
        return response.json()["data"][0]["id"]

    def send(self, model: str, text: str) -> Probe:
        """Stream one request of max_tokens 1; TTFT until the first text (or the finish)."""
        c = self.config
        body: dict = {"model": model, "max_tokens": 1, "temperature": 0, "stream": True,
                      "stream_options": {"include_usage": True}, **c.extra_body}
        path = "/chat/completions" if c.api == "chat" else "/completions"
        if c.api == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        ttft = None
        usage = None
        start = time.perf_counter()
        with self.client.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                response.read()
                _check(response)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"the server sent an error mid-stream: {chunk['error']}")
                if ttft is None and any(_has_output(choice) for choice in chunk.get("choices") or []):
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    usage = chunk["usage"]
        if ttft is None:
            ttft = time.perf_counter() - start
        details = (usage or {}).get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
        return Probe("", ttft, cached if isinstance(cached, int) else None, (usage or {}).get("prompt_tokens"))


def _has_output(choice: dict) -> bool:
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or choice.get("text") or choice.get("finish_reason"))


def _check(response: httpx.Response) -> None:
    if response.status_code >= 400:
        raise RuntimeError(f"{response.request.method} {response.request.url.path}: HTTP {response.status_code}: "
                           f"{response.text[:300]}")


def run_audit(config: AuditConfig, progress=None) -> AuditResult:
    """Run the audit against the live server; returns the measurements and the verdict."""
    rng = random.Random(config.seed if config.seed is not None else secrets.randbits(64))
    text = TextGenerator(rng)
    victim, attacker = _Tenant(config, config.victim_key), _Tenant(config, config.attacker_key)
    start = time.perf_counter()
    try:
        model = config.model or attacker.model()

        def fresh() -> str:
            # a random nonce first, so no prefix of it was ever cached by anyone
            return f"{text.hex_id(16)} {text.text(config.prompt_tokens)}"

        for _ in range(config.warmup):  # first requests pay one-off costs (allocations, JIT)
            attacker.send(model, fresh() + "\n\n" + QUESTION)
            victim.send(model, fresh())
        probes: list[Probe] = []
        oracle = 0
        for trial in range(config.trials):
            planted = fresh()
            victim.send(model, planted)
            order = ["hit", "miss"]
            rng.shuffle(order)
            pair = {}
            for kind in order:
                prompt = (planted if kind == "hit" else fresh()) + "\n\n" + QUESTION
                probe = attacker.send(model, prompt)
                probe.kind = kind
                pair[kind] = probe
                probes.append(probe)
            hit, miss = pair["hit"].cached_tokens, pair["miss"].cached_tokens
            if hit is not None and miss is not None and hit > miss:
                oracle += 1
            if progress is not None:
                progress(trial + 1, config.trials)
    finally:
        victim.close()
        attacker.close()
    hits = [p.ttft for p in probes if p.kind == "hit"]
    misses = [p.ttft for p in probes if p.kind == "miss"]
    ks = ks_2samp(hits, misses)
    reported = any(p.cached_tokens is not None for p in probes)
    return AuditResult(
        hit_ttfts=hits, miss_ttfts=misses, ks_statistic=ks.statistic, pvalue=ks.pvalue, alpha=config.alpha,
        timing_leak=ks.pvalue < config.alpha, cached_tokens_reported=reported,
        # under isolation both probes of a trial read the same (the attacker's own) cached
        # tokens, so a hit probe reporting more, in a majority of trials, is A's prefix showing
        cached_tokens_oracle=oracle > config.trials // 2, oracle_trials=oracle, trials=config.trials,
        seconds=time.perf_counter() - start, probes=probes,
    )


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"
