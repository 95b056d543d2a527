"""The suite's report: Markdown tables, the verdict sentences, the PNGs, and the section of
docs/benchmarks.md (written with bench/report.py's update_section, like every other bench)."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from radixserve.benchmark.plots import plot_hit_rate_over_time, plot_ttft_distribution, plot_ttft_vs_prefix
from radixserve.benchmark.results import RunSummary, SuiteResult, percentile, summarize

# Below this hit rate the control counts as "near zero"; above SHARED_HIGH a shared-prefix
# workload counts as "high". The report states the measured numbers either way.
HOSTILE_MAX = 0.05
SHARED_HIGH = 0.5


def fmt_seconds(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def fmt_rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def fmt_dollars(x: float | None) -> str:
    return "-" if x is None else f"${x:,.2f}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}x"


def ratio(off: float | None, on: float | None) -> float | None:
    if off is None or on is None or on <= 0:
        return None
    return off / on


@dataclass(slots=True)
class Comparison:
    """One workload, caching on vs off."""

    name: str
    shares_prefix: bool
    on: RunSummary
    off: RunSummary
    kind: str = "shared-prefix"  # Workload.kind
    # head-of-line only, per mode: (TTFT p50 of the short requests, TTFT of the long one,
    # "k of n" short requests served before the long one's first token)
    head_of_line: dict[str, tuple[float | None, float | None, str]] | None = None

    @property
    def ttft_ratio(self) -> float | None:
        """TTFT p50 off / on: how many times faster the first token comes with caching."""
        return ratio(self.off.ttft_p50, self.on.ttft_p50)

    @property
    def cost_saved(self) -> float | None:
        if self.on.cost is None or self.off.cost is None or self.off.cost == 0:
            return None
        return 1 - self.on.cost / self.off.cost


def compare(suite: SuiteResult) -> list[Comparison]:
    out = []
    for w in suite.workloads:
        if "on" in w.runs and "off" in w.runs:
            kind = w.kind or ("shared-prefix" if w.shares_prefix else "control")
            hol = {mode: _head_of_line(w.runs[mode]) for mode in ("on", "off")} if kind == "head-of-line" else None
            out.append(Comparison(w.name, w.shares_prefix, summarize(w.runs["on"], suite.pricing),
                                  summarize(w.runs["off"], suite.pricing), kind, hol))
    return out


def _head_of_line(run) -> tuple[float | None, float | None, str]:
    """(TTFT p50 of the run's "short" requests, TTFT of its "long" one, "k of n": how many short
    requests had their first token before the long one had its own)."""
    ok = [r for r in run.ok_results if r.ttft is not None]
    short = [r for r in ok if r.group == "short"]
    long = next((r for r in ok if r.group == "long"), None)
    if long is None:
        return percentile([r.ttft for r in short], 50), None, "?"
    before = sum(1 for r in short if r.start + r.ttft < long.start + long.ttft)
    return percentile([r.ttft for r in short], 50), long.ttft, f"{before} of {len(short)}"


def _table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(comparisons: list[Comparison]) -> str:
    rows = []
    for c in comparisons:
        ok = c.on.num_requests - c.on.num_failed
        rows.append([
            c.name, c.on.num_requests, f"{c.on.prompt_tokens / ok:,.0f}" if ok else "-",
            fmt_rate(c.on.hit_rate), fmt_rate(c.off.hit_rate),
            fmt_seconds(c.on.ttft_p50), fmt_seconds(c.off.ttft_p50), f"**{fmt_ratio(c.ttft_ratio)}**",
            f"{c.on.cached_tokens or 0:,}", f"{fmt_dollars(c.on.cost_per_1k_requests())} vs "
            f"{fmt_dollars(c.off.cost_per_1k_requests())}",
            "-" if c.cost_saved is None else f"{c.cost_saved:.0%}",
        ])
    return _table(["workload", "requests", "prompt tokens / req", "hit rate on", "hit rate off", "TTFT p50 on",
                   "TTFT p50 off", "TTFT off/on", "prefill tokens saved", "cost / 1k req (on vs off)",
                   "cost saved"], rows)


def detail_table(comparisons: list[Comparison]) -> str:
    rows = []
    for c in comparisons:
        for mode, s in (("on", c.on), ("off", c.off)):
            rows.append([
                c.name, mode, fmt_seconds(s.ttft_p50), fmt_seconds(s.ttft_p90), fmt_seconds(s.ttft_p99),
                fmt_seconds(s.tpot_p50), fmt_seconds(s.e2e_p50), f"{s.request_throughput:.2f}",
                f"{s.output_throughput:.1f}", fmt_rate(s.hit_rate), f"{s.prefill_tokens:,}",
                f"{s.num_failed}" if s.num_failed else "0",
            ])
    return _table(["workload", "cache", "TTFT p50", "TTFT p90", "TTFT p99", "TPOT p50", "e2e p50", "req/s",
                   "output tok/s", "hit rate", "prefill tokens", "failed"], rows)


def _span(values: list[float], fmt) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)} to {fmt(hi)}"


def verdict(comparisons: list[Comparison]) -> str:
    """The sentences the acceptance asks for: hit rates and TTFT ratios, shared vs hostile,
    stated from the measurements (and flagged when they are not what the design predicts)."""
    shared = [c for c in comparisons if c.kind == "shared-prefix"]
    hostile = [c for c in comparisons if c.kind == "control"]
    lines = []
    if shared:
        rates = [c.on.hit_rate for c in shared if c.on.hit_rate is not None]
        ratios = [c.ttft_ratio for c in shared if c.ttft_ratio is not None]
        per = ", ".join(f"{c.name} {fmt_rate(c.on.hit_rate)} / {fmt_ratio(c.ttft_ratio)}" for c in shared)
        low = [c.name for c in shared if c.on.hit_rate is not None and c.on.hit_rate < SHARED_HIGH]
        lines.append(
            f"- **Shared-prefix workloads**: hit rate {_span(rates, fmt_rate)} with caching on, and time to first "
            f"token (p50) {_span(ratios, fmt_ratio)} lower than with caching off ({per})."
            + (f" Unexpectedly low hit rate: {', '.join(low)}." if low else "")
        )
    for c in hostile:
        near_zero = c.on.hit_rate is not None and c.on.hit_rate <= HOSTILE_MAX
        lines.append(
            f"- **{c.name}** (the negative control: a unique id before the same content): hit rate "
            f"{fmt_rate(c.on.hit_rate)} with caching on, TTFT p50 ratio off/on {fmt_ratio(c.ttft_ratio)} "
            f"(end-to-end p50 {fmt_ratio(ratio(c.off.e2e_p50, c.on.e2e_p50))}). "
            + ("A per-request id in the first tokens leaves nothing to reuse, so caching cannot help; "
               if near_zero else "This is NOT near zero: something shares a prefix that should not. ")
            + ("the ratio is 1 within noise." if c.ttft_ratio is not None and 0.8 <= c.ttft_ratio <= 1.25 else
               "a ratio away from 1 here is the machine's noise or scheduling, not the cache.")
        )
    for c in comparisons:
        if c.head_of_line is not None:
            (short_on, long_on, before_on), (short_off, long_off, before_off) = c.head_of_line["on"], c.head_of_line["off"]
            lines.append(
                f"- **{c.name}** (short requests arriving while an uncached long prompt prefills): the short "
                f"requests' TTFT p50 {fmt_seconds(short_on)} / {fmt_seconds(short_off)} (caching on / off) against "
                f"{fmt_seconds(long_on)} / "
                f"{fmt_seconds(long_off)} for the long prompt's first token; {before_on} / {before_off} short requests "
                "had their first token before the long prompt had its own (none would, if the long prefill "
                "held every step)."
            )
    lines.append("- With caching off every hit rate is 0% by construction (the server reports no cached tokens).")
    return "\n".join(lines)


def render_body(suite: SuiteResult, pngs: dict[str, Path | None], doc_dir: Path) -> str:
    comparisons = compare(suite)
    p = suite.pricing
    load = ""
    if suite.load_before is not None and suite.load_after is not None:
        load = (f" Load average at start / end: {suite.load_before[0]:.1f} / {suite.load_after[0]:.1f} "
                "(a busy machine inflates every latency; compare on/off ratios, not absolute times).")
    workloads = "\n".join(f"- `{w.name}`: {w.summary}" for w in suite.workloads)
    images = []
    captions = {"ttft": "TTFT distribution, caching on vs off", "hit-rate": "hit rate over time",
                "ttft-vs-prefix": "TTFT vs shared prefix length"}
    for key, path in pngs.items():
        if path is not None:
            rel = path.resolve().relative_to(doc_dir.resolve()) if path.resolve().is_relative_to(doc_dir.resolve()) \
                else path
            images.append(f"![{captions[key]}]({rel.as_posix()})")
    server = f"server options `{' '.join(suite.server_args)}`" if suite.server_args else "default server options"
    notes = "\n\n" + "\n".join(f"- note: {n}" for n in suite.notes) if suite.notes else ""
    return f"""
