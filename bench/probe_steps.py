"""GPU (device): per-step probe of the issue #18 workload, in-process: start-up time, the first
burst after start-up vs later (warm) bursts, and where each step's time goes by kind of step.

    PYTHONPATH=. python3 bench/probe_steps.py [--requests 512] [--groups 32] [--bursts 2]
        [--overlap off,on,...] [--no-kernel-warmup] [--triton-cache-dir DIR] [--json FILE]
        [--cascade on|off|off,on] [--policy fcfs,group,...]

Workload: Llama-3-8B shape with dummy weights (bf16), `--requests` requests in `--groups` groups
sharing a 2048-token prefix, + 128 new tokens each, 128 output tokens (ignore_eos); all added at
once, run until done. Each burst uses new random prefixes (the same hit rate every burst).
Engine: max_num_seqs 128, max_num_batched_tokens 4096, the rest default.

The probe wraps the scheduler and the runner from outside (it replaces `engine.scheduler.schedule`
and `engine.runner.execute` on the instance; nothing in radixserve changes) and times, per step:
wall (the whole `engine.step()`), schedule (host), execute (host: until the launches return), and
GPU (CUDA events recorded around execute: the span of the step's GPU work, idle gaps inside it
included). Steps are grouped by kind: prefill-only, mixed (prefill chunks + decodes), decode-only.
"host outside GPU" = wall - GPU summed: the Python time between the GPU's steps that an overlapped
scheduler could hide. `--overlap` sets SchedulerConfig.overlap_outputs per burst (one value per
burst, the last repeated), so overlap off and on are compared in one process, on one engine.
`--cascade off,on` builds one engine per value in turn over the same loaded weights (cascade
attention off / on, ModelConfig.cascade_attention) and runs `--bursts` bursts on each: an A/B in
one process ("cascade rows" counts the decode rows that read a shared prefix once per group).
`--policy` sets SchedulerConfig.policy per burst like `--overlap` (e.g. fcfs,fcfs,group,fcfs,group:
prefix-grouped admission off and on, on one engine). `--freeze-gc off,on,...` likewise freezes the
garbage collector's view of every object alive before a burst, or unfreezes it (an A/B of
SchedulerConfig.freeze_gc on one engine).
`--profile-first-step DIR` profiles the first step of every burst (host Python with cProfile inside
torch.profiler's CPU and CUDA activities) and writes DIR/burst<i>-first-step.txt: the first step of
a process against the first step of a warm burst, to find what one pays once.
"new kernel variants" counts the Triton binaries the runner's launchers met for the first time
during a burst (0 once the start-up warm-up covered them all); each is printed (launcher: key)
and kept in the JSON (`new_kernel_variant_keys`).
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


class StepProbe:
    """Wraps one engine's schedule and execute; `step()` runs and records one engine step."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.on_gpu = engine.device.type == "cuda"
        self.records: list[dict] = []
        self._plan = None
        self._timing: tuple = ()
        schedule, execute = engine.scheduler.schedule, engine.runner.execute

        def timed_schedule():
            t0 = time.perf_counter()
            plan = schedule()
            elapsed = time.perf_counter() - t0
            prefilling = [s.prefilling for s in plan.scheduled]  # now: postprocess appends tokens
            kind = "prefill-only" if all(prefilling) else "decode-only" if not any(prefilling) else "mixed"
            self._plan = (plan, kind, elapsed)
            return plan

        def timed_execute(step):
            if not self.on_gpu:  # a CPU smoke run: the forward is all host time
                t0 = time.perf_counter()
                logits = execute(step)
                self._timing = (None, None, time.perf_counter() - t0)
                return logits
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            logits = execute(step)
            end.record()
            self._timing = (start, end, time.perf_counter() - t0)
            return logits

        engine.scheduler.schedule = timed_schedule
        engine.runner.execute = timed_execute

    def step(self, profile_to: Path | None = None) -> None:
        self._plan, self._timing = None, ()
        t0 = time.perf_counter()
        if profile_to is None:
            self.engine.step()
        else:
            profile_step(self.engine, profile_to)
        wall = time.perf_counter() - t0
        if self._plan is None or not self._timing:
            return
        plan, kind, schedule_s = self._plan
        start, end, execute_s = self._timing
        self.records.append({"kind": kind, "wall": wall, "schedule": schedule_s, "execute_host": execute_s,
                             "events": (start, end), "tokens": plan.step.num_tokens, "seqs": plan.step.num_seqs})

    def summary(self) -> dict:
        if self.on_gpu:
            torch.cuda.synchronize()
        for r in self.records:
            start, end = r.pop("events")
            r["gpu"] = start.elapsed_time(end) / 1000 if start is not None else r["execute_host"]
        out: dict = {}
        for kind in KINDS:
            rs = [r for r in self.records if r["kind"] == kind]
            if not rs:
                continue
            out[kind] = {
                "steps": len(rs),
                "wall_s": sum(r["wall"] for r in rs),
                "gpu_s": sum(r["gpu"] for r in rs),
                **{f"{k}_ms_mean": statistics.mean(r[k] for r in rs) * 1000
                   for k in ("wall", "gpu", "schedule", "execute_host")},
                "wall_ms_max": max(r["wall"] for r in rs) * 1000,
                "tokens_mean": statistics.mean(r["tokens"] for r in rs),
                "seqs_mean": statistics.mean(r["seqs"] for r in rs),
            }
        out["all"] = {
            "steps": len(self.records),
            "wall_s": sum(r["wall"] for r in self.records),
            "gpu_s": sum(r["gpu"] for r in self.records),
            "host_outside_gpu_s": sum(max(0.0, r["wall"] - r["gpu"]) for r in self.records),
        }
        self.records = []
        return out


