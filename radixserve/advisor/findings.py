"""Findings: what makes a log cache-hostile, how many tokens it costs, and what to change.

- ``early_divergence``: requests that share long content but diverge before it (a timestamp,
  request id or user name near the start), so the shared content is never a cached prefix. Found
  by content anchors: token k-grams at positions chosen by the tokens themselves (so the same
  content yields the same anchors at any offset) are indexed per request; a later request whose
  anchor, past its common prefix with an earlier request, also occurs in that earlier request is
  extended both ways to the full shared span.
- ``short_prefix``: requests whose shared prefix with every earlier request is shorter than the
  block size (nothing of it can be cached) or than a configured minimum.
- ``no_sharing``: most requests share nothing but the chat template's first tokens.
- ``churn``: the working set does not fit the capacity; hits are lost to evictions.
- ``ttl_expiry``: hits lost because prefixes went unused for longer than the TTL.
"""

from __future__ import annotations

import bisect
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from radixserve.advisor.logs import PromptRequest
from radixserve.sequences import common_prefix_len

# Anchors: a position p is an anchor when token_ids[p] falls in 1/_ANCHOR_EVERY of the id space
# (a multiplicative hash), keyed by the _ANCHOR_LEN tokens from p. Content-defined, so two copies
# of the same text pick the same anchors wherever they sit in their prompts.
_ANCHOR_LEN = 8
_ANCHOR_EVERY = 8
_POSTINGS_PER_ANCHOR = 4  # earlier requests remembered per anchor (the first ones seen)
_MAX_PARTNER_CHECKS = 24  # span extensions tried per request
_MAX_POSTINGS_VISITED = 256

SEVERITY_ORDER = {"high": 0, "medium": 1, "info": 2}


@dataclass(slots=True)
class Finding:
    """One problem (or observation), its cost and its fix. ``data`` holds kind-specific numbers."""

    kind: str
    severity: str  # "high" | "medium" | "info"
    title: str
    detail: str
    fix: str
    requests: int  # requests affected
    tokens_lost: int  # prompt tokens that miss the cache because of it (an estimate)
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "title": self.title,
            "detail": self.detail,
            "fix": self.fix,
            "requests": self.requests,
            "tokens_lost": self.tokens_lost,
            **self.data,
        }


# ---- token helpers ----------------------------------------------------------------------


