"""LLMEngine: add_request / step / abort over the scheduler, the cache manager and the runner.

Single-threaded by design: the HTTP server drives it from its own loop thread.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from radixserve.cache.block_keys import CacheIdentity
from radixserve.cache.kv_store import open_kv_store
from radixserve.cache.manager import KVCacheManager
from radixserve.cache.radix_tree import PinnedEdge, RadixTree
from radixserve.config import EngineConfig, default_dtype_for
from radixserve.detokenizer import IncrementalDetokenizer
from radixserve.errors import InvalidRequestError
from radixserve.model.loader import LoadedModel, load_model
from radixserve.request import (
    CachePin,
    CachePolicy,
    Request,
    RequestMetrics,
    RequestOutput,
    RequestStatus,
    choice_request_ids,
)
from radixserve.runner import ModelRunner, determine_num_blocks
from radixserve.sampling import Sampler, SamplingParams, choice_seed, compute_logprobs
from radixserve.scheduler import ScheduledRequest, Scheduler, check_fits
from radixserve.structured import Guide, GuideFactory
from radixserve.tier_io import TierIO
from radixserve.warmup import use_triton_cache_dir, warm_up_kernels, warmup_shapes

log = logging.getLogger("radixserve.engine")


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
    # steps that found nothing to run, no output to hand out and no storage read to wait for (a
    # pool full of pinned blocks): a caller stepping in a loop naps after one instead of spinning
    stalled_steps: int = 0


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
    copied_blocks: int  # partial blocks copied on write by n > 1 choices
    tiers: TierSnapshot | None = None  # the lower tiers (None: off)
    # per tenant (cache/quotas.py): (prompt tokens looked up, tokens hit, blocks held, blocks evicted)
    tenant_cache: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


@dataclass(slots=True)
class TierSnapshot:
    """The prefix cache's tiers at one instant (LLMEngine.snapshot; /metrics labels them by tier)."""

    hit_tokens: dict[str, int]  # prompt tokens served, per tier (device, host, storage)
    hit_bytes: dict[str, int]  # their KV bytes
    used_bytes: dict[str, int]  # occupancy per tier
    capacity_bytes: dict[str, int]
    records: dict[str, int]  # blocks held per tier
    decisions: dict[str, int]  # admissions that found blocks below the device: "load" / "recompute"
    corrupt_records: int  # storage records refused (checksum, truncation, wrong key or identity)
    written_blocks: int  # blocks the storage tier took
    write_failures: int  # blocks it could not take (full disk, I/O error) or the writer dropped
    prefetched_blocks: int  # storage blocks read in the background while their request waited
    load_seconds: list[tuple[str, float]]  # (tier, seconds) of each load since the previous snapshot


def _parse_cache_policy(value: CachePolicy | str) -> CachePolicy:
    try:
        return CachePolicy(value)
    except ValueError:
        raise InvalidRequestError(f"cache_policy must be one of {[p.value for p in CachePolicy]}, got {value!r}") from None


