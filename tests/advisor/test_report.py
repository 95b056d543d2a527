"""The terminal report, the JSON, the PNG and the `radixserve advise` command, on small logs."""

from __future__ import annotations

import json

import pytest

from radixserve.advisor import AdvisorConfig, analyze, read_log
from radixserve.advisor.plot import render_png
from radixserve.advisor.report import human_bytes
from radixserve.cli import main
from tests.advisor import generated_logs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def small_logs(tmp_path_factory, tokenizer):
    """Small versions of the generated logs (300-token system prompts), as files."""
    folder = tmp_path_factory.mktemp("logs")
    g = generated_logs
    return {
        "shared": g.write_jsonl(g.shared_system_log(tokenizer, 6, 300), folder / "shared.jsonl"),
        "request_id": g.write_jsonl(g.request_id_log(tokenizer, 6, 300), folder / "ids.jsonl"),
        "interleaved": g.write_jsonl(g.interleaved_log(tokenizer, 12, 100), folder / "inter.jsonl"),
    }


@pytest.fixture(scope="module")
def id_report(small_logs, advisor_model):
    log = read_log(small_logs["request_id"], advisor_model.tokenizer)
    config = AdvisorConfig(capacity_tokens=4096, prefill_tokens_per_s=1000.0, price_per_mtok=2.0, min_prefix_tokens=1024)
    return analyze(log.requests, advisor_model, config, log=log)


def test_json_schema(id_report):
    data = json.loads(json.dumps(id_report.to_json()))  # serialisable as is
    assert data["schema_version"] == 1
    assert set(data) >= {"log", "model", "cache", "prediction", "savings", "capacity_curve", "top_prefixes", "findings"}
    assert data["log"]["requests"] == 6 and data["log"]["apis"] == {"messages": 6} and data["log"]["has_timestamps"]
    model = data["model"]
    assert model["kv_formula"] == {"layers": 30, "kv_heads": 3, "head_dim": 64, "dtype": "float32", "dtype_bytes": 4,
                                   "bytes_per_token": 46080}
    assert model["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4 and model["kv_bytes_per_block"] == 46080 * 16
    cache = data["cache"]
    assert cache["capacity_tokens"] == 4096 and cache["capacity_bytes"] == 4096 * 46080 and cache["eviction"] == "lru"
    pred = data["prediction"]
    assert 0.0 <= pred["hit_rate"] <= 1.0 and pred["hit_tokens"] <= pred["query_tokens"]
    assert len(pred["per_request_cached_tokens"]) == 6
    assert pred["hit_rate_after_fixes"] > pred["hit_rate"]
    savings = data["savings"]
    assert savings["prefill_rate_source"] == "given" and savings["prefill_tokens_per_s"] == 1000.0
    assert savings["ttft_saved_s_total"] == pytest.approx(pred["hit_tokens"] / 1000.0)
    assert savings["input_cost_without_cache"] == pytest.approx(pred["query_tokens"] * 2.0 / 1e6)
    assert savings["cost_saved_fraction"] == pytest.approx(pred["hit_rate"] * 0.9)
    curve = data["capacity_curve"]
    assert curve["points"] and all({"capacity_tokens", "capacity_bytes", "hit_rate"} <= set(p) for p in curve["points"])
    caps = [p["capacity_tokens"] for p in curve["points"]]
    assert caps == sorted(caps)
    kinds = [f["kind"] for f in data["findings"]]
    assert kinds[0] == "early_divergence"
    finding = data["findings"][0]
    for key in ("severity", "title", "detail", "fix", "requests", "tokens_lost", "divergence_token", "shared_tokens",
                "examples", "hit_rate_after_fix"):
        assert key in finding
    for prefix in data["top_prefixes"]:
        assert prefix["kv_bytes"] == prefix["tokens"] * 46080


def test_terminal_report(id_report):
    text = id_report.render_text()
    for heading in ("Prediction", "Capacity curve", "Biggest shared prefixes", "Findings"):
        assert f"\n{heading}" in text
    assert "2 x 30 layers x 3 kv heads x 64 head dim x 4 B (float32) = 46,080 B/token" in text
    assert "capacity 4,096 tokens" in text
    assert "[HIGH]" in text and "diverge early, at token 7" in text and "Fix: Move the varying part" in text
    assert "Predicted hit rate after the fix" in text
    assert "est. TTFT saved" in text and "1,000 tok/s (given)" in text
    assert "$2/Mtok" in text


def test_png_is_written(id_report, tmp_path):
    path = render_png(id_report, tmp_path / "out" / "tree.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[0] > 500 and image.shape[1] > 800


def test_cli_text_json_and_png(small_logs, tmp_path, capsys):
    png = tmp_path / "tree.png"
    code = main(["advise", str(small_logs["interleaved"]), "--capacity-tokens", "512", "--prefill-tokens-per-s", "500",
                 "--json", "--png", str(png), "--no-progress", "--curve-points", "6"])
    assert code == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["cache"]["capacity_tokens"] == 512
    assert data["log"]["requests"] == 12
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert "wrote" in captured.err

    code = main(["advise", str(small_logs["shared"]), "--capacity-gb", "0.05", "--no-measure", "--no-progress",
                 "--block-size", "32", "--ttl", "600", "--cached-discount", "0.5"])
    assert code == 0
    text = capsys.readouterr().out
    assert "radixserve prompt-cache advisor" in text
    assert "32-token blocks" in text and "TTL 600 s" in text
    blocks = int(0.05 * 2**30) // (46080 * 32)
    assert f"capacity {blocks * 32:,} tokens" in text
    assert "at a 50% cached-token discount" in text
    assert "unknown: give --prefill-tokens-per-s" in text


def test_cli_errors(tmp_path, capsys):
    assert main(["advise", str(tmp_path / "missing.jsonl"), "--no-measure"]) == 2
    assert "not found" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["advise", str(empty), "--no-measure"]) == 2
    assert "no usable request" in capsys.readouterr().err


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 2**30) == "3.0 GiB"


