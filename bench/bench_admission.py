"""Prefix-grouped admission (SchedulerConfig.policy "group") vs fcfs on the issue #18 workload,
host only (CPU): which decode rows run together, what cascade attention could make of them, what
the ordering costs the scheduler, and how long requests wait.

    PYTHONPATH=. python3 bench/bench_admission.py [--requests 512] [--groups 32] [--policies fcfs,group]

The real scheduler and cache manager over a no-op model (dummy:tiny weights; forward and logits
replaced by preallocated tensors, as bench_host_step.py does): 512 requests in 32 groups sharing a
2048-token prefix, + 128 new tokens, 128 output tokens (ignore_eos), all added at once in shuffled
or grouped order (bench/probe_steps.py's bursts); max_num_seqs 128, max_num_batched_tokens 4096.
Every step's decode rows go through the cascade planner (model/cascade.py, `plan_cascade`) on the
step's real block tables: "rows per chunk" is how full the prefix kernel's 16-row tiles are (the
kernel is 1.93x over plain decode at 16 rows a group, 1.25x at 4: docs/benchmarks.md gpu-cascade).
Schedule time is `Scheduler.schedule` per step, the policies side by side in one process.
Waiting time is counted in engine steps from arrival to admission.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.probe_steps import burst_prompts  # noqa: E402
from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from radixserve.engine import LLMEngine  # noqa: E402
from radixserve.model.attention import padded_block_tables  # noqa: E402
from radixserve.model.cascade import plan_cascade  # noqa: E402
from radixserve.sampling import SamplingParams  # noqa: E402


def run(policy: str, prompts: list[list[int]], max_tokens: int, max_overtakes: int) -> dict:
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(source="dummy:tiny", dtype="float32", show_progress=False),
        cache=CacheConfig(num_blocks=24576, block_size=16),
        scheduler=SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=4096, policy=policy,
                                  group_max_overtakes=max_overtakes),
    ))
    hidden, logits = torch.zeros(8192, 8), torch.zeros(8192, 16) + torch.arange(16.0)
    model = engine.loaded.model
    model.forward = lambda input_ids, *args, **kwargs: hidden[: input_ids.shape[0]]
    model.compute_logits = lambda h, *args, **kwargs: logits[: h.shape[0]]
    scheduler = engine.scheduler
    schedule = scheduler.schedule
    steps: list[dict] = []
    admitted_at: dict[str, int] = {}

    def recorded_schedule():
        t0 = time.perf_counter()
        out = schedule()
        elapsed = time.perf_counter() - t0
        for s in out.scheduled:
            admitted_at.setdefault(s.request.request_id, len(steps))
        step = out.step
        decode = np.flatnonzero(np.asarray(step.query_lens) == 1)
        plan = None
        if decode.shape[0] >= 2:
            plan = plan_cascade(padded_block_tables(step), np.asarray(step.seq_lens), 16, rows=decode)
        steps.append({"schedule_s": elapsed, "decode_rows": int(decode.shape[0]),
                      "mixed": bool(decode.shape[0] < step.num_seqs),
                      "cascade_rows": plan.shared_rows if plan else 0, "chunks": plan.num_chunks if plan else 0})
        return out

    scheduler.schedule = recorded_schedule
    ordering = {"calls": 0, "s": 0.0, "queue": 0}
    for name in ("_order_waiting", "_count_overtakes"):  # what the policy adds to a step
        method = getattr(scheduler, name)

        def timed(*a, _method=method, **kw):
            t0 = time.perf_counter()
            _method(*a, **kw)
            ordering["s"] += time.perf_counter() - t0
            ordering["calls"] += _method.__name__ == "_order_waiting"
            ordering["queue"] = max(ordering["queue"], len(scheduler.waiting))

        setattr(scheduler, name, timed)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    now = time.monotonic()
    ids = [engine.add_request(p, params, arrival_time=now, request_id=str(i)).request_id for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    wall = time.perf_counter() - t0
    engine.close()
    waits = [admitted_at[i] for i in ids]
    decode_rows = sum(s["decode_rows"] for s in steps)
    cascade_rows = sum(s["cascade_rows"] for s in steps)
    chunks = sum(s["chunks"] for s in steps)
    return {
        "policy": policy, "steps": len(steps), "mixed_steps": sum(s["mixed"] for s in steps),
        "decode_rows": decode_rows, "cascade_rows": cascade_rows,
        "cascade_row_share": cascade_rows / max(1, decode_rows),
        "rows_per_chunk": cascade_rows / max(1, chunks),
        "schedule_us_mean": statistics.mean(s["schedule_s"] for s in steps) * 1e6,
        "schedule_us_max": max(s["schedule_s"] for s in steps) * 1e6,
        "wait_steps_mean": statistics.mean(waits), "wait_steps_max": max(waits),
        "wait_steps_max_first_half": max(waits[: len(waits) // 2]),
        "wall_s": wall, "ordering_calls": ordering["calls"], "ordering_us_per_call": ordering["s"] / max(1, ordering["calls"]) * 1e6,
        "ordering_max_queue": ordering["queue"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--lengths", default="2048,128,128", help="prefix, question, output tokens")
    parser.add_argument("--policies", default="fcfs,group")
    parser.add_argument("--arrivals", default="shuffled,grouped")
    parser.add_argument("--max-overtakes", type=int, default=SchedulerConfig().group_max_overtakes)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    prefix_len, question_len, max_tokens = map(int, args.lengths.split(","))
    results = []
    for arrival in args.arrivals.split(","):
        prompts = burst_prompts(random.Random(18), args.requests, args.groups, prefix_len, question_len,
                                grouped=arrival == "grouped")
        for policy in args.policies.split(","):
            r = {"arrival": arrival, **run(policy, prompts, max_tokens, args.max_overtakes)}
            results.append(r)
            print(f"{arrival:8} {policy:5}: {r['steps']} steps ({r['mixed_steps']} mixed); decode rows cascaded "
                  f"{r['cascade_row_share']:.1%}, {r['rows_per_chunk']:.1f} rows per chunk; schedule "
                  f"{r['schedule_us_mean']:.0f} us/step (max {r['schedule_us_max']:.0f}); wait {r['wait_steps_mean']:.0f} "
                  f"steps mean, max {r['wait_steps_max']} (first half of arrivals: {r['wait_steps_max_first_half']}); ordering "
                  f"{r['ordering_us_per_call']:.0f} us x {r['ordering_calls']} steps (queue <= {r['ordering_max_queue']})",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
