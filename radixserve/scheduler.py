"""The scheduler: which requests run this step, and how many tokens each.

Continuous batching: running requests keep their place (decodes take one token, unfinished
prefills take a chunk of the token budget), then waiting requests are admitted while the
budget, the sequence limit and the block pool allow. When blocks run out the cache evicts
first; only then is the most recently admitted running request preempted (its blocks freed,
its tokens recomputed later - cheaply, since its computed blocks stay in the prefix cache).
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from radixserve.cache.manager import KVCacheManager
from radixserve.config import SchedulerConfig
from radixserve.errors import PromptTooLongError
from radixserve.model.cascade import CASCADE_MIN_BLOCKS
from radixserve.request import Request, RequestStatus
from radixserve.step import StepInput


def check_fits(num_prompt: int, max_tokens: int, max_model_len: int | None, block_size: int, num_blocks: int) -> None:
    """The engine's admission check: raise PromptTooLongError unless a request of `num_prompt`
    prompt tokens generating up to `max_tokens` fits the context (None: unlimited) and the pool.
    The advisor's replay calls it too, so both reject exactly the same requests."""
    if max_model_len is not None and num_prompt >= max_model_len:
        raise PromptTooLongError(f"the prompt has {num_prompt} tokens but the model's context length is {max_model_len}")
    if max_model_len is not None and num_prompt + max_tokens > max_model_len:
        raise PromptTooLongError(
            f"this model's maximum context length is {max_model_len} tokens, but {num_prompt} prompt "
            f"tokens + {max_tokens} max_tokens = {num_prompt + max_tokens}; lower max_tokens or shorten the prompt"
        )
    needed = -(-(num_prompt + max_tokens) // block_size)
    if needed > num_blocks:
        raise PromptTooLongError(
            f"the request needs {needed} KV blocks but the pool has only {num_blocks}; "
            "give the engine more KV cache memory"
        )


def shares_a_block_past(tokens: list[int], other: list[int], num_tokens: int, block_size: int, limit: int) -> bool:
    """Whether the whole blocks `tokens` and `other` share (at most `limit` tokens) reach past
    their first `num_tokens`: they agree up to the end of the block after that."""
    end = (num_tokens // block_size + 1) * block_size
    if end > limit:
        return False
    # The last block first: requests that part before `end` mostly differ there (a sibling's own
    # question, another prefix), and 16 tokens reject them without copying thousands.
    last = end - block_size
    return tokens[last:end] == other[last:end] and tokens[:last] == other[:last]


def is_prefilling(num_computed_tokens: int, num_tokens: int) -> bool:
    """More than the last token is left to compute: a prefill (or a chunk of one), not a decode.
    (A decode computes exactly the last token, the one sampled at the previous step.)"""
    return num_computed_tokens < num_tokens - 1


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    num_computed_tokens: int  # before this step
    samples: bool  # this step computes its last token: a new token is sampled from its logits

    @property
    def prefilling(self) -> bool:
        return is_prefilling(self.num_computed_tokens, self.request.num_tokens)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    step: StepInput | None = None  # the runner's input, built once the batch is final


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCacheManager) -> None:
        if config.policy not in ("fcfs", "lpm", "group"):
            raise ValueError(f"unknown scheduling policy {config.policy!r} (use 'fcfs', 'lpm' or 'group')")
        self.config = config
        self.cache = cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._num_added = 0  # arrival order (policy group): arrival times may tie

    # ---- queue management -------------------------------------------------------------
    def add(self, request: Request) -> None:
        if self.config.policy == "group":
            request.arrival_seq = self._num_added
            request.prefix_group = self._prefix_group(request)
        self._num_added += 1
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Drop a request (finished or aborted) and return its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.cache.free(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fork(self, parent: Request, child: Request) -> None:
        """Start `child`, another choice of `parent`'s prompt (n > 1), as a running request on
        the parent's KV: the parent's prefill just completed, so the child goes straight to
        decoding. It is the newest running request (the first to be preempted)."""
        self.cache.fork(parent, child)
        child.num_cached_tokens = parent.num_cached_tokens
        child.cache_report = parent.cache_report  # one prompt, one lookup: the same report
        child.first_scheduled_time = parent.first_scheduled_time
        child.status = RequestStatus.RUNNING
        self.running.append(child)

    # ---- one step ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:  # memory is tight: let the survivors make progress first
            self._admit_waiting(out, budget)
        out.step = self._step_input(out.scheduled)
        return out

    @staticmethod
    def _scheduled(request: Request, num_new: int, computed: int) -> ScheduledRequest:
        # 0 ..... computed (K/V in its blocks) ..... computed + num_new (this step) ..... num_tokens
        # A step that reaches num_tokens yields its last token's logits: a new token is sampled.
        return ScheduledRequest(request, num_new, computed, samples=computed + num_new == request.num_tokens)

    def _step_input(self, scheduled: list[ScheduledRequest]) -> StepInput:
        requests = [s.request for s in scheduled]
        tables = self.cache.block_tables(requests)
        if all(s.num_new_tokens == 1 and s.samples for s in scheduled):  # decode-only: most steps
            return StepInput.decodes(self.cache.block_size, [r.last_token_id for r in requests],
                                     [s.num_computed_tokens for s in scheduled], tables, self.cache.take_block_copies())
        return StepInput.build(self.cache.block_size, [
            (s.request.token_slice(s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens),
             s.num_computed_tokens, blocks, s.samples)
            for s, blocks in zip(scheduled, tables)
        ], self.cache.take_block_copies())  # fmt: skip

    def _prefilling(self, request: Request) -> bool:
        return is_prefilling(self.cache.num_computed_tokens(request), request.num_tokens)

    def _room_for_new(self) -> int:
        """Tokens a prefill chunk leaves for a new prompt: none unless someone waits and could run."""
        if not self.waiting or len(self.running) >= self.config.max_num_seqs:
            return 0
        return int(self.config.max_num_batched_tokens * self.config.new_prompt_budget_fraction)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Running requests, oldest first, each its next tokens; preempt the newest when blocks
        run out. A prefill chunk leaves room in the step for the decodes behind it and, when
        requests wait, for a new prompt, so a long prompt cannot hold everyone else back for its
        whole prefill. Returns the budget left.

        Runs for every running request on every step, between two GPU steps: each request's
        counts are read once, up front (a preemption drops requests from the end only, so the
        lists stay aligned with `running` up to the request at hand)."""
        running = self.running
        computed = self.cache.computed_tokens(running)
        totals = [r.num_tokens for r in running]
        decodes_left = len(running) - sum(map(is_prefilling, computed, totals))
        room_for_new = self._room_for_new()
        allocate_slots, scheduled = self.cache.allocate_slots, out.scheduled
        i = 0
        while i < len(running) and budget > 0:
            request, done, total = running[i], computed[i], totals[i]
            num_new = min(total - done, budget)
            if is_prefilling(done, total):
                num_new = max(1, min(num_new, budget - decodes_left - room_for_new))
            else:
                decodes_left -= 1
            while not allocate_slots(request, num_new):
                victim = running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    return budget  # nothing after it can run either
            # (what _scheduled builds, without the call)
            scheduled.append(ScheduledRequest(request, num_new, done, samples=done + num_new == total))
            budget -= num_new
            i += 1
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Admit waiting requests while budget, sequence slots and blocks allow."""
        if not self.waiting or budget <= 0 or len(self.running) >= self.config.max_num_seqs:
            return
        self._order_waiting()
        num_running = len(self.running)
        # requests computing more than their last token this step (their blocks may be shared)
        in_flight = [s.request for s in out.scheduled if s.prefilling]
        deferred: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.forks and self.running and len(self.running) + 1 + len(request.forks) > self.config.max_num_seqs:
                break  # its choices fork off it after the prefill: they need their seats too
            if self._should_wait_for_shared_prefix(request, in_flight):
                request.times_deferred += 1
                deferred.append(self.waiting.popleft())
                continue
            if self.cache.loading(request):  # its storage blocks are read in the background
                deferred.append(self.waiting.popleft())
                continue
            cached = self.cache.admit(request)
            num_new = min(request.num_tokens - cached, budget)
            if not self.cache.allocate_slots(request, num_new):
                self.cache.free(request)
                if not self.running and self.cache.release_pin():
                    continue  # nothing running will free memory: pins yield, the first to lapse first
                break
            self.waiting.popleft()
            self._start(request, cached)
            out.scheduled.append(self._scheduled(request, num_new, cached))
            budget -= num_new
            if is_prefilling(cached, request.num_tokens) or cached + num_new < request.num_tokens:
                in_flight.append(request)
        self.waiting.extendleft(reversed(deferred))
        if self.config.policy == "group" and len(self.running) > num_running:
            self._count_overtakes(self.running[num_running:])

    def _start(self, request: Request, cached: int) -> None:
        if request.num_cached_tokens is None:
            request.num_cached_tokens = cached
            if self.cache.tiered:
                kv = self.cache.kv(request)
                host, storage = kv.num_host_hit_tokens, kv.num_storage_hit_tokens
                request.cached_tokens_by_tier = {"device": cached - host - storage, "host": host, "storage": storage}
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.cache.free(request)  # computed full blocks stay cached: the recompute mostly hits
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _order_waiting(self) -> None:
        if len(self.waiting) < 2:
            return
        if self.config.policy == "lpm":
            self._order_by_cached_prefix()
        elif self.config.policy == "group":
            self._order_by_prefix_group()

    def _order_by_cached_prefix(self) -> None:
        """LPM: admit the longest cached prefix first, but never pass anyone over too often."""
        window = [self.waiting.popleft() for _ in range(min(len(self.waiting), 128))]
        starving = [r for r in window if r.times_deferred >= self.config.lpm_max_skips]
        others = [r for r in window if r.times_deferred < self.config.lpm_max_skips]
        scores = {id(r): self.cache.peek_cached_tokens(r) for r in others}
        others.sort(key=lambda r: -scores[id(r)])  # stable: FCFS among equals
        ordered = starving + others
        latest_ahead = float("-inf")
        for request in ordered:  # passed over: someone who arrived later is ahead of it
            if latest_ahead > request.arrival_time:
                request.times_deferred += 1
            latest_ahead = max(latest_ahead, request.arrival_time)
        self.waiting.extendleft(reversed(ordered))

    def _should_wait_for_shared_prefix(self, request: Request, in_flight: list[Request]) -> bool:
        """Hold a request back for a step when another request now prefilling is about to
        compute a longer shared prefix than the cache holds: it then reads those blocks
        instead of computing them a second time. Bounded, so nobody waits forever."""
        if not self.cache.enable_prefix_caching or not in_flight or not request.cache_policy.reads \
                or request.times_deferred >= self.config.lpm_max_skips * 4:
            return False
        block_size = self.cache.block_size
        tokens = request.all_token_ids
        limit = self.cache.max_cacheable(len(tokens))
        cached = None  # what it could read now: a tree lookup, done only when it matters
        for other in in_flight:
            if not other.cache_policy.writes or other.namespace != request.namespace:
                continue
            # It waits when the whole blocks it shares with `other` reach past both what the tree
            # holds of `other` and what it could read now. One slice compare of the blocks up to
            # there, not the whole common prefix (siblings share thousands of tokens).
            in_tree = self.cache.kv(other).num_tree_tokens
            if not shares_a_block_past(tokens, other.prompt_token_ids, in_tree, block_size, limit):
                continue
            if cached is None:
                cached = self.cache.peek_cached_tokens(request)
            if cached <= in_tree or shares_a_block_past(tokens, other.prompt_token_ids, cached, block_size, limit):
                return True
        return False

    # ---- policy "group": requests sharing a prompt prefix run together ----------------
    def _prefix_group(self, request: Request) -> int | None:
        """The group of a request: its namespace and first CASCADE_MIN_BLOCKS blocks of prompt
        (what cascade attention groups decode rows by: the same block at that column). None
        (a group of its own) when it shares nothing that way: a shorter prompt, a request that
        reads no cache, or caching off. Computed once, when it arrives."""
        key_tokens = CASCADE_MIN_BLOCKS * self.cache.block_size
        tokens = request.prompt_token_ids
        if len(tokens) <= key_tokens or not self.cache.enable_prefix_caching or not request.cache_policy.reads:
            return None
        return hash((request.namespace, tuple(tokens[:key_tokens])))

    def _order_by_prefix_group(self) -> None:
        """Admit requests group by group, so the running rows form few large groups sharing a
        prefix (the grouped arrival of a shuffled queue): first anyone overtaken
        `group_max_overtakes` times (oldest first), then the waiting requests of groups already
        running, then the other groups, each group in the order of its oldest waiting request;
        first come first served within a group. O(n log n) over the queue with keys computed on
        arrival, run only on steps that can admit."""
        oldest: dict[int | None, int] = {}
        for request in self.waiting:
            group, seq = request.prefix_group, request.arrival_seq
            if oldest.get(group, seq) >= seq:
                oldest[group] = seq
        running = {r.prefix_group for r in self.running}
        running.discard(None)
        bound = self.config.group_max_overtakes

        def rank(request: Request) -> tuple[int, int, int]:
            seq = request.arrival_seq
            if request.times_overtaken >= bound:
                return (0, seq, seq)
            group = request.prefix_group
            if group is None:
                return (2, seq, seq)
            return (1 if group in running else 2, oldest[group], seq)

        ordered = sorted(self.waiting, key=rank)
        self.waiting.clear()
        self.waiting.extend(ordered)

    def _count_overtakes(self, admitted: list[Request]) -> None:
        """Each waiting request was overtaken by the requests admitted this step that arrived
        after it: the starvation bound of `_order_by_prefix_group`."""
        seqs = sorted(r.arrival_seq for r in admitted)
        for request in self.waiting:
            request.times_overtaken += len(seqs) - bisect.bisect_right(seqs, request.arrival_seq)
