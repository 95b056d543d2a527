"""GPU (device): the batch-32 decode loop of bench_gpu.py on its own, for the tree given as the first
argument: the 8B shape, 32 x 1024-token prompts, 64 decode steps, three passes on one fresh engine
(per-step medians), the first block tables, and torch.profiler tables of one more pass.

    python3 bench/profile_decode_b32.py TREE      (TREE: . or a `git archive` of another commit)
"""
import random, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from torch.profiler import ProfilerActivity, profile
from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from radixserve.engine import LLMEngine
from radixserve.model.loader import load_model
from radixserve.sampling import SamplingParams
mc = ModelConfig(source="dummy:llama3-8b", dtype="bfloat16", device="cuda", show_progress=False, max_model_len=8192)
loaded = load_model(mc)
engine = LLMEngine(EngineConfig(model=mc, cache=CacheConfig(num_blocks=20000), scheduler=SchedulerConfig(max_num_seqs=256)), loaded=loaded)
rng = random.Random(0); V = loaded.arch.vocab_size
def run(prof=None, show=False):
    reqs = [engine.add_request([rng.randrange(3, V) for _ in range(1024)], SamplingParams(max_tokens=65, temperature=0, ignore_eos=True)) for _ in range(32)]
    times = []; shown = False
    while engine.has_unfinished_requests():
        dec = all(r.first_token_time is not None for r in reqs) and not any(r.finished for r in reqs)
        t0 = time.perf_counter(); engine.step(); dt = time.perf_counter() - t0
        if dec:
            times.append(dt)
            if prof: prof.step()
            if show and not shown:
                shown = True
                kv = getattr(engine.cache, "kv", None)
                tabs = [kv(r).block_ids[:4] if kv else r.block_ids[:4] for r in reqs[:3]]
                print("block tables (first 4 of 3 seqs):", tabs)
    return statistics.median(times) * 1000
run(); print(sys.argv[1], "median b32 step ms", [round(run(show=(i == 0)), 3) for i in range(3)])
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    run()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=50))
