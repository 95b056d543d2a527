"""The load generator and the suite against real radixserve servers (embedded model, small numbers).

Timings are never asserted as numbers (the machine is shared); only that every per-request
metric is present and consistent, and what the prefix cache reports.
"""

from __future__ import annotations

import math

import pytest

from radixserve.benchmark.loadgen import LoadConfig, reset_prefix_cache, run_load_sync, served_model
from radixserve.benchmark.report import compare, write_report
from radixserve.benchmark.results import SuiteResult, percentile
from radixserve.benchmark.suite import SuiteConfig, run_suite
from radixserve.benchmark.workloads import make_workload
from radixserve.cli import main as cli_main

MODEL = "SmolLM2-135M-Instruct"
SMALL = {  # quick workloads, smaller still: prefill is slow on a busy CPU
    "generated-shared-prefix": {"prompts_per_group": 3, "prefix_tokens": (48, 112), "question_tokens": 12},
    "cache-hostile": {"num_requests": 4, "system_tokens": 96},
    "multi-turn": {"num_conversations": 3, "turns": 3},
}


def small(name: str, **kw):
    return make_workload(name, quick=True, **{**SMALL.get(name, {}), **kw})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tmp_path_factory.mktemp("suite") / "checkpoint.json"


@pytest.fixture(scope="module")
def suite(bench_servers, checkpoint):
    """One suite run (external-server mode) over the two in-process servers."""
    config = SuiteConfig(workloads=["generated-shared-prefix", "cache-hostile"], quick=True, overrides=SMALL,
                         on_url=bench_servers["on"], off_url=bench_servers["off"], progress=False,
                         warmup_tokens=32, command="pytest", machine="test", checkpoint=checkpoint)
    return run_suite(config)


def check_metrics(run, max_tokens: int | None) -> None:
    """max_tokens None: each request's own (a workload of mixed lengths)."""
    assert run.results and all(r.ok for r in run.results), [r.error for r in run.results]
    for r in run.results:
        assert 0 < r.ttft <= r.e2e
        if max_tokens is not None:
            assert r.completion_tokens == max_tokens  # ignore_eos: fixed output length
            assert r.tpot is not None and 0 < r.tpot < r.e2e
        assert r.prompt_tokens > 0 and r.cached_tokens is not None and 0 <= r.cached_tokens < r.prompt_tokens
    assert run.duration >= max(r.e2e for r in run.results)


def test_suite_shared_prefix_hits_and_hostile_does_not(suite):
    by = {w.name: w for w in suite.workloads}
    assert suite.model == MODEL and suite.token_scale == pytest.approx(1.0, abs=0.05)
    for w in suite.workloads:
        for mode in ("on", "off"):
            check_metrics(w.runs[mode], max_tokens=4)
        # the same requests, in the same order, to both servers
        assert [r.prompt_tokens for r in w.runs["on"].results] == [r.prompt_tokens for r in w.runs["off"].results]
        assert all(r.cached_tokens == 0 for r in w.runs["off"].results)
    gsp = by["generated-shared-prefix"].runs["on"].results
    assert sum(r.cached_tokens for r in gsp) > 0
    hits = [r for r in gsp if r.cached_tokens > 0]
    assert len(hits) >= 2
    assert all(r.cached_tokens >= r.shared_prefix_tokens - 16 for r in hits)  # whole blocks of the prefix
    assert all(r.cached_tokens == 0 for r in by["cache-hostile"].runs["on"].results)
    comparisons = {c.name: c for c in compare(suite)}
    assert comparisons["generated-shared-prefix"].on.hit_rate > 0.3
    assert comparisons["cache-hostile"].on.hit_rate == 0.0


def test_suite_checkpoint_after_each_workload(suite, checkpoint):
    saved = SuiteResult.load(checkpoint)  # what a run killed after its last workload leaves
    assert [w.name for w in saved.workloads] == [w.name for w in suite.workloads]
    assert saved.notes == ["partial results: 2 of 2 workloads"] and suite.notes == []


def test_suite_time_limit_skips_workloads(bench_servers, tmp_path):
    config = SuiteConfig(workloads=["cache-hostile", "rag"], quick=True, overrides=SMALL, on_url=bench_servers["on"],
                         off_url=bench_servers["off"], progress=False, warmup_tokens=32, time_limit=0,
                         notes=["launched by a test"], checkpoint=tmp_path / "r.json")
    result = run_suite(config)
    assert result.workloads == [] and not (tmp_path / "r.json").exists()
    assert result.notes == ["launched by a test",
                            "the run stopped at its time limit (0 s) before cache-hostile, rag"]


