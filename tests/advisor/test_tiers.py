"""Host and storage tiers below the replayed device pool: exact numbers on constructed logs,
the TTFT model, and `radixserve advise --host-gb --store-gb` over a generated log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from radixserve.advisor import AdvisorConfig, analyze
from radixserve.advisor.replay import ReplayConfig, replay
from radixserve.advisor.tier_costs import predict_tiers
from radixserve.advisor.tiers import LowerTiers
from tests.advisor import generated_logs
from tests.advisor.test_replay import reqs

REPO_ROOT = Path(__file__).resolve().parents[2]

# Three 64-token prompts (4 blocks each; a repeat reads 3, the n-1 rule) through a 9-block pool:
# a, b, a, c, a, b. c's admission trims b's last 3 blocks, a's next one drops b's first block,
# the last b trims c's last 3 (test_replay.test_lru_eviction_under_a_small_capacity).
A, B, C = ([k] * 64 for k in (1, 2, 3))
LOG = [A, B, A, C, A, B]


def test_without_tiers_the_replay_is_unchanged():
    plain = replay(reqs(LOG), ReplayConfig(block_size=16, capacity_blocks=9))
    tiered = replay(reqs(LOG), ReplayConfig(block_size=16, capacity_blocks=9, host_blocks=100, store_blocks=100))
    assert plain.cached_tokens == tiered.cached_tokens == [0, 0, 48, 0, 48, 0]
    assert plain.evicted_blocks == tiered.evicted_blocks and plain.host_hit_tokens == 0


def test_the_host_tier_serves_what_the_device_evicted():
    r = replay(reqs(LOG), ReplayConfig(block_size=16, capacity_blocks=9, host_blocks=100))
    assert r.host_tokens == [0, 0, 0, 0, 0, 48]  # b's 3 readable blocks, all in host RAM
    assert r.store_tokens == [0] * 6
    assert r.host_hit_tokens == 48 and r.store_hit_tokens == 0
    assert r.demoted_to_host_blocks == 3 + 1 + 3 and r.demoted_to_store_blocks == 0
    assert r.host_hit_rate == 48 / (6 * 64)


def test_storage_alone_takes_the_demoted_blocks():
    r = replay(reqs(LOG), ReplayConfig(block_size=16, capacity_blocks=9, store_blocks=100))
    assert r.host_tokens == [0] * 6 and r.store_tokens == [0, 0, 0, 0, 0, 48]
    assert r.demoted_to_store_blocks == 7 and r.demoted_to_host_blocks == 0


def test_a_small_host_tier_spills_its_lru_blocks_to_storage():
    # host holds 2 blocks: b2 b3 b4 arrive (b2 spills), then b1 (b3 spills): host {b4, b1},
    # storage {b2, b3}. The last b reads b1 from the host, b2 and b3 from storage; then c's
    # trimmed c2 c3 c4 push b4, b1 and c2 down.
    r = replay(reqs(LOG), ReplayConfig(block_size=16, capacity_blocks=9, host_blocks=2, store_blocks=100))
    assert r.host_tokens[-1] == 16 and r.store_tokens[-1] == 32
    assert r.demoted_to_host_blocks == 7 and r.demoted_to_store_blocks == 5 and r.dropped_from_host_blocks == 5


def test_a_full_storage_tier_drops_its_lru_blocks():
    r = replay(reqs(LOG), ReplayConfig(block_size=16, capacity_blocks=9, store_blocks=2))
    # storage keeps the last two of b2 b3 b4 b1 (b4, b1): b1 is found, b2 is not, so the match stops at b1
    assert r.store_tokens[-1] == 16 and r.dropped_from_store_blocks == 4 + 3 - 2


def test_the_lower_tier_match_stops_at_the_first_gap():
    tiers = LowerTiers(host_blocks=10, store_blocks=10)
    k1, k2, k3, k4 = (bytes([i]) * 32 for i in range(4))
    tiers.demote(k1)
    tiers.demote(k3)
    assert tiers.lookup([k1, k2, k3]) == (1, 0)
    tiers.store.put(k2)
    assert tiers.lookup([k1, k2, k3, k4]) == (2, 1)


def test_namespaces_never_share_a_lower_tier_block():
    log = [A, B, A, C, A, B]
    namespaces = ["x", "x", "x", "x", "x", "y"]  # the last b asks from another namespace
    r = replay(reqs(log, namespaces=namespaces), ReplayConfig(block_size=16, capacity_blocks=9, host_blocks=100))
    assert r.host_tokens[-1] == 0


def test_blocks_expired_by_the_ttl_are_dropped_not_demoted():
    ids = list(range(80))
    log = reqs([ids, [9] * 200, ids], timestamps=[0.0, 10.0, 500.0])
    r = replay(log, ReplayConfig(block_size=16, ttl=300.0, host_blocks=100))
    assert r.cached_tokens == [0, 0, 0] and r.host_tokens == [0, 0, 0] and r.expired_blocks > 0


def test_ttft_model_and_when_a_tier_pays():
    r = replay(reqs(LOG), ReplayConfig(block_size=16, capacity_blocks=9, host_blocks=2, store_blocks=100))
    # 1000 tok/s: recomputing a token costs 1 ms. 1 MB of KV per token: host at 10 GB/s loads
    # one in 0.1 ms (pays); storage at 0.5 GB/s in 2 ms (does not: recomputed instead).
    p = predict_tiers(r, [64] * 6, kv_bytes_per_token=10**6, prefill_tokens_per_s=1000.0, host_gbps=10.0,
                      store_gbps=0.5)
    assert p.host_pays is True and p.store_pays is False and p.break_even_gbps == pytest.approx(1.0)
    device_only = [64, 64, 16, 64, 16, 64]  # tokens computed per request, in ms
    assert p.ttft_mean_s_device_only == pytest.approx(sum(device_only) / 6 / 1000)
    with_tiers = device_only[:5] + [64 - 16 + 16 * 0.1]  # b1 loaded from the host; b2, b3 recomputed
    assert p.ttft_mean_s_with_tiers == pytest.approx(sum(with_tiers) / 6 / 1000)
    assert p.ttft_p50_s_device_only == pytest.approx(0.064)
    assert p.host_hit_rate == 16 / 384 and p.store_hit_rate == 32 / 384 and p.device_hit_rate == 96 / 384
    fast = predict_tiers(r, [64] * 6, kv_bytes_per_token=10**6, prefill_tokens_per_s=1000.0, host_gbps=10.0,
                         store_gbps=5.0)
    assert fast.ttft_mean_s_with_tiers == pytest.approx((sum(device_only[:5]) + 64 - 48 + 1.6 + 32 * 0.2) / 6 / 1000)
    unknown = predict_tiers(r, [64] * 6, kv_bytes_per_token=10**6, prefill_tokens_per_s=None, host_gbps=10.0,
                            store_gbps=5.0)
    assert unknown.host_pays is None and unknown.ttft_mean_s_with_tiers is None


def _round_robin_log(tokenizer, num_systems: int = 6, rounds: int = 3, system_tokens: int = 256) -> list[dict]:
    """num_systems system prompts, requests round robin: an LRU pool holding fewer never hits."""
    systems = [generated_logs.system_prompt(tokenizer, system_tokens, seed=40 + k) for k in range(num_systems)]
    qs = generated_logs.questions(num_systems * rounds, seed=7)
    return [{"prompt": f"{systems[i % num_systems]}\n\nUser: {q}\nAssistant:"} for i, q in enumerate(qs)]


def test_analyze_reports_tier_hit_rates_and_findings(advisor_model, tokenizer):
    from radixserve.advisor import requests_from_bodies

    requests = requests_from_bodies(_round_robin_log(tokenizer), tokenizer)
    kv = advisor_model.kv_bytes_per_token
    block_bytes = kv * 16
    config = AdvisorConfig(
        capacity_tokens=3 * 300, prefill_tokens_per_s=500.0,  # room for ~3 of the 6 system prompts
        host_bytes=2 * 17 * block_bytes, store_bytes=100 * 17 * block_bytes, host_gbps=20.0, store_gbps=0.01,
    )
    report = analyze(requests, advisor_model, config)
    r, t = report.result, report.tiers
    assert r.hit_tokens == 0  # round robin over more prompts than the pool holds: LRU never hits
    assert r.host_hit_tokens > 0 and r.store_hit_tokens > 0
    assert t.host_pays and not t.store_pays  # 0.01 GB/s is slower than 500 tok/s of recompute
    kinds = {f.kind for f in report.findings}
    assert {"tier_host", "tier_storage_too_slow"} <= kinds
    text = report.render_text()
    assert "host RAM" in text and "storage" in text and "est. prompt TTFT" in text
    data = report.to_json()["tiers"]
    assert data["host_hit_tokens"] == r.host_hit_tokens and data["store_pays"] is False
    assert sum(data["per_request_store_tokens"]) == r.store_hit_tokens


@pytest.mark.slow
def test_advise_cli_with_tiers(tmp_path: Path, tokenizer):
    log = generated_logs.write_jsonl(_round_robin_log(tokenizer), tmp_path / "log.jsonl")
    out = subprocess.run(
        [sys.executable, "-m", "radixserve", "advise", str(log), "--no-progress", "--json", "--prefill-tokens-per-s",
         "500", "--capacity-tokens", "900", "--host-gb", "0.1", "--store-gb", "1", "--store-gbps", "0.01"],
        capture_output=True, text=True, cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    tiers = json.loads(out.stdout)["tiers"]
    assert tiers["host_gbps"] == 20.0 and tiers["store_gbps"] == 0.01  # the documented default, and the override
    assert tiers["host_hit_rate"] > 0.5 and tiers["device_hit_rate"] == 0.0 and tiers["store_pays"] is False
    assert tiers["ttft_mean_s_with_tiers"] < tiers["ttft_mean_s_device_only"]
