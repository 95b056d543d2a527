"""radixserve's LLMEngine in a process of its own, for bench/bench_cpu_ttft.py --baseline-tree: the
same in-process measurement as the bench's own engine, on another checkout's code (the working
directory and PYTHONPATH the bench gives it), so before and after run side by side in one run.

    python bench/radixserve_worker.py THREADS        (run with cwd = the other checkout)

One JSON command per stdin line ({"ids": [...]}), one answer per stdout line ({"ttft", "text"});
the first line written is {"ready": true}. It uses only LLMEngine's public surface.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import torch

    torch.set_num_threads(int(sys.argv[1]))
    from radixserve.config import CacheConfig, EngineConfig, ModelConfig
    from radixserve.engine import LLMEngine
    from radixserve.sampling import SamplingParams

    engine = LLMEngine(EngineConfig(model=ModelConfig(show_progress=False), cache=CacheConfig(num_blocks=1024)))
    import radixserve

    print(json.dumps({"ready": True, "radixserve": radixserve.__file__}), flush=True)
    for line in sys.stdin:
        ids = json.loads(line)["ids"]
        start = time.perf_counter()
        engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0))
        text = ""
        while engine.has_unfinished_requests():
            text += "".join(out.new_text for out in engine.step())
        print(json.dumps({"ttft": time.perf_counter() - start, "text": text}), flush=True)


if __name__ == "__main__":
    main()
