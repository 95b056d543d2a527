"""Cache-hostile pattern detection, the prefix overlaps and the shared-prefix tree."""

from __future__ import annotations

import random

from radixserve.advisor import AdvisorConfig, analyze, requests_from_bodies
from radixserve.advisor.findings import (
    common_prefix_len,
    find_divergences,
    prefix_overlaps,
    reorder_for_caching,
)
from radixserve.advisor.logs import PromptRequest
from radixserve.advisor.prefix_tree import build_prefix_tree, iter_nodes
from tests.advisor import generated_logs


def reqs(token_lists, namespaces=None) -> list[PromptRequest]:
    return [PromptRequest(i, i + 1, "prompt", namespaces[i] if namespaces else "", None, list(t))
            for i, t in enumerate(token_lists)]


def _bodies(records):
    return [r["body"] if "body" in r else r for r in records]


def test_request_id_in_front_is_flagged_with_position_and_fix(advisor_model, request_id_records):
    requests = requests_from_bodies(_bodies(request_id_records), advisor_model.tokenizer, api="messages")
    report = analyze(requests, advisor_model, AdvisorConfig())
    [finding] = [f for f in report.findings if f.kind == "early_divergence"]
    divergence = common_prefix_len(requests[0].token_ids, requests[1].token_ids)
    assert finding.severity == "high"
    assert finding.data["divergence_token"] == divergence == 7  # "<|im_start|>system\nRequest id: " = 7 tokens
    assert finding.data["divergence_tokens_seen"] == [7]
    texts = {e["varying_text"] for e in finding.data["examples"]}
    assert {"Request id: 3817", "Request id: 5202"} <= texts
    assert "Request id: " in finding.fix and "after the shared content" in finding.fix
    assert finding.requests == len(requests)
    # Every request but the first could reuse the ~2000 shared tokens.
    assert finding.tokens_lost >= (len(requests) - 1) * 1984
    assert finding.data["hit_rate_after_fix"] > 0.8 > report.hit_rate + 0.7
    assert "diverge early, at token 7" in finding.title


def test_cache_friendly_log_has_no_divergence(advisor_model, shared_system_records):
    requests = requests_from_bodies(_bodies(shared_system_records), advisor_model.tokenizer, api="chat")
    report = analyze(requests, advisor_model, AdvisorConfig())
    assert report.findings == []
    assert report.reordered is None
    [top, *_] = report.top_prefixes
    assert top.requests == len(requests) and top.tokens >= 2000 and top.branches == len(requests)


def test_varying_part_of_varying_length_is_found():
    rng = random.Random(3)
    shared = [rng.randrange(1000, 2000) for _ in range(300)]
    names = [[5, 6], [5, 7, 8, 9], [5, 10, 11], [5, 12]]  # "User: <name>" of different lengths
    log = reqs([[1, 2, 3] + name + shared + [rng.randrange(3000, 4000) for _ in range(10)] for name in names])
    pairs = find_divergences(log, min_shared_tokens=64)
    assert [p.request for p in pairs] == [1, 2, 3]
    for p in pairs:
        assert p.divergence == 4  # [1, 2, 3, 5] in common
        assert p.length == 300
        assert log[p.request].token_ids[p.start : p.start + 300] == shared
    fixed = reorder_for_caching(log, pairs)
    assert all(ids[4 : 4 + 300] == shared for ids in fixed)
    assert sorted(map(len, fixed)) == sorted(r.num_tokens for r in log)


def test_short_shared_spans_and_continuations_are_not_flagged():
    rng = random.Random(4)
    base = [rng.randrange(1000) for _ in range(400)]
    phrase = [rng.randrange(5000, 6000) for _ in range(20)]
    log = reqs([
        base + [1] + phrase,
        base + [2] + phrase,  # shares a 20-token phrase after the divergence: too short
        base + [1] + phrase + [rng.randrange(1000) for _ in range(200)],  # a continuation (multi-turn)
    ])
    assert find_divergences(log, min_shared_tokens=64) == []


def test_namespaces_are_separate():
    shared = list(range(1000, 1300))
    log = reqs([[1] + shared, [2] + shared], namespaces=["a", "b"])
    assert find_divergences(log, min_shared_tokens=64) == []


