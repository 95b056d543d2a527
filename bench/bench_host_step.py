"""Host cost of an engine step, with the model replaced by a no-op (CPU): what the scheduler, the
step record, sampling and post-processing cost per step, without the forward pass.

    PYTHONPATH=. python3 bench/bench_host_step.py [BATCH]        (default 32)
    PYTHONPATH=. python3 bench/bench_host_step.py --workload issue18 [--bursts 3] [--json FILE]

Run it from two trees (e.g. a `git worktree` of the old one) to compare their host paths.

BATCH: each of BATCH requests has a 1024-token prompt (dummy:tiny weights) and decodes with
ignore_eos; the figure is the best of 5 rounds of 40 decode steps (the CPU runner's path).

--workload issue18: the issue #18 workload of bench/probe_steps.py and bench/device_admit.sh (512
requests, 32 groups x 2048-token prefix, +128 new, 128 out, shuffled arrivals, max 128 running,
4096-token steps, policy group, overlap_outputs on) through the real scheduler, cache, engine
step and the GPU runner's host code: a decode-only step fills the decode CUDA graphs' host buffer
(`DecodeGraphs.fill`, cascade planned), any other step builds the eager path's parts and packs
them (`ModelRunner.host_inputs`, `PinnedUploader.pack`); nothing is copied or replayed. Per kind of
step (as probe_steps.py counts them), in ms per step:
  schedule     Scheduler.schedule (admission, the running requests' slots, the StepInput)
  prep         the runner's input preparation: everything the GPU path does before the forward
  cascade      plan_cascade (part of prep)
  post-sample  the engine's work after the sampled tokens are known (appending them, stop checks)
  overlapped   what runs while the GPU computes on the device: rendering the previous step's
               outputs (overlap_outputs), advancing the KV state, the sampler's call
"critical" = post-sample + schedule + prep: the host time between two GPU steps on the device
(step N's tokens are needed before schedule(N+1), so it is not hidden), summed over the burst.
"gc" is the garbage collector's time during the burst by generation (count x ms; a collection
runs wherever an allocation triggers it, so it is inside the figures above too); `--freeze-gc`
builds the engine with SchedulerConfig.freeze_gc.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from radixserve.engine import LLMEngine  # noqa: E402
from radixserve.sampling import SamplingParams  # noqa: E402

KINDS = ("prefill-only", "mixed", "decode-only")
PARTS = ("schedule", "prep", "cascade", "post_sample", "overlapped")


def no_op_model(engine: LLMEngine, rows: int) -> torch.Tensor:
    """Replace the model's forward and logits by near-free slices of preallocated tensors; returns
    the logits tensor (16-wide, row i argmax 15)."""
    hidden, logits = torch.zeros(rows, 8), torch.zeros(rows, 16) + torch.arange(16.0)
    model = engine.loaded.model
    model.forward = lambda input_ids, *args, **kwargs: hidden[: input_ids.shape[0]]
    model.compute_logits = lambda h, *args, **kwargs: logits[: h.shape[0]]
    return logits


def decode_batch(batch: int) -> None:
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(source="dummy:tiny", dtype="float32"),
        cache=CacheConfig(num_blocks=8192, block_size=16),
        scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=65536),
    ))
    no_op_model(engine, 70000)
    rng = random.Random(0)
    for _ in range(batch):
        prompt = [rng.randrange(3, 200) for _ in range(1024)]
        engine.add_request(prompt, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    for _ in range(5):  # the prefills, then all decoding
        engine.step()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(40):
            engine.step()
        best = min(best, (time.perf_counter() - t0) / 40)
    print(f"batch {batch}: host {best * 1e6:.0f} us per decode step (best of 5 x 40 steps)")


class GpuHostPath:
    """Runs an engine's steps through the GPU runner's host code on the CPU and times each part
    of each step (see the module docstring). Wraps the instance's methods; radixserve is unchanged."""

    def __init__(self, engine: LLMEngine, max_model_len: int) -> None:
        import radixserve.cuda_graphs as cuda_graphs
        import radixserve.runner as runner_module
        from radixserve.cuda_graphs import DecodeGraphs, PinnedUploader

        self.engine = engine
        self.records: list[dict] = []
        self.current: dict = {}
        runner, scheduler = engine.runner, engine.scheduler
        runner.model.backend.cascade = True  # as on the GPU (Triton backend): eager steps plan it too
        graphs = DecodeGraphs(runner.model, runner.kv_cache, runner.block_size, scheduler.config.max_num_seqs,
                              max_model_len, cascade=True)  # fmt: skip
        uploader = PinnedUploader(torch.device("cpu"))
        logits = no_op_model(engine, 8192)

        def execute(step):
            t0 = time.perf_counter()
            if step.is_decode and graphs.can_run(step.num_seqs, step.max_blocks):
                graphs.fill(step)
            else:
                parts, tables, _ = runner.host_inputs(step)
                uploader.pack(parts + [tables.reshape(-1)])
            self.current["prep"] = time.perf_counter() - t0
            return logits[: len(step.logits_rows)]

        runner.execute = execute
        plan_cascade = cuda_graphs.plan_cascade

        def timed_plan(*args, **kwargs):
            t0 = time.perf_counter()
            plan = plan_cascade(*args, **kwargs)
            self.current["cascade"] = self.current.get("cascade", 0.0) + time.perf_counter() - t0
            return plan

        cuda_graphs.plan_cascade = runner_module.plan_cascade = timed_plan
        schedule = scheduler.schedule

        def timed_schedule():
            t0 = time.perf_counter()
            plan = schedule()
            self.current["schedule"] = time.perf_counter() - t0
            prefilling = [s.prefilling for s in plan.scheduled]
            self.current["kind"] = "prefill-only" if all(prefilling) else "decode-only" if not any(prefilling) else "mixed"
            return plan

        scheduler.schedule = timed_schedule
        render, postprocess, sample = engine._render, engine._postprocess, engine._sample

        def timed_render(produced):
            t0 = time.perf_counter()
            out = render(produced)
            self.current["render"] = self.current.get("render", 0.0) + time.perf_counter() - t0
            return out

        def timed_sample(*args):
            tokens = sample(*args)
            self.current["sampled_at"] = time.perf_counter()
            return tokens

        def timed_postprocess(*args):
            t0 = time.perf_counter()
            out = postprocess(*args)
            end = time.perf_counter()
            self.current["post_sample"] = end - self.current.get("sampled_at", end)
            self.current["postprocess"] = end - t0
            return out

        engine._render, engine._postprocess, engine._sample = timed_render, timed_postprocess, timed_sample

    def step(self) -> None:
        self.current = {}
        self.engine.step()
        r = self.current
        if "kind" not in r or "prep" not in r:
            return
        r.setdefault("cascade", 0.0)
        r.setdefault("post_sample", 0.0)
        r["overlapped"] = r.get("render", 0.0) + r.get("postprocess", 0.0) - r["post_sample"]
        r["critical"] = r["post_sample"] + r["schedule"] + r["prep"]
        self.records.append(r)

    def summary(self) -> dict:
        out: dict = {}
        for kind in KINDS:
            rs = [r for r in self.records if r["kind"] == kind]
            if rs:
                out[kind] = {"steps": len(rs), **{f"{p}_ms": statistics.mean(r[p] for r in rs) * 1000
                                                  for p in PARTS + ("critical",)}}
        out["critical_s"] = sum(r["critical"] for r in self.records)
        out["overlapped_s"] = sum(r["overlapped"] for r in self.records)
        self.records = []
        return out


