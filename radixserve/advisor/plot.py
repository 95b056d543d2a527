"""The PNG: the shared-prefix tree as an icicle chart, and the capacity curve under it.

Icicle: x is the position in the prompt (tokens), every request is one row. A node of the prefix
tree is a box spanning its tokens across the rows of every request that runs through it, so a
prefix shared by many requests is a tall box, and where requests branch its box splits into
shorter ones. Shared boxes are coloured by how many requests share them; tokens unique to one
request are grey; content that requests share *after* an early divergence (which the cache
cannot reuse) is hatched red, with the divergence marked.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from radixserve.advisor.findings import snippet
from radixserve.advisor.prefix_tree import PrefixNode, iter_nodes

if TYPE_CHECKING:
    from radixserve.advisor.report import AdviceReport

_MAX_BOXES = 4000  # beyond this, small subtrees are drawn as one box each
_UNIQUE = "#d9d9d9"
_LOST = "#d62728"


def render_png(report: AdviceReport, path: str | Path, title: str | None = None) -> Path:
    """Write the picture to ``path`` (PNG) and return the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless: never needs a display
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Patch, Rectangle

    path = Path(path)
    requests = report.requests
    tokenizer = report.model.tokenizer
    n = max(1, len(requests))
    roots = report.prefix_roots
    fig, (ax, ax_curve) = plt.subplots(
        2, 1, figsize=(13, 9), gridspec_kw={"height_ratios": [3.2, 1]}, constrained_layout=True
    )
    cmap = colormaps["viridis_r"]
    norm = LogNorm(vmin=2, vmax=max(3, n))

    # Lay the rows out: each root's requests in one band, nodes in log order.
    min_count = max(1, n // 400)  # subtrees smaller than this are not split further
    row_of: dict[int, float] = {}
    boxes: list[tuple[PrefixNode, float, int]] = []  # (node, y0, max_end of what it stands for)
    y = 0.0
    max_x = max((r.num_tokens for r in requests), default=1)
    bands: list[tuple[float, int, str]] = []  # (top row, rows, namespace) of each root's band
    for root in roots:
        bands.append((y, root.count, root.namespace))
        stack: list[tuple[PrefixNode, float]] = [(root, y)]
        while stack:
            node, y0 = stack.pop()
            collapse = node.count < min_count or len(boxes) > _MAX_BOXES
            if node.end > node.start:
                boxes.append((node, y0, _subtree_end(node) if collapse else node.end))
            if collapse:
                for idx in _subtree_requests(node):
                    row_of.setdefault(idx, y0)
                continue
            cursor = y0
            for child in node.children:
                stack.append((child, cursor))
                cursor += child.count
            for idx in node.ending:
                row_of[idx] = cursor
                cursor += 1
        y += root.count + (0.02 * n if len(roots) > 1 else 0)
    height = y

    # A shared prefix of a few tokens would be invisible next to 2000-token prompts; give shared
    # boxes a minimum width (the axis still reads true everywhere else).
    min_width = 0.004 * max_x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs (CJK, emoji) in prompt snippets
        for node, y0, end in boxes:
            colour = cmap(norm(node.count)) if node.count >= 2 else _UNIQUE
            width = max(end - node.start, min_width) if node.count >= 2 else end - node.start
            ax.add_patch(Rectangle((node.start, y0), width, node.count, facecolor=colour,
                                   edgecolor="white", linewidth=0.4 if n < 200 else 0.0))
        # Labels on boxes big enough to hold one.
        for node, y0, end in boxes:
            if node.count < 2 or node.count < 0.07 * n or (end - node.start) < 0.1 * max_x:
                continue
            text = snippet(tokenizer, requests[node.rep].token_ids[node.start : node.start + 10], 34)
            branches = len(node.children) + node.ends_here
            label = (f"{node.count} requests share the first {node.end:,} tokens, then branch {branches} ways\n"
                     f"{'from' if node.start == 0 else f'this part from token {node.start}:'} \"{_tex_safe(text)}\"")
            shade = norm(node.count)
            ax.text(node.start + 0.01 * max_x, y0 + node.count / 2, label, va="center", ha="left", fontsize=8,
                    color="white" if shade > 0.45 else "black", clip_on=True)

        # Shared content the cache cannot reuse, and where the prompts diverged.
        lost_drawn = False
        drawn: set[int] = set()
        for pair in report.divergence_pairs:
            for idx, start in ((pair.request, pair.start), (pair.partner, pair.partner_start)):
                if idx in row_of and idx not in drawn:
                    drawn.add(idx)
                    ax.add_patch(Rectangle((start, row_of[idx] + 0.1), pair.length, 0.8, facecolor=_LOST,
                                           alpha=0.35, hatch="///", edgecolor=_LOST, linewidth=0.0))
                    lost_drawn = True
        divergences = [f for f in report.findings if f.kind == "early_divergence"][:3]
        for k, finding in enumerate(divergences):
            d = finding.data["divergence_token"]
            ax.axvline(d, color=_LOST, linestyle="--", linewidth=1.2)
            example = finding.data["examples"][0]["varying_text"] if finding.data.get("examples") else ""
            ax.annotate(
                f"diverges at token {d}: \"{_tex_safe(example)}\" ({finding.requests} requests);\n"
                f"~{finding.data['shared_tokens']} shared tokens after it are not reused",
                xy=(d, height * 0.02), xytext=(d + 0.04 * max_x + 0.3 * max_x * k, -0.07 * height), color=_LOST,
                fontsize=8 if len(divergences) > 1 else 9, arrowprops={"arrowstyle": "->", "color": _LOST},
                annotation_clip=False,
            )
        if len(bands) > 1:
            for top, rows, namespace in bands:
                ax.axhline(top, color="black", linewidth=0.6)
                ax.text(max_x * 1.015, top + rows / 2, f"namespace {namespace or '(default)'}", rotation=90,
                        va="center", ha="left", fontsize=7, color="#333333", clip_on=True)

    ax.set_xlim(0, max_x * (1.04 if len(bands) > 1 else 1.02))
    ax.set_ylim(height, -0.14 * height if report.divergence_pairs else 0)  # row 0 on top
    ax.set_xlabel("position in the prompt (tokens)")
    ax.set_ylabel(f"requests ({len(requests)}, one row each)")
    if n > 60:
        ax.set_yticks([])
    r = report.result
    cap = (f"{report.capacity_blocks * report.config.block_size:,}-token cache" if report.capacity_blocks
           else "unlimited cache")
    fig.suptitle(title or (f"Shared-prefix tree: {len(requests)} requests, predicted hit rate {r.hit_rate:.1%} "
                           f"({cap}, {report.config.block_size}-token blocks)"), fontsize=12)
    handles = [
        Patch(facecolor=cmap(norm(max(2, n))), label="prefix shared by several requests (darker = more)"),
        Patch(facecolor=_UNIQUE, label="tokens unique to one request"),
    ]
    if lost_drawn:
        handles.append(Patch(facecolor=_LOST, alpha=0.35, hatch="///",
                             label="shared content after an early divergence (not reused)"))
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=len(handles), fontsize=8,
              frameon=False, borderaxespad=0.2)
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    bar = fig.colorbar(sm, ax=ax, label="requests sharing the prefix", pad=0.01)
    ticks = [t for t in (2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 100_000) if t < n] + [max(3, n)]
    bar.set_ticks(ticks, labels=[f"{t:,}" for t in ticks])
    bar.ax.minorticks_off()

    _draw_curve(ax_curve, report)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_curve(ax, report: AdviceReport) -> None:
    from radixserve.advisor.report import human_bytes

    curve = report.curve
    kv = report.model.kv_bytes_per_token
    xs = [p.capacity_tokens for p in curve.points]
    ys = [100 * p.hit_rate for p in curve.points]
    ax.plot(xs, ys, marker="o", markersize=3, color="#1f77b4")
    if curve.knee_tokens is not None:
        ax.axvline(curve.knee_tokens, color="#2ca02c", linestyle=":", linewidth=1.2)
        ax.annotate(f"saturates: {curve.knee_tokens:,} tokens ({human_bytes(curve.knee_tokens * kv)})",
                    xy=(curve.knee_tokens, 100 * curve.target * curve.max_hit_rate), fontsize=8, color="#2ca02c",
                    xytext=(6, -14), textcoords="offset points")
    if report.capacity_blocks:
        cap = report.capacity_blocks * report.config.block_size
        ax.axvline(cap, color="#7f7f7f", linestyle="--", linewidth=1.0)
        ax.annotate(f"configured: {report.result.hit_rate:.1%}", xy=(cap, 100 * report.result.hit_rate), fontsize=8,
                    color="#555555", xytext=(6, 6), textcoords="offset points")
    if len(xs) > 1 and xs[-1] / max(1, xs[0]) > 20:
        ax.set_xscale("log")
    if curve.max_hit_rate == 0:
        ax.text(0.5, 0.5, "no hits at any capacity: nothing in this log is reused", transform=ax.transAxes,
                ha="center", va="center", fontsize=10, color="#555555")
    top = max(ys + [1.0])
    ax.set_ylim(0, min(100, math.ceil(top * 1.15 + 1)))
    ax.set_xlabel("cache capacity (tokens)")
    ax.set_ylabel("hit rate (%)")
    ax.set_title("Capacity curve: hit rate by cache size (LRU)", fontsize=10)
    ax.grid(True, alpha=0.3)


def _subtree_end(node: PrefixNode) -> int:
    return max(n.end for n in iter_nodes(node))


def _subtree_requests(node: PrefixNode) -> list[int]:
    return [idx for n in iter_nodes(node) for idx in n.ending]


def _tex_safe(text: str) -> str:
    """Matplotlib reads $...$ as math; prompts are plain text."""
    return text.replace("$", r"\$")
