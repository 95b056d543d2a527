"""The suite's PNGs (matplotlib, Agg: no display needed). Small on purpose: ~100 dpi, few artists.

- ttft: the TTFT distribution of every workload, caching on vs off (box + points, log scale);
- hit-rate: the cumulative prefix-cache hit rate over each caching-on run;
- ttft-vs-prefix: TTFT against the shared prefix length (generated-shared-prefix's groups).
"""

from __future__ import annotations

import random
from pathlib import Path

from radixserve.benchmark.results import SuiteResult, hit_rate_over_time, percentile

COLORS = {"on": "#1f77b4", "off": "#ff7f0e"}
_DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _plain_log_axis(axis) -> None:
    """Log-scale ticks as plain numbers (250, 1000, 4000) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, metadata={"Software": None})  # no version stamp: stable bytes across runs
    _pyplot().close(fig)
    return path


def plot_ttft_distribution(suite: SuiteResult, path: Path) -> Path:
    plt = _pyplot()
    names = [w.name for w in suite.workloads]
    fig, ax = plt.subplots(figsize=(9, 4.2), constrained_layout=True)
    jitter = random.Random(0)
    for i, workload in enumerate(suite.workloads):
        for offset, mode in ((-0.18, "on"), (0.18, "off")):
            run = workload.runs.get(mode)
            if run is None:
                continue
            ttfts = [r.ttft * 1000 for r in run.ok_results if r.ttft is not None]
            if not ttfts:
                continue
            box = ax.boxplot([ttfts], positions=[i + offset], widths=0.3, showfliers=False, patch_artist=True,
                             medianprops={"color": "black"})
            box["boxes"][0].set(facecolor=COLORS[mode], alpha=0.35, edgecolor=COLORS[mode])
            xs = [i + offset + jitter.uniform(-0.09, 0.09) for _ in ttfts]
            ax.scatter(xs, ttfts, s=9, color=COLORS[mode], alpha=0.75, linewidths=0,
                       label=f"prefix caching {mode}" if i == 0 else None)
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    ax.set_xticks(range(len(names)), [n.replace("generated-shared-prefix", "gen-shared-prefix") for n in names],
                  fontsize=8)
    ax.set_ylabel("time to first token (ms, log scale)")
    ax.set_title(f"TTFT per workload, prefix caching on vs off ({suite.label}, {suite.model}, {suite.discipline})",
                 fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.25)
    # below the axes: inside, it would hide the outliers (cold first requests) at the top
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=2, fontsize=8, markerscale=2.5, frameon=False)
    return _save(fig, path)


def plot_hit_rate_over_time(suite: SuiteResult, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8), constrained_layout=True)
    curves = []
    for workload in suite.workloads:
        run = workload.runs.get("on")
        if run is None:
            continue
        times, rates = hit_rate_over_time(run.results)
        if times:
            t0 = min(r.start for r in run.results)
            curves.append((workload, [t - t0 for t in times], [100 * r for r in rates]))
    # The x axis ends with the longest shared-prefix run: the control (no prefill saved) runs
    # much longer and would squeeze the curves that matter into a corner; its legend says so.
    shared_ends = [xs[-1] for w, xs, _ in curves if w.shares_prefix]
    x_max = 1.05 * max(shared_ends) if shared_ends else None
    for workload, xs, ys in curves:
        label = workload.name
        if x_max is not None and xs[-1] > x_max:
            label += f" (to {xs[-1]:.0f} s, {ys[-1]:.0f}% at the end)"
        ax.plot(xs, ys, marker=".", markersize=4, linewidth=1.2, label=label,
                linestyle="-" if workload.shares_prefix else "--")
    if x_max is not None:
        ax.set_xlim(-0.02 * x_max, x_max)
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("cumulative hit rate (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"Prefix-cache hit rate over each caching-on run ({suite.label}; caching off: 0%)", fontsize=10)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_ttft_vs_prefix(suite: SuiteResult, path: Path, workload_name: str = "generated-shared-prefix") -> Path | None:
    """None when the suite did not run the workload (or it has a single prefix length)."""
    workload = next((w for w in suite.workloads if w.name == workload_name), None)
    if workload is None:
        return None
    lengths = sorted({r.shared_prefix_tokens for run in workload.runs.values() for r in run.results})
    if len(lengths) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8), constrained_layout=True)
    for mode in ("on", "off"):
        run = workload.runs.get(mode)
        if run is None:
            continue
        medians = []
        for n in lengths:
            ttfts = [r.ttft * 1000 for r in run.ok_results if r.ttft is not None and r.shared_prefix_tokens == n]
            ax.scatter([n] * len(ttfts), ttfts, s=8, color=COLORS[mode], alpha=0.35, linewidths=0)
            medians.append(percentile(ttfts, 50))
        ax.plot(lengths, medians, marker="o", color=COLORS[mode], label=f"prefix caching {mode} (median)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    ax.set_xlabel("shared prefix length (tokens)")
    ax.set_ylabel("time to first token (ms, log scale)")
    ax.set_title(f"TTFT vs shared prefix length ({workload_name}, {suite.label})", fontsize=10)
    ax.grid(which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return _save(fig, path)
