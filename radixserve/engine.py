"""LLMEngine: add_request / step / abort over the scheduler, the cache manager and the runner.

Single-threaded by design: the HTTP server drives it from its own loop thread.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from radixserve.cache.manager import KVCacheManager
from radixserve.cache.radix_tree import RadixTree
from radixserve.config import EngineConfig, default_dtype_for
from radixserve.detokenizer import IncrementalDetokenizer
from radixserve.errors import InvalidRequestError
from radixserve.model.loader import LoadedModel, load_model
from radixserve.request import CachePin, CachePolicy, Request, RequestMetrics, RequestOutput, RequestStatus
from radixserve.runner import ModelRunner, determine_num_blocks
from radixserve.sampling import Sampler, SamplingParams, compute_logprobs
from radixserve.scheduler import ScheduledRequest, Scheduler, check_fits
from radixserve.structured import Guide, GuideFactory


@dataclass(slots=True)
class EngineStats:
    """Monotonic counters (the cache keeps its own in KVCacheManager.stats)."""

    prompt_tokens: int = 0  # prompt tokens of admitted requests
    computed_prompt_tokens: int = 0  # prompt tokens actually run through the model
    generation_tokens: int = 0
    finished_requests: int = 0
    aborted_requests: int = 0
    preemptions: int = 0
    steps: int = 0


@dataclass(slots=True)
class EngineSnapshot:
    """The engine's counters and gauges at one instant (LLMEngine.snapshot; /metrics shows them)."""

    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found cached
    prefix_cache_hit_rate: float
    cached_blocks: int
    free_blocks: int
    total_blocks: int
    block_size: int
    evicted_blocks: int
    inserted_blocks: int
    kv_cache_usage: float
    running: int
    waiting: int
    prompt_tokens: int
    computed_prompt_tokens: int
    generation_tokens: int
    finished_requests: int
    aborted_requests: int
    preemptions: int
    # per tenant (cache/quotas.py): (prompt tokens looked up, tokens hit, blocks held, blocks evicted)
    tenant_cache: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


