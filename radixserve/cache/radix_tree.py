"""RadixTree: a token-block radix tree over the block pool (the automatic prefix cache).

Each edge of the tree is a run of *full* KV blocks: ``block_size`` tokens per block, together
with the ids of the blocks that hold their K/V. A path from a namespace's root spells a token
prefix whose KV is cached, so a new request reuses the blocks of the longest path that matches
its prompt and only prefills the rest.

Ownership: the tree holds exactly one pool reference on every block it indexes (taken in
``insert``, dropped in ``evict``/``reset``). Running requests hold their own references, and
``lock`` keeps the nodes a request is using (and their ancestors) from being evicted.

Namespaces (cache salt + model identity) each get their own root, so two tenants never share a
node, let alone a block.

Eviction is LRU over unlocked, unpinned leaves, parents only after their children. Instead of
walking the whole tree on every ``evict`` call (which would cost milliseconds per allocation once
the pool is full and every new block needs an eviction), the tree keeps a lazily-invalidated
min-heap of leaf candidates: an entry is pushed whenever a node becomes an evictable leaf or a
leaf's LRU timestamp changes, and stale entries are skipped when popped.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from radixserve.cache.block_pool import BlockPool
from radixserve.cache.tree_observer import NULL_OBSERVER, TreeObserver

# pinned_until of a node that was never pinned: earlier than any clock reading, fake ones included.
_NOT_PINNED = -math.inf

# A heap entry: (last_access, access_seq, serial, node). The serial breaks ties so that two
# entries never compare their nodes.
_HeapEntry = tuple[float, int, int, "TreeNode"]


@dataclass(slots=True, eq=False, repr=False)
class TreeNode:
    """One edge of the tree and the node it leads to.

    ``tokens`` are the edge's tokens (a whole number of blocks, never empty except at a root),
    ``block_ids`` the KV blocks holding them. ``depth`` counts tokens from the namespace root to
    the end of this edge. Identity matters: a node object always ends at the same depth while a
    lock is held on it (a split keeps the *lower* part in the original object).
    """

    namespace: str
    tokens: list[int]
    block_ids: list[int]
    parent: TreeNode | None
    depth: int
    # Keyed by the child's first block of tokens, so following an edge is one dict lookup.
    children: dict[tuple[int, ...], TreeNode] = field(default_factory=dict)
    # Number of locks held on this node or any of its descendants (a lock covers the whole path).
    lock_ref: int = 0
    # LRU key: clock time of the last match/insert through this node, and the tree's operation
    # counter at that moment (exact order among equal clock readings, e.g. with a fake clock).
    last_access: float = 0.0
    access_seq: int = 0
    # This node's own pin (clock time); see RadixTree.pin for why ancestors are not stamped.
    pinned_until: float = _NOT_PINNED
    # Seconds a read of the whole pinned path extends a live pin by (0: the pin has a fixed end).
    pin_refresh: float = 0.0

    @property
    def is_root(self) -> bool:
        """True for a namespace root (the only node with an empty edge)."""
        return not self.tokens and self.parent is None and self.depth == 0

    @property
    def num_blocks(self) -> int:
        """Blocks on this node's own edge."""
        return len(self.block_ids)

    def __repr__(self) -> str:  # the default would recurse through parent/children
        return (
            f"TreeNode(namespace={self.namespace!r}, depth={self.depth}, edge_tokens={len(self.tokens)}, "
            f"block_ids={self.block_ids[:4]}{'...' if len(self.block_ids) > 4 else ''}, "
            f"children={len(self.children)}, lock_ref={self.lock_ref}, pinned_until={self.pinned_until})"
        )


@dataclass(slots=True)
class PrefixMatch:
    """Result of ``RadixTree.match_prefix``."""

    num_tokens: int  # multiple of block_size
    block_ids: list[int]  # len == num_tokens // block_size
    node: TreeNode | None  # deepest node covering the match (the namespace root if nothing matched; None: caching off)


