"""`radixserve generate`: one prompt (or a chat) in, text out; interactive without a prompt."""

from __future__ import annotations

import argparse
import atexit
import json
import sys

from radixserve.commands.common import add_engine_args, engine_config_from_args
from radixserve.errors import InvalidRequestError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt or chat messages")
    p.add_argument("--prompt", help="the user's message (or raw text with --raw); omit for an interactive chat")
    p.add_argument("--messages", help="a JSON list of {role, content} messages, or @file.json")
    p.add_argument("--system", help="a system prompt for chat mode")
    p.add_argument("--raw", action="store_true", help="send --prompt as raw text, without the chat template")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stats", action="store_true", help="print token counts and timings to stderr")
    add_engine_args(p)
    p.set_defaults(func=run)


def _load_messages(value: str) -> list[dict]:
    text = open(value[1:]).read() if value.startswith("@") else value
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"--messages is not valid JSON: {e}") from None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise InvalidRequestError("--messages must be a JSON list of {\"role\": ..., \"content\": ...} objects")
    return messages


def run(args: argparse.Namespace) -> int:
    from radixserve.llm import LLM
    from radixserve.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=args.stop,
    )
    if args.prompt is not None and not args.prompt.strip():
        raise InvalidRequestError("--prompt must not be empty")
    messages = _load_messages(args.messages) if args.messages else None
    llm = LLM.from_config(engine_config_from_args(args))
    atexit.register(llm.close)  # with --kv-store: the prefix cache is written down for the next run
    system = [{"role": "system", "content": args.system}] if args.system else []

    def answer(conversation_or_prompt) -> str:
        if isinstance(conversation_or_prompt, str):
            out = llm.generate(conversation_or_prompt, params, use_tqdm=False)[0]
        else:
            out = llm.chat(conversation_or_prompt, params, use_tqdm=False)[0]
        if args.stats:
            ttft = out.metrics.time_to_first_token or 0.0
            print(f"[{out.num_prompt_tokens} prompt tokens ({out.num_cached_tokens} cached), "
                  f"{len(out.token_ids)} generated, TTFT {ttft * 1000:.1f} ms, finish: {out.finish_reason}]",
                  file=sys.stderr)
        return out.text

    if messages is not None:
        print(answer(system + messages))
        return 0
    if args.prompt is not None:
        print(answer(args.prompt if args.raw else system + [{"role": "user", "content": args.prompt}]))
        return 0
    # interactive multi-turn chat: each turn re-sends the conversation, so the prefix cache hits
    conversation = list(system)
    print("radixserve chat - empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        conversation.append({"role": "user", "content": line})
        reply = answer(conversation)
        print(reply)
        conversation.append({"role": "assistant", "content": reply})
    return 0
