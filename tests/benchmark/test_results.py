"""Summaries, the cost arithmetic, the report's tables and verdict, PNGs and the docs section
(on synthetic measurements: no server)."""

from __future__ import annotations

import math

import pytest

from radixserve.benchmark.loadgen import LoadConfig, LoadRun, RequestResult
from radixserve.benchmark.report import compare, render_body, verdict, write_report
from radixserve.benchmark.results import (
    Pricing,
    SuiteResult,
    WorkloadResult,
    hit_rate_over_time,
    percentile,
    summarize,
)


def test_cost_bills_cached_input_at_a_discount():
    p = Pricing(input_per_mtok=3.0, output_per_mtok=15.0, cached_discount=0.9)
    # 1M prompt tokens of which 800k cached, 100k output:
    # 200k x $3 + 800k x $0.30 + 100k x $15 per 1M = 0.6 + 0.24 + 1.5
    assert p.cost(1_000_000, 800_000, 100_000) == pytest.approx(2.34)
    assert p.cost(1_000_000, 0, 0) == pytest.approx(3.0)
    assert p.cost(1_000_000, 1_000_000, 0) == pytest.approx(0.3)  # reads at 10% of the price
    assert Pricing(cached_discount=0.0).cost(1000, 1000, 0) == Pricing().cost(1000, 0, 0)  # no discount
    assert Pricing(cached_discount=1.0).cost(1000, 1000, 10) == pytest.approx(10 * 15 / 1e6)  # free reads
    assert Pricing(2.5, 10.0, 0.5).cost(4000, 2000, 100) == pytest.approx((2000 * 2.5 + 2000 * 1.25 + 1000) / 1e6)


def test_pricing_validation():
    with pytest.raises(ValueError):
        Pricing(cached_discount=1.5)
    with pytest.raises(ValueError):
        Pricing(input_per_mtok=-1)
    with pytest.raises(ValueError):
        Pricing().cost(10, 11, 0)


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile(list(map(float, range(101))), 90) == pytest.approx(90.0)
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0


def result(i, start, ttft, end, prompt=1000, cached=0, out=8, prefix=0, error=None):
    return RequestResult(index=i, group="g", shared_prefix_tokens=prefix, start=start, end=end, ttft=ttft,
                         prompt_tokens=prompt, cached_tokens=cached, completion_tokens=out, error=error)


def make_run(label, results, workload="w"):
    return LoadRun(workload=workload, label=label, base_url="http://x", model="m", discipline="closed loop",
                   started_at=0.0, duration=max(r.end for r in results) - min(r.start for r in results),
                   results=results)


def test_summarize_and_per_request_metrics():
    r = result(0, start=1.0, ttft=0.5, end=2.2, out=5)
    assert r.e2e == pytest.approx(1.2)
    assert r.tpot == pytest.approx((1.2 - 0.5) / 4)
    assert result(1, 0, 0.1, 0.2, out=1).tpot is None
    run = make_run("on", [
        result(0, 0.0, 1.0, 1.5, cached=0),
        result(1, 0.0, 0.2, 0.7, cached=960),
        result(2, 1.5, 0.2, 2.0, cached=960),
        result(3, 2.0, None, 2.1, error="HTTP 500"),
    ])
    s = summarize(run, Pricing())
    assert (s.num_requests, s.num_failed) == (4, 1)
    assert s.prompt_tokens == 3000 and s.cached_tokens == 1920 and s.completion_tokens == 24
    assert s.hit_rate == pytest.approx(0.64)
    assert s.prefill_tokens == 1080
    assert s.ttft_p50 == pytest.approx(0.2)
    assert s.request_throughput == pytest.approx(3 / 2.1)
    assert s.output_throughput == pytest.approx(24 / 2.1)
    assert s.cost == pytest.approx(Pricing().cost(3000, 1920, 24))
    assert s.cost_per_1k_requests() == pytest.approx(s.cost * 1000 / 3)
    times, rates = hit_rate_over_time(run.results)
    assert times == [0.7, 1.5, 2.0]
    assert rates == pytest.approx([0.96, 0.48, 0.64])


def test_unknown_cached_tokens_is_not_zero():
    run = make_run("x", [result(0, 0, 0.1, 0.2, cached=None)])
    s = summarize(run)
    assert s.cached_tokens is None and s.hit_rate is None


