"""A request's state as it moves through the engine, and the outputs handed back."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from radixserve.sampling import SamplingParams

if TYPE_CHECKING:
    from radixserve.cache.cache_report import CacheReport


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class CachePolicy(str, enum.Enum):
    """What a request may do with the prefix cache (an opt-out for sensitive prompts).

    READ_WRITE reads cached prefixes and leaves its computed blocks in the cache (the default);
    READ_ONLY reads but stores nothing; NONE neither reads nor stores: its blocks go back to the
    free list when it finishes, indexed by nothing, and it pins nothing.
    """

    READ_WRITE = "read_write"
    READ_ONLY = "read_only"
    NONE = "none"

    @property
    def reads(self) -> bool:
        return self is not CachePolicy.NONE

    @property
    def writes(self) -> bool:
        return self is CachePolicy.READ_WRITE


@dataclass(slots=True)
class CachePin:
    """Explicit cache control: keep the first `num_tokens` of the prompt cached for `ttl` seconds.

    `alive`, if given, is asked on the engine thread right before the pin is applied: a pin whose
    owner went away meanwhile (a named cache deleted or expired while this request prefilled)
    is not applied, so deleted means unpinned whatever is in flight."""

    num_tokens: int
    ttl: float
    alive: Callable[[], bool] | None = None
    # Seconds each later read of the whole prefix extends the pin by (None: `ttl`). A pin
    # re-created after a restart keeps its original refresh while `ttl` is what was left of it.
    refresh: float | None = None
    # The named cache it serves (its id), for the engine process: `alive` cannot cross a process
    # boundary, so the core refuses the pin once the server said this owner is gone.
    owner: str | None = None


def choice_request_ids(request_id: str, n: int) -> list[str]:
    """The request ids of the n choices of request `request_id`: choice 0 is the request itself
    (it runs the prefill), choice i > 0 is `<request_id>/<i>`."""
    return [request_id] + [f"{request_id}/{i}" for i in range(1, n)]


@dataclass
class Request:
    """One generation request: its tokens, sampling and status. The engine owns it; the scheduler
    sets its status. Its KV state lives in the cache manager (KVCacheManager.kv)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling: SamplingParams
    namespace: str = ""
    arrival_time: float = field(default_factory=time.monotonic)
    cache_pins: list[CachePin] = field(default_factory=list)
    cache_policy: CachePolicy = CachePolicy.READ_WRITE
    index: int = 0  # which choice of its request this is (n > 1); 0 runs the prefill
    # the other choices (n > 1), waiting for this one's prefill: when it completes they fork off
    # its KV (KVCacheManager.fork) and sample their first tokens from the same logits
    forks: list[Request] = field(default_factory=list)
    want_cache_report: bool = False  # compute a CacheReport at its first admission
    # Other namespaces the caller may read itself (its unsalted one), which its report may name.
    cache_report_namespaces: tuple[str, ...] = ()
    publish_scope: str | None = None  # an operator request computing this shared scope's prefix

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_text: str = ""
    output_logprobs: list[Any] = field(default_factory=list)  # TokenLogprob per output token, when asked
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None  # why it failed (finish_reason "error")

    # Request facts the scheduler keeps (the KV state is the cache manager's: KVCacheManager.kv)
    num_cached_tokens: int | None = None  # prefix-cache hit at first admission (reported)
    cache_report: CacheReport | None = None  # why it hit or missed, when asked (first admission)
    num_pinned_tokens: int = 0  # the longest of its cache_pins the tree accepted (0: none or refused)
    cached_tokens_by_tier: dict[str, int] | None = None  # num_cached_tokens split device/host/storage (tiers on)
    num_preemptions: int = 0
    times_deferred: int = 0  # scheduler passes over it (lpm policy / in-batch dedup)
    # policy "group": its place in arrival order, its prompt's prefix group, and how many later
    # arrivals were admitted before it (Scheduler._order_by_prefix_group)
    arrival_seq: int = 0
    prefix_group: int | None = None
    times_overtaken: int = 0

    first_token_time: float | None = None
    first_scheduled_time: float | None = None
    finish_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def last_token_id(self) -> int:
        """all_token_ids[-1]: the token a decode step computes."""
        return (self.output_token_ids or self.prompt_token_ids)[-1]

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole prompt + output list (a decode
        step needs one token of a list thousands long)."""
        prompt = self.prompt_token_ids
        n = len(prompt)
        if end <= n:
            return prompt[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return prompt[start:] + self.output_token_ids[: end - n]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        if self.finish_time is None:
            return None
        return self.finish_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    """What a request produced since its previous output (streamed), and in all (finished).

    Every output carries the delta: `new_token_ids` and `new_text`; concatenated over a
    request's outputs they give the whole. Only the finished output (`finished` True) also
    carries the whole output in `token_ids` and `text`; streamed ones leave them empty, so
    streaming costs O(1) per token rather than a copy of everything so far.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" (this request failed; see `error`)
    stop_reason: str | int | None
    num_cached_tokens: int
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)  # the whole output: finished outputs only
    text: str = ""  # the whole output text: finished outputs only
    cache_write_tokens: int = 0  # prompt tokens newly pinned by explicit cache control (and accepted)
    error: str | None = None  # why it failed (finish_reason "error")
    num_pinned_tokens: int = 0  # prompt tokens its cache pins hold (a pin over the bounds is refused)
    logprobs: list[Any] | None = None  # sampling.TokenLogprob per output token (when asked)
    new_logprobs: list[Any] = field(default_factory=list)  # those of new_token_ids (streaming)
    index: int = 0  # the choice (n > 1): request_id is choice_request_ids(first id, n)[index]
    cached_tokens_by_tier: dict[str, int] | None = None  # num_cached_tokens by tier: device/host/storage (tiers on)
    cache_report: CacheReport | None = None  # why the prompt hit or missed (when asked)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
