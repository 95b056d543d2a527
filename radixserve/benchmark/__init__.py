"""Serving benchmarks: seeded workloads, an OpenAI-compatible load generator, the caching
on-vs-off suite, and its report (tables, PNGs, docs/benchmarks.md). `radixserve bench` runs them."""

from radixserve.benchmark.loadgen import LoadConfig, LoadRun, RequestResult, run_load, run_load_sync
from radixserve.benchmark.results import Pricing, RunSummary, SuiteResult, summarize
from radixserve.benchmark.workloads import WORKLOADS, BenchRequest, Workload, make_workload

__all__ = [
    "BenchRequest", "LoadConfig", "LoadRun", "Pricing", "RequestResult", "RunSummary", "SuiteResult", "WORKLOADS",
    "Workload", "make_workload", "run_load", "run_load_sync", "summarize",
]
