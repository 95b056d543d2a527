"""What each CPU time-to-first-token change of issue #18 buys, one at a time, in one run.

    .venv/bin/python bench/bench_cpu_ttft_parts.py [--threads 1] [--rounds 8] [--write-docs]

1. The forward pass of a short question over a long cached prompt (17 new tokens over 1536
   cached, the embedded model, plus the LM head on the last row), with the linear layers on
   oneDNN-packed weights vs plain F.linear, alternating. Both the process's CPU time and the wall
   time are reported: on a loaded shared machine CPU time at one thread is the steadier figure.
2. Tokenizing the chat prompt the way the server does (server/prompting.build_prompt) for a
   1538-token system prompt + a question, with the tokenizer's memory of long pieces vs without.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_cpu_ttft import SYSTEM_TOKENS, messages, system_text  # noqa: E402
from bench.report import markdown_table, update_section  # noqa: E402
from radixserve.config import ModelConfig  # noqa: E402
from radixserve.model.attention import AttentionMetadata, KVCache  # noqa: E402
from radixserve.model.loader import load_model  # noqa: E402
from radixserve.model.tokenizer import Tokenizer  # noqa: E402
from radixserve.server.prompting import ChatTurn, build_prompt  # noqa: E402

BLOCK_SIZE, CACHED, NEW = 16, 1536, 17


def timed(fn) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def median_row(title: str, samples: list[tuple[float, float]], decimals: int) -> list:
    """A table row: title, samples, median CPU and wall time (ms) of `timed` samples."""
    cpu = statistics.median(s[0] for s in samples)
    wall = statistics.median(s[1] for s in samples)
    return [title, len(samples), f"{cpu * 1000:.{decimals}f} ms", f"{wall * 1000:.{decimals}f} ms"]


def forward_rows(loaded, rounds: int, profile: bool = False) -> list[list[str]]:
    model = loaded.model
    num_blocks = (CACHED + NEW + BLOCK_SIZE - 1) // BLOCK_SIZE
    table = list(range(num_blocks))
    kv = KVCache.allocate(loaded.arch, num_blocks, BLOCK_SIZE, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    model(torch.randint(0, loaded.arch.vocab_size, (CACHED,), generator=gen),
          AttentionMetadata.build([table], [0], [CACHED], BLOCK_SIZE), kv)  # fmt: skip
    ids = torch.randint(0, loaded.arch.vocab_size, (NEW,), generator=gen)

    def step() -> None:
        meta = AttentionMetadata.build([table], [CACHED], [NEW], BLOCK_SIZE)
        model.compute_logits(model(ids, meta, kv)[-1:])

    samples: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(rounds):
        for packed in (False, True):
            model.set_packed_weights(packed)
            step()  # warm
            samples[packed] += [timed(step) for _ in range(3)]
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    model.set_packed_weights(False)
    return [median_row(f"forward, {NEW} new over {CACHED} cached + LM head: {label}", samples[packed], 1)
            for packed, label in ((False, "F.linear (before)"), (True, "oneDNN-packed weights"))]


def tokenize_rows(loaded, rounds: int) -> list[list[str]]:
    tok = loaded.tokenizer
    system = system_text(tok, SYSTEM_TOKENS, seed=1)
    samples: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for r in range(rounds * 3):
        turns = [ChatTurn(m["role"], [m["content"]]) for m in messages(system, r)]
        for memory in (False, True):
            fresh = tok if memory else Tokenizer(tok.backend, chat_template=tok.chat_template,
                                                 bos_token=tok.bos_token, eos_token=tok.eos_token)  # fmt: skip
            samples[memory].append(timed(lambda t=fresh: build_prompt(t, turns)))
    return [median_row(f"build_prompt, {SYSTEM_TOKENS}-token system prompt + question: {label}", samples[memory], 2)
            for memory, label in ((False, "each piece tokenized (before)"), (True, "long pieces remembered"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--profile", action="store_true",
                        help="also print the torch profiler's table of 5 packed forwards (where the time goes)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(ModelConfig(show_progress=False))
    rows = forward_rows(loaded, args.rounds, args.profile) + tokenize_rows(loaded, args.rounds)
    body = (
        f"Embedded model, fp32, {args.threads} thread(s); the two variants of each row alternate. CPU time is "
        "this process's (steadier than wall time on a shared, loaded machine).\n\n"
        + markdown_table(["what", "samples", "CPU time p50", "wall p50"], rows)
    )
    print(body)
    if args.write_docs:
        update_section("cpu-ttft-parts", "CPU: what each time-to-first-token change buys (issue #18)", body)


if __name__ == "__main__":
    main()
