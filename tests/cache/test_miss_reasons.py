"""CacheReport at the manager level: each reason, constructed exactly (no model: pure bookkeeping)."""

from __future__ import annotations

from radixserve.cache.manager import KVCacheManager
from radixserve.request import CachePolicy, Request
from radixserve.sampling import SamplingParams

BS = 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _request(rid: str, tokens: list[int], namespace: str = "", policy=CachePolicy.READ_WRITE,
             readable: tuple[str, ...] = ()) -> Request:
    return Request(request_id=rid, prompt=None, prompt_token_ids=tokens, sampling=SamplingParams(max_tokens=1),
                   namespace=namespace, cache_policy=policy, want_cache_report=True,
                   cache_report_namespaces=readable)


def _run(cache: KVCacheManager, request: Request):
    cache.admit(request)
    n = request.num_tokens - cache.num_computed_tokens(request)
    assert cache.allocate_slots(request, n)
    cache.advance(request, n)
    cache.free(request)
    return request.cache_report


def _manager(num_blocks: int = 64, clock=None, **kw) -> KVCacheManager:
    return KVCacheManager(num_blocks=num_blocks, block_size=BS, model_key="m", ghost_index_blocks=64,
                          clock=clock or FakeClock(), **kw)


def test_not_cached_then_full_hit():
    cache = _manager()
    prompt = list(range(1, 14))  # 3 full blocks + 1 token; cacheable: 12
    first = _run(cache, _request("a", prompt))
    assert (first.reason, first.cached_tokens, first.cacheable_tokens, first.prompt_tokens) == ("not_cached", 0, 12, 13)
    again = _run(cache, _request("b", prompt))
    assert (again.reason, again.cached_tokens) == ("full_hit", 12)


def test_short_prompt_caching_off_and_opted_out():
    cache = _manager()
    assert _run(cache, _request("a", [1, 2, 3, 4])).reason == "prompt_shorter_than_block"  # 4 = 1 block, last token kept
    assert _run(cache, _request("b", list(range(20)), policy=CachePolicy.NONE)).reason == "opted_out"
    off = KVCacheManager(num_blocks=16, block_size=BS, model_key="m", enable_prefix_caching=False)
    report = _run(off, _request("c", list(range(20))))
    assert (report.reason, report.cached_tokens) == ("caching_off", 0)


def test_diverged_at_the_exact_token_with_the_callers_own_context():
    cache = _manager()
    _run(cache, _request("a", list(range(100, 121))))  # 5 blocks cached
    mine = list(range(100, 110)) + [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    report = _run(cache, _request("b", mine))
    assert report.reason == "diverged"
    assert report.cached_tokens == 8 and report.diverged_at == 10  # inside the third block
    assert report.context_before == mine[6:10] and report.context_after == mine[10:14]  # never the cached side


def test_evicted_and_ttl_expired_are_remembered_by_the_ghost_index():
    clock = FakeClock()
    cache = _manager(num_blocks=8, clock=clock)
    victim = list(range(200, 217))  # 4 full blocks + 1
    _run(cache, _request("a", victim))
    clock.now += 5
    _run(cache, _request("flood", list(range(500, 532))))  # needs all 8 blocks: evicts the victim's
    clock.now += 2
    report = _run(cache, _request("b", victim))
    assert report.reason == "evicted" and report.cached_tokens == 0
    assert report.evicted_seconds_ago == 2.0

    cache = _manager(num_blocks=8, clock=clock)
    pinned = _request("p", victim)
    cache.admit(pinned)
    assert cache.allocate_slots(pinned, 17)
    cache.advance(pinned, 17)
    assert cache.pin(pinned, 16, ttl=10) == 16
    cache.free(pinned)
    clock.now += 11  # the pin lapsed: LRU may now evict it
    _run(cache, _request("flood", list(range(500, 532))))
    assert _run(cache, _request("b", victim)).reason == "ttl_expired"


def test_different_namespace_only_names_the_callers_own_unsalted_namespace():
    cache = _manager()
    prompt = list(range(300, 317))
    _run(cache, _request("a", prompt, namespace="key:A"))
    salted = _run(cache, _request("b", prompt, namespace="key:A|salt:x", readable=("key:A",)))
    assert salted.reason == "different_namespace"
    # another key's namespace is never named: B learns nothing about A's prompt
    other = _run(cache, _request("c", prompt, namespace="key:B"))
    assert other.reason == "not_cached"


def test_the_report_is_made_once_at_first_admission():
    cache = _manager()
    request = _request("a", list(range(9)))
    cache.admit(request)
    report = request.cache_report
    cache.free(request)
    cache.admit(request)
    assert request.cache_report is report
    cache.free(request)
