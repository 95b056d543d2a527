"""Tokenizing a /v1/messages prompt with 4 cache_control breakpoints: before and after "tokenize once".

Before (the code up to this change, kept below as `_before`): the prompt is tokenized in one
call, then each breakpoint tokenizes the prompt text again from the start up to its boundary.
After (radixserve.server.prompting): the prompt is tokenized once in pieces split after the
template's control tokens, and a breakpoint re-tokenizes at most the head of the one piece it
falls in. Both run side by side on the same conversation, on the embedded model's tokenizer and
chat template; the two must agree on every count.

The conversation: tools (breakpoint 1), a long system prompt (breakpoint 2), a long first user
message of two blocks (breakpoint 3 on its first block, inside the message), a long assistant
answer and a last user message (breakpoint 4 on it).

    PYTHONPATH=. python bench/bench_tokenize_breakpoints.py [--words 6000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, update_section  # noqa: E402
from radixserve.config import ModelConfig  # noqa: E402
from radixserve.model.loader import load_model  # noqa: E402
from radixserve.sequences import common_prefix_len  # noqa: E402
from radixserve.server.prompting import ChatTurn, build_prompt, prefix_token_count, render  # noqa: E402
from radixserve.server.tools import ToolSpec  # noqa: E402

WORDS = ("the cache keeps every block of a prompt that another request may share , and the tree finds "
         "them by their tokens . Prefill costs time ; reuse does not ! 42 tokens per block ( or 16 ) "
         "naïve café 東京 — résumé\n").split(" ")


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _before(tokenizer, turns, breakpoints, tools):
    """The previous code: one-shot tokenization, then one re-tokenization per breakpoint."""
    text = render(tokenizer, turns, add_generation_prompt=True, tools=tools)
    ids = tokenizer.encode(text)
    counts = []
    for i, j in breakpoints:
        if i < 0:
            prefix = render(tokenizer, [], add_generation_prompt=False, tools=tools)
        else:
            turn = turns[i]
            prefix = render(tokenizer, list(turns[:i]) + [ChatTurn(turn.role, turn.blocks[: j + 1])],
                            add_generation_prompt=False, tools=tools)
        offset = common_prefix_len(prefix, text)
        counts.append(common_prefix_len(tokenizer.encode(text[:offset]), ids) if offset else 0)
    return ids, counts


def _after(tokenizer, turns, breakpoints, tools):
    prompt = build_prompt(tokenizer, turns, tools=tools)
    return prompt.token_ids, [prefix_token_count(tokenizer, prompt, turns, i, j, tools=tools) for i, j in breakpoints]


def _render_only(tokenizer, turns, breakpoints, tools):
    """What both still do per breakpoint besides tokenizing: render the truncated conversation."""
    for i, j in breakpoints:
        turn = turns[max(i, 0)]
        render(tokenizer, list(turns[: max(i, 0)]) + [ChatTurn(turn.role, turn.blocks[: j + 1])],
               add_generation_prompt=False, tools=tools)


def _one_shot(tokenizer, turns, breakpoints, tools):
    """The floor: one tokenizer call over the whole prompt, no breakpoints."""
    tokenizer.encode(render(tokenizer, turns, add_generation_prompt=True, tools=tools))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--words", type=int, default=6000, help="words per long text (4 of them)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    tokenizer = load_model(ModelConfig(source="embedded", show_progress=False)).tokenizer
    rng = random.Random(0)
    tools = [ToolSpec("get_time", "The time in a city.", {"type": "object", "properties": {"city": {"type": "string"}}})]
    turns = [
        ChatTurn("system", [_text(rng, args.words)]),
        ChatTurn("user", [_text(rng, args.words), "Summarise the above."]),
        ChatTurn("assistant", [_text(rng, args.words)]),
        ChatTurn("user", [_text(rng, args.words // 10)]),
    ]
    breakpoints = [(-1, 0), (0, 0), (1, 0), (3, 0)]
    ids_b, counts_b = _before(tokenizer, turns, breakpoints, tools)
    ids_a, counts_a = _after(tokenizer, turns, breakpoints, tools)
    assert ids_a == ids_b and counts_a == counts_b, (counts_a, counts_b)
    times: dict[str, list[float]] = {"before": [], "after": [], "render only": [], "one-shot encode": []}
    for _ in range(args.repeat):  # interleaved, so both see the same machine load
        for name, fn in (("before", _before), ("after", _after), ("render only", _render_only),
                         ("one-shot encode", _one_shot)):
            t0 = time.perf_counter()
            fn(tokenizer, turns, breakpoints, tools)
            times[name].append(time.perf_counter() - t0)
    text_chars = len(render(tokenizer, turns, tools=tools))
    print(f"prompt: {len(ids_a)} tokens, {text_chars} characters; breakpoint counts {counts_a}")
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for name, ms in med.items():
        print(f"{name:16s} median {ms:8.1f} ms  (of {args.repeat})")
    print(f"after / before = {med['after'] / med['before']:.2f}")
    rows = [[name, f"{ms:.1f} ms"] for name, ms in med.items()]
    body = (
        f"A /v1/messages conversation of {len(ids_a)} prompt tokens ({text_chars} characters: tools, a system prompt, "
        f"a two-block user message, an assistant answer, a last user message) with 4 cache_control breakpoints "
        f"(after the tools, the system prompt, the first block of the user message, the last message), counted "
        f"{counts_a} tokens (identical before and after). Median of {args.repeat} interleaved runs; the embedded "
        "model's tokenizer and chat template. Before: one tokenization of the prompt, then one per breakpoint from "
        "the start up to it. After: one tokenization in pieces cut at the template's control tokens; a breakpoint "
        "re-tokenizes only the head of the piece it falls in (here the user message's first block), nothing for one "
        "that ends a message.\n\n"
        + markdown_table(["", "time"], rows)
        + f"\n\nafter / before = **{med['after'] / med['before']:.2f}** (the floor, one tokenizer call over the "
        "prompt, is the last row; rendering the truncated conversations is the third)."
    )
    update_section("cpu-tokenize-breakpoints", "CPU: tokenizing a /v1/messages prompt with 4 breakpoints", body)


if __name__ == "__main__":
    main()