def test_interleaved_prompts_under_small_capacity_show_churn(advisor_model, interleaved_records):
    requests = requests_from_bodies(interleaved_records, advisor_model.tokenizer)
    report = analyze(requests, advisor_model, AdvisorConfig(capacity_tokens=80 * 16))
    kinds = [f.kind for f in report.findings]
    assert kinds[0] == "churn"
    churn = report.findings[0]
    assert churn.tokens_lost == report.unbounded.hit_tokens - report.result.hit_tokens > 0
    assert churn.data["suggested_capacity_bytes"] == churn.data["suggested_capacity_tokens"] * 46080
    assert "early_divergence" not in kinds and "short_prefix" not in kinds
    assert len(report.top_prefixes) >= 4


def test_short_prefix_below_the_block_size_and_below_a_minimum(advisor_model):
    tok = advisor_model.tokenizer
    qs = generated_logs.questions(12, seed=9)
    tiny_system = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]} for q in qs]
    report = analyze(requests_from_bodies(tiny_system, tok), advisor_model, AdvisorConfig())
    [short] = [f for f in report.findings if f.kind == "short_prefix"]
    assert short.data["threshold_tokens"] == 16 and short.data["median_shared_tokens"] < 16
    assert short.requests == len(qs) - 1

    system = generated_logs.system_prompt(tok, 200, seed=4)
    medium = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}]} for q in qs]
    requests = requests_from_bodies(medium, tok)
    assert not [f for f in analyze(requests, advisor_model, AdvisorConfig()).findings if f.kind == "short_prefix"]
    report = analyze(requests, advisor_model, AdvisorConfig(min_prefix_tokens=1024))
    [short] = [f for f in report.findings if f.kind == "short_prefix"]
    assert short.data["threshold_tokens"] == 1024 and 200 <= short.data["median_shared_tokens"] < 1024


def test_unrelated_prompts_are_reported_as_not_sharing(advisor_model):
    qs = generated_logs.questions(10, seed=11)
    bodies = [{"messages": [{"role": "system", "content": f"{k} {q}"}]} for k, q in enumerate(qs)]
    report = analyze(requests_from_bodies(bodies, advisor_model.tokenizer), advisor_model, AdvisorConfig())
    assert [f.kind for f in report.findings] == ["no_sharing"]
    assert report.hit_rate == 0.0


def test_ttl_expiry_finding(advisor_model, shared_system_records):
    records = [dict(r, ts=1_700_000_000 + 600 * i) for i, r in enumerate(shared_system_records)]
    requests = requests_from_bodies(_bodies(records), advisor_model.tokenizer, api="chat")
    for r, rec in zip(requests, records):
        r.timestamp = float(rec["ts"])
    report = analyze(requests, advisor_model, AdvisorConfig(ttl=300))
    assert report.hit_rate == 0.0
    [ttl] = [f for f in report.findings if f.kind == "ttl_expiry"]
    assert ttl.data["hit_rate_without_ttl"] > 0.8


def test_prefix_overlaps_match_brute_force():
    rng = random.Random(7)
    stems = [[rng.randrange(5) for _ in range(rng.randrange(1, 6))] for _ in range(5)]
    lists = [rng.choice(stems) + [rng.randrange(5) for _ in range(rng.randrange(0, 6))] for _ in range(60)]
    namespaces = [rng.choice("ab") for _ in lists]
    log = reqs(lists, namespaces)
    for i, (k, partner) in enumerate(prefix_overlaps(log)):
        earlier = [common_prefix_len(lists[i], lists[j]) for j in range(i) if namespaces[j] == namespaces[i]]
        assert k == max(earlier, default=0)
        if partner >= 0:
            assert partner < i and common_prefix_len(lists[i], lists[partner]) == k


def test_prefix_tree_counts_match_brute_force():
    rng = random.Random(8)
    stems = [[rng.randrange(4) for _ in range(rng.randrange(1, 5))] for _ in range(4)]
    lists = [rng.choice(stems) + [rng.randrange(4) for _ in range(rng.randrange(0, 5))] for _ in range(50)]
    lists.append(list(lists[0]))  # an exact duplicate
    log = reqs(lists)
    [root] = build_prefix_tree(log)
    assert root.count == len(lists)
    for node in iter_nodes(root):
        if node.end == 0:
            continue
        prefix = lists[node.rep][: node.end]
        through = [ids for ids in lists if ids[: node.end] == prefix]
        assert node.count == len(through)
        for child in node.children:
            assert child.start == node.end
        # Compacted: a node is a branch point, a prompt end, or a leaf.
        assert len(node.children) != 1 or node.ends_here > 0