def common_suffix_len(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the longest common suffix of a and b, at most ``limit``."""
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    if a[len(a) - n :] == b[len(b) - n :]:
        return n
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def cacheable(k: int, n: int, block_size: int) -> int:
    """Tokens the engine reuses when ``k`` leading tokens of an ``n``-token prompt are cached."""
    return block_size * (min(k, n - 1) // block_size)


def prefix_overlaps(requests: Sequence[PromptRequest]) -> list[tuple[int, int]]:
    """For each request: (longest common prefix with any earlier request of its namespace, that
    request's index), or (0, -1) for the first of its namespace.

    In lexicographic order the sequence sharing the longest prefix with x is a neighbour of x,
    so a sorted list of the requests seen so far answers each query with two comparisons.
    """
    seen: list[tuple[str, list[int], int]] = []
    out: list[tuple[int, int]] = []
    for i, r in enumerate(requests):
        key = (r.namespace, r.token_ids, i)
        pos = bisect.bisect_left(seen, key)
        best, partner = 0, -1
        for nb in (pos - 1, pos):
            if 0 <= nb < len(seen) and seen[nb][0] == r.namespace:
                k = common_prefix_len(r.token_ids, seen[nb][1])
                if k > best:
                    best, partner = k, seen[nb][2]
        out.append((best, partner))
        seen.insert(pos, key)
    return out


# ---- early divergence -------------------------------------------------------------------


@dataclass(slots=True)
class DivergencePair:
    """Request ``request`` shares ``length`` tokens with the earlier ``partner``, starting at
    ``start`` (in request) and ``partner_start`` (in partner), after their common prefix of
    ``divergence`` tokens: the shared span is not a prefix, so it is not reused."""

    request: int
    partner: int
    divergence: int
    start: int
    partner_start: int
    length: int


def _is_anchor(token: int) -> bool:
    return ((token * 0x9E3779B1) & 0xFFFFFFFF) >> 29 == 0  # 1 in 8 ids


def find_divergences(requests: Sequence[PromptRequest], min_shared_tokens: int) -> list[DivergencePair]:
    """At most one pair per request: the longest shared non-prefix span with an earlier request
    of the same namespace, if it is at least ``min_shared_tokens`` long and at least a tenth of
    the request (a long document behind a different preamble, not a repeated short phrase)."""
    index: dict[tuple[str, tuple[int, ...]], list[tuple[int, int]]] = {}
    anchor_cache: dict[int, bool] = {}
    pairs: list[DivergencePair] = []
    for i, r in enumerate(requests):
        a = r.token_ids
        anchors: list[int] = []
        for p in range(len(a) - _ANCHOR_LEN + 1):
            t = a[p]
            flag = anchor_cache.get(t)
            if flag is None:
                flag = anchor_cache[t] = _is_anchor(t)
            if flag:
                anchors.append(p)
        best: DivergencePair | None = None
        lcps: dict[int, int] = {}
        covered_until = -1
        checks = visited = 0
        keys = [(r.namespace, tuple(a[p : p + _ANCHOR_LEN])) for p in anchors]
        for p, key in zip(anchors, keys):
            if p < covered_until or checks >= _MAX_PARTNER_CHECKS or visited >= _MAX_POSTINGS_VISITED:
                continue
            for j, q in index.get(key, ()):
                visited += 1
                b = requests[j].token_ids
                lcp = lcps.get(j)
                if lcp is None:
                    lcp = lcps[j] = common_prefix_len(a, b)
                if p < lcp or q < lcp:
                    continue  # part of what they already share as a prefix
                checks += 1
                back = common_suffix_len(a[:p], b[:q], min(p, q) - lcp)
                start, partner_start = p - back, q - back
                length = back + common_prefix_len(a[p:], b[q:])
                if best is None or length > best.length:
                    best = DivergencePair(i, j, lcp, start, partner_start, length)
                covered_until = max(covered_until, start + length)
                break
        if best is not None and best.length >= min_shared_tokens and best.length * 10 >= len(a):
            pairs.append(best)
        seen: set[tuple[str, tuple[int, ...]]] = set()
        for p, key in zip(anchors, keys):
            if key in seen:
                continue
            seen.add(key)
            postings = index.setdefault(key, [])
            if len(postings) < _POSTINGS_PER_ANCHOR:
                postings.append((i, p))
    return pairs


def reorder_for_caching(requests: Sequence[PromptRequest], pairs: Sequence[DivergencePair]) -> list[list[int]]:
    """The token ids after the suggested fix: each pair's varying part moved behind its shared
    span (in both requests), so the shared span directly follows the common prefix."""
    out = [list(r.token_ids) for r in requests]
    done: set[int] = set()

    def move(idx: int, div: int, start: int, length: int) -> None:
        if idx in done:
            return
        done.add(idx)
        ids = requests[idx].token_ids
        out[idx] = ids[:div] + ids[start : start + length] + ids[div:start] + ids[start + length :]

    for pair in pairs:
        move(pair.request, pair.divergence, pair.start, pair.length)
        move(pair.partner, pair.divergence, pair.partner_start, pair.length)
    return out


def divergence_findings(
    requests: Sequence[PromptRequest],
    pairs: Sequence[DivergencePair],
    tokenizer: Any,
    block_size: int,
    max_findings: int = 5,
) -> list[Finding]:
    """Group pairs that chain together (same shared content) into one finding each."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for pair in pairs:
        parent[find(pair.request)] = find(pair.partner)
    components: dict[int, list[DivergencePair]] = defaultdict(list)
    for pair in pairs:
        components[find(pair.request)].append(pair)
    # Namespaces never share, so the same pattern in several tenants forms several components;
    # report it once, keyed by the start of the shared content.
    groups: dict[tuple[int, ...], list[DivergencePair]] = defaultdict(list)
    for component in components.values():
        first = component[0]
        groups[tuple(requests[first.request].token_ids[first.start : first.start + 16])].extend(component)
    findings = []
    for group in groups.values():
        members = {p.request for p in group} | {p.partner for p in group}
        lost = sum(
            cacheable(p.divergence + p.length, requests[p.request].num_tokens, block_size)
            - cacheable(p.divergence, requests[p.request].num_tokens, block_size)
            for p in group
        )
        if lost <= 0:
            continue
        findings.append(_divergence_finding(requests, group, len(members), lost, tokenizer))
    findings.sort(key=lambda f: -f.tokens_lost)
    if len(findings) > max_findings:
        rest = findings[max_findings:]
        findings = findings[:max_findings]
        findings[-1].data["more_groups"] = len(rest)
        findings[-1].data["more_tokens_lost"] = sum(f.tokens_lost for f in rest)
    return findings


def _divergence_finding(
    requests: Sequence[PromptRequest], group: list[DivergencePair], num_requests: int, lost: int, tokenizer: Any
) -> Finding:
    positions = Counter(p.divergence for p in group)
    divergence = positions.most_common(1)[0][0]
    shared = int(statistics.median(p.length for p in group))
    examples = []
    for pair in group[:3]:
        for idx, start in ((pair.partner, pair.partner_start), (pair.request, pair.start)):
            text = varying_text(tokenizer, requests[idx].token_ids, pair.divergence, start)
            if text not in (e["varying_text"] for e in examples):
                examples.append({"request": idx, "line": requests[idx].line, "varying_text": text})
    examples = examples[:4]
    first = group[0]
    ids = requests[first.request].token_ids
    shared_start_text = snippet(tokenizer, ids[first.start : first.start + 12])
    div_char = len(tokenizer.decode(ids[:divergence], skip_special_tokens=False))
    shown = " vs ".join(f'"{e["varying_text"]}"' for e in examples[:2])
    where = f"token {divergence}" if len(positions) == 1 else f"token {divergence} (range {min(positions)}-{max(positions)})"
    title = f"{num_requests} requests share ~{shared} tokens but diverge early, at {where}"
    detail = (
        f"These prompts differ at {where} ({shown}), before ~{shared} tokens of content they all share "
        f"(starting \"{shared_start_text}\"). The cache reuses only a common prefix, so that content is "
        f"prefilled again for every request: ~{lost} prompt tokens lost."
    )
    example = examples[-1]["varying_text"] if examples else "the varying part"
    fix = (
        f"Move the varying part (e.g. \"{example}\") after the shared content, or drop it; "
        f"put the ~{shared} shared tokens (\"{shared_start_text}...\") first. Every request then reuses them."
    )
    return Finding(
        kind="early_divergence",
        severity="high",
        title=title,
        detail=detail,
        fix=fix,
        requests=num_requests,
        tokens_lost=lost,
        data={
            "divergence_token": divergence,
            "divergence_char": div_char,
            "divergence_tokens_seen": sorted(positions),
            "shared_tokens": shared,
            "shared_start_text": shared_start_text,
            "examples": examples,
            "request_indices": sorted({p.request for p in group} | {p.partner for p in group})[:50],
            "namespaces": sorted({requests[p.request].namespace for p in group}),
        },
    )


def snippet(tokenizer: Any, ids: Sequence[int], max_chars: int = 60) -> str:
    """Decoded text, one line, control characters escaped, truncated with an ellipsis."""
    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace('"', "'")
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def varying_text(tokenizer: Any, ids: Sequence[int], divergence: int, start: int, max_chars: int = 60) -> str:
    """The line on which the prompts diverge, whole ("Request id: 4821"): the varying part plus
    the text before it on its line and after it up to the line's end."""
    lo = max(0, divergence - 16)
    head = tokenizer.decode(list(ids[lo:divergence]), skip_special_tokens=False).rsplit("\n", 1)[-1].lstrip()
    body = tokenizer.decode(list(ids[divergence:start]), skip_special_tokens=False)
    if "\n" not in body:
        body += tokenizer.decode(list(ids[start : start + 16]), skip_special_tokens=False).split("\n", 1)[0]
    text = (head + body).strip()
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace('"', "'")
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


# ---- short prefixes, no sharing -----------------------------------------------------------


def template_head_tokens(tokenizer: Any) -> int:
    """Tokens every chat prompt starts with whatever its content (the template's opening)."""
    try:
        a = tokenizer.encode(tokenizer.apply_chat_template([{"role": "system", "content": "Alpha"}]))
        b = tokenizer.encode(tokenizer.apply_chat_template([{"role": "system", "content": "Omega"}]))
    except Exception:  # a template that refuses a lone system message
        return 0
    return common_prefix_len(a, b)


def prefix_findings(
    requests: Sequence[PromptRequest],
    overlaps: Sequence[tuple[int, int]],
    *,
    block_size: int,
    min_prefix_tokens: int,
    head_tokens: int,
    exclude: set[int],
    tokenizer: Any,
) -> list[Finding]:
    """short_prefix (below the block size, below the configured minimum) and no_sharing."""
    findings: list[Finding] = []
    below_block: list[int] = []
    below_min: list[int] = []
    unshared: list[int] = []
    considered = 0
    # A request whose first T tokens recur in another request is the first copy of a long enough
    # shared prefix (e.g. the first request of each system prompt), not a short-prefix problem.
    heads: dict[int, Counter[tuple[str, tuple[int, ...]]]] = {}
    for t in {block_size, min_prefix_tokens} - {0}:
        heads[t] = Counter((r.namespace, tuple(r.token_ids[:t])) for r in requests if r.num_tokens >= t)

    def recurs(i: int, t: int) -> bool:
        r = requests[i]
        return r.num_tokens >= t and heads[t][(r.namespace, tuple(r.token_ids[:t]))] >= 2

    for i, (k, partner) in enumerate(overlaps):
        if partner < 0 or i in exclude:
            continue
        considered += 1
        head = head_tokens if requests[i].api in ("chat", "messages") else 0
        n = requests[i].num_tokens
        if k <= head:
            if not recurs(i, block_size):
                unshared.append(i)
        elif cacheable(k, n, block_size) == 0 and not recurs(i, block_size):
            below_block.append(i)
        elif min_prefix_tokens > block_size and k < min_prefix_tokens and not recurs(i, min_prefix_tokens):
            below_min.append(i)
    # A pattern is worth a finding when it covers a fair part of the log.
    threshold = max(2, considered // 10)

    def example(indices: list[int]) -> tuple[int, str]:
        ks = [overlaps[i][0] for i in indices]
        k = int(statistics.median(ks))
        idx = next(i for i in indices if overlaps[i][0] == min(ks, key=lambda x: abs(x - k)))
        return k, snippet(tokenizer, requests[idx].token_ids[: overlaps[idx][0]])

    if len(below_block) >= threshold:
        k, text = example(below_block)
        findings.append(Finding(
            kind="short_prefix",
            severity="medium",
            title=f"{len(below_block)} requests share a prefix shorter than the block size ({block_size} tokens)",
            detail=(
                f"Their longest prefix in common with any earlier request is only ~{k} tokens (e.g. \"{text}\"): "
                f"the cache stores whole blocks of {block_size} tokens, so none of it is reused."
            ),
            fix=(
                "Put more stable content (instructions, tool definitions, few-shot examples) at the start so "
                f"requests share at least a block; or serve with a smaller --block-size (e.g. {max(1, block_size // 2)})."
            ),
            requests=len(below_block),
            tokens_lost=sum(overlaps[i][0] for i in below_block),
            data={"threshold_tokens": block_size, "median_shared_tokens": k, "example_text": text},
        ))
    if len(below_min) >= threshold:
        k, text = example(below_min)
        findings.append(Finding(
            kind="short_prefix",
            severity="medium",
            title=f"{len(below_min)} requests share a prefix shorter than the minimum of {min_prefix_tokens} tokens",
            detail=(
                f"Their shared prefix is ~{k} tokens (e.g. \"{text}\"). radixserve's automatic cache still reuses "
                f"it, but explicit cache breakpoints (cache_control, named caches) and hosted APIs ignore prefixes "
                f"under {min_prefix_tokens} tokens."
            ),
            fix=(
                f"Grow the stable prefix past {min_prefix_tokens} tokens (move shared examples or documents before the "
                "varying part), or rely on automatic caching instead of explicit breakpoints for these requests."
            ),
            requests=len(below_min),
            tokens_lost=sum(cacheable(overlaps[i][0], requests[i].num_tokens, block_size) for i in below_min),
            data={"threshold_tokens": min_prefix_tokens, "median_shared_tokens": k, "example_text": text},
        ))
    if considered and len(unshared) * 2 >= considered:
        findings.append(Finding(
            kind="no_sharing",
            severity="info",
            title=f"{len(unshared)} of {considered} later requests share nothing with earlier ones",
            detail=(
                "Beyond the chat template's first tokens these prompts have no prefix in common with any earlier "
                "request, so prefix caching cannot help them."
            ),
            fix="If the requests carry common instructions or context, send them first and identically in every request.",
            requests=len(unshared),
            tokens_lost=0,
            data={"template_head_tokens": head_tokens},
        ))
    return findings
