"""ModelRunner: turns a step's host metadata (StepInput) into tensors, runs the model, returns logits.

It owns the KV tensors and never makes caching decisions: the scheduler and the cache
manager decide which blocks hold what; the runner just writes and reads them.
"""

from __future__ import annotations

import numpy as np
import torch

from radixserve.config import CacheConfig
from radixserve.model.attention import AttentionMetadata, KVCache
from radixserve.model.cascade import CascadeMetadata, CascadePlan, plan_cascade
from radixserve.model.loader import LoadedModel
from radixserve.step import BlockTableRows, StepInput

def determine_num_blocks(loaded: LoadedModel, cache: CacheConfig, dtype: torch.dtype, device: torch.device) -> int:
    """Pool size: explicit, else from free GPU memory, else from the CPU memory budget."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    bytes_per_block = loaded.arch.kv_bytes_per_token(dtype) * cache.block_size
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_elsewhere = total - free
        budget = total * cache.gpu_memory_utilization - used_elsewhere
        # leave room for activations of the largest step
        budget -= 2 * 1024**3
        return max(int(budget // bytes_per_block), 16)
    return max(int(cache.kv_cache_memory_gb * 1024**3 // bytes_per_block), 16)


class ModelRunner:
    """On CUDA (with the Triton backend) decode-only steps replay captured CUDA graphs and
    metadata goes up in one pinned copy; see radixserve/cuda_graphs.py. CPU is unchanged."""

    def __init__(
        self,
        loaded: LoadedModel,
        cache: CacheConfig,
        num_blocks: int,
        max_num_seqs: int = 0,
        max_model_len: int | None = None,
        cuda_graphs: bool = True,
        deterministic: bool = False,
        packed_weights: bool = True,
        cascade_attention: bool = True,
    ) -> None:
        self.model = loaded.model
        self.arch = loaded.arch
        self.block_size = cache.block_size
        param = next(self.model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.kv_cache = KVCache.allocate(self.arch, num_blocks, self.block_size, self.dtype, self.device)
        # Before any graph capture: the graphs record whichever kernels the mode picks. Set on
        # every runner (a LoadedModel may be shared by engines of either mode, one at a time).
        self.model.set_deterministic(deterministic, max_model_len)
        # CPU only (a no-op elsewhere); deterministic mode's own matmuls take precedence anyway.
        self.packed_weights = self.model.set_packed_weights(packed_weights and not deterministic)
        # Cascade attention: the Triton backend only, never in deterministic mode (it changes the
        # order in which a row's keys are reduced). Before the graph capture, which records it.
        backend = self.model.backend
        backend.cascade, self._eager_cascade_rows = cascade_attention and backend.kernels is not None and not deterministic, 0
        self._uploader = self.graphs = self.prefill_graphs = None
        self._table_rows = BlockTableRows(np.zeros((0, 0), dtype=np.int64))  # grown by the first eager step
        if self.device.type == "cuda":
            from radixserve.cuda_graphs import DecodeGraphs, PinnedUploader, PrefillGraphs

            self._uploader = PinnedUploader(self.device)
            if cuda_graphs and max_num_seqs > 0 and self.model.backend.kernels is not None:
                max_len = max_model_len or self.arch.max_position_embeddings
                self.graphs = DecodeGraphs(self.model, self.kv_cache, self.block_size, max_num_seqs, max_len, backend.cascade)
                pool = self.graphs.capture()
                self.prefill_graphs = PrefillGraphs(self.model, self.kv_cache, self.block_size, max_len)
                self.prefill_graphs.capture(pool)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        """Compute K/V for the step's new tokens; return the logits [len(step.logits_rows), vocab]
        (fp32; on the CPU for a CPU model, on the GPU for a GPU model) of its logits rows, in order.
        The step's block copies (copy-on-write of forked choices) go first, on every path."""
        self.kv_cache.copy_blocks(step.block_copies)
        if self.graphs is not None and step.is_decode and self.graphs.can_run(step.num_seqs, step.max_blocks):
            return self.graphs.run(step)
        if self.prefill_graphs is not None and step.num_seqs == 1:
            if self.prefill_graphs.can_run(step.num_tokens, step.max_blocks):
                logits = self.prefill_graphs.run(step)
                return logits if step.logits_rows else logits[:0]
        meta, input_ids, rows = self._device_inputs(step)
        hidden = self.model(input_ids, meta, self.kv_cache)
        if not step.logits_rows:
            return torch.empty(0, self.arch.vocab_size)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        return logits if self._uploader is not None else logits.float().cpu()

    def _device_inputs(self, step: StepInput) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
        """The step's lists as device tensors: (metadata, input ids, logits rows). On the GPU they
        go up in one pinned copy (each separate small host->device copy costs a synchronous
        ~10-20 us)."""
        parts, tables, cascade = self.host_inputs(step)
        if self._uploader is not None:
            *lists, flat_tables = self._uploader.upload(parts + [tables.reshape(-1)])
        else:
            lists = [torch.tensor(p, dtype=torch.long, device=self.device) for p in parts]
            flat_tables = torch.from_numpy(tables).to(self.device)
        ids, positions, slots, query_start, seq_lens, rows = lists[:6]
        cascade_meta = None
        if cascade is not None:
            cascade_meta = CascadeMetadata(*lists[6:], cascade.num_chunks, cascade.chunk_rows.shape[1])
        block_tables = flat_tables.view(step.num_seqs, step.max_blocks)
        meta = AttentionMetadata.from_step(step, positions, slots, query_start, seq_lens, block_tables,
                                           cascade=cascade_meta)  # fmt: skip
        return meta, ids, rows

    def host_inputs(self, step: StepInput) -> tuple[list, np.ndarray, CascadePlan | None]:
        """The host half of `_device_inputs`: (the int64 parts to upload, in order, the block
        tables [B, max_blocks], the step's cascade plan or None)."""
        tables = self._block_tables(step)
        parts = [step.token_ids, step.positions, step.slot_mapping, step.query_start_loc, step.seq_lens, step.logits_rows]
        cascade = self._plan_cascade(step, tables)
        if cascade is not None:
            parts += [cascade.row_prefix, cascade.chunk_rows.reshape(-1), cascade.chunk_prefix, cascade.chunk_leader]
        return parts, tables, cascade

    def _block_tables(self, step: StepInput) -> np.ndarray:
        """padded_block_tables(step), converting only the rows that changed since the last eager
        step (a copy: the array is rewritten by the next step)."""
        rows = self._table_rows
        if not rows.fits(step.num_seqs, step.max_blocks):
            shape = (max(step.num_seqs, rows.array.shape[0]), max(step.max_blocks, rows.array.shape[1]))
            rows = self._table_rows = BlockTableRows(np.zeros(shape, dtype=np.int64))
        return rows.write(step.block_tables)[:, : step.max_blocks].copy()

    def _plan_cascade(self, step: StepInput, tables: np.ndarray) -> CascadePlan | None:
        """The cascade of an eager step's decode rows (a mixed step's, mostly: decode-only steps
        replay graphs, which plan their own), when the backend does cascade attention."""
        if not self.model.backend.cascade:
            return None
        decode = np.flatnonzero(np.asarray(step.query_lens) == 1)
        if decode.shape[0] < 2:
            return None
        plan = plan_cascade(tables, np.asarray(step.seq_lens), self.block_size, rows=decode)
        if plan is not None:
            self._eager_cascade_rows += plan.shared_rows
        return plan

    @property
    def cascade_rows(self) -> int:
        """Decode rows that read a shared prefix through cascade attention so far (a row counts
        once per step): 0 when it is off or nothing was shared."""
        return self._eager_cascade_rows + (self.graphs.cascade_rows if self.graphs is not None else 0)