@dataclass(slots=True)
class PinnedEdge:
    """One edge on the path of a live pin (``RadixTree.pinned_paths``)."""

    namespace: str
    parent: int  # index of the edge above in the same list (-1: the namespace root)
    tokens: list[int]  # this edge's tokens (whole blocks)
    until: float | None  # this edge's own pin (clock time); None: it only lies on a deeper pin's path
    refresh: float  # seconds a read extends the pin by (0: a fixed end)


@dataclass(slots=True)
class InsertResult:
    """Result of ``RadixTree.insert``."""

    node: TreeNode | None  # the node ending exactly at the end of the inserted sequence (None: caching off)
    num_existing_tokens: int  # leading tokens that were already cached (their blocks not adopted)
    block_ids: list[int]  # the tree's block ids for the whole sequence


class RadixTree:
    """Prefix cache index: token-block radix tree with LRU eviction, locks and TTL pins.

    Not thread-safe: the engine drives it from its single scheduling loop.
    """

    def __init__(self, pool: BlockPool, block_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.pool = pool
        self.block_size = block_size
        self.clock = clock
        self.num_cached_blocks: int = 0  # blocks the tree holds a reference on
        self._roots: dict[str, TreeNode] = {}
        self._num_nodes = 0  # attached non-root nodes (sizes the eviction heap's compaction)
        self._locked_blocks = 0  # blocks on nodes with lock_ref > 0
        self._pinned: set[TreeNode] = set()  # nodes that may hold a live pin (pruned lazily)
        self._access_seq = 0
        self._evict_heap: list[_HeapEntry] = []
        self._serial = itertools.count()
        # Bounds on what live pins may hold, in blocks (None: unbounded). A pin that would take
        # more is refused (pin returns 0), so pins can never starve the pool.
        self.max_pinned_blocks: int | None = None
        self.max_pinned_blocks_per_namespace: int | None = None
        # Told when full blocks enter or leave the cache (KV events for scale-out routing).
        self.observer: TreeObserver = NULL_OBSERVER
        # Called with the block ids ``evict`` drops, before the tree's refs on them go (the
        # blocks are still intact then), so a lower tier can write them down. The tree stays
        # about the tree: what an evicted block was is the hook owner's to know.
        self.on_evict: Callable[[list[int]], None] | None = None
        # Blocks the tree holds per namespace (what quotas and per-tenant metrics read).
        self.blocks_by_namespace: dict[str, int] = {}
        # Called as listener(node, num_kept_blocks) right before the tail of an unlocked leaf's
        # edge (all of it when num_kept_blocks is 0) leaves the tree: eviction, quota trimming,
        # reset. Policies beside the tree (the ghost index, per-tenant counters) listen here.
        self.eviction_listeners: list[Callable[[TreeNode, int], None]] = []

    # ---- lookup ---------------------------------------------------------------------------
    def match_prefix(self, namespace: str, token_ids: Sequence[int], max_tokens: int | None = None) -> PrefixMatch:
        """Longest cached prefix of ``token_ids``, in whole blocks, capped at ``max_tokens``.

        The cap is rounded down to a block. If the match (or the cap) ends inside an edge, the
        edge is split so that the returned node ends exactly there; the LRU timestamps of the
        path are refreshed. Lock the returned node before anything can evict (e.g. before
        allocating), or its blocks may be dropped.
        """
        tokens = _as_list(token_ids)
        end = len(tokens) if max_tokens is None else min(len(tokens), max(0, max_tokens))
        end -= end % self.block_size
        root = self.root(namespace)
        node, pos, blocks = self._walk(root, tokens, end, split=True, stamp=self._stamp())
        if node is not root and not node.children and node.lock_ref == 0:
            self._push_candidate(node)  # its LRU key changed
        return PrefixMatch(pos, blocks, node)

    def insert(self, namespace: str, token_ids: Sequence[int], block_ids: Sequence[int]) -> InsertResult:
        """Index ``token_ids`` (whole blocks) whose KV lives in ``block_ids``.

        Blocks for tokens already in the tree are *not* adopted: the tree keeps its own and
        returns them in ``InsertResult.block_ids`` (the caller may switch to them and free its
        duplicates). The new tail becomes one node, and the tree takes a reference on each of
        its blocks. The returned node ends exactly at the end of ``token_ids`` (an edge is split
        if needed), ready to be locked.
        """
        tokens = _as_list(token_ids)
        blocks_in = list(block_ids)
        block_size = self.block_size
        if len(tokens) != len(blocks_in) * block_size:
            raise ValueError(
                f"insert needs whole blocks: {len(tokens)} tokens for {len(blocks_in)} blocks of {block_size}"
            )
        root = self.root(namespace)
        stamp = self._stamp()
        node, existing, blocks = self._walk(root, tokens, len(tokens), split=True, stamp=stamp)
        if existing < len(tokens):
            new_blocks = blocks_in[existing // block_size :]
            # Check before taking any ref, so a bad call leaves the pool and the cached content as they were.
            for block_id in new_blocks:
                if self.pool.ref_count(block_id) == 0:
                    raise RuntimeError(f"insert of free block {block_id}: the caller must own its blocks")
            for block_id in new_blocks:
                self.pool.incref(block_id)
            leaf = TreeNode(namespace, tokens[existing:], new_blocks, node, node.depth + len(tokens) - existing)
            leaf.last_access, leaf.access_seq = stamp
            node.children[tuple(tokens[existing : existing + block_size])] = leaf
            self._num_nodes += 1
            self.num_cached_blocks += len(new_blocks)
            self.blocks_by_namespace[namespace] = self.blocks_by_namespace.get(namespace, 0) + len(new_blocks)
            blocks.extend(new_blocks)
            node = leaf
            self.observer.blocks_stored(leaf, 0)
        if node is not root and not node.children and node.lock_ref == 0:
            self._push_candidate(node)
        return InsertResult(node, existing, blocks)

    def cached_prefix_length(self, namespace: str, token_ids: Sequence[int], max_tokens: int | None = None) -> int:
        """Tokens of ``token_ids`` (whole blocks, capped at ``max_tokens``) cached in ``namespace``,
        without splitting an edge or touching LRU order: a read-only probe for reports."""
        root = self._roots.get(namespace)
        if root is None:
            return 0
        tokens = _as_list(token_ids)
        end = len(tokens) if max_tokens is None else min(len(tokens), max(0, max_tokens))
        end -= end % self.block_size
        node, pos = root, 0
        while pos < end:
            child = node.children.get(tuple(tokens[pos : pos + self.block_size]))
            if child is None:
                break
            matched = self._edge_match(tokens, pos, end, child.tokens)
            pos += matched
            if matched < len(child.tokens):
                break
            node = child
        return pos

    def root(self, namespace: str) -> TreeNode:
        """The root of ``namespace`` (created on first use; roots are never evicted)."""
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = TreeNode(namespace, [], [], None, 0)
        return root

    def head_match(self, node: TreeNode, token_ids: Sequence[int], max_scan: int = 64) -> tuple[int, int]:
        """(block id, n): the block, among the first blocks of ``node``'s child edges, whose
        leading tokens agree longest with ``token_ids`` (n of them; (-1, 0) when none agrees).
        For admission to reuse the matching head of a block its prompt only partly shares
        (e.g. a question after a cached system prompt whose last block the previous question
        filled). Reads only: no split, no LRU stamp. Scans the ``max_scan`` newest children,
        so a node with thousands of them costs a bounded time per admission."""
        want = list(token_ids[: self.block_size])
        best_block, best = -1, 0
        for i, child in enumerate(reversed(node.children.values())):
            if i == max_scan or best == len(want):
                break
            n = 0
            for a, b in zip(child.tokens, want):
                if a != b:
                    break
                n += 1
            if n > best:
                best_block, best = child.block_ids[0], n
        return best_block, best

    # ---- locks ----------------------------------------------------------------------------
    def lock(self, node: TreeNode) -> None:
        """+1 lock on ``node`` and all its ancestors: none of them is evicted while locked.

        Locking a root is a no-op (roots hold no blocks and are never evicted).
        """
        if node.parent is None:
            if self._roots.get(node.namespace) is node:
                return
            raise RuntimeError(f"lock of a node that is no longer in the tree: {node!r}")
        n: TreeNode | None = node
        while n is not None and n.parent is not None:
            if n.lock_ref == 0:
                self._locked_blocks += len(n.block_ids)
            n.lock_ref += 1
            n = n.parent

    def unlock(self, node: TreeNode) -> None:
        """Undo one ``lock(node)``. Unlocking more often than locking raises RuntimeError."""
        if node.parent is None:
            if self._roots.get(node.namespace) is node:
                return
            raise RuntimeError(f"unlock of a node that is no longer in the tree: {node!r}")
        if node.lock_ref <= 0:
            raise RuntimeError(f"unlock without a matching lock: {node!r}")
        n: TreeNode | None = node
        while n is not None and n.parent is not None:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._locked_blocks -= len(n.block_ids)
            n = n.parent
        if node.lock_ref == 0 and not node.children:
            self._push_candidate(node)

    # ---- eviction -------------------------------------------------------------------------
    def evict(self, num_blocks: int) -> int:
        """Free at least ``num_blocks`` blocks from unlocked, unpinned leaves, LRU first.

        A parent becomes a candidate only once all its children are gone. The tree drops its
        reference on each evicted block; only blocks that thereby went back to the pool's free
        list count (a block a request still references leaves the tree but stays allocated).
        When fewer blocks are needed than the LRU leaf holds, only the tail of its edge is
        dropped, so the leaf's still-useful prefix stays cached. Stops once enough blocks were
        freed or nothing evictable is left. Returns the number of blocks freed.
        """
        if num_blocks <= 0:
            return 0
        now = self.clock()
        heap = self._evict_heap
        still_pinned: list[_HeapEntry] = []
        freed = 0
        while freed < num_blocks and heap:
            entry = heapq.heappop(heap)
            node = entry[3]
            if node.parent is None or node.children or node.lock_ref or node.access_seq != entry[1]:
                continue  # stale: evicted, no longer a leaf, locked (unlock re-pushes), or touched since
            if node.pinned_until > now:
                still_pinned.append(entry)  # evictable once the pin lapses; keep its entry
                continue
            needed = num_blocks - freed
            if needed < len(node.block_ids):
                freed += self._trim_leaf(node, needed)
                heapq.heappush(heap, entry)  # still the same leaf with the same LRU key
            else:
                parent = node.parent
                if self.on_evict is not None:
                    self.on_evict(list(node.block_ids))
                freed += self._remove_leaf(node)
                if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                    self._push_candidate(parent)
        for entry in still_pinned:
            heapq.heappush(heap, entry)
        return freed

    def evict_from(self, namespaces: set[str], num_blocks: int) -> int:
        """Evict at least ``num_blocks`` blocks from the unlocked, unpinned leaves of
        ``namespaces`` only, LRU first (quotas: a namespace over its budget pays for itself).

        Walks those namespaces' nodes (O(their size)), so it is for the rare over-quota case,
        not for every allocation. Returns the number of blocks that left the tree.
        """
        if num_blocks <= 0:
            return 0
        now = self.clock()
        heap = [(n.last_access, n.access_seq, next(self._serial), n)
                for ns in namespaces for n in self.iter_nodes(ns)
                if not n.children and n.lock_ref == 0 and n.pinned_until <= now]
        heapq.heapify(heap)
        dropped = 0
        while dropped < num_blocks and heap:
            node = heapq.heappop(heap)[3]
            needed = num_blocks - dropped
            if needed < len(node.block_ids):
                self._trim_leaf(node, needed)
                dropped += needed
            else:
                parent = node.parent
                dropped += len(node.block_ids)
                self._remove_leaf(node)
                if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                    self._push_candidate(parent)
                    if parent.pinned_until <= now:
                        heapq.heappush(heap, (parent.last_access, parent.access_seq, next(self._serial), parent))
        return dropped

    def num_evictable_blocks(self) -> int:
        """Blocks ``evict`` could drop from the tree right now (unlocked and not pinned).

        Cost is proportional to the number of live pins, not the tree size, so the scheduler can
        call it on every admission decision.
        """
        now = self.clock()
        protected = 0
        seen: set[TreeNode] = set()
        for node in list(self._pinned):
            if node.pinned_until <= now:
                self._pinned.discard(node)
                continue
            # A pinned node's ancestors can't become leaves while it exists, so they are
            # protected too. Locked nodes (and so all their ancestors) are already excluded.
            n = node
            while n.parent is not None and n.lock_ref == 0 and n not in seen:
                seen.add(n)
                protected += len(n.block_ids)
                n = n.parent
        return self.num_cached_blocks - self._locked_blocks - protected

    def reset(self) -> int:
        """Admin reset: drop every unlocked node (and every pin). Returns blocks freed.

        Nodes a running request has locked (and their ancestors) stay, but lose their pins.
        """
        freed = 0
        for root in self._roots.values():
            # Reversed pre-order visits every node after all of its descendants.
            for node in reversed(list(self._descendants(root))):
                node.pinned_until = _NOT_PINNED
                node.pin_refresh = 0.0
                if node.lock_ref == 0 and not node.children:
                    freed += self._remove_leaf(node)
        self._pinned.clear()
        self._rebuild_heap()
        return freed

    # ---- pins -----------------------------------------------------------------------------
    def pin(self, namespace: str, token_ids: Sequence[int], until: float, refresh: float = 0.0) -> int:
        """Keep the cached path covering ``token_ids``' full blocks until clock time ``until``.

        The pin is stored on the node where the cached part of that path ends (an edge is split
        there if needed); its ancestors are protected structurally, since eviction only takes
        leaves. An existing pin on that node is extended, never shortened. With ``refresh``, a
        later request that reads the whole pinned path (``refresh_pins``) extends the pin to
        ``now + refresh``, as providers refresh a prompt cache each time it is used. Returns the
        number of tokens pinned (0 if no block of the prefix is cached).
        """
        root = self._roots.get(namespace)
        if root is None:
            return 0
        tokens = _as_list(token_ids)
        end = len(tokens) - len(tokens) % self.block_size
        node, pos, _ = self._walk(root, tokens, end, split=True, stamp=None)
        if pos == 0 or not self._pin_fits(node):
            return 0
        live = node.pinned_until > self.clock()
        node.pin_refresh = max(node.pin_refresh, refresh) if live else refresh  # a lapsed pin's refresh is gone
        if until > node.pinned_until:
            node.pinned_until = until
        self._pinned.add(node)
        return pos

    def pinned_blocks(self, namespace: str | None = None) -> int:
        """Blocks live pins hold (a pinned node and its ancestors), in `namespace` or in all."""
        return sum(len(n.block_ids) for n in self._pinned_nodes() if namespace is None or n.namespace == namespace)

    def _pinned_nodes(self) -> set[TreeNode]:
        now = self.clock()
        covered: set[TreeNode] = set()
        for node in list(self._pinned):
            if node.pinned_until <= now:
                self._pinned.discard(node)
                continue
            n = node
            while n.parent is not None and n not in covered:
                covered.add(n)
                n = n.parent
        return covered

    def _pin_fits(self, node: TreeNode) -> bool:
        """Whether pinning the path root..node keeps pins within their bounds."""
        if self.max_pinned_blocks is None and self.max_pinned_blocks_per_namespace is None:
            return True
        covered = self._pinned_nodes()
        added = 0
        n = node
        while n.parent is not None and n not in covered:
            added += len(n.block_ids)
            n = n.parent
        if added == 0:
            return True  # already pinned (this extends or refreshes it)
        if self.max_pinned_blocks is not None:
            if sum(len(c.block_ids) for c in covered) + added > self.max_pinned_blocks:
                return False
        if self.max_pinned_blocks_per_namespace is not None:
            mine = sum(len(c.block_ids) for c in covered if c.namespace == node.namespace)
            if mine + added > self.max_pinned_blocks_per_namespace:
                return False
        return True

    def release_pin(self) -> bool:
        """Lift the live pin that would lapse first (the liveness rule: when nothing running
        can free memory and a waiting request does not fit, pins yield). False if none."""
        now = self.clock()
        live = [n for n in self._pinned if n.pinned_until > now]
        if not live:
            return False
        node = min(live, key=lambda n: n.pinned_until)
        node.pinned_until = _NOT_PINNED
        node.pin_refresh = 0.0
        self._pinned.discard(node)
        return True

    def refresh_pins(self, node: TreeNode) -> None:
        """A request read the path root..node: extend the live refreshable pins on it."""
        now = self.clock()
        while node is not None:
            if node.pin_refresh and node.pinned_until > now:
                node.pinned_until = max(node.pinned_until, now + node.pin_refresh)
            node = node.parent

    def unpin(self, namespace: str, token_ids: Sequence[int]) -> None:
        """Remove the pin that ``pin(namespace, token_ids, ...)`` placed.

        Clears the pin of the node that ends exactly at the last full block of ``token_ids``,
        and only if that whole prefix is cached: other pins (on shorter or longer prefixes
        sharing the path) are never touched, even if this pin already lapsed and its blocks were
        evicted. A pin that covered only ``n < len(token_ids)`` tokens (``pin``'s return value)
        is undone with ``unpin(namespace, token_ids[:n])``; otherwise it lapses at its ``until``.
        """
        root = self._roots.get(namespace)
        if root is None:
            return
        tokens = _as_list(token_ids)
        end = len(tokens) - len(tokens) % self.block_size
        node, pos, _ = self._walk(root, tokens, end, split=False, stamp=None)
        if pos != end or pos == 0:
            return  # no node ends there, so nothing this call pinned is left to unpin
        node.pinned_until = _NOT_PINNED
        node.pin_refresh = 0.0
        self._pinned.discard(node)

    def pinned_paths(self) -> list[PinnedEdge]:
        """Every edge on a live pin's path, parents before children: what a restart needs to
        re-create the pins (radixserve/server/persistence.py).

        An edge is listed once however many pins pass through it, so the tokens listed total
        exactly the pinned blocks (bounded by ``max_pinned_blocks``). ``parent`` indexes the
        listed edge above (-1: the namespace root); ``until`` is None on an edge that only lies
        on the path of a deeper pin. Read-only, O(pinned blocks).
        """
        covered = self._pinned_nodes()
        now = self.clock()
        index: dict[TreeNode, int] = {}
        edges: list[PinnedEdge] = []
        for node in sorted(covered, key=lambda n: n.depth):  # a parent is shallower than its child
            live = node.pinned_until > now
            parent = node.parent
            index[node] = len(edges)
            edges.append(PinnedEdge(
                namespace=node.namespace, parent=index[parent] if parent in index else -1, tokens=list(node.tokens),
                until=node.pinned_until if live else None, refresh=node.pin_refresh if live else 0.0,
            ))
        return edges

    # ---- introspection --------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        """Non-root nodes in the tree, all namespaces together."""
        return self._num_nodes

    @staticmethod
    def path_tokens(node: TreeNode) -> list[int]:
        """The tokens from the namespace root to the end of ``node``'s edge."""
        edges = []
        while node.parent is not None:
            edges.append(node.tokens)
            node = node.parent
        tokens: list[int] = []
        for edge in reversed(edges):
            tokens += edge  # C-level extend: a per-token comprehension cost 0.4 ms on a 700-token path
        return tokens

    def iter_nodes(self, namespace: str | None = None) -> Iterator[TreeNode]:
        """Every non-root node (of one namespace, or all), parents before children."""
        if namespace is None:
            roots = list(self._roots.values())
        else:
            roots = [self._roots[namespace]] if namespace in self._roots else []
        for root in roots:
            yield from self._descendants(root)

    def check_invariants(self) -> None:
        """Verify the tree's internal bookkeeping (O(tree size); for tests and debugging)."""
        block_size = self.block_size
        seen_blocks: set[int] = set()
        num_nodes = cached = locked = 0
        for ns, root in self._roots.items():
            assert root.namespace == ns and root.parent is None and not root.tokens and not root.block_ids
            for node in self._descendants(root):
                num_nodes += 1
                parent = node.parent
                assert parent is not None
                assert node.namespace == ns
                assert node.tokens and len(node.tokens) == len(node.block_ids) * block_size, node
                assert parent.children.get(tuple(node.tokens[:block_size])) is node, node
                assert node.depth == parent.depth + len(node.tokens), node
                assert node.lock_ref >= sum(c.lock_ref for c in node.children.values()), node
                for block_id in node.block_ids:
                    assert block_id not in seen_blocks, f"block {block_id} indexed twice"
                    seen_blocks.add(block_id)
                    assert self.pool.ref_count(block_id) >= 1, f"tree holds free block {block_id}"
                cached += len(node.block_ids)
                if node.lock_ref:
                    locked += len(node.block_ids)
                if node.pinned_until != _NOT_PINNED and node not in self._pinned:
                    assert node.pinned_until <= self.clock(), f"live pin not tracked: {node}"
        assert num_nodes == self._num_nodes, (num_nodes, self._num_nodes)
        assert cached == self.num_cached_blocks, (cached, self.num_cached_blocks)
        for ns in self._roots:
            held = sum(len(n.block_ids) for n in self.iter_nodes(ns))
            assert held == self.blocks_by_namespace.get(ns, 0), (ns, held, self.blocks_by_namespace.get(ns))
        assert locked == self._locked_blocks, (locked, self._locked_blocks)
        # Every unlocked leaf must have a live entry in the eviction heap, or evict would miss it.
        live = {id(e[3]) for e in self._evict_heap if e[3].access_seq == e[1]}
        for node in self.iter_nodes():
            if not node.children and node.lock_ref == 0:
                assert id(node) in live, f"evictable leaf missing from the eviction heap: {node}"

    # ---- internals ------------------------------------------------------------------------
    def _stamp(self) -> tuple[float, int]:
        self._access_seq += 1
        return self.clock(), self._access_seq

    def _walk(
        self, root: TreeNode, tokens: list[int], end: int, *, split: bool, stamp: tuple[float, int] | None
    ) -> tuple[TreeNode, int, list[int]]:
        """Follow ``tokens[:end]`` (``end`` a multiple of block_size) down from ``root``.

        Returns (deepest node matched, tokens matched, their block ids). If the match ends
        partway into an edge, ``split`` cuts the edge there and returns its matched upper part;
        without ``split`` the walk stops before that edge. ``stamp`` refreshes LRU keys.
        """
        block_size = self.block_size
        node = root
        pos = 0
        blocks: list[int] = []
        while pos < end:
            child = node.children.get(tuple(tokens[pos : pos + block_size]))
            if child is None:
                break
            n = len(child.tokens)
            matched = self._edge_match(tokens, pos, end, child.tokens)
            if matched < n:
                if not split:
                    break
                child = self._split(child, matched)
            blocks.extend(child.block_ids)
            pos += matched
            if stamp is not None:
                child.last_access, child.access_seq = stamp
            node = child
            if matched < n:
                break
        return node, pos, blocks

    def _edge_match(self, tokens: list[int], pos: int, end: int, edge: list[int]) -> int:
        """How many tokens of ``edge`` (whole blocks) ``tokens[pos:end]`` matches; its first
        block is known to match (it is the child's key)."""
        block_size = self.block_size
        n = len(edge)
        # Fast path: all of it matches (one C-level list comparison).
        if pos + n <= end:
            if tokens[pos : pos + n] == edge:
                return n
            return self._matched_blocks(tokens, pos, edge, n // block_size) * block_size
        avail = (end - pos) // block_size  # >= 1
        if tokens[pos:end] == edge[: avail * block_size]:
            return avail * block_size
        return self._matched_blocks(tokens, pos, edge, avail) * block_size

    def _matched_blocks(self, tokens: list[int], pos: int, edge: list[int], hi: int) -> int:
        """Number of leading blocks of ``edge`` equal to ``tokens[pos:]``, known to be < ``hi``.

        Binary search over blocks with slice comparisons: O(log) Python steps and O(len) C work,
        instead of a Python loop over tokens. Block 0 always matches (it is the child's key).
        """
        block_size = self.block_size
        lo = 1  # blocks [0, lo) match; the first mismatching block is in [lo, hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if tokens[pos + lo * block_size : pos + mid * block_size] == edge[lo * block_size : mid * block_size]:
                lo = mid
            else:
                hi = mid
        return lo

    def _split(self, child: TreeNode, num_tokens: int) -> TreeNode:
        """Cut ``child``'s edge after ``num_tokens``; returns the new upper node.

        The original object keeps the lower part, so a node someone locked or pinned still ends
        at the same depth. The upper part inherits the lock count (every lock on the child is a
        lock on its new parent too) and the LRU key; it takes no pin of its own, since it can
        only be evicted after the child is gone.
        """
        block_size = self.block_size
        parent = child.parent
        assert parent is not None and 0 < num_tokens < len(child.tokens) and num_tokens % block_size == 0
        num_upper_blocks = num_tokens // block_size
        upper = TreeNode(
            child.namespace,
            child.tokens[:num_tokens],
            child.block_ids[:num_upper_blocks],
            parent,
            child.depth - len(child.tokens) + num_tokens,
        )
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.access_seq = child.access_seq
        del child.tokens[:num_tokens]
        del child.block_ids[:num_upper_blocks]
        child.parent = upper
        upper.children[tuple(child.tokens[:block_size])] = child
        parent.children[tuple(upper.tokens[:block_size])] = upper  # same key the child had
        self._num_nodes += 1
        return upper

    def _trim_leaf(self, node: TreeNode, num_blocks: int) -> int:
        """Drop the last ``num_blocks`` blocks of an unlocked leaf's edge; returns blocks freed."""
        keep = len(node.block_ids) - num_blocks
        self.observer.blocks_removed(node, keep)
        self._notify_eviction(node, keep)
        dropped = node.block_ids[keep:]
        if self.on_evict is not None:
            self.on_evict(dropped)
        del node.block_ids[keep:]
        del node.tokens[keep * self.block_size :]
        node.depth -= num_blocks * self.block_size
        self.num_cached_blocks -= num_blocks
        self.blocks_by_namespace[node.namespace] -= num_blocks
        return self._release(dropped)

    def _remove_leaf(self, node: TreeNode) -> int:
        """Detach an unlocked leaf and drop the tree's refs on its blocks; returns blocks freed."""
        parent = node.parent
        assert parent is not None and not node.children and node.lock_ref == 0, node
        self.observer.blocks_removed(node, 0)
        self._notify_eviction(node, 0)
        del parent.children[tuple(node.tokens[: self.block_size])]
        node.parent = None  # marks it detached: lock() on it now raises
        self._num_nodes -= 1
        self.num_cached_blocks -= len(node.block_ids)
        self.blocks_by_namespace[node.namespace] -= len(node.block_ids)
        self._pinned.discard(node)
        blocks, node.block_ids = node.block_ids, []
        return self._release(blocks)

    def _notify_eviction(self, node: TreeNode, num_kept_blocks: int) -> None:
        for listener in self.eviction_listeners:
            listener(node, num_kept_blocks)

    def _release(self, blocks: list[int]) -> int:
        pool = self.pool
        freed = 0
        for block_id in blocks:
            pool.decref(block_id)
            if pool.ref_count(block_id) == 0:
                freed += 1
        return freed

    def _push_candidate(self, node: TreeNode) -> None:
        heap = self._evict_heap
        heapq.heappush(heap, (node.last_access, node.access_seq, next(self._serial), node))
        # Stale entries pile up as leaves get touched; compact once they dominate (amortized O(1)).
        if len(heap) > 2 * self._num_nodes + 256:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        self._evict_heap = [
            (n.last_access, n.access_seq, next(self._serial), n)
            for n in self.iter_nodes()
            if not n.children and n.lock_ref == 0
        ]
        heapq.heapify(self._evict_heap)

    @staticmethod
    def _descendants(root: TreeNode) -> Iterator[TreeNode]:
        stack = list(root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())


def _as_list(token_ids: Sequence[int] | Any) -> list[int]:
    """Token ids as a list of Python ints (list slices compare at C speed against edges)."""
    if type(token_ids) is list:
        return token_ids
    tolist = getattr(token_ids, "tolist", None)  # numpy arrays, torch tensors
    if tolist is not None:
        return tolist()
    return list(token_ids)