def _on_gpu(config: EngineConfig, loaded: LoadedModel | None) -> bool:
    if loaded is not None:
        return next(loaded.model.parameters()).device.type == "cuda"
    return config.model.device.startswith("cuda")


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index`'s sampling: as asked for n == 1; else one sample with its own derived seed."""
    return params if params.n == 1 else dataclasses.replace(params, n=1, seed=choice_seed(params.seed, index))


class LLMEngine:
    """Requests in, outputs out, one step at a time.

    Its public surface (what the server, the advisor and the offline API use): add_request,
    abort_request, step, has_unfinished_requests, unfinished_request_ids; tokenizer, model_id,
    config, max_model_len, block_size, prefix_caching, num_kv_blocks, max_total_tokens, pin_bounds,
    device, cuda_graphs, stats (EngineStats, read only), snapshot(), pinned_blocks() and
    check_cache_invariants(); pin_prefix, unpin_prefix, pinned_paths, cache_identity,
    attach_tree_observer,
    reset_prefix_cache.
    Everything else (cache, scheduler, runner, requests, loaded) is internal: nothing outside
    this module reads it (scripts/check_structure.py checks the server, the advisor, the
    benchmarks and the tests).
    """

    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None) -> None:
        started = time.perf_counter()
        self.config = config or EngineConfig()
        if _on_gpu(self.config, loaded):
            use_triton_cache_dir(self.config.model.triton_cache_dir)  # before the first kernel compiles
        if loaded is None:
            self.config.model.dtype = self.config.model.resolved_dtype
            loaded = load_model(self.config.model)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        arch_len = loaded.arch.max_position_embeddings
        self.max_model_len = min(self.config.model.max_model_len or arch_len, arch_len)
        cache_cfg = self.config.cache
        # seconds per start-up phase (logged; the probe in bench/ reports them)
        self.startup_seconds: dict[str, float] = {"load_model": time.perf_counter() - started}
        self.runner = self._start_runner(loaded)
        num_blocks = self.runner.kv_cache.num_blocks
        self.cache = KVCacheManager(
            num_blocks, cache_cfg.block_size, loaded.cache_identity, enable_prefix_caching=cache_cfg.enable_prefix_caching,
            max_pinned_fraction=cache_cfg.max_pinned_fraction,
            max_pinned_fraction_per_namespace=cache_cfg.max_pinned_fraction_per_namespace,
            **self._tier_options(loaded),
            ghost_index_blocks=cache_cfg.ghost_index_blocks, tenant_quota_blocks=cache_cfg.tenant_quota,
            reuse_partial_blocks=cache_cfg.reuse_partial_blocks)
        # None with the tiers off: then a step does no tier work at all
        self.tier_io: TierIO | None = self._tier_io() if self.cache.tiered else None
        self.scheduler = Scheduler(self.config.scheduler, self.cache)
        self.sampler = Sampler()
        self.guide_factory = GuideFactory(self.tokenizer, loaded.arch.vocab_size)
        self._guides: dict[str, Guide] = {}  # grammar state of constrained requests
        self.requests: dict[str, Request] = {}
        self._emitted_text: dict[str, str] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}  # running requests' output text
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._pending: list[Request | RequestOutput] = []  # overlap_outputs: rendered during the next step
        self._ready(started)

    def _ready(self, started: float) -> None:
        """Start-up is over: its time logged and, with freeze_gc, its heap frozen."""
        self.startup_seconds["total"] = time.perf_counter() - started
        if self.config.scheduler.freeze_gc:
            gc.collect()  # start-up's garbage goes first; what is left is kept for the process's life
            gc.freeze()
        log.info("engine ready in %.1f s (%s)", self.startup_seconds["total"],
                 ", ".join(f"{k} {v:.1f} s" for k, v in self.startup_seconds.items() if k != "total"))

    def _start_runner(self, loaded: LoadedModel) -> ModelRunner:
        """The runner over a KV pool sized from the config: CUDA graphs captured and, on a GPU
        with the Triton kernels, every kernel variant serving launches compiled (warmup.py)."""
        started = time.perf_counter()
        model_cfg, cache_cfg, sched_cfg = self.config.model, self.config.cache, self.config.scheduler
        param = next(loaded.model.parameters())
        num_blocks = determine_num_blocks(loaded, cache_cfg, param.dtype, param.device)
        runner = ModelRunner(
            loaded, cache_cfg, num_blocks, max_num_seqs=sched_cfg.max_num_seqs, max_model_len=self.max_model_len,
            cuda_graphs=not model_cfg.enforce_eager, deterministic=model_cfg.deterministic,
            packed_weights=model_cfg.cpu_packed_weights, cascade_attention=model_cfg.cascade_attention,
        )  # fmt: skip
        self.startup_seconds["kv_pool_and_cuda_graphs"] = time.perf_counter() - started
        if model_cfg.kernel_warmup and param.device.type == "cuda" and loaded.model.backend.kernels is not None:
            max_context = min(self.max_model_len, num_blocks * cache_cfg.block_size)
            shapes = warmup_shapes(sched_cfg.max_num_seqs, sched_cfg.max_num_batched_tokens, max_context,
                                   fresh_length_step=loaded.model.backend.fresh_length_step)
            self.startup_seconds["kernel_warmup"] = warm_up_kernels(runner, shapes, model_cfg.show_progress)
        return runner

    def _tier_io(self) -> TierIO:
        cache = self.cache
        return TierIO(self.runner.kv_cache, cache.identity.describe(), cache.store, cache.host, cache.cost_model,
                      cache.load_seconds)

    def _tier_options(self, loaded: LoadedModel) -> dict:
        """The lower tiers the config asks for (host RAM on a GPU, a KV store), opened once."""
        cfg = self.config.cache
        if not cfg.kv_store and not cfg.host_cache_gb:
            return {}
        if not cfg.enable_prefix_caching:
            log.warning("--kv-store / --host-cache-gb ignored: prefix caching is off")
            return {}
        from radixserve.host_cache import HostKVCache
        from radixserve.kv_transfer import block_layout

        identity = CacheIdentity(loaded.cache_identity, cfg.block_size)
        kv_cache = self.runner.kv_cache
        host = None
        if cfg.host_cache_gb and kv_cache.storage.device.type != "cuda":
            log.info("--host-cache-gb %.1f ignored on %s: the KV pool already is host RAM (use --kv-store to "
                     "keep evicted blocks)", cfg.host_cache_gb, kv_cache.storage.device.type)
        elif cfg.host_cache_gb:
            host = HostKVCache(kv_cache, int(cfg.host_cache_gb * 2**30))
            log.info("host-RAM tier: %d blocks (%.1f GiB pinned)", host.num_slots, host.capacity_bytes / 2**30)
        store = open_kv_store(cfg.kv_store, int(cfg.kv_store_gb * 2**30), identity.describe())
        if cfg.kv_store:
            log.info("storage tier: %s (%.1f GiB)", store.name, cfg.kv_store_gb)
        return {"identity": identity, "store": store, "host": host, "block_bytes": block_layout(kv_cache).nbytes,
                "write_through_all": cfg.kv_store_write == "through"}

    def close(self) -> None:
        """Write the prefix cache down to the KV store (what only the device held too: a
        restarted engine then finds it), wait for the writes and close the store (a disk
        store's directory lock is released, so another engine may open it). Idempotent.
        With freeze_gc, the collector sees the frozen objects again (the engine's among them)."""
        if self.config.scheduler.freeze_gc:
            gc.unfreeze()
        if self.tier_io is not None:
            self.cache.list_tree_for_storage()
            self.tier_io.run(self.cache.take_transfers())
            self.cache.detach_tiers()  # the engine may go on serving, from the device alone
            self.tier_io.close()
            self.tier_io = None

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

        With `sampling_params.n` > 1 it has n choices, each a Request of its own (ids:
        `choice_request_ids(request_id, n)`, outputs carry `index`): choice 0 is queued and
        prefills the prompt once; the others fork off its KV when that prefill completes. Each
        choice samples independently (a seed gives each a distinct derived seed: `choice_seed`).
        Returns choice 0. `cache_report` asks for a CacheReport (why it hit or missed) in the final
        output, which may name `cache_report_namespaces` (the caller's other namespaces).
        `publish_scope` is for publish_shared_prefix only."""
        params = sampling_params or SamplingParams()
        params.validate()
        cache_policy = _parse_cache_policy(cache_policy)
        request_ids = self._new_request_ids(request_id, params.n)  # one per choice
        token_ids, text = self._prompt_tokens(prompt)
        check_fits(len(token_ids), params.max_tokens, self.max_model_len, self.cache.block_size, self.cache.num_blocks)
        guides = [self.guide_factory.compile(params.guided) for _ in request_ids] if params.guided is not None else []
        common = dict(prompt=text, prompt_token_ids=token_ids, namespace=cache_namespace, cache_policy=cache_policy,
                      arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
                      want_cache_report=cache_report, cache_report_namespaces=tuple(cache_report_namespaces),
                      publish_scope=publish_scope)
        choices = [Request(request_id=rid, sampling=_choice_params(params, i), index=i,  # pins: applied by choice 0
                           cache_pins=list(cache_pins or []) if i == 0 else [], **common)
                   for i, rid in enumerate(request_ids)]
        self._queue_choices(choices, guides)
        return choices[0]

    def _new_request_ids(self, request_id: str | None, n: int) -> list[str]:
        """The ids of a request's n choices (from a fresh id when None); InvalidRequestError if one is in use."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        request_ids = choice_request_ids(request_id, n)
        for rid in request_ids:
            if rid in self.requests:
                raise InvalidRequestError(f"request id {rid!r} is already in use")
        return request_ids

    def _queue_choices(self, choices: list[Request], guides: list[Guide]) -> None:
        """Register a request's choices; only choice 0 is scheduled, the others fork off it."""
        request = choices[0]
        request.forks = choices[1:]
        for choice in choices:
            self.requests[choice.request_id] = choice
        for choice, guide in zip(choices, guides):
            self._guides[choice.request_id] = guide
        self.scheduler.add(request)
        self.stats.prompt_tokens += len(request.prompt_token_ids)

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
            return None  # (a request that finished at the last step: its output is on its way)
        # Its last token's output may still be pending (overlap_outputs): this output carries it.
        new_tokens = sum(1 for item in self._pending if item is request)
        self._pending = [item for item in self._pending if item is not request]
        if new_tokens and not request.sampling.stop:
            self._update_text(request)
        try:
            self._finish(request, "abort")
        except Exception:
            self.requests.pop(request_id, None)  # dropped either way: never abort it twice
            raise
        self.stats.aborted_requests += 1
        return self._output(request, new_tokens=new_tokens)

    def has_unfinished_requests(self) -> bool:
        """Work to schedule, or outputs not handed out yet (overlap_outputs)."""
        return self.scheduler.has_work() or bool(self._pending)

    # ---- one step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch. Returns an output for every request that produced tokens or finished."""
        plan = self.scheduler.schedule()
        self.stats.preemptions += len(plan.preempted)
        if self.tier_io is not None:
            self._run_tier_transfers()  # evicted blocks are copied out before anything overwrites them
        if not plan.scheduled:
            pending = self._take_pending()
            # only loading requests wait: block on their reads (up to 10 ms), don't spin against the reader
            if not pending and not self.cache.wait_for_loading(0.01):
                self.stats.stalled_steps += 1
            return self._render(pending)
        self.stats.steps += 1
        sampling = [s.request for s in plan.scheduled if s.samples]
        logits_rows = None
        if any(r.forks for r in sampling):
            sampling, logits_rows = self._with_forks(sampling)
        pending_masks = self._start_masks(sampling)
        start = time.perf_counter()  # the prefill rate the load-or-recompute choice compares with
        logits = self.runner.execute(plan.step)
        # the previous step's outputs (overlap_outputs), built while the GPU runs this one
        outputs = self._render(self._take_pending())
        if logits_rows is not None:
            with torch.inference_mode():
                logits = logits.index_select(0, torch.tensor(logits_rows, device=logits.device))
        produced = self._postprocess(plan.scheduled, sampling, logits, pending_masks)
        if self.tier_io is not None:
            self.cache.cost_model.observe_prefill(plan.step.num_tokens, time.perf_counter() - start)
            self._run_tier_transfers()  # pins (and write-through) of this step: stored now, not at the next step
        if self.config.scheduler.overlap_outputs:
            self._pending = produced
            return outputs
        return outputs + self._render(produced)

    def _take_pending(self) -> list[Request | RequestOutput]:
        pending, self._pending = self._pending, []
        return pending

    def _render(self, produced: list[Request | RequestOutput]) -> list[RequestOutput]:
        """The outputs of a step's results: a request that got a token this step (its text
        brought up to date, its deltas cut), or an output already built (a failed request)."""
        outputs = []
        for item in produced:
            if isinstance(item, RequestOutput):
                outputs.append(item)
                continue
            try:
                if not item.finished and not item.sampling.stop:  # (stop strings: done at the stop check)
                    self._update_text(item)
                outputs.append(self._output(item, new_tokens=1))
            except Exception as e:  # noqa: BLE001 - its own failure, as in _append_token
                outputs.append(self._fail_request(item, e))
        return outputs

    def _run_tier_transfers(self) -> None:
        transfers = self.cache.take_transfers()
        if transfers:
            self.tier_io.run(transfers)

    @staticmethod
    def _with_forks(sampling: list[Request]) -> tuple[list[Request], list[int]]:
        """The requests sampling this step with, right after each whose prefill completes now,
        the choices that fork off it (n > 1); and for each, its row of the step's logits: a
        forked choice samples its first token from its parent's row, independently."""
        requests, rows = [], []
        for row, request in enumerate(sampling):
            for choice in (request, *request.forks):
                requests.append(choice)
                rows.append(row)
        return requests, rows

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
    ) -> list[Request | RequestOutput]:
        """After the forward pass: move every request's KV forward (the cache inserts the full
        blocks), sample a token for those in `sampling` (their last new token's logits were
        computed), check stops. Returns what `_render` turns into this step's outputs: each
        request that got a token, or the output of one that failed."""
        for s in scheduled:
            if s.request.finished:  # failed while this step ran (rendering the last one's output)
                continue
            computed, num_prompt = s.num_computed_tokens, s.request.num_prompt_tokens
            if computed < num_prompt:
                self.stats.computed_prompt_tokens += min(s.num_new_tokens, num_prompt - computed)
            self.cache.advance(s.request, s.num_new_tokens)
        for request in sampling:
            if request.forks:  # its prefill completed: the other choices share its KV from here
                for choice in request.forks:
                    self.scheduler.fork(request, choice)
                request.forks = []
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

    def _append_token(self, request: Request, token: int | Exception, now: float) -> Request | RequestOutput:
        """One sampled token for `request` (returned, for `_render`). A failure here (its
        sampling, its pins, its grammar, its stop check, its detokenization) is the request's
        own: it finishes with "error" (its output returned), the batch goes on."""
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
            return request
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
            pinned = self.cache.pin(request, min(pin.num_tokens, request.num_prompt_tokens), pin.ttl, pin.refresh)
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
        if params.stop:  # the text is needed now; for others `_render` updates it
            self._update_text(request)
            self._check_stop_strings(request)
        if request.finish_reason is None:
            if len(ids) >= params.max_tokens or request.num_tokens >= self.max_model_len:
                request.finish_reason = "length"
                request.output_text = self.tokenizer.decode(ids)  # the full text, once

    def _update_text(self, request: Request) -> None:
        """request.output_text brought up to its output tokens (incrementally)."""
        detokenizer = self._detokenizers.get(request.request_id)
        if detokenizer is None:
            detokenizer = self._detokenizers[request.request_id] = IncrementalDetokenizer(self.tokenizer)
        request.output_text = detokenizer.update(request.output_token_ids)

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
        self._hand_over_forks(request)
        self.sampler.forget(request.request_id)
        self._guides.pop(request.request_id, None)
        self._detokenizers.pop(request.request_id, None)
        self.stats.finished_requests += 1

    def _hand_over_forks(self, request: Request) -> None:
        """Keep the other choices of an n > 1 request alive when `request` ends early: a choice
        still waiting for the prefill leaves its group; a request that ends (aborted) before its
        prefill completed passes the prefill on to its next choice."""
        if request.forks:
            heir, *rest = request.forks
            request.forks, heir.forks = [], rest
            self.scheduler.add(heir)
        elif request.index > 0 and request.first_scheduled_time is None:
            for holder in self.requests.values():
                if any(choice is request for choice in holder.forks):
                    holder.forks = [choice for choice in holder.forks if choice is not request]
                    return

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
            cached_tokens_by_tier=request.cached_tokens_by_tier,
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
            index=request.index,
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
            copied_blocks=cache.stats.copied_blocks,
            tiers=self._tier_snapshot(),
            tenant_cache=self.tenant_cache_stats(),
        )

    def _tier_snapshot(self) -> TierSnapshot | None:
        cache, io = self.cache, self.tier_io
        if io is None:
            return None
        ts = cache.tier_stats
        block_bytes = cache.block_bytes
        used = {"device": cache.num_cached_blocks() * block_bytes}
        capacity = {"device": cache.num_blocks * block_bytes}
        records = {"device": cache.num_cached_blocks()}
        for tier, lower in (("host", cache.host), ("storage", cache.store)):
            if lower is not None:
                used[tier], capacity[tier], records[tier] = lower.used_bytes, lower.capacity_bytes, lower.num_records
        store_stats = cache.store.stats if cache.store is not None else None
        writer = io.writer.stats if io.writer is not None else None
        load_seconds = list(cache.load_seconds)
        cache.load_seconds.clear()
        return TierSnapshot(
            hit_tokens=dict(ts.hit_tokens), hit_bytes=dict(ts.hit_bytes), used_bytes=used, capacity_bytes=capacity,
            records=records, decisions={"load": ts.load_decisions, "recompute": ts.recompute_decisions},
            corrupt_records=store_stats.corrupt_records if store_stats else 0,
            written_blocks=writer.written if writer else 0,
            write_failures=(writer.failed + writer.dropped) if writer else 0,
            prefetched_blocks=ts.prefetched_blocks,
            load_seconds=load_seconds,
        )

    @property
    def pin_bounds(self) -> tuple[int, int] | None:
        """(total, per namespace): the most KV blocks pins may hold (None: caching off). Fixed
        at construction, so any thread may read it."""
        return self.cache.pin_bounds()

    def pinned_blocks(self, cache_namespace: str | None = None) -> int:
        """KV blocks pins hold now: all of them, or those of one cache namespace (call it on the
        engine's thread)."""
        return self.cache.pinned_blocks(None if cache_namespace is None else self.cache.cache_key(cache_namespace))

    def check_cache_invariants(self) -> None:
        """Raise AssertionError unless the KV bookkeeping is consistent: the prefix cache's own
        invariants, and with nothing running every block free or cached (no leak). What the
        fault suite checks after a storm; O(cache size), call it on the engine's thread."""
        self.cache.prefix_cache.check_invariants()
        if not self.scheduler.has_work():
            free, cached, total = self.cache.num_free_blocks(), self.cache.num_cached_blocks(), self.cache.num_blocks
            assert free + cached == total, f"{free} free + {cached} cached blocks != {total}: blocks leaked"

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

    def pinned_paths(self) -> list[PinnedEdge]:
        """Every live pin, as the edges of its path with seconds left (call it on the engine's
        thread): what the server saves so that pins survive a restart."""
        return self.cache.pinned_paths()

    @property
    def cache_identity(self) -> str:
        """What the KV depends on besides the tokens: model, weights + tokenizer fingerprint, dtype."""
        return self.loaded.cache_identity

    def attach_tree_observer(self, observer) -> bool:
        """Hand the radix tree to `observer.attach(tree)` (the scale-out KV-event recorder), so it
        is told when full blocks enter or leave the cache. False when caching is off."""
        tree = self.cache.prefix_cache
        if not isinstance(tree, RadixTree):
            return False
        observer.attach(tree)
        return True

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

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps and one-sequence prefills of up to 512 tokens replay captured CUDA
        graphs (CUDA with the Triton backend, unless enforce_eager)."""
        return self.runner.graphs is not None

    @property
    def cascade_rows(self) -> int:
        """Decode rows that read a shared prompt prefix once per group (cascade attention) so
        far, a row counted once per step: 0 on CPU, with it off, or when nothing was shared."""
        return self.runner.cascade_rows


__all__ = ["LLMEngine", "EngineSnapshot", "EngineStats", "TierSnapshot", "default_dtype_for"]