def synthetic_suite() -> SuiteResult:
    """Shared-prefix workloads that hit, a hostile one that does not (made-up numbers)."""
    workloads = []
    for name, shares in (("system-prompt", True), ("generated-shared-prefix", True), ("cache-hostile", False)):
        w = WorkloadResult(name=name, summary=f"{name} summary", shares_prefix=shares)
        for mode in ("on", "off"):
            hit = shares and mode == "on"
            rs = []
            for i in range(12):
                prefix = (256, 1024)[i % 2] if name == "generated-shared-prefix" else 2000
                ttft = (0.05 if hit and i > 0 else 1.0) * (prefix / 1000)
                rs.append(result(i, start=i * 0.5, ttft=ttft, end=i * 0.5 + ttft + 0.3, prompt=prefix + 20,
                                 cached=(prefix if hit and i > 0 else 0), prefix=prefix))
            w.runs[mode] = make_run(mode, rs, name)
        workloads.append(w)
    return SuiteResult(label="test", command="radixserve bench suite --quick", machine="a test machine",
                       date="2000-01-01", model="m", discipline="closed loop, concurrency 2", seed=0, token_scale=1.0,
                       server_args=["--model", "embedded"], load_before=(1.0, 1.0, 1.0), load_after=(2.0, 1.0, 1.0),
                       pricing=Pricing(), workloads=workloads, duration=60.0)


def test_verdict_states_hit_rates_and_ratios():
    comparisons = compare(synthetic_suite())
    by = {c.name: c for c in comparisons}
    assert by["cache-hostile"].on.hit_rate == 0
    assert by["system-prompt"].on.hit_rate > 0.8
    assert by["system-prompt"].ttft_ratio == pytest.approx(20.0)
    assert by["cache-hostile"].ttft_ratio == pytest.approx(1.0)
    assert by["system-prompt"].cost_saved > 0.5 and by["cache-hostile"].cost_saved == pytest.approx(0.0)
    text = verdict(comparisons)
    assert "Shared-prefix workloads" in text and "20.00x" in text
    assert "cache-hostile" in text and "hit rate 0.0%" in text and "1.00x" in text
    assert "NOT near zero" not in text and "Unexpectedly" not in text


def test_verdict_flags_surprises():
    suite = synthetic_suite()
    hostile = suite.workloads[2].runs["on"]
    for r in hostile.results:
        r.cached_tokens = r.prompt_tokens // 2
    assert "NOT near zero" in verdict(compare(suite))


def test_save_load_round_trip(tmp_path):
    suite = synthetic_suite()
    loaded = SuiteResult.load(suite.save(tmp_path / "r.json"))
    assert loaded == suite


def test_write_report_keeps_other_sections(tmp_path):
    md = tmp_path / "benchmarks.md"
    other = "<!-- BEGIN cpu-prefix-cache -->\n## someone else's\n\nkeep me\n<!-- END cpu-prefix-cache -->"
    md.write_text("# Benchmarks\n\n" + other + "\n")
    suite = synthetic_suite()
    assert write_report(suite, tmp_path) == md
    text = md.read_text()
    assert other in text
    assert "<!-- BEGIN serving-test -->" in text and "<!-- END serving-test -->" in text
    assert "- command: `radixserve bench suite --quick`" in text and "- machine: a test machine" in text
    assert "- date: 2000-01-01" in text
    for png in ("ttft", "hit-rate", "ttft-vs-prefix"):
        path = tmp_path / "bench" / f"serving-test-{png}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert 5_000 < path.stat().st_size < 200_000
        assert f"](bench/serving-test-{png}.png)" in text
    # a second run replaces its own section only
    suite.date = "2000-01-02"
    write_report(suite, tmp_path)
    text = md.read_text()
    assert text.count("<!-- BEGIN serving-test -->") == 1 and "2000-01-02" in text and other in text


def test_render_body_without_gsp_plot(tmp_path):
    suite = synthetic_suite()
    body = render_body(suite, {"ttft": tmp_path / "a.png", "hit-rate": None}, tmp_path)
    assert "](a.png)" in body and "hit rate over time" not in body
    assert "| system-prompt | on |" in body and "| cache-hostile | off |" in body
    assert not math.isnan(compare(suite)[0].on.request_throughput)


def test_load_config_validation():
    assert LoadConfig(base_url="http://h:1/", model="m").api_base == "http://h:1/v1"
    assert LoadConfig(base_url="http://h:1/v1", model="m").api_base == "http://h:1/v1"
    assert LoadConfig(base_url="u", model="m", request_rate=math.inf).discipline == "open loop, all at once"
    assert LoadConfig(base_url="u", model="m", concurrency=3).discipline == "closed loop, concurrency 3"
    with pytest.raises(ValueError):
        LoadConfig(base_url="u", model="m", concurrency=2, request_rate=1.0)
    with pytest.raises(ValueError):
        LoadConfig(base_url="u", model="m", concurrency=0)
    assert LoadConfig(base_url="u", model="m", api_key="k").headers() == {"Authorization": "Bearer k"}
