"""GPU (device): bench_gpu.py's speed phases for the tree given as the first argument, with cProfile
switched on only for the batch-32 decode phase (between its `graph_replay_ms(engine, 1)` and
`graph_replay_ms(engine, 32)` calls), so two trees' host paths can be compared *in* the sequence
that bench_gpu.py measures, not in a fresh engine.

    python3 bench/probe_b32_in_sequence.py TREE [OUT_PREFIX]
"""
import cProfile, io, json, pstats, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/bench")
import bench_gpu  # noqa: E402

prof = cProfile.Profile()
_replay = bench_gpu.graph_replay_ms


def graph_replay_ms(engine, size, prefill=False):
    if size == 32 and not prefill:
        prof.disable()
    result = _replay(engine, size, prefill=prefill)
    if size == 1 and not prefill:
        prof.enable()
    return result


bench_gpu.graph_replay_ms = graph_replay_ms
loaded = bench_gpu.dummy("llama3-8b", "bfloat16", 8192)
out = bench_gpu.our_speed(loaded, 5)
text = io.StringIO()
stats = pstats.Stats(prof, stream=text)
stats.sort_stats("tottime").print_stats(30)
stats.sort_stats("cumtime").print_stats(30)
print(sys.argv[1], json.dumps({k: v for k, v in out.items() if "b32" in k or "b1" in k}))
print(text.getvalue())
