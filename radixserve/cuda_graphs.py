"""GPU helpers of the runner: one-copy metadata upload, and CUDA graphs for decode steps.

A decode step of an 8B model is ~5 ms of GPU work split over ~350 kernels; launched from
Python one by one they would take longer than the work itself (on the H100 machine an eager
forward costs ~13 ms of host time). `DecodeGraphs` captures the whole decode forward (model +
logits) once per batch size in `CAPTURE_SIZES` over static input buffers, and a step then fills
the buffers (one pinned host->device copy) and replays the graph of the smallest captured size
that fits, padding the extra rows. `PrefillGraphs` does the same for a step that is one short
prefill (a new question after a long cached prefix: the time-to-first-token case), bucketed by
token count.

Padding is harmless by construction: padded rows get slot -1 (the KV write kernels skip
negative slots), padded decode sequences a context of 1 over whatever block their stale table
row names, padded prefill tokens sit past the sequence's query length (attention never reads or
writes them; every other op is row-wise), and their logits are dropped. Only imported on CUDA.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from radixserve.model.attention import AttentionMetadata, KVCache
from radixserve.model.cascade import CASCADE_MIN_ROWS, CASCADE_ROWS, CascadeMetadata, max_chunks, plan_cascade
from radixserve.step import BlockTableRows, StepInput


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No garbage collection while a graph is captured: a collection could free an earlier,
    unreachable engine's CUDA graphs, and destroying a graph is an operation that invalidates the
    capture in progress (seen when engines are built and dropped in a loop)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

CAPTURE_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)
# Single-sequence prefill steps up to this many tokens replay a graph; longer ones are GPU-bound
# anyway (a 1024-token step of an 8B model is ~25 ms of GPU work).
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)


def aligned_offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
    """(offsets, total) of int64 parts packed one after another, each starting on a 16-byte
    boundary (an even index). Triton specializes a kernel on whether each pointer argument is
    16-byte aligned; packed back to back, a part's alignment changed with the lengths before it
    (the step's token and sequence counts), and each new combination compiled new binaries in
    the middle of serving."""
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += n + (n & 1)
    return offsets, total


def _layout(names_and_sizes: dict[str, int]) -> tuple[dict[str, int], int]:
    offsets, total = aligned_offsets(list(names_and_sizes.values()))
    return dict(zip(names_and_sizes, offsets)), total


class PinnedUploader:
    """Packs int64 host arrays into one pinned buffer and uploads them with a single copy.

    The copy is asynchronous; before the buffer is refilled, the previous copy is waited for
    (an event), since the GPU may still be reading it when the host runs ahead."""

    def __init__(self, device: torch.device, capacity: int = 1 << 15) -> None:
        self.device = device
        self._event: torch.cuda.Event | None = None
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        # pinned on CUDA; plain on a CPU-only build (the host-only bench packs without a GPU)
        self._host = torch.empty(capacity, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self._np = self._host.numpy()

    def pack(self, parts: Sequence[Sequence[int] | np.ndarray]) -> tuple[list[int], list[int], int]:
        """The host half of `upload`: the parts written into the host buffer, each 16-byte
        aligned (see aligned_offsets); returns (offsets, sizes, total)."""
        sizes = [len(p) for p in parts]
        offsets, total = aligned_offsets(sizes)
        if self._event is not None:
            self._event.synchronize()
        if total > self._np.shape[0]:
            self._alloc(max(total, 2 * self._np.shape[0]))
        for part, offset, n in zip(parts, offsets, sizes):
            self._np[offset : offset + n] = part
        return offsets, sizes, total

    def upload(self, parts: Sequence[Sequence[int] | np.ndarray]) -> list[torch.Tensor]:
        """The parts as device int64 tensors, each 16-byte aligned (see aligned_offsets)."""
        offsets, sizes, total = self.pack(parts)
        dev = self._host[:total].to(self.device, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        return [dev[offset : offset + n] for offset, n in zip(offsets, sizes)]


class DecodeGraphs:
    """Captured decode forwards (model + logits) for a set of batch sizes."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        block_size: int,
        max_batch_size: int,
        max_model_len: int,
        cascade: bool = False,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        sizes = [s for s in CAPTURE_SIZES if s < max_batch_size] + [max_batch_size]
        self.sizes = sorted(set(sizes))
        self.max_bs = self.sizes[-1]
        self.width = -(-max_model_len // block_size)  # block-table columns: a full-length sequence
        # Cascade attention (model/cascade.py): sizes that can hold a group (>= CASCADE_MIN_ROWS
        # rows) get a second graph with the cascade; a step replays it only when its rows share
        # (the plain graph otherwise: no cost when nothing is shared). Its prefix launch covers
        # max_chunks(size) chunk slots; a replay fills the step's chunks, zeroes the rest's
        # prefix (skipped), and sets every row's prefix length (0: plain path).
        self.cascade = cascade
        self.cascade_sizes = [s for s in self.sizes if s >= CASCADE_MIN_ROWS] if cascade else []
        self.cascade_rows = 0  # decode rows that took the cascade path, all replays together
        self._plan_key: tuple[int, bytes] | None = None  # (table version, full blocks per row) of _plan
        self._plan = None
        self._allocate_buffers(next(model.parameters()).device)
        self._event: torch.cuda.Event | None = None
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._logits: dict[tuple[int, bool], torch.Tensor] = {}

    def _allocate_buffers(self, device: torch.device) -> None:
        """One int64 buffer, host (pinned) and device alike: ids | positions | slots | seq_lens
        | query_start_loc (n+1) | cascade parts | block tables (n x w), each part 16-byte
        aligned. A step copies its prefix in one go."""
        n, w = self.max_bs, self.width
        c = max_chunks(n) if self.cascade else 0
        self._offsets, total = _layout({
            "ids": n, "pos": n, "slots": n, "seq_lens": n, "qsl": n + 1, "row_prefix": n if self.cascade else 0,
            "chunk_rows": c * CASCADE_ROWS, "chunk_prefix": c, "chunk_leader": c, "tables": n * w,
        })  # fmt: skip
        self._host = torch.zeros(total, dtype=torch.long, pin_memory=device.type == "cuda")
        self._np = self._host.numpy()
        self._dev = torch.zeros(total, dtype=torch.long, device=device)
        o = self._offsets
        self._np[o["qsl"] : o["qsl"] + n + 1] = np.arange(n + 1)
        self._np[o["slots"] : o["slots"] + n] = -1
        self._np[o["seq_lens"] : o["seq_lens"] + n] = 1
        self._np[o["chunk_rows"] : o["chunk_rows"] + c * CASCADE_ROWS] = -1
        self._dev.copy_(self._host)
        self._host_tables = BlockTableRows(self._np[o["tables"] : o["tables"] + n * w].reshape(n, w))

    def _view(self, name: str, length: int) -> torch.Tensor:
        start = self._offsets[name]
        return self._dev[start : start + length]

    def _meta(self, bs: int, with_cascade: bool) -> AttentionMetadata:
        tables = self._view("tables", self.max_bs * self.width).view(self.max_bs, self.width)[:bs]
        # nominal lengths (one token of context each): decode launch shapes never depend on them
        step = StepInput(self.block_size, query_lens=[1] * bs, seq_lens=[1] * bs)
        cascade = None
        if with_cascade:
            capacity = max_chunks(bs)
            cascade = CascadeMetadata(
                self._view("row_prefix", bs), self._view("chunk_rows", capacity * CASCADE_ROWS),
                self._view("chunk_prefix", capacity), self._view("chunk_leader", capacity), capacity,
            )  # fmt: skip
        return AttentionMetadata.from_step(
            step, self._view("pos", bs), self._view("slots", bs), self._view("qsl", bs + 1),
            self._view("seq_lens", bs), tables, lengths_are_nominal=True, cascade=cascade,
        )  # fmt: skip

    def _forward(self, bs: int, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.model(self._view("ids", bs), meta, self.kv_cache)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self):
        """Warm up (compiles the kernels) and capture every size, largest first, in one pool;
        returns the pool (other graphs of the runner share it: only one replays at a time)."""
        pool = None
        variants = [(bs, False) for bs in self.sizes] + [(bs, True) for bs in self.cascade_sizes]
        for bs, with_cascade in sorted(variants, reverse=True):
            meta = self._meta(bs, with_cascade)
            self._forward(bs, meta)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with _no_gc(), torch.cuda.graph(graph, pool=pool):
                logits = self._forward(bs, meta)
            pool = graph.pool()
            self._graphs[bs, with_cascade] = graph
            self._logits[bs, with_cascade] = logits
        torch.cuda.synchronize()
        return pool

    def can_run(self, num_seqs: int, max_blocks: int) -> bool:
        return 0 < num_seqs <= self.max_bs and max_blocks <= self.width

    def run(self, step: StepInput) -> torch.Tensor:
        """One decode step (step.is_decode) for B sequences -> logits [B, vocab] fp32 on the GPU.

        The result is a view of the graph's static output: read it before the next run."""
        B = step.num_seqs
        size, with_cascade, end = self.fill(step)
        self._dev[:end].copy_(self._host[:end], non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        self._graphs[size, with_cascade].replay()
        return self._logits[size, with_cascade][:B]

    def fill(self, step: StepInput) -> tuple[int, bool, int]:
        """The host half of `run`: the step into the host buffer. Returns (the graph's batch
        size, whether it replays the cascade graph, how much of the buffer to copy up)."""
        B = step.num_seqs
        size = next(s for s in self.sizes if s >= B)
        o, npb = self._offsets, self._np
        if self._event is not None:
            self._event.synchronize()  # the previous step's copy has left the pinned buffer
        npb[o["ids"] : o["ids"] + B] = step.token_ids
        npb[o["pos"] : o["pos"] + B] = step.positions
        npb[o["slots"] : o["slots"] + B] = step.slot_mapping
        npb[o["seq_lens"] : o["seq_lens"] + B] = step.seq_lens
        if size > B:  # padding rows: write nothing, attend over one (stale but valid) slot
            npb[o["ids"] + B : o["ids"] + size] = 0
            npb[o["pos"] + B : o["pos"] + size] = 0
            npb[o["slots"] + B : o["slots"] + size] = -1
            npb[o["seq_lens"] + B : o["seq_lens"] + size] = 1
        tables = self._host_tables.write(step.block_tables)  # only the rows that changed
        with_cascade = size in self.cascade_sizes and self._fill_cascade(tables, step.seq_lens, size)
        return size, with_cascade, o["tables"] + size * self.width

    def _fill_cascade(self, tables: np.ndarray, seq_lens: list[int], size: int) -> bool:
        """The step's cascade into the buffer's parts for a graph of `size` rows (padding rows:
        prefix 0; unused chunk slots: prefix 0, skipped); False when nothing is shared."""
        seq_lens = np.asarray(seq_lens)
        # plan_cascade reads the tables and each row's full blocks only: from one decode step to
        # the next, unless a row was rewritten or completed a block, the plan is the same
        key = (self._host_tables.version, ((seq_lens - 1) // self.block_size).tobytes())
        if key == self._plan_key:
            plan = self._plan
        else:
            plan = self._plan = plan_cascade(tables, seq_lens, self.block_size)
            self._plan_key = key
        if plan is None:
            return False
        o, npb = self._offsets, self._np
        used = plan.num_chunks
        self.cascade_rows += plan.shared_rows
        npb[o["row_prefix"] : o["row_prefix"] + size] = 0
        npb[o["row_prefix"] : o["row_prefix"] + len(seq_lens)] = plan.row_prefix
        rows = o["chunk_rows"]
        npb[rows : rows + used * CASCADE_ROWS] = plan.chunk_rows.reshape(-1)
        npb[o["chunk_prefix"] : o["chunk_prefix"] + used] = plan.chunk_prefix
        npb[o["chunk_leader"] : o["chunk_leader"] + used] = plan.chunk_leader
        npb[o["chunk_prefix"] + used : o["chunk_prefix"] + max_chunks(size)] = 0
        return True


class PrefillGraphs:
    """Captured forwards of a one-sequence prefill step of up to PREFILL_BUCKETS[-1] tokens over
    any cached prefix, plus the logits of its last token."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, block_size: int, max_model_len: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.buckets = PREFILL_BUCKETS
        self.max_tokens = self.buckets[-1]
        self.max_model_len = max_model_len
        self.width = -(-max_model_len // block_size)
        n = self.max_tokens
        # ids | positions | slots (n each) | seq_len | query_start_loc (2) | logits row | block table
        self._offsets, total = _layout({"ids": n, "pos": n, "slots": n, "seq_lens": 1, "qsl": 2, "row": 1, "tables": self.width})
        device = next(model.parameters()).device
        self._host = torch.zeros(total, dtype=torch.long, pin_memory=True)
        self._np = self._host.numpy()
        o = self._offsets
        self._np[o["slots"] : o["slots"] + n] = -1
        self._np[o["seq_lens"]] = 1
        self._np[o["qsl"] : o["qsl"] + 2] = (0, 1)
        self._dev = self._host.to(device)
        self._event: torch.cuda.Event | None = None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}

    def _view(self, name: str, length: int) -> torch.Tensor:
        start = self._offsets[name]
        return self._dev[start : start + length]

    def _meta(self, tokens: int) -> AttentionMetadata:
        # Host lists are nominal: a long context and `tokens` new tokens, so the attention plan
        # (query blocks, key splits) covers any real length in the bucket and never takes the
        # fresh-prefill shortcut.
        step = StepInput(self.block_size, query_lens=[tokens], seq_lens=[self.max_model_len])
        return AttentionMetadata.from_step(
            step, self._view("pos", tokens), self._view("slots", tokens), self._view("qsl", 2),
            self._view("seq_lens", 1), self._view("tables", self.width).view(1, self.width),
            lengths_are_nominal=True,
        )  # fmt: skip

    def _forward(self, tokens: int, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.model(self._view("ids", tokens), meta, self.kv_cache)
        return self.model.compute_logits(hidden.index_select(0, self._view("row", 1)))

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        for tokens in reversed(self.buckets):
            meta = self._meta(tokens)
            self._forward(tokens, meta)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with _no_gc(), torch.cuda.graph(graph, pool=pool):
                logits = self._forward(tokens, meta)
            pool = graph.pool()
            self._graphs[tokens] = graph
            self._logits[tokens] = logits
        torch.cuda.synchronize()

    def can_run(self, num_tokens: int, num_blocks: int) -> bool:
        return 1 < num_tokens <= self.max_tokens and num_blocks <= self.width

    def run(self, step: StepInput) -> torch.Tensor:
        """A one-sequence step (its new tokens at the end of its context) -> logits of its last
        token [1, vocab]."""
        T = step.num_tokens
        block_ids = step.block_tables[0]
        bucket = next(b for b in self.buckets if b >= T)
        o, npb = self._offsets, self._np
        if self._event is not None:
            self._event.synchronize()
        npb[o["ids"] : o["ids"] + T] = step.token_ids
        npb[o["pos"] : o["pos"] + T] = step.positions
        npb[o["slots"] : o["slots"] + T] = step.slot_mapping
        npb[o["ids"] + T : o["ids"] + bucket] = 0
        npb[o["pos"] + T : o["pos"] + bucket] = 0
        npb[o["slots"] + T : o["slots"] + bucket] = -1
        npb[o["seq_lens"]] = step.seq_lens[0]
        npb[o["qsl"] + 1] = T
        npb[o["row"]] = T - 1
        npb[o["tables"] : o["tables"] + len(block_ids)] = block_ids
        end = o["tables"] + len(block_ids)
        self._dev[:end].copy_(self._host[:end], non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        self._graphs[bucket].replay()
        return self._logits[bucket]