Model `{suite.model}`, {server}; {suite.discipline}; streaming; seed {suite.seed} (token scale
{suite.token_scale:g}); {suite.duration / 60:.1f} minutes in all.{load}

Each workload runs against a caching-on and a caching-off server (one after the other, the order
alternating between workloads), same requests in the same order, after a warm-up and with the
prefix cache emptied first (so every shared prefix is computed once per run). TTFT is measured by
the client, to the first streamed text; hit rate = cached prompt tokens / prompt tokens, from each
response's `usage.prompt_tokens_details.cached_tokens`; cost at ${p.input_per_mtok:g} /
${p.output_per_mtok:g} per million input / output tokens with cached input
{p.cached_discount:.0%} off (as providers bill prompt-cache reads). With few requests, p99 is close
to the maximum: with caching on, that is the cold first request of a shared prefix.{notes}

{verdict(comparisons)}

{summary_table(comparisons)}

Workloads:

{workloads}

Per run (TPOT: time per output token after the first; e2e: end-to-end latency):

{detail_table(comparisons)}

{chr(10).join(images)}
"""


def bench_report_module() -> ModuleType:
    """bench/report.py of the source checkout (not part of the installed package)."""
    path = Path(__file__).resolve().parents[2] / "bench" / "report.py"
    if not path.exists():
        raise RuntimeError(f"writing docs/benchmarks.md needs the radixserve source checkout ({path} is missing); "
                           "save the results with --json instead")
    spec = importlib.util.spec_from_file_location("radixserve_bench_report", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_report(suite: SuiteResult, out_dir: str | Path) -> Path:
    """PNGs under out_dir/bench/, the section `serving-<label>` of out_dir/benchmarks.md;
    returns the Markdown file's path."""
    out_dir = Path(out_dir)
    stem = out_dir / "bench" / f"serving-{suite.label}"
    pngs = {
        "ttft": plot_ttft_distribution(suite, stem.with_name(stem.name + "-ttft.png")),
        "hit-rate": plot_hit_rate_over_time(suite, stem.with_name(stem.name + "-hit-rate.png")),
        "ttft-vs-prefix": plot_ttft_vs_prefix(suite, stem.with_name(stem.name + "-ttft-vs-prefix.png")),
    }
    body = render_body(suite, pngs, out_dir)
    md = out_dir / "benchmarks.md"
    bench_report_module().update_section(
        f"serving-{suite.label}",
        f"Serving ({suite.label.upper()}): prefix caching on vs off over HTTP, {len(suite.workloads)} workloads",
        body, md, command=suite.command or None, machine=suite.machine or None, date=suite.date,
    )
    return md