def profile_step(engine: LLMEngine, path: Path) -> None:
    """One engine step under cProfile and torch.profiler; the top entries of both go to `path`."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    python = cProfile.Profile()
    t0 = time.perf_counter()
    with profile(activities=activities) as ops:
        python.enable()
        engine.step()
        python.disable()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    text = io.StringIO()
    pstats.Stats(python, stream=text).sort_stats("cumulative").print_stats(45)
    averages = ops.key_averages()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"step wall under both profilers: {elapsed * 1000:.1f} ms\n\n== host ops by self CPU time\n"
        + averages.table(sort_by="self_cpu_time_total", row_limit=30)
        + ("\n== ops by device time\n" + averages.table(sort_by="self_cuda_time_total", row_limit=20)
           if engine.device.type == "cuda" else "")
        + "\n== Python, cumulative\n" + text.getvalue())


def burst_prompts(rng: random.Random, requests: int, groups: int, prefix_len: int, question_len: int,
                  grouped: bool = False) -> list[list[int]]:
    """Random token ids below 250 (valid in every preset's vocabulary, dummy:tiny's included).
    Shuffled (the issue's workload: ~128 running rows are ~32 groups x 4), or grouped: a group's
    requests arrive one after another (a batch of questions over one document; the running rows
    are ~8 groups x 16)."""
    prefixes = [[rng.randrange(3, 250) for _ in range(prefix_len)] for _ in range(groups)]
    prompts = [prefixes[i % groups] + [rng.randrange(3, 250) for _ in range(question_len)] for i in range(requests)]
    rng.shuffle(prompts)
    if grouped:  # stable: the shuffled order within a group
        group_of = {tuple(p): i for i, p in enumerate(prefixes)}
        prompts.sort(key=lambda p: group_of[tuple(p[:prefix_len])])
    return prompts


def kernel_variants() -> set[str]:
    """The compiled variants the Triton launchers hold, as "launcher: key" (empty without Triton):
    a burst's new ones name what the start-up warm-up missed."""
    module = sys.modules.get("radixserve.model.triton_kernels")
    if module is None:
        return set()
    return {f"{name}: {key}" for name, launcher in vars(module).items() if isinstance(launcher, module._Launcher)
            for key in launcher.cache}


def run_burst(engine: LLMEngine, probe: StepProbe, prompts: list[list[int]], max_tokens: int, grouped: bool = False,
              profile_first_step: Path | None = None) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    variants0 = kernel_variants()
    cascade0 = engine.cascade_rows
    hits0, queries0 = engine.snapshot().prefix_cache_hits, engine.snapshot().prefix_cache_queries
    t0 = time.perf_counter()
    now = time.monotonic()
    for p in prompts:
        engine.add_request(p, params, arrival_time=now)
    profile_to = profile_first_step
    while engine.has_unfinished_requests():
        probe.step(profile_to)
        profile_to = None
    elapsed = time.perf_counter() - t0
    snap = engine.snapshot()
    new_variants = sorted(kernel_variants() - variants0)
    return {"requests": len(prompts), "elapsed_s": elapsed, "req_per_s": len(prompts) / elapsed,
            "overlap_outputs": engine.config.scheduler.overlap_outputs, "new_kernel_variants": len(new_variants),
            "new_kernel_variant_keys": new_variants,
            "policy": engine.config.scheduler.policy,
            "cascade_attention": engine.config.model.cascade_attention, "cascade_rows": engine.cascade_rows - cascade0,
            "arrival": "grouped" if grouped else "shuffled",
            "hit_rate": (snap.prefix_cache_hits - hits0) / max(1, snap.prefix_cache_queries - queries0),
            "steps": probe.summary()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--bursts", type=int, default=2)
    parser.add_argument("--overlap", default="off", help="overlap_outputs per burst: off,on,...")
    parser.add_argument("--no-kernel-warmup", action="store_true")
    parser.add_argument("--triton-cache-dir", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--model", default="dummy:llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--lengths", default="2048,128,128", help="prefix, question, output tokens")
    parser.add_argument("--arrival", default="shuffled", help="per burst: shuffled (the issue's) or grouped (a group's "
                        "requests one after another), e.g. shuffled,grouped")
    parser.add_argument("--cascade", default=None, help="cascade attention per engine: on, off, or off,on (an A/B)")
    parser.add_argument("--policy", default="fcfs", help="SchedulerConfig.policy per burst: fcfs,group,...")
    parser.add_argument("--freeze-gc", default="off", help="per burst, like --overlap: on freezes every object "
                        "alive before the burst (gc.freeze, what SchedulerConfig.freeze_gc does after start-up), off unfreezes")
    parser.add_argument("--profile-first-step", default=None, metavar="DIR",
                        help="profile each burst's first step into DIR/burst<i>-first-step.txt")
    args = parser.parse_args()
    cascades = [None] if args.cascade is None else [v == "on" for v in args.cascade.split(",")]
    loaded = None
    result: dict = {}
    for cascade in cascades:
        if len(cascades) > 1:
            print(f"== cascade attention {'on' if cascade else 'off'}", flush=True)
        result, loaded = run_engine(args, cascade, loaded)
        if len(cascades) > 1:
            args_key = "cascade_on" if cascade else "cascade_off"
            if args.json:
                path = Path(args.json)
                path.with_name(f"{path.stem}-{args_key}{path.suffix}").write_text(json.dumps(result, indent=1))


def run_engine(args, cascade: bool | None, loaded) -> tuple[dict, object]:
    """Build an engine (over `loaded` when given), run the bursts; (result, loaded weights)."""
    prefix_len, question_len, max_tokens = map(int, args.lengths.split(","))
    t0 = time.perf_counter()
    model = ModelConfig(source=args.model, device=args.device, max_model_len=4096, show_progress=False,
                        kernel_warmup=not args.no_kernel_warmup, triton_cache_dir=args.triton_cache_dir)
    if cascade is not None:
        model.cascade_attention = cascade
    cache = CacheConfig(gpu_memory_utilization=0.85) if args.device != "cpu" else CacheConfig(num_blocks=2048)
    config = EngineConfig(model=model, cache=cache, scheduler=SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=4096))
    engine = LLMEngine(config, loaded=loaded)
    result = {"args": vars(args), "startup_s": time.perf_counter() - t0, "startup_phases_s": engine.startup_seconds,
              "device": torch.cuda.get_device_name(0) if args.device != "cpu" else "cpu", "bursts": [],
              "cascade_attention": model.cascade_attention, "num_kv_blocks": engine.num_kv_blocks}
    print(f"start-up {result['startup_s']:.1f} s {engine.startup_seconds}, {engine.num_kv_blocks} KV blocks", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    probe = StepProbe(engine)
    rng = random.Random(18)
    overlap = [v == "on" for v in args.overlap.split(",")]
    arrival = args.arrival.split(",")
    policy = args.policy.split(",")
    freeze = [v == "on" for v in args.freeze_gc.split(",")]
    for i in range(args.bursts):
        frozen = freeze[min(i, len(freeze) - 1)]
        if frozen:
            gc.collect()
            gc.freeze()
        else:
            gc.unfreeze()
        engine.config.scheduler.overlap_outputs = overlap[min(i, len(overlap) - 1)]
        engine.config.scheduler.policy = policy[min(i, len(policy) - 1)]  # the queue is empty between bursts
        grouped = arrival[min(i, len(arrival) - 1)] == "grouped"
        prompts = burst_prompts(rng, args.requests, args.groups, prefix_len, question_len, grouped)
        profile_to = Path(args.profile_first_step) / f"burst{i + 1}-first-step.txt" if args.profile_first_step else None
        burst = run_burst(engine, probe, prompts, max_tokens, grouped, profile_to)
        burst["freeze_gc"] = frozen
        result["bursts"].append(burst)
        steps = burst["steps"]
        kinds = "; ".join(f"{k} {v['steps']} x {v['wall_ms_mean']:.1f} ms (GPU {v['gpu_ms_mean']:.1f})"
                          for k, v in steps.items() if k != "all")
        print(f"burst {i + 1} ({burst['arrival']}, policy {burst['policy']}, gc {'frozen' if frozen else 'not frozen'}, overlap {'on' if burst['overlap_outputs'] else 'off'}, {burst['new_kernel_variants']} new "
              f"kernel variants, {burst['cascade_rows']} cascade rows): {burst['req_per_s']:.1f} req/s ({burst['elapsed_s']:.2f} s, hit {burst['hit_rate']:.3f}); "
              f"GPU {steps['all']['gpu_s']:.2f} of {steps['all']['wall_s']:.2f} s wall; {kinds}", flush=True)
        for key in burst["new_kernel_variant_keys"]:  # what the start-up warm-up did not compile
            print(f"  new kernel variant {key}", flush=True)
        if args.json:  # after every burst: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(result, indent=1))
    loaded = engine.loaded
    engine.close()
    gc.unfreeze()
    del engine, probe
    if args.device != "cpu":
        gc.collect()
        torch.cuda.empty_cache()
    return result, loaded


if __name__ == "__main__":
    main()
