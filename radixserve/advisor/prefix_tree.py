"""The shared-prefix tree of a log: which prefixes requests share, and where they branch.

A compacted token trie of all prompts (one per namespace) with a request count on every node,
built from the sorted prompts and the common-prefix lengths of sorted neighbours (the standard
stack construction, linear in the number of requests). It is exact at token granularity, unlike
the cache's block-granular tree, so it shows where prompts really diverge.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from radixserve.advisor.findings import snippet
from radixserve.advisor.logs import PromptRequest
from radixserve.sequences import common_prefix_len


@dataclass(slots=True, eq=False)
class PrefixNode:
    """Tokens [start, end) of every prompt below this node (spelled by ``requests[rep]``)."""

    namespace: str
    start: int
    end: int
    rep: int  # index of one request whose prompt runs through this node
    children: list[PrefixNode] = field(default_factory=list)
    ending: list[int] = field(default_factory=list)  # requests whose prompt ends exactly here
    count: int = 0  # prompts through this node (filled in by build_prefix_tree)
    first: int = 0  # smallest request index below (for ordering)

    @property
    def ends_here(self) -> int:
        return len(self.ending)


@dataclass(slots=True)
class SharedPrefix:
    """A prefix several requests start with, for the report."""

    requests: int
    tokens: int
    branches: int  # distinct continuations (children + prompts ending here)
    start_text: str
    end_text: str  # the last tokens before the branch point
    branch_texts: list[str]  # how the biggest branches continue
    namespace: str


def build_prefix_tree(requests: Sequence[PromptRequest]) -> list[PrefixNode]:
    """One root per namespace (depth 0, ``count`` = the namespace's requests)."""
    order = sorted(range(len(requests)), key=lambda i: (requests[i].namespace, requests[i].token_ids))
    roots: list[PrefixNode] = []
    stack: list[PrefixNode] = []
    prev: PromptRequest | None = None
    for idx in order:
        r = requests[idx]
        if prev is None or prev.namespace != r.namespace:
            root = PrefixNode(r.namespace, 0, 0, idx)
            roots.append(root)
            stack = [root]
            lcp = 0
        else:
            lcp = common_prefix_len(prev.token_ids, r.token_ids)
        last: PrefixNode | None = None
        while stack[-1].end > lcp:
            last = stack.pop()
        top = stack[-1]
        if top.end < lcp:
            # The new prompt branches inside `last`'s edge: split it at lcp.
            assert last is not None
            mid = PrefixNode(r.namespace, top.end, lcp, last.rep, [last])
            top.children[top.children.index(last)] = mid
            last.start = lcp
            stack.append(mid)
            top = mid
        if r.num_tokens == lcp:
            top.ending.append(idx)
        else:
            leaf = PrefixNode(r.namespace, lcp, r.num_tokens, idx, ending=[idx])
            top.children.append(leaf)
            stack.append(leaf)
        prev = r
    for root in roots:
        for node in reversed(list(iter_nodes(root))):
            node.count = node.ends_here + sum(c.count for c in node.children)
            node.first = min([node.rep] + [c.first for c in node.children])
            node.children.sort(key=lambda c: c.first)  # log order reads better than token order
    return roots


def iter_nodes(root: PrefixNode) -> Iterator[PrefixNode]:
    """Pre-order (parents before children), iteratively: prompt trees can be deep."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


def top_shared_prefixes(
    roots: Sequence[PrefixNode], requests: Sequence[PromptRequest], tokenizer: Any, limit: int = 5
) -> list[SharedPrefix]:
    """The shared prefixes worth the most: ranked by the reuse their own tokens add, edge length x
    (requests - 1), so a prefix and its one-token-longer extension are not both listed."""
    candidates = [n for root in roots for n in iter_nodes(root) if n.end > 0 and n.count >= 2]
    candidates.sort(key=lambda n: -((n.end - n.start) * (n.count - 1)))
    out = []
    for node in candidates[:limit]:
        ids = requests[node.rep].token_ids
        branches = sorted(node.children, key=lambda c: -c.count)[:3]
        out.append(SharedPrefix(
            requests=node.count,
            tokens=node.end,
            branches=len(node.children) + node.ends_here,
            start_text=snippet(tokenizer, ids[: min(node.end, 16)]),
            end_text=snippet(tokenizer, ids[max(0, node.end - 12) : node.end]),
            branch_texts=[
                f"{c.count} req: " + snippet(tokenizer, requests[c.rep].token_ids[c.start : c.start + 8], 40)
                for c in branches
            ],
            namespace=node.namespace,
        ))
    return out