def test_model_info_without_weights(tmp_path):
    from radixserve.advisor import load_model_info
    from radixserve.errors import ModelLoadError

    tiny = load_model_info("dummy:tiny", "bfloat16")
    assert tiny.model_id == "dummy:tiny" and tiny.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2
    assert tiny.kv_formula()["dtype_bytes"] == 2
    with pytest.raises(ModelLoadError):
        load_model_info(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError):
        load_model_info("dummy:nonexistent")


def test_advise_counts_the_servers_cache_reports(tmp_path, advisor_model):
    """Report lines (RequestLogWriter.write_cache_report) are not requests: advise sums their reasons."""
    from radixserve.request_log import RequestLogWriter

    path = tmp_path / "with_reports.jsonl"
    with RequestLogWriter(path) as writer:
        for i, (reason, missed) in enumerate([("not_cached", 40), ("full_hit", 5), ("evicted", 33), ("evicted", 17)]):
            writer.write("completions", {"model": "m", "prompt": f"request number {i} " * 20})
            writer.write_cache_report(f"cmpl-{i}", {"reason": reason, "missed_tokens": missed})
    log = read_log(path, advisor_model.tokenizer)
    assert len(log.requests) == 4 and not log.skipped
    report = analyze(log.requests, advisor_model, AdvisorConfig(prefill_tokens_per_s=1000.0), log=log)
    observed = report.to_json()["observed_cache_reasons"]
    assert observed == {"evicted": {"requests": 2, "missed_tokens": 50}, "not_cached": {"requests": 1, "missed_tokens": 40},
                        "full_hit": {"requests": 1, "missed_tokens": 5}}
    text = report.render_text()
    assert "Why requests missed" in text and "evicted" in text.split("Why requests missed")[1]
