"""ModelRunner: turns a scheduled batch into tensors, runs the model, returns logits.

It owns the KV tensors and never makes caching decisions: the scheduler and the cache
manager decide which blocks hold what; the runner just writes and reads them.
"""

from __future__ import annotations

import numpy as np
import torch

from radixserve.config import CacheConfig
from radixserve.model.attention import AttentionMetadata, KVCache
from radixserve.model.loader import LoadedModel
from radixserve.scheduler import ScheduledRequest

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


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
    ) -> None:
        self.model = loaded.model
        self.arch = loaded.arch
        self.block_size = cache.block_size
        param = next(self.model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.kv_cache = KVCache.allocate(self.arch, num_blocks, self.block_size, self.dtype, self.device)
        self._uploader = None
        self.graphs = None
        self.prefill_graphs = None
        if self.device.type == "cuda":
            from radixserve.cuda_graphs import DecodeGraphs, PinnedUploader, PrefillGraphs

            self._uploader = PinnedUploader(self.device)
            if cuda_graphs and max_num_seqs > 0 and self.model.backend.kernels is not None:
                max_len = max_model_len or self.arch.max_position_embeddings
                self.graphs = DecodeGraphs(self.model, self.kv_cache, self.block_size, max_num_seqs, max_len)
                pool = self.graphs.capture()
                self.prefill_graphs = PrefillGraphs(self.model, self.kv_cache, self.block_size, max_len)
                self.prefill_graphs.capture(pool)

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledRequest], logits_for: list[bool]) -> torch.Tensor:
        """Compute K/V for each request's next tokens; return logits [n, vocab] (fp32; on CPU
        for a CPU model, on the GPU for a GPU model) for the requests whose `logits_for` flag is
        set (those about to sample), in order."""
        if self.graphs is not None and all(logits_for) and all(s.num_new_tokens == 1 for s in batch):
            if self.graphs.can_run(len(batch), max(len(s.kv.block_ids) for s in batch)):
                return self._run_graph(batch)
        if self.prefill_graphs is not None and len(batch) == 1:
            item = batch[0]
            if self.prefill_graphs.can_run(item.num_new_tokens, len(item.kv.block_ids)):
                logits = self._run_prefill_graph(item)
                return logits if logits_for[0] else logits[:0]
        meta, input_ids, logits_rows = self._prepare(batch, logits_for)
        hidden = self.model(input_ids, meta, self.kv_cache)
        if not logits_rows:
            return torch.empty(0, self.arch.vocab_size)
        if self._uploader is not None:  # GPU: the rows came up with the metadata
            return self.model.compute_logits(hidden.index_select(0, meta.backend_state.pop("logits_rows")))
        rows = torch.tensor(logits_rows, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows)).float().cpu()

    def _run_graph(self, batch: list[ScheduledRequest]) -> torch.Tensor:
        ids, positions, slots, seq_lens = [], [], [], []
        bs = self.block_size
        for item in batch:
            request = item.request
            pos = item.kv.num_computed_tokens
            ids.append(request.token_slice(pos, pos + 1)[0])
            positions.append(pos)
            slots.append(item.kv.block_ids[pos // bs] * bs + pos % bs)
            seq_lens.append(pos + 1)
        return self.graphs.run(ids, positions, slots, seq_lens, [s.kv.block_ids for s in batch])

    def _run_prefill_graph(self, item: ScheduledRequest) -> torch.Tensor:
        request = item.request
        start = item.kv.num_computed_tokens
        end = start + item.num_new_tokens
        bs = self.block_size
        blocks = item.kv.block_ids
        slots = [blocks[p // bs] * bs + p % bs for p in range(start, end)]
        return self.prefill_graphs.run(request.token_slice(start, end), start, slots, blocks)

    def _prepare(self, batch: list[ScheduledRequest], logits_for: list[bool]):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        query_lens: list[int] = []
        logits_rows: list[int] = []
        max_blocks = 1
        for item, wants_logits in zip(batch, logits_for):
            request = item.request
            start = item.kv.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids.extend(request.token_slice(start, end))
            positions.extend(range(start, end))
            blocks = item.kv.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + item.num_new_tokens)
            seq_lens.append(end)
            query_lens.append(item.num_new_tokens)
            max_blocks = max(max_blocks, len(blocks))
            if wants_logits:
                logits_rows.append(query_start[-1] - 1)
        if self._uploader is not None:
            return self._prepare_gpu(batch, input_ids, positions, slots, query_start, seq_lens, query_lens, logits_rows, max_blocks)
        tables = torch.zeros(len(batch), max_blocks, dtype=torch.long)
        for i, item in enumerate(batch):
            blocks = item.kv.block_ids
            if blocks:
                tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        dev = self.device
        meta = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.long, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=dev),
            block_tables=tables.to(dev),
            query_lens=query_lens,
            seq_lens_list=seq_lens,
        )
        return meta, torch.tensor(input_ids, dtype=torch.long, device=dev), logits_rows

    def _prepare_gpu(self, batch, input_ids, positions, slots, query_start, seq_lens, query_lens, logits_rows, max_blocks):
        """Same metadata as the CPU path, uploaded in one pinned copy (each separate small
        host->device copy costs a synchronous ~10-20 us)."""
        tables = np.zeros((len(batch), max_blocks), dtype=np.int64)
        for i, item in enumerate(batch):
            blocks = item.kv.block_ids
            tables[i, : len(blocks)] = blocks
        ids_t, pos_t, slots_t, qsl_t, lens_t, rows_t, tables_t = self._uploader.upload(
            [input_ids, positions, slots, query_start, seq_lens, logits_rows, tables.reshape(-1)]
        )
        meta = AttentionMetadata(
            positions=pos_t,
            slot_mapping=slots_t,
            query_start_loc=qsl_t,
            seq_lens=lens_t,
            block_tables=tables_t.view(len(batch), max_blocks),
            query_lens=query_lens,
            seq_lens_list=seq_lens,
        )
        meta.backend_state["logits_rows"] = rows_t
        return meta, ids_t, logits_rows
