"""ModelRunner: turns a scheduled batch into tensors, runs the model, returns logits.

It owns the KV tensors and never makes caching decisions: the scheduler and the cache
manager decide which blocks hold what; the runner just writes and reads them.
"""

from __future__ import annotations

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
    def __init__(self, loaded: LoadedModel, cache: CacheConfig, num_blocks: int) -> None:
        self.model = loaded.model
        self.arch = loaded.arch
        self.block_size = cache.block_size
        param = next(self.model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.kv_cache = KVCache.allocate(self.arch, num_blocks, self.block_size, self.dtype, self.device)

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledRequest], logits_for: list[bool]) -> torch.Tensor:
        """Compute K/V for each request's next tokens; return logits [n, vocab] (fp32, on CPU)
        for the requests whose `logits_for` flag is set (those about to sample), in order."""
        meta, input_ids, logits_rows = self._prepare(batch, logits_for)
        hidden = self.model(input_ids, meta, self.kv_cache)
        if not logits_rows:
            return torch.empty(0, self.arch.vocab_size)
        rows = torch.tensor(logits_rows, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows)).float().cpu()

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
            start = request.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids.extend(request.all_token_ids[start:end])
            positions.extend(range(start, end))
            blocks = request.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + item.num_new_tokens)
            seq_lens.append(end)
            query_lens.append(item.num_new_tokens)
            max_blocks = max(max_blocks, len(blocks))
            if wants_logits:
                logits_rows.append(query_start[-1] - 1)
        tables = torch.zeros(len(batch), max_blocks, dtype=torch.long)
        for i, item in enumerate(batch):
            blocks = item.request.block_ids
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