def test_suite_report(suite, tmp_path):
    md = write_report(suite, tmp_path)
    text = md.read_text()
    assert "<!-- BEGIN serving-cpu -->" in text and "cache-hostile" in text and "TTFT off/on" in text
    assert len(list((tmp_path / "bench").glob("serving-cpu-*.png"))) == 3


def test_open_loop_rate_and_reset(bench_servers):
    url = bench_servers["on"]
    assert served_model(url) == MODEL
    requests = small("generated-shared-prefix").build()
    assert reset_prefix_cache(url)
    config = LoadConfig(base_url=url + "/v1", model="embedded", request_rate=20.0, seed=1, progress=False)
    run = run_load_sync(requests, config, "on")
    check_metrics(run, max_tokens=4)
    assert run.discipline == "open loop, Poisson 20 req/s"
    starts = [r.start for r in run.results]
    assert starts == sorted(starts)  # sent in order, at (seeded) Poisson times


def test_sessions_run_turns_in_order(bench_servers):
    requests = small("multi-turn").build()
    config = LoadConfig(base_url=bench_servers["on"], model=MODEL, concurrency=3, progress=False)
    run = run_load_sync(requests, config, "on")
    check_metrics(run, max_tokens=4)
    by_key = {(r.session, r.turn): r for r in run.results}
    for (session, turn), r in by_key.items():
        if turn > 0:
            assert r.start >= by_key[(session, turn - 1)].end  # a turn waits for the previous reply
    later = [r for r in run.results if r.turn > 0]
    assert all(r.cached_tokens > 0 for r in later)  # the earlier turns are read from the cache


def test_head_of_line_requests_follow_their_timeline_and_are_reported(bench_servers, tmp_path):
    """Each request leaves at its send_at (whatever the discipline); the report states the short
    requests' TTFT against the long prompt's."""
    config = SuiteConfig(workloads=["head-of-line"], quick=True, on_url=bench_servers["on"],
                         off_url=bench_servers["off"], progress=False, warmup_tokens=32, concurrency=1)
    suite = run_suite(config)
    (w,) = suite.workloads
    assert w.kind == "head-of-line"
    requests = make_workload("head-of-line", quick=True).build()
    for mode in ("on", "off"):
        results = w.runs[mode].results
        check_metrics(w.runs[mode], max_tokens=None)
        assert [r.group for r in results] == ["long", "short", "short"]
        for req, r in zip(requests, results):  # sent on the timeline, not by the closed loop
            assert req.send_at <= r.start < req.send_at + 5.0
    (c,) = compare(suite)
    short_p50, long_ttft, before = c.head_of_line["on"]
    assert short_p50 == percentile([r.ttft for r in w.runs["on"].results[1:]], 50)
    assert long_ttft == w.runs["on"].results[0].ttft
    assert before in ("0 of 2", "1 of 2", "2 of 2")
    text = write_report(suite, tmp_path).read_text()
    assert "**head-of-line** (short requests arriving while an uncached long prompt prefills)" in text
    assert "negative control" not in text  # not reported as the cache-hostile control


def test_a_timeline_sends_requests_concurrently_whatever_the_concurrency(bench_servers):
    """A request sent on the timeline is in flight at once, not queued behind the client's
    connection limit: the short request's first token comes while the long one still decodes."""
    requests = make_workload("head-of-line", quick=True, num_short=1, delay=0.0, long_output_tokens=40).build()
    config = LoadConfig(base_url=bench_servers["off"], model=MODEL, concurrency=1, progress=False)
    long, short = run_load_sync(requests, config, "off").results
    assert long.ok and short.ok and long.completion_tokens == 40
    assert short.start + short.ttft < long.end


def test_failures_are_recorded_not_raised(bench_servers):
    requests = small("cache-hostile", num_requests=2).build()
    config = LoadConfig(base_url=bench_servers["on"], model="no-such-model", concurrency=2, progress=False)
    run = run_load_sync(requests, config)
    assert [r.ok for r in run.results] == [False, False]
    assert all("HTTP 404" in r.error for r in run.results)
    dead = LoadConfig(base_url="http://127.0.0.1:9", model=MODEL, request_rate=math.inf, progress=False)
    assert all(not r.ok for r in run_load_sync(requests, dead).results)


def test_bench_load_command(bench_servers, capsys, tmp_path):
    out = tmp_path / "run.json"
    rc = cli_main(["bench", "load", "--base-url", bench_servers["on"], "--model", "embedded", "--workload",
                   "few-shot", "--quick", "--num-requests", "3", "--concurrency", "2", "--no-progress",
                   "--reset-cache", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "requests        3 (0 failed)" in text and "hit rate" in text and "TTFT" in text
    assert out.exists()