def issue18(args: argparse.Namespace) -> None:
    from bench.probe_steps import burst_prompts

    max_model_len = 4096
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(source="dummy:tiny", dtype="float32", show_progress=False, max_model_len=max_model_len),
        cache=CacheConfig(num_blocks=24576, block_size=16),
        scheduler=SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=4096, policy=args.policy,
                                  overlap_outputs=True, freeze_gc=args.freeze_gc),
    ))  # fmt: skip
    path = GpuHostPath(engine, max_model_len)
    collections: dict[int, list[float]] = {}
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collections.setdefault(info["generation"], []).append(time.perf_counter() - started[0])

    gc.callbacks.append(on_gc)
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    rng = random.Random(18)
    results = []
    for burst in range(args.bursts):
        prompts = burst_prompts(rng, args.requests, args.groups, 2048, 128)
        now = time.monotonic()
        collections.clear()
        t0 = time.perf_counter()
        for p in prompts:
            engine.add_request(p, params, arrival_time=now)
        while engine.has_unfinished_requests():
            path.step()
        wall = time.perf_counter() - t0
        gcs = {g: (len(ts), sum(ts) * 1000) for g, ts in sorted(collections.items())}
        s = {"burst": burst + 1, "wall_s": wall, **path.summary(), "gc": {str(g): v for g, v in gcs.items()},
             "gc_s": sum(v[1] for v in gcs.values()) / 1000, "gc_max_ms": max((max(ts) * 1000 for ts in collections.values()), default=0.0)}
        results.append(s)
        kinds = "; ".join(f"{k} {v['steps']} x critical {v['critical_ms']:.2f} ms (schedule {v['schedule_ms']:.2f}, "
                          f"prep {v['prep_ms']:.2f} [cascade {v['cascade_ms']:.2f}], post-sample {v['post_sample_ms']:.2f}; "
                          f"overlapped {v['overlapped_ms']:.2f})" for k, v in s.items() if k in KINDS)
        print(f"burst {burst + 1}: wall {wall:.2f} s, critical host {s['critical_s']:.3f} s, overlapped "
              f"{s['overlapped_s']:.3f} s; {kinds}; gc " + ", ".join(f"gen{g} {n} x {ms / max(1, n):.1f} ms"
              for g, (n, ms) in gcs.items()) + f" (longest {s['gc_max_ms']:.0f} ms)", flush=True)
    gc.callbacks.remove(on_gc)
    engine.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "bursts": results}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batch", nargs="?", type=int, default=32)
    parser.add_argument("--workload", choices=("decode", "issue18"), default="decode")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--policy", default="group")
    parser.add_argument("--freeze-gc", action="store_true", help="SchedulerConfig.freeze_gc (issue18 workload)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.workload == "issue18":
        issue18(args)
    else:
        decode_batch(args.batch)


if __name__ == "__main__":
    main()
