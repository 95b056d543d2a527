"""`radixserve bench`: the serving benchmark suite, a load generator, and its report.

    radixserve bench suite [--quick] [--workloads ...] [--out docs/] [engine options for the servers]
    radixserve bench load --base-url URL --model NAME --workload NAME [--rate R | --concurrency C]
    radixserve bench report RESULTS.json [--out docs/]
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from radixserve.commands.common import add_engine_args

_DOCS = Path(__file__).resolve().parents[2] / "docs"
_NOT_FORWARDED = {"no_prefix_caching"}  # the suite itself turns caching off for the second server


def register(subparsers: argparse._SubParsersAction) -> None:
    from radixserve.benchmark.workloads import DEFAULT_WORKLOADS, WORKLOADS

    p = subparsers.add_parser("bench", help="serving benchmarks: the on-vs-off suite, a load generator, reports",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="bench_command", required=True)

    s = sub.add_parser(
        "suite", help="every workload against a caching-on and a caching-off server; writes docs/benchmarks.md",
        description="Start two radixserve servers (prefix caching on / off) with the given engine options, run "
                    "every workload against both, and write the tables and PNGs. Example on a GPU: "
                    "radixserve bench suite --device cuda --model dummy:llama3.2-1b --scale 4",
    )
    s.add_argument("--workloads", nargs="+", default=list(DEFAULT_WORKLOADS), choices=list(WORKLOADS), metavar="NAME",
                   help=f"which workloads (default: all but agent): {', '.join(WORKLOADS)}")
    s.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in a minute or two")
    s.add_argument("--scale", type=float, default=1.0, help="multiply every workload's request count (default 1)")
    # Concurrency 1 by default: TTFT is then the prefill the cache saves, not also queueing behind
    # another client's prefill (with equal-length requests, two closed-loop clients lock into
    # phases that move TTFT and TPOT around between otherwise identical runs).
    _add_arrivals(s, default_concurrency=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--label", default=None,
                   help="names the docs section and PNGs: serving-<label> (default: cpu, or gpu with --device cuda)")
    s.add_argument("--out", type=Path, default=_DOCS,
                   help="where benchmarks.md is (its section is replaced) and bench/*.png go (default: docs/)")
    s.add_argument("--no-docs", action="store_true", help="do not write benchmarks.md or PNGs (print the tables)")
    s.add_argument("--json", type=Path, default=None,
                   help="also save every measurement to this JSON file (rewritten after every workload)")
    s.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no workload that would likely end later than this many seconds after the start "
                        "(server start-up included); the report names the ones skipped")
    s.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a line for the report's notes; repeatable")
    s.add_argument("--command", default=None, metavar="TEXT",
                   help="the command the report names for reproducing the run (default: this command line; "
                        "bench/device_suite.sh gives its own)")
    s.add_argument("--server-threads", type=int, default=None,
                   help="torch threads per server (OMP_NUM_THREADS); default: torch's own choice")
    s.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra `radixserve serve` option(s) for both servers, e.g. --server-arg=--max-num-seqs=8")
    s.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for a server to load")
    s.add_argument("--on-url", default=None, help="use this running server as the caching-on one (no servers started)")
    s.add_argument("--off-url", default=None, help="use this running server as the caching-off one")
    s.add_argument("--served-model", default=None, help="model name to send (default: the first /v1/models lists)")
    s.add_argument("--api-key", default=None)
    s.add_argument("--no-calibrate", action="store_true",
                   help="size prompts for the embedded tokenizer instead of measuring the server's")
    _add_client_opts(s)
    _add_pricing(s)
    add_engine_args(s)  # forwarded to both servers
    s.set_defaults(func=run_suite_command)

    ld = sub.add_parser(
        "load", help="drive one OpenAI-compatible server (any engine) with one workload",
        description="Send one workload to any OpenAI-compatible server and print TTFT, TPOT, throughput, hit rate "
                    "and cost. Works against radixserve, vLLM, SGLang or a hosted API.",
    )
    ld.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000 (with or without /v1)")
    ld.add_argument("--model", required=True, help="model name to send")
    ld.add_argument("--workload", required=True, choices=list(WORKLOADS))
    ld.add_argument("--api-key", default=None)
    _add_arrivals(ld, default_concurrency=None)
    ld.add_argument("--num-requests", type=int, default=None,
                    help="how many requests (default: the workload's own count; sessions/groups scale to fit)")
    ld.add_argument("--quick", action="store_true", help="the workload's tiny sizes")
    ld.add_argument("--seed", type=int, default=0)
    ld.add_argument("--calibrate", action="store_true",
                    help="measure the server's tokenizer first so prompt lengths match in its tokens")
    ld.add_argument("--reset-cache", action="store_true",
                    help="empty the server's prefix cache first (/reset_prefix_cache or /flush_cache)")
    ld.add_argument("--warm-up", action="store_true", help="send a few short unrelated requests first")
    ld.add_argument("--json", type=Path, default=None, help="save the per-request measurements to this JSON file")
    _add_client_opts(ld)
    _add_pricing(ld)
    ld.set_defaults(func=run_load_command)

    r = sub.add_parser("report", help="re-render tables, PNGs and the docs section from a suite's --json file",
                       description="Render a saved suite result (e.g. one measured on the GPU machine) into "
                                   "benchmarks.md and PNGs here, keeping its own command, machine and date.")
    r.add_argument("results", type=Path)
    r.add_argument("--out", type=Path, default=_DOCS)
    r.set_defaults(func=run_report_command)


def _add_arrivals(p: argparse.ArgumentParser, default_concurrency: int | None) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--concurrency", type=int, default=None,
                   help="closed loop: this many clients, each waiting for its reply "
                        f"(default {default_concurrency or 1})")
    g.add_argument("--rate", type=float, default=None,
                   help="open loop: Poisson arrivals at this many requests/s ('inf': all at once)")
    p.set_defaults(default_concurrency=default_concurrency or 1)


def _add_client_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="do not send ignore_eos (for servers that reject it); output lengths then vary")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_pricing(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cost column")
    g.add_argument("--price-input", type=float, default=3.0, help="$ per million input tokens (default 3)")
    g.add_argument("--price-output", type=float, default=15.0, help="$ per million output tokens (default 15)")
    g.add_argument("--cached-discount", type=float, default=0.9,
                   help="fraction of the input price a cached token saves (default 0.9: reads cost 10%%)")


def _pricing(args: argparse.Namespace):
    from radixserve.benchmark.results import Pricing

    return Pricing(args.price_input, args.price_output, args.cached_discount)


def _arrivals(args: argparse.Namespace) -> tuple[int | None, float | None]:
    if args.rate is not None:
        return None, args.rate
    return args.concurrency or args.default_concurrency, None


def forwarded_engine_args(parser_args: argparse.Namespace) -> list[str]:
    """The engine options given on the command line, as `radixserve serve` arguments."""
    defaults = vars(_engine_defaults())
    out: list[str] = []
    for dest, default in defaults.items():
        value = getattr(parser_args, dest)
        if dest in _NOT_FORWARDED or value == default:
            continue
        flag = "--" + dest.replace("_", "-")
        if isinstance(value, bool):
            if value:
                out.append(flag)
        else:
            out += [flag, str(value)]
    return out


def _engine_defaults() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return p.parse_args([])


def _command_line() -> str:
    # What a reader types to reproduce the section: the console script (or bench/ wrapper) and
    # its arguments, as run from the project root.
    argv = sys.argv
    if argv[1:2] == ["bench"]:
        return shlex.join([".venv/bin/radixserve", *argv[1:]])
    if argv and argv[0].endswith("bench_serving.py"):
        return shlex.join([".venv/bin/python", "bench/bench_serving.py", *argv[1:]])
    return "radixserve bench suite"


def suite_config_from_args(args: argparse.Namespace):
    """The SuiteConfig a `bench suite` command line means (engine options go to both servers)."""
    from radixserve.benchmark.report import bench_report_module
    from radixserve.benchmark.suite import SuiteConfig

    if args.no_prefix_caching:
        raise ValueError("the suite runs one server with prefix caching and one without; drop --no-prefix-caching")
    concurrency, rate = _arrivals(args)
    external = args.on_url is not None
    machine = f"external servers ({args.on_url}, {args.off_url})" if external else \
        bench_report_module().machine_description()
    return SuiteConfig(
        workloads=list(args.workloads), quick=args.quick, scale=args.scale, concurrency=concurrency,
        request_rate=rate, seed=args.seed,
        label=args.label or ("gpu" if args.device.startswith("cuda") else "cpu"),
        server_args=forwarded_engine_args(args) + list(args.server_arg), server_threads=args.server_threads,
        startup_timeout=args.startup_timeout, on_url=args.on_url, off_url=args.off_url, model=args.served_model,
        api_key=args.api_key, calibrate=not args.no_calibrate, ignore_eos=not args.no_ignore_eos,
        pricing=_pricing(args), progress=not args.no_progress, command=args.command or _command_line(),
        machine=machine, notes=list(args.note), time_limit=args.time_limit, checkpoint=args.json,
    )


def run_suite_command(args: argparse.Namespace) -> int:
    from radixserve.benchmark.report import compare, detail_table, summary_table, verdict, write_report
    from radixserve.benchmark.suite import run_suite

    config = suite_config_from_args(args)
    # A SIGTERM (e.g. `timeout` around the run) unwinds like Ctrl-C: the servers are stopped and
    # --json keeps the workloads finished so far.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        suite = run_suite(config)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.json is not None:
        print(f"saved {suite.save(args.json)}", file=sys.stderr)
    comparisons = compare(suite)
    print(verdict(comparisons), summary_table(comparisons), detail_table(comparisons), sep="\n\n")
    if not args.no_docs:
        md = write_report(suite, args.out)
        print(f"\nwrote the section serving-{suite.label} of {md} and its PNGs under {args.out / 'bench'}",
              file=sys.stderr)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_load_command(args: argparse.Namespace) -> int:
    from radixserve.benchmark.loadgen import LoadConfig, calibrate_token_scale, reset_prefix_cache, run_load_sync, \
        warm_up
    from radixserve.benchmark.report import fmt_dollars, fmt_rate, fmt_seconds
    from radixserve.benchmark.results import summarize
    from radixserve.benchmark.workloads import make_workload

    concurrency, rate = _arrivals(args)
    ignore_eos = not args.no_ignore_eos
    token_scale = calibrate_token_scale(args.base_url, args.model, args.api_key) if args.calibrate else 1.0
    workload = make_workload(args.workload, seed=args.seed, token_scale=token_scale, quick=args.quick)
    requests = workload.build()
    if args.num_requests is not None:
        if args.num_requests < 1:
            raise ValueError("--num-requests must be >= 1")
        workload = make_workload(args.workload, seed=args.seed, token_scale=token_scale, quick=args.quick,
                                 scale=args.num_requests / len(requests))
        requests = workload.build()[: args.num_requests]
    if args.warm_up:
        warm_up(args.base_url, args.model, args.api_key, ignore_eos=ignore_eos)
    if args.reset_cache and not reset_prefix_cache(args.base_url, args.api_key):
        print("note: the server has no prefix-cache reset endpoint; its cache may be warm", file=sys.stderr)
    config = LoadConfig(base_url=args.base_url, model=args.model, api_key=args.api_key, concurrency=concurrency,
                        request_rate=rate, seed=args.seed,
                        ignore_eos=ignore_eos, progress=not args.no_progress, description=args.workload)
    run = run_load_sync(requests, config, label=args.base_url)
    s = summarize(run, _pricing(args))
    print(f"{args.workload}: {workload.summary()}; {config.discipline}")
    print(f"  requests        {s.num_requests} ({s.num_failed} failed) in {s.duration:.1f} s")
    print(f"  TTFT            p50 {fmt_seconds(s.ttft_p50)}  p90 {fmt_seconds(s.ttft_p90)}  "
          f"p99 {fmt_seconds(s.ttft_p99)}")
    print(f"  TPOT / e2e      p50 {fmt_seconds(s.tpot_p50)} / p50 {fmt_seconds(s.e2e_p50)}  "
          f"p99 {fmt_seconds(s.e2e_p99)}")
    print(f"  throughput      {s.request_throughput:.2f} req/s, {s.output_throughput:.1f} output tok/s")
    print(f"  prompt tokens   {s.prompt_tokens:,}, cached {s.cached_tokens if s.cached_tokens is not None else 'n/a'}"
          f" (hit rate {fmt_rate(s.hit_rate)})")
    print(f"  cost            {fmt_dollars(s.cost)} ({fmt_dollars(s.cost_per_1k_requests())} per 1k requests)")
    for failed in [r for r in run.results if not r.ok][:3]:
        print(f"  failed #{failed.index}: {failed.error}")
    if args.json is not None:
        import dataclasses
        import json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dataclasses.asdict(run), indent=1))
    return 1 if s.num_failed == s.num_requests else 0


def run_report_command(args: argparse.Namespace) -> int:
    from radixserve.benchmark.report import write_report
    from radixserve.benchmark.results import SuiteResult

    md = write_report(SuiteResult.load(args.results), args.out)
    print(f"wrote {md}", file=sys.stderr)
    return 0