class LLMEngine:
    """Requests in, outputs out, one step at a time.

    Its public surface (what the server, the advisor and the offline API use): add_request,
    abort_request, step, has_unfinished_requests, unfinished_request_ids; tokenizer, model_id,
    config, max_model_len, block_size, prefix_caching, num_kv_blocks, max_total_tokens, pin_bounds,
    stats (EngineStats, read only), snapshot() and pinned_blocks(); pin_prefix, unpin_prefix,
    reset_prefix_cache.
    Everything else (cache, scheduler, runner, requests) is internal.
    """

    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None) -> None:
        self.config = config or EngineConfig()
        if loaded is None:
            self.config.model.dtype = self.config.model.resolved_dtype
            loaded = load_model(self.config.model)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        arch_len = loaded.arch.max_position_embeddings
        self.max_model_len = min(self.config.model.max_model_len or arch_len, arch_len)
        cache_cfg = self.config.cache
        param = next(loaded.model.parameters())
        num_blocks = determine_num_blocks(loaded, cache_cfg, param.dtype, param.device)
        self.runner = ModelRunner(
            loaded,
            cache_cfg,
            num_blocks,
            max_num_seqs=self.config.scheduler.max_num_seqs,
            max_model_len=self.max_model_len,
            cuda_graphs=not self.config.model.enforce_eager,
        )
        self.cache = KVCacheManager(
            num_blocks, cache_cfg.block_size, loaded.cache_identity, enable_prefix_caching=cache_cfg.enable_prefix_caching,
            max_pinned_fraction=cache_cfg.max_pinned_fraction,
            max_pinned_fraction_per_namespace=cache_cfg.max_pinned_fraction_per_namespace,
            ghost_index_blocks=cache_cfg.ghost_index_blocks, tenant_quota_blocks=cache_cfg.tenant_quota,
        )
        self.scheduler = Scheduler(self.config.scheduler, self.cache)
        self.sampler = Sampler()
        self.guide_factory = GuideFactory(self.tokenizer, loaded.arch.vocab_size)
        self._guides: dict[str, Guide] = {}  # grammar state of constrained requests
        self.requests: dict[str, Request] = {}
        self._emitted_text: dict[str, str] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}  # running requests' output text
        self.stats = EngineStats()
        self._ids = itertools.count()

    # ---- requests ---------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        cache_namespace: str = "",
        cache_pins: list[CachePin] | None = None,
        arrival_time: float | None = None,
        cache_policy: CachePolicy | str = CachePolicy.READ_WRITE,
        cache_report: bool = False,
        cache_report_namespaces: tuple[str, ...] = (),
        publish_scope: str | None = None,
    ) -> Request:
        """Queue a request. Raises InvalidRequestError / PromptTooLongError for bad input.
        `cache_policy` (read_write, read_only, none) says whether it reads and stores prefix-cache blocks.
        `cache_report` asks for a CacheReport (why it hit or missed) in its final output;
        `cache_report_namespaces` are other namespaces of the same caller the report may name.
        `publish_scope` is for publish_shared_prefix only."""
        params = sampling_params or SamplingParams()
        params.validate()
        try:
            cache_policy = CachePolicy(cache_policy)
        except ValueError:
            raise InvalidRequestError(
                f"cache_policy must be one of {[p.value for p in CachePolicy]}, got {cache_policy!r}"
            ) from None
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        token_ids, text = self._prompt_tokens(prompt)
        check_fits(len(token_ids), params.max_tokens, self.max_model_len, self.cache.block_size, self.cache.num_blocks)
        guide = self.guide_factory.compile(params.guided) if params.guided is not None else None
        request = Request(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=token_ids,
            sampling=params,
            namespace=cache_namespace,
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
            cache_pins=list(cache_pins or []),
            cache_policy=cache_policy,
            want_cache_report=cache_report,
            cache_report_namespaces=tuple(cache_report_namespaces),
            publish_scope=publish_scope,
        )
        self.requests[request_id] = request
        if guide is not None:
            self._guides[request_id] = guide
        self.scheduler.add(request)
        self.stats.prompt_tokens += len(token_ids)
        return request

    def _prompt_tokens(self, prompt: str | list[int]) -> tuple[list[int], str | None]:
        """(token ids, text) of a prompt given as text or token ids; InvalidRequestError if bad."""
        if isinstance(prompt, str):
            token_ids, text = (self.tokenizer.encode(prompt) if prompt else []), prompt
        else:
            token_ids, text = list(prompt), None
            vocab = self.loaded.arch.vocab_size
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]!r} is outside the vocabulary (0..{vocab - 1})")
        if not token_ids:
            raise InvalidRequestError("prompt must not be empty")
        return token_ids, text

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks. Unknown or finished ids are ignored."""
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return None
        try:
            self._finish(request, "abort")
        except Exception:
            self.requests.pop(request_id, None)  # dropped either way: never abort it twice
            raise
        self.stats.aborted_requests += 1
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch. Returns an output for every request that produced tokens or finished."""
        plan = self.scheduler.schedule()
        self.stats.preemptions += len(plan.preempted)
        if not plan.scheduled:
            return []
        self.stats.steps += 1
        sampling = [s.request for s in plan.scheduled if s.samples]
        pending_masks = self._start_masks(sampling)
        logits = self.runner.execute(plan.step)
        return self._postprocess(plan.scheduled, sampling, logits, pending_masks)

    def _start_masks(self, sampling: list[Request]) -> tuple[list[int], Future] | None:
        """(rows, future bitmask) of the grammar-constrained requests about to sample: the masks
        are computed on a helper thread while the model runs. None (and no work) without any."""
        if not self._guides:
            return None
        rows = [i for i, r in enumerate(sampling) if r.request_id in self._guides]
        if not rows:
            return None
        return rows, self.guide_factory.start_masks([self._guides[sampling[i].request_id] for i in rows])

    def _postprocess(
        self,
        scheduled: list[ScheduledRequest],
        sampling: list[Request],
        logits: torch.Tensor,
        pending_masks: tuple[list[int], Future] | None,
    ) -> list[RequestOutput]:
        """After the forward pass: move every request's KV forward (the cache inserts the full
        blocks), sample a token for those in `sampling` (their last new token's logits were
        computed), check stops, emit outputs."""
        for s in scheduled:
            computed, num_prompt = s.num_computed_tokens, s.request.num_prompt_tokens
            if computed < num_prompt:
                self.stats.computed_prompt_tokens += min(s.num_new_tokens, num_prompt - computed)
            self.cache.advance(s.request, s.num_new_tokens)
        if not sampling:
            return []
        masks = None
        if pending_masks is not None:
            rows, bitmask = pending_masks
            masks = (rows, bitmask.result())
        tokens = self._sample(logits, sampling, masks)
        logprob_rows = [i for i, r in enumerate(sampling)
                        if r.sampling.logprobs is not None and not isinstance(tokens[i], Exception)]
        if logprob_rows:
            logprobs = compute_logprobs(logits, logprob_rows, [tokens[i] for i in logprob_rows],
                                        [sampling[i].sampling.logprobs for i in logprob_rows])
            for i, lp in zip(logprob_rows, logprobs):
                sampling[i].output_logprobs.append(lp)
        now = time.monotonic()
        return [self._append_token(r, token, now) for r, token in zip(sampling, tokens) if not r.finished]

    def _append_token(self, request: Request, token: int | Exception, now: float) -> RequestOutput:
        """One sampled token for `request`. A failure here (its sampling, its pins, its grammar,
        its stop check, its detokenization) is the request's own: it finishes with "error", the
        batch goes on."""
        try:
            if isinstance(token, Exception):
                raise token
            if not request.output_token_ids:
                self._apply_cache_pins(request)
            if request.first_token_time is None:
                request.first_token_time = now
            request.output_token_ids.append(token)
            self.stats.generation_tokens += 1
            guide = self._guides.get(request.request_id)
            grammar_done = guide is not None and self._advance_guide(guide, token)
            self._check_stop(request, token)
            if grammar_done and request.finish_reason in (None, "length"):
                # the grammar is complete: its next token could only be EOS, so stop now
                request.finish_reason, request.stop_reason = "stop", None
                request.output_text = self.tokenizer.decode(request.output_token_ids)
            if request.finish_reason is not None:
                self._finish(request, request.finish_reason)
            return self._output(request, new_tokens=1)
        except Exception as e:  # noqa: BLE001
            return self._fail_request(request, e)

    def _sample(self, logits: torch.Tensor, requests: list[Request],
                masks: tuple[list[int], torch.Tensor] | None) -> list[int | Exception]:
        """One token per request; a request whose sampling raises gets the exception instead,
        so one request's bad parameters cannot fail the others in its batch."""
        params = [r.sampling for r in requests]
        ids = [r.request_id for r in requests]
        try:
            return list(self.sampler.sample(logits, params, ids, masks))
        except Exception:  # noqa: BLE001 - retried row by row to find whose it is
            pass
        masked = {row: j for j, row in enumerate(masks[0])} if masks is not None else {}
        tokens: list[int | Exception] = []
        for i in range(len(requests)):
            # a grammar mask may already be applied in place; applying it again changes nothing
            row_mask = ([0], masks[1][masked[i] : masked[i] + 1]) if i in masked else None
            try:
                tokens.append(self.sampler.sample(logits[i : i + 1], params[i : i + 1], ids[i : i + 1], row_mask)[0])
            except Exception as e:  # noqa: BLE001
                tokens.append(e)
        return tokens

    def _fail_request(self, request: Request, error: Exception) -> RequestOutput:
        """Finish `request` with finish reason "error" (its blocks go back) and say why."""
        request.error = f"{type(error).__name__}: {error}"
        if not request.finished:
            self._finish(request, "error")
        return self._output(request)

    @staticmethod
    def _advance_guide(guide: Guide, token: int) -> bool:
        """Feed the token to the request's grammar; True when the grammar is complete (or, which
        a masked sample cannot cause, rejected the token): the request ends there."""
        return not guide.advance(token) or guide.done

    def _apply_cache_pins(self, request: Request) -> None:
        for pin in request.cache_pins:
            if pin.alive is not None and not pin.alive():
                continue  # its named cache was deleted or expired while this request ran
            pinned = self.cache.pin(request, min(pin.num_tokens, request.num_prompt_tokens), pin.ttl)
            request.num_pinned_tokens = max(request.num_pinned_tokens, pinned)  # 0: refused (pin bounds)

    def _check_stop(self, request: Request, token: int) -> None:
        params = request.sampling
        if token in params.stop_token_ids:
            request.finish_reason, request.stop_reason = "stop", token
        elif not params.ignore_eos and token in self.tokenizer.eos_token_ids:
            request.finish_reason, request.stop_reason = "stop", token
        ids = request.output_token_ids
        if request.finish_reason == "stop":  # the full text, once, without the stop token
            request.output_text = self.tokenizer.decode(ids[:-1])
            return
        detokenizer = self._detokenizers.get(request.request_id)
        if detokenizer is None:
            detokenizer = self._detokenizers[request.request_id] = IncrementalDetokenizer(self.tokenizer)
        request.output_text = detokenizer.update(ids)
        if params.stop:
            self._check_stop_strings(request)
        if request.finish_reason is None:
            if len(ids) >= params.max_tokens or request.num_tokens >= self.max_model_len:
                request.finish_reason = "length"
                request.output_text = self.tokenizer.decode(ids)  # the full text, once

    def _check_stop_strings(self, request: Request) -> None:
        text = request.output_text
        emitted = len(self._emitted_text.get(request.request_id, ""))
        longest = max(len(s) for s in request.sampling.stop)
        search_from = max(0, emitted - longest)
        hits = [(text.find(s, search_from), s) for s in request.sampling.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return
        pos, stop = min(hits)
        end = pos + len(stop) if request.sampling.include_stop_str_in_output else pos
        request.output_text = text[:end]
        request.finish_reason, request.stop_reason = "stop", stop

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        request.status = RequestStatus.FINISHED
        request.finish_time = time.monotonic()
        self.scheduler.remove(request)
        self.sampler.forget(request.request_id)
        self._guides.pop(request.request_id, None)
        self._detokenizers.pop(request.request_id, None)
        self.stats.finished_requests += 1

    def _output(self, request: Request, new_tokens: int = 0) -> RequestOutput:
        """A streamed output carries what is new (tokens, text); the finished one also the whole."""
        finished = request.finished
        new_text = self._text_delta(request)
        if finished:
            self.requests.pop(request.request_id, None)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            new_token_ids=request.output_token_ids[-new_tokens:] if new_tokens else [],
            new_text=new_text,
            finished=finished,
            finish_reason=request.finish_reason if finished else None,
            stop_reason=request.stop_reason,
            num_cached_tokens=request.num_cached_tokens or 0,
            metrics=RequestMetrics(
                request.arrival_time, request.first_scheduled_time, request.first_token_time, request.finish_time
            ),
            token_ids=list(request.output_token_ids) if finished else [],
            logprobs=list(request.output_logprobs) if finished and request.sampling.logprobs is not None else None,
            new_logprobs=request.output_logprobs[-new_tokens:] if new_tokens and request.output_logprobs else [],
            text=request.output_text if finished else "",
            cache_write_tokens=self._cache_write_tokens(request),
            error=request.error,
            num_pinned_tokens=request.num_pinned_tokens,
            cache_report=request.cache_report if finished else None,
        )

    def _text_delta(self, request: Request) -> str:
        """The output text not handed out yet (all of it, once the request finished)."""
        text = request.output_text
        previous = self._emitted_text.get(request.request_id, "")
        if not request.finished:
            # hold back a possible stop-string start (a partial UTF-8 character never reaches
            # here: the incremental detokenizer waits for the rest of it)
            holdback = max((len(s) for s in request.sampling.stop), default=1) - 1
            if holdback:
                text = text[: max(len(previous), len(text) - holdback)]
        if request.finished:
            self._emitted_text.pop(request.request_id, None)
        else:
            self._emitted_text[request.request_id] = text
        return text[len(previous) :] if text.startswith(previous) else text

    @staticmethod
    def _cache_write_tokens(request: Request) -> int:
        if not request.cache_pins or not request.cache_policy.writes:
            return 0
        return max(0, request.num_pinned_tokens - (request.num_cached_tokens or 0))

    # ---- the surface the server and the advisor use ------------------------------------
    @property
    def block_size(self) -> int:
        """Tokens per KV block (the prefix cache's granularity)."""
        return self.cache.block_size

    @property
    def prefix_caching(self) -> bool:
        return self.cache.enable_prefix_caching

    @property
    def num_kv_blocks(self) -> int:
        """The KV pool's capacity in blocks."""
        return self.cache.num_blocks

    @property
    def max_total_tokens(self) -> int:
        """Prompt + output tokens one request can have: the context length, and the KV pool."""
        return min(self.max_model_len, self.cache.num_blocks * self.cache.block_size)

    def snapshot(self) -> EngineSnapshot:
        """The engine's counters and gauges now (call it on the engine's thread)."""
        cache, stats = self.cache, self.stats
        return EngineSnapshot(
            prefix_cache_queries=cache.stats.query_tokens,
            prefix_cache_hits=cache.stats.hit_tokens,
            prefix_cache_hit_rate=cache.stats.hit_rate,
            cached_blocks=cache.num_cached_blocks(),
            free_blocks=cache.num_free_blocks(),
            total_blocks=cache.num_blocks,
            block_size=cache.block_size,
            evicted_blocks=cache.stats.evicted_blocks,
            inserted_blocks=cache.stats.inserted_blocks,
            kv_cache_usage=cache.usage(),
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            prompt_tokens=stats.prompt_tokens,
            computed_prompt_tokens=stats.computed_prompt_tokens,
            generation_tokens=stats.generation_tokens,
            finished_requests=stats.finished_requests,
            aborted_requests=stats.aborted_requests,
            preemptions=stats.preemptions,
            tenant_cache=self.tenant_cache_stats(),
        )

    @property
    def pin_bounds(self) -> tuple[int, int] | None:
        """(total, per namespace): the most KV blocks pins may hold (None: caching off). Fixed
        at construction, so any thread may read it."""
        return self.cache.pin_bounds()

    def pinned_blocks(self) -> int:
        """KV blocks all pins hold now (call it on the engine's thread)."""
        return self.cache.pinned_blocks()

    def unfinished_request_ids(self) -> list[str]:
        return list(self.requests)

    def reset_prefix_cache(self) -> int:
        """Drop every cached block no running request uses (pins included). Returns blocks freed."""
        return self.cache.reset_prefix_cache()

    def pin_prefix(self, token_ids: list[int], ttl: float, cache_namespace: str = "") -> int:
        """Pin an already cached prefix for `ttl` seconds (named caches): returns tokens pinned."""
        return self.cache.pin_prefix(cache_namespace, token_ids, ttl)

    def unpin_prefix(self, token_ids: list[int], cache_namespace: str = "") -> None:
        self.cache.unpin_prefix(cache_namespace, token_ids)

    def publish_shared_prefix(self, name: str, token_ids: list[int], ttl: float = 10 * 365 * 86400.0) -> Request:
        """Operator action: publish the whole blocks of `token_ids` as shared scope `name`.

        Every tenant whose prompt starts with them reads the scope's blocks; what follows stays
        in the tenant's own namespace (cache/shared_scopes.py). This queues the one request that
        computes the prefix into the scope and pins it for `ttl` seconds (refreshed by every
        read); the scope is used once that request has run. Returns the request."""
        block_size = self.cache.block_size
        num_tokens = len(token_ids) // block_size * block_size
        if num_tokens == 0:
            raise InvalidRequestError(f"a shared prefix needs at least one full block ({block_size} tokens)")
        try:
            self.cache.shared_scopes.publish(name, token_ids[:num_tokens])
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        return self.add_request(list(token_ids[:num_tokens]), SamplingParams(max_tokens=1),
                                request_id=f"publish-{name}-{next(self._ids)}",
                                cache_pins=[CachePin(num_tokens, ttl)], publish_scope=name)

    def shared_prefix_cached_tokens(self, name: str) -> int:
        """Tokens of shared scope `name` cached now (0: not published, or not computed yet)."""
        scope = self.cache.shared_scopes.get(name)
        if scope is None or not isinstance(self.cache.prefix_cache, RadixTree):
            return 0
        return self.cache.prefix_cache.cached_prefix_length(self.cache.shared_scopes.scope_key(scope), scope.token_ids)

    def withdraw_shared_prefix(self, name: str) -> bool:
        """Stop sharing scope `name` and unpin it (LRU evicts it later). False if unknown."""
        scope = self.cache.shared_scopes.withdraw(name)
        if scope is None:
            return False
        self.cache.prefix_cache.unpin(self.cache.shared_scopes.scope_key(scope), list(scope.token_ids))
        return True

    def tenant_cache_stats(self) -> dict[str, tuple[int, int, int, int]]:
        """Per tenant: (prompt tokens looked up, tokens hit, blocks held now, blocks evicted)."""
        ledger = self.cache.tenants
        held = ledger.blocks_held()
        return {t: (s.query_tokens, s.hit_tokens, held.get(t, 0), s.evicted_blocks)
                for t, s in ledger.stats.items()} | {t: (0, 0, n, 0) for t, n in held.items() if t not in ledger.stats}

    @property
    def device(self) -> torch.device:
        return self.runner.device


__all__ = ["LLMEngine", "EngineSnapshot", "EngineStats", "default_dtype_for"]
