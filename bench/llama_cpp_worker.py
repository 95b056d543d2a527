"""llama.cpp's side of bench/bench_cpu_ttft.py, run by the interpreter of its own venv (it imports
only llama_cpp and the standard library, never radixserve).

    <llama venv>/bin/python bench/llama_cpp_worker.py MODEL.gguf THREADS

One JSON command per stdin line, one JSON answer per stdout line:
    {"ids": [...], "cold": false}  ->  {"ttft": seconds, "text": first token's text, "n_prompt": N}
`cold` forgets the KV of the one slot first; otherwise `Llama.generate` reuses the longest prefix
the slot already holds (what llama.cpp does for a repeated system prompt), and only the rest is
evaluated. The first line written is {"ready": true, "system_info": ...}.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    model_path, threads = sys.argv[1], int(sys.argv[2])
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=model_path, n_ctx=4096, n_batch=2048, n_ubatch=512, n_threads=threads,
        n_threads_batch=threads, verbose=False,
    )  # fmt: skip
    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    print(json.dumps({"ready": True, "system_info": info, "version": llama_cpp.__version__}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("cold"):
            llm.reset()  # the slot's tokens are forgotten; the next eval overwrites its KV
        start = time.perf_counter()
        out = llm.create_completion(command["ids"], max_tokens=1, temperature=0.0)
        ttft = time.perf_counter() - start
        answer = {"ttft": ttft, "text": out["choices"][0]["text"], "n_prompt": out["usage"]["prompt_tokens"]}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
