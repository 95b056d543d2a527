"""`radixserve bench`: argument plumbing (engine options reach both servers, the GPU label), and
the whole suite through the CLI with real `radixserve serve` subprocesses on a tiny dummy model."""

from __future__ import annotations

import pytest

from radixserve.benchmark.results import SuiteResult
from radixserve.cli import build_parser
from radixserve.cli import main as cli_main
from radixserve.benchmark.suite import GPU_NUM_BLOCKS, server_args_for
from radixserve.commands.bench import forwarded_engine_args, suite_config_from_args


def parse(*argv: str):
    return build_parser().parse_args(["bench", "suite", *argv])


def test_engine_options_are_forwarded_to_the_servers():
    args = parse("--device", "cuda", "--model", "dummy:llama3.2-1b", "--kv-cache-memory-gb", "4", "--policy", "lpm",
                 "--server-arg=--max-request-bytes=100000")
    assert forwarded_engine_args(args) == ["--model", "dummy:llama3.2-1b", "--device", "cuda",
                                           "--kv-cache-memory-gb", "4.0", "--policy", "lpm"]
    config = suite_config_from_args(args)
    assert config.label == "gpu"  # its own section and PNGs, beside the CPU ones
    assert config.server_args[-1] == "--max-request-bytes=100000"
    assert config.concurrency == 1 and config.request_rate is None
    assert forwarded_engine_args(parse()) == []
    assert suite_config_from_args(parse()).label == "cpu"


def test_two_servers_on_one_gpu_get_a_fixed_pool():
    gpu = suite_config_from_args(parse("--device", "cuda", "--model", "dummy:llama3.2-1b"))
    assert server_args_for(gpu) == ["--model", "dummy:llama3.2-1b", "--device", "cuda",
                                    "--num-blocks", str(GPU_NUM_BLOCKS)]
    sized = suite_config_from_args(parse("--device", "cuda:1", "--num-blocks", "100"))
    assert server_args_for(sized) == ["--device", "cuda:1", "--num-blocks", "100"]
    cpu = suite_config_from_args(parse("--server-arg=--device=cpu"))
    assert "--num-blocks" not in server_args_for(cpu)


def test_suite_options():
    config = suite_config_from_args(parse("--rate", "inf", "--workloads", "rag", "cache-hostile", "--label", "x",
                                          "--cached-discount", "0.5"))
    assert config.request_rate == float("inf") and config.concurrency is None
    assert config.workloads == ["rag", "cache-hostile"] and config.label == "x"
    assert config.pricing.cached_discount == 0.5
    assert config.time_limit is None and config.checkpoint is None and config.notes == []
    run = suite_config_from_args(parse("--time-limit", "300", "--note", "a", "--note", "b", "--command", "bash x.sh",
                                       "--json", "r.json"))
    assert run.time_limit == 300 and run.notes == ["a", "b"] and run.command == "bash x.sh"
    assert str(run.checkpoint) == "r.json"  # --json is rewritten after every workload
    with pytest.raises(ValueError, match="drop --no-prefix-caching"):
        suite_config_from_args(parse("--no-prefix-caching"))
    with pytest.raises(SystemExit):
        parse("--workloads", "nope")
    with pytest.raises(ValueError, match="both on_url and off_url"):
        suite_config_from_args(parse("--on-url", "http://127.0.0.1:1"))


@pytest.mark.slow
def test_suite_end_to_end_with_server_subprocesses(tmp_path, capsys):
    """Starts two `radixserve serve` processes (dummy:tiny loads in a second), runs two quick
    workloads, writes benchmarks.md + PNGs + JSON, then re-renders the JSON elsewhere."""
    out = tmp_path / "docs"
    rc = cli_main(["bench", "suite", "--quick", "--model", "dummy:tiny", "--workloads", "generated-shared-prefix",
                   "cache-hostile", "--out", str(out), "--json", str(tmp_path / "r.json"), "--no-progress",
                   "--server-threads", "1"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "| generated-shared-prefix |" in printed and "| cache-hostile |" in printed
    text = (out / "benchmarks.md").read_text()
    assert "<!-- BEGIN serving-cpu -->" in text and "`--model dummy:tiny`" in text
    assert len(list((out / "bench").glob("serving-cpu-*.png"))) == 3
    suite = SuiteResult.load(tmp_path / "r.json")
    by = {w.name: w for w in suite.workloads}
    assert all(r.ok for w in suite.workloads for run in w.runs.values() for r in run.results)
    assert sum(r.cached_tokens for r in by["generated-shared-prefix"].runs["on"].results) > 0
    assert all(r.cached_tokens == 0 for r in by["cache-hostile"].runs["on"].results)
    assert all(r.cached_tokens == 0 for w in suite.workloads for r in w.runs["off"].results)

    again = tmp_path / "again"
    assert cli_main(["bench", "report", str(tmp_path / "r.json"), "--out", str(again)]) == 0
    assert f"- machine: {suite.machine}" in (again / "benchmarks.md").read_text()
